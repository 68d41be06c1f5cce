"""The embedded default's build: the synthetic world, its tokenizer and real retriever, the tiny
policy's format warm-up and the tiny simulator fine-tuned from it. zerosearch.py calls
`prepare_embedded` when data=world; the result is cached in out_dir/build/<hash of BUILD_KEYS>/.
"""
import collections
import copy
import hashlib
import json
import os
import random
import shutil

import sim
import world

BUILD_VERSION = 2  # bump when the code changes what a build holds, so old caches are not loaded
BUILD_KEYS = ["world_seed", "world_persons", "world_companies", "tiny_hidden", "tiny_layers", "tiny_heads",
              "warmup_steps", "warmup_batch_size", "warmup_lr", "rl_share", "sim_sft_steps",
              "sim_sft_batch_size", "sim_sft_lr", "sim_sft_noisy", "prompt_template", "direct_template",
              "invalid_action", "sim_template_finetuned", "sim_template_prompted",
              "sim_template_prompted_noisy", "topk", "seed"]


def prepare_embedded(cfg, cache_dir, log=print):
    """Build (or load from `cache_dir`) everything the embedded default needs: the world, its
    tokenizer, the real retriever, the format-warmed tiny policy and the tiny simulator fine-tuned
    from it (as the paper's policy and simulator both start from pretrained Qwen2.5 models).
    The build is cached under a hash of the keys that shape it, written to a temporary folder
    and renamed when complete, so a build killed half-way is built again.
    Returns (world, retriever, simulator path, policy path)."""
    w = world.build_world(cfg["world_seed"], cfg["world_persons"], cfg["world_companies"])
    retriever = sim.Retriever(w.docs)
    key = hashlib.sha1(json.dumps([BUILD_VERSION] + [cfg[k] for k in BUILD_KEYS]).encode()).hexdigest()[:10]
    done = os.path.join(cache_dir, key)
    if os.path.isdir(done):
        log(f"embedded default: loading the world's tokenizer, simulator and warm-up policy from {done}")
        return w, retriever, os.path.join(done, "simulator"), os.path.join(done, "warmup")
    tmp = done + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a build that was killed
    build_models(w, retriever, cfg, os.path.join(tmp, "warmup"), os.path.join(tmp, "simulator"))
    os.replace(tmp, done)
    log(f"embedded default built in {done}")
    return w, retriever, os.path.join(done, "simulator"), os.path.join(done, "warmup")


def build_models(w, retriever, cfg, policy_dir, sim_dir):
    """1. the policy: a format warm-up on one trajectory per train question (queries and answers
    not reliably right); 2. the simulator: simulation fine-tuning of a copy of it on labelled
    (query, documents, useful/noisy) rows from the warm-up's queries and the real engine."""
    def search(query):
        return retriever.search(query, cfg["topk"])

    tok = world.world_tokenizer(w, cfg)
    rng = random.Random(cfg["seed"])
    names, guesses = collections.defaultdict(set), collections.defaultdict(list)
    warmup_questions = world.split_train(w.train, cfg["rl_share"])[0]
    for q in warmup_questions:
        guesses[q["relation"]].append(q["golden_answers"][0])
        if q["hops"] == 1:
            names[world.SUBJECT_TYPE[q["relation"]]].add(q["subject"])
    names = {k: sorted(v) for k, v in names.items()}
    trajectories, queries = [], []
    for q in warmup_questions:
        if rng.random() < 0.1:  # the no-search prompt's format: an answer straight away (a guess)
            prompt = cfg["direct_template"].format(question=q["question"])
            response = f"<answer> {rng.choice(guesses[q['relation']])} </answer>"
        else:
            prompt = cfg["prompt_template"].format(question=q["question"])
            response, qs = world.warmup_trajectory(q, search, sim.information, names, rng)
            queries += [(q, query) for query in qs]
        trajectories.append(world.encode_warmup(tok, prompt, response))
    policy = world.tiny_model(len(tok), cfg["tiny_hidden"], cfg["tiny_layers"], cfg["tiny_heads"], cfg["seed"])
    sim.sft(policy, trajectories, cfg["warmup_steps"], cfg["warmup_batch_size"], cfg["warmup_lr"], cfg["seed"],
            "warm-up (format only)", tok.pad_token_id)
    policy.save_pretrained(policy_dir)
    tok.save_pretrained(policy_dir)
    simulator = copy.deepcopy(policy)
    rows = world.simulator_rows(w, queries, search, world.knowledge_index(w.docs), rng, cfg["sim_sft_noisy"])
    sim.train_simulator(simulator, tok, rows, cfg, steps=cfg["sim_sft_steps"],
                        batch_size=cfg["sim_sft_batch_size"], lr=cfg["sim_sft_lr"], seed=cfg["seed"])
    simulator.save_pretrained(sim_dir)
    tok.save_pretrained(sim_dir)
