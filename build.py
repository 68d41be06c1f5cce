"""The embedded default's build: the synthetic world, its tokenizer and real retriever, the tiny
policy's warm-up and the tiny simulator fine-tuned from it. zerosearch.py calls
`prepare_embedded` when data=world. The warm-up policy is cached in out_dir/build/<hash of
WARMUP_KEYS>/warmup and each simulator made from it beside it, in simulator-<hash of SIMULATOR_KEYS>,
so runs that differ only in the simulator's fine-tuning share one warm-up.
"""
import collections
import hashlib
import json
import os
import random
import shutil

from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM

import sim
import world

BUILD_VERSION = 7  # bump when the code changes what a build holds, so old caches are not loaded
WARMUP_KEYS = ["world_seed", "world_persons", "world_companies", "tiny_hidden", "tiny_layers", "tiny_heads",
               "warmup_steps", "warmup_batch_size", "warmup_lr", "warmup_quote", "rl_share", "prompt_template", "direct_template",
               "invalid_action", "sim_template_finetuned", "sim_template_prompted",  # in the tokenizer's vocabulary
               "sim_template_prompted_noisy", "topk", "seed"]
MISNAMED_SHARE = 0.2  # of the warm-up's queries, also asked with the name miscopied, for the simulator's rows
SIMULATOR_KEYS = ["sim_sft_steps", "sim_sft_batch_size", "sim_sft_lr", "sim_sft_noisy"]


def digest(cfg, keys):
    return hashlib.sha1(json.dumps([BUILD_VERSION] + [cfg[k] for k in keys]).encode()).hexdigest()[:10]


def prepare_embedded(cfg, cache_dir, log=print):
    """Build (or load from `cache_dir`) everything the embedded default needs: the world, its
    tokenizer, the real retriever, the format-warmed tiny policy and the tiny simulator fine-tuned
    from it (as the paper's policy and simulator both start from pretrained Qwen2.5 models). Each
    model is written to a temporary folder and renamed when complete, so a build killed half-way is
    built again. Returns (world, retriever, simulator path, policy path)."""
    w = world.build_world(cfg["world_seed"], cfg["world_persons"], cfg["world_companies"])
    retriever = sim.Retriever(w.docs)
    base = os.path.join(cache_dir, digest(cfg, WARMUP_KEYS))
    policy_dir, sim_dir = os.path.join(base, "warmup"), os.path.join(base, "simulator-" + digest(cfg, SIMULATOR_KEYS))
    if whole(policy_dir) and whole(sim_dir):
        log(f"embedded default: loading the world's tokenizer, warm-up policy and simulator from {base}")
        return w, retriever, sim_dir, policy_dir
    tok, trajectories, queries, rng = warmup_data(w, retriever, cfg)
    if not whole(policy_dir):  # 1. the policy: the warm-up (format, queries of the entity, a first reading)
        policy = world.tiny_model(len(tok), cfg["tiny_hidden"], cfg["tiny_layers"], cfg["tiny_heads"], cfg["seed"])
        sim.sft(policy, trajectories, cfg["warmup_steps"], cfg["warmup_batch_size"], cfg["warmup_lr"], cfg["seed"],
                "warm-up", tok.pad_token_id)
        save_atomically(policy, tok, policy_dir)
    # 2. the simulator: simulation fine-tuning of a copy on labelled (query, documents, useful/noisy) rows
    simulator = AutoModelForCausalLM.from_pretrained(policy_dir)
    rows = world.simulator_rows(w, queries, lambda q: retriever.search(q, cfg["topk"]),
                                world.knowledge_index(w.docs), rng, cfg["sim_sft_noisy"])
    if cfg["sim_sft_steps"]:  # 0: the warm-up policy itself serves as an untrained simulator
        sim.train_simulator(simulator, tok, rows, cfg, steps=cfg["sim_sft_steps"],
                            batch_size=cfg["sim_sft_batch_size"], lr=cfg["sim_sft_lr"], seed=cfg["seed"])
    save_atomically(simulator, tok, sim_dir)
    log(f"embedded default built in {base}")
    return w, retriever, sim_dir, policy_dir


def warmup_data(w, retriever, cfg):
    """-> (tokenizer, warm-up examples, the (question, query) pairs of the simulator's rows, the random
    stream after them, which the rows continue): one trajectory per train question, searching the real
    engine; 10% are the no-search prompt's format (an answer straight away). The rows' queries are the
    warm-up's, and a fifth of them again with the entity's name miscopied (`world.misnamed_query`)."""
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

    def search(query):
        return retriever.search(query, cfg["topk"])

    for q in warmup_questions:
        if rng.random() < 0.1:
            prompt = cfg["direct_template"].format(question=q["question"])
            response = f"<answer> {rng.choice(guesses[q['relation']])} </answer>"
        else:
            prompt = cfg["prompt_template"].format(question=q["question"])
            response, qs = world.warmup_trajectory(q, search, sim.information, names, rng, cfg["warmup_quote"])
            queries += [(q, query) for query in qs]
        trajectories.append(world.encode_warmup(tok, prompt, response))
    # The same query with a name that is no entity's: the simulator then knows nothing and must not
    # write the answer it sees in its prompt (trained without such rows, on the entity's own facts, it
    # did for 73 of 123 such queries; with them 10, with BM25's results as the useful documents 7).
    entities = {q["subject"] for q in w.train + w.test}
    firsts = sorted({e.split()[0] for e in entities})
    queries += [(q, wrong) for q, query in queries if rng.random() < MISNAMED_SHARE
                for wrong in [world.misnamed_query(query, entities, firsts, rng)] if wrong]
    return tok, trajectories, queries, rng


def save_atomically(model, tok, path):
    """save_pretrained to path.tmp, then rename: a folder at `path` is always complete."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a save that was killed
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)  # one that whole() found damaged
    os.replace(tmp, path)


def whole(path):
    """Is `path` a saved tiny model whose weights read whole? One cut short (a full disk, a copy that
    stopped) is built again, not loaded."""
    try:
        return bool(safe_open(os.path.join(path, "model.safetensors"), "pt"))  # its header must cover the whole file
    except (OSError, SafetensorError):
        return False
