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
import urllib.parse

from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM

import engines
import sim
import world

BUILD_VERSION = 11  # bump when the code changes what a build holds, so old caches are not loaded
WARMUP_KEYS = ["world_seed", "world_persons", "world_companies", "world_phrasings", "world_passages",
               "tiny_hidden", "tiny_layers", "tiny_heads", "pretrain_steps", "pretrain_lr",
               "warmup_steps", "warmup_batch_size", "warmup_lr", "prompt_template", "direct_template",
               "invalid_action", "sim_template_finetuned", "sim_template_prompted",  # in the tokenizer's vocabulary
               "sim_template_prompted_noisy", "topk", "seed"]
SIMULATOR_KEYS = ["sim_sft_steps", "sim_sft_batch_size", "sim_sft_lr",
                  "max_turns", "max_turn_tokens", "max_response_tokens", "temperature", "top_p"]  # these shape its rows
SIM_ROWS = 4000  # rows collected, balanced (the paper: about 20,000 for a 3B to 14B model)


def digest(cfg, keys):
    return hashlib.sha1(json.dumps([BUILD_VERSION] + [cfg[k] for k in keys]).encode()).hexdigest()[:10]


def prepare_embedded(cfg, cache_dir, log=print, collect=None):
    """Build (or load from `cache_dir`) everything the embedded default needs: the world, its
    tokenizer, the real retriever, the format-warmed tiny policy and the tiny simulator fine-tuned
    from it (as the paper's policy and simulator both start from pretrained Qwen2.5 models). Each
    model is written to a temporary folder and renamed when complete, so a build killed half-way is
    built again. The simulator's rows are, as the paper makes them, the warm-up policy's searches labelled
    by its answers and the judge (`collect`, zerosearch.collect). Returns (world, retriever, simulator
    path, policy path)."""
    w = world.world_of(cfg)
    retriever = engines.Retriever(w.docs)
    base = os.path.join(cache_dir, digest(cfg, WARMUP_KEYS))
    policy_dir, sim_dir = os.path.join(base, "warmup"), os.path.join(base, "simulator-" + digest(cfg, SIMULATOR_KEYS))
    if whole(policy_dir) and whole(sim_dir):
        log(f"embedded default: loading the world's tokenizer, warm-up policy and simulator from {base}")
        return w, retriever, sim_dir, policy_dir
    tok, trajectories = warmup_data(w, retriever, cfg)
    if not whole(policy_dir):  # 1. the policy: pretraining's copying, then the warm-up (format, queries, a first reading)
        policy = world.tiny_model(len(tok), cfg["tiny_hidden"], cfg["tiny_layers"], cfg["tiny_heads"], cfg["seed"])
        if cfg["pretrain_steps"]:  # induction heads, which both of the paper's models bring from pretraining
            copies = world.copy_sequences(len(tok), max(tok.all_special_ids) + 1, 20_000, cfg["seed"])
            sim.sft(policy, copies, cfg["pretrain_steps"], cfg["warmup_batch_size"], cfg["pretrain_lr"], cfg["seed"],
                    "pretrain", tok.pad_token_id)
        sim.sft(policy, trajectories, cfg["warmup_steps"], cfg["warmup_batch_size"], cfg["warmup_lr"], cfg["seed"],
                "warm-up", tok.pad_token_id)
        save_atomically(policy, tok, policy_dir)
    # 2. the simulator: simulation fine-tuning of a copy on labelled (query, documents, useful/noisy) rows
    simulator = AutoModelForCausalLM.from_pretrained(policy_dir)
    if cfg["sim_sft_steps"]:  # 0: the warm-up policy itself serves as an untrained simulator, and needs no rows
        rows = simulator_rows(simulator, tok, w, retriever, cfg, collect, log)
        sim.train_simulator(simulator, tok, rows, cfg, steps=cfg["sim_sft_steps"],
                            batch_size=cfg["sim_sft_batch_size"], lr=cfg["sim_sft_lr"], seed=cfg["seed"])
    save_atomically(simulator, tok, sim_dir)
    log(f"embedded default built in {base}")
    return w, retriever, sim_dir, policy_dir


def simulator_rows(policy, tok, w, retriever, cfg, collect, log=print):
    """The simulator's fine-tuning rows as the paper makes them: the warm-up `policy`'s searches of the real
    engine labelled by its answers and the judge (`collect`, zerosearch.collect), each with the simulator's
    knowledge of its query, and its documents in that knowledge's order, the one that states the answer first
    (the engine shows what the simulator writes in a random order: sim.read_documents)."""
    rows, n_useful, n_noisy = collect(policy.eval(), tok, w.train, engines.RealEngine(retriever, cfg, tok), cfg,
                                      SIM_ROWS, cfg["seed"])
    if not rows:
        raise SystemExit(f"error: the warm-up policy's searches gave {n_useful} useful and {n_noisy} noisy rows, and the "
                         "simulator needs both; raise warmup_steps")
    log(f"simulator rows: {len(rows)} kept of {n_useful} useful and {n_noisy} noisy from the warm-up policy's searches")
    knowledge = world.knowledge_index(w.docs)
    return [dict(r, evidence=known, documents=sorted(r["documents"], key=lambda d: known.index(d) if d in known else len(known)))
            for r in rows for known in [knowledge(r["query"], [r["answer"]])]]


def warmup_data(w, retriever, cfg):
    """-> (tokenizer, warm-up examples): one trajectory per train question, searching the real engine;
    10% are the no-search prompt's format (an answer straight away)."""
    tok = world.world_tokenizer(w, cfg)
    rng = random.Random(cfg["seed"])
    names, guesses = collections.defaultdict(set), collections.defaultdict(list)
    for q in w.train:
        guesses[q["relation"]].append(q["golden_answers"][0])
        if q["hops"] == 1:
            names[world.SUBJECT_TYPE[q["relation"]]].add(q["subject"])
    names = {k: sorted(v) for k, v in names.items()}
    trajectories = []
    for q in w.train:
        if rng.random() < 0.1:
            prompt = cfg["direct_template"].format(question=q["question"])
            response = f"<answer> {rng.choice(guesses[q['relation']])} </answer>"
        else:
            prompt = cfg["prompt_template"].format(question=q["question"])
            response, _ = world.warmup_trajectory(q, lambda query: retriever.search(query, cfg["topk"]), sim.information,
                                                  names, rng, cfg["world_phrasings"], cfg["max_turns"])
        # (token ids, loss mask): the loss covers the whole response, <information> blocks included. Predicting what
        # the engine returns for a query is how the tiny model learns to copy names from its context (a base LLM
        # arrives with that skill); in RL the same blocks are masked out of every loss.
        prompt_ids, response_ids = tok.encode(prompt), tok.encode(response)
        trajectories.append((prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)))
    return tok, trajectories


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


# ----------------------------------------------------------------------------- a run's inputs: data, models, engines
def setup(cfg, ctx, collect=None):
    """Tokenizer, train questions, evaluation sets, the in-process BM25 retriever (None when no engine
    searches it), the simulator's and the starting policy's paths: built here for the embedded world,
    else from the config."""
    if cfg["data"] == "world" and cfg["eval_data"] == "world":
        if cfg["policy_model"] and (cfg["sim_model"] or not uses_simulator(cfg)):  # no tiny model to build
            w = world.world_of(cfg)
            retriever, sim_path, policy_path = engines.Retriever(w.docs), None, None
        else:
            cache = os.path.join(cfg["out_dir"], "build")
            if ctx.master:  # one process builds, the others wait and load
                prepare_embedded(cfg, cache, log=ctx.print0, collect=collect)
            ctx.barrier()
            w, retriever, sim_path, policy_path = prepare_embedded(cfg, cache, log=lambda *a: None)
        tok = world.load_tokenizer(cfg["policy_model"] or policy_path)  # a real policy on the world keeps its own
        test = {name: [q for q in w.test if q["hops"] == hops] for name, hops in world.TEST_SETS.items()}
        eval_sets = {k: fitting(v, tok, cfg, k, ctx)[:cfg["eval_size"]] for k, v in test.items() if v}
        knowledge = None if cfg["sim_model"] else world.knowledge_index(w.docs)  # a real simulator has its own
        train_qs = fitting(w.train, tok, cfg, "the train questions", ctx)
        return tok, train_qs, eval_sets, retriever, cfg["sim_model"] or sim_path, cfg["policy_model"] or policy_path, knowledge
    if not cfg["policy_model"]:
        raise SystemExit("error: data is a file, so policy_model must name a model (e.g. policy_model=Qwen/Qwen2.5-3B)")
    if cfg["eval_backend"] == "real" and not cfg["corpus"]:  # the simulator sees the gold answer: never the evaluation's engine
        raise SystemExit("error: data is a file, so evaluation needs a real engine: set corpus=path/to/corpus.jsonl "
                         "(BM25 here) or eval_backend=retriever (a served one at retriever_url)")
    if cfg["search_backend"] == "real" and not cfg["corpus"]:
        raise SystemExit("error: search_backend=real searches BM25 over corpus=path/to/corpus.jsonl; set it, "
                         "or search_backend=retriever (a served engine at retriever_url)")
    tok = world.load_tokenizer(cfg["policy_model"])
    eval_sets = {}
    for item in str(cfg["eval_data"]).split(","):
        name, _, path = item.partition("=")
        if not path or name in eval_sets:
            raise SystemExit(f"error: eval_data item {item!r} must be name=path (e.g. nq=data/nq_test.jsonl), "
                             "a name no other set has")
        eval_sets[name] = fitting(world.load_questions(path), tok, cfg, path, ctx)[:cfg["eval_size"]]
    train_qs = fitting(world.load_questions(cfg["data"]), tok, cfg, cfg["data"], ctx) if cfg["data"] != "world" else []
    in_process = "real" in (cfg["eval_backend"], cfg["search_backend"])  # else both engines are served: no corpus here
    retriever = engines.Retriever(world.load_corpus(cfg["corpus"])) if in_process else None
    return tok, train_qs, eval_sets, retriever, cfg["sim_model"], cfg["policy_model"], None


def check_engines(cfg, retriever, policy_path):
    """The engines can serve this run: topk fits the corpus, and a fine-tuned simulator is not the policy."""
    if retriever and cfg["topk"] > len(retriever.docs):
        raise SystemExit(f"error: topk={cfg['topk']} is more than the corpus holds: set topk={len(retriever.docs)} or less")
    is_policy = cfg["sim_model"] and os.path.realpath(cfg["sim_model"]) == os.path.realpath(policy_path)
    if is_policy and uses_simulator(cfg) and cfg["sim_style"] == "finetuned":  # the paper's untrained simulator is prompted
        raise SystemExit(f"error: sim_model={cfg['sim_model']} is the policy itself, not a simulator fine-tuned to write "
                         "documents; set sim_model= to one, or sim_style=prompted to prompt it as an untrained simulator")


def uses_simulator(cfg):
    """Does this run search a simulator (in process, or served with the embedded one's tokenizer)?"""
    return {"train": cfg["search_backend"], "eval": None, "ask": cfg["ask_engine"]}[cfg["mode"]] in ("sim", "http")


def fitting(questions, tok, cfg, source, ctx):
    """The questions whose prompt fits max_prompt_tokens; the others are skipped and counted in one
    note. A question of more than 64 characters a token is skipped without being tokenized."""
    limit, template = cfg["max_prompt_tokens"], cfg["prompt_template"]
    kept = [q for q in questions if len(q["question"]) <= 64 * limit and
            len(sim.prompt_ids(tok, template.format(question=q["question"]), cfg["chat_template"])) <= limit]
    if len(kept) < len(questions):
        ctx.print0(f"note: {len(questions) - len(kept)} of {len(questions)} questions of {source} have a prompt "
                   f"longer than max_prompt_tokens={limit} tokens; they are skipped")
    if questions and not kept:
        raise SystemExit(f"error: no question of {source} fits max_prompt_tokens={limit}; raise it or shorten them")
    return kept


def check_model(key, name):
    """A model named in the config loads: a folder with config.json and weights, or a hub name whose
    config can be had. Checked before any long stage, with one line."""
    if os.path.isdir(name):
        files = os.listdir(name)
        if "config.json" not in files or not any(f.endswith((".safetensors", ".bin")) for f in files):
            raise SystemExit(f"error: {key}={name}: the folder needs config.json and the weights "
                             "(*.safetensors or *.bin), as save_pretrained writes them")
        if not {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"} & set(files):
            raise SystemExit(f"error: {key}={name}: no tokenizer in the folder; save it there with tokenizer.save_pretrained")
        if "auto_map" in open(os.path.join(name, "config.json"), encoding="utf-8", errors="replace").read():
            raise SystemExit(f"error: {key}={name} needs its own code (auto_map in config.json), which zerosearch never runs")
        return
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SystemExit(f"error: {key}={name}: no such model folder here")
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {key}={name}: not a folder here, and the hub name could not be loaded "
                         f"(hub names cannot be fetched on a machine without network): {str(e).splitlines()[0]}")


def make_engine(backend, cfg, retriever, sim_path, ctx, knowledge=None, tok=None):
    """The search engine of `backend`; `knowledge(query, answers)` (embedded world) feeds the simulator's prompt;
    `tok`, the policy's tokenizer, cuts a real engine's documents to doc_tokens."""
    if backend == "real":
        return engines.RealEngine(retriever, cfg, tok)
    if backend == "retriever":
        engine = engines.RetrieverEngine(cfg, tok)
        engine.search([{"query": "test"}])  # the server answers now, not at the first search
        return engine
    if not sim_path:  # backend http or sim, the last two of config.CHOICES
        raise SystemExit(f"error: search_backend={backend} needs sim_model (the {'served' if backend == 'http' else 'fine-tuned'} "
                         "simulator's name or path; its tokenizer cuts documents to doc_tokens)")
    if backend == "http":
        url = urllib.parse.urlparse(cfg["sim_url"])
        if url.scheme not in ("http", "https") or not url.netloc:
            raise SystemExit(f"error: sim_url={cfg['sim_url']} is not an http(s) URL; e.g. sim_url=http://127.0.0.1:8000/v1")
        engine = engines.HttpEngine(cfg, world.load_tokenizer(sim_path), cfg["sim_served_model"] or sim_path, knowledge)
        engine.complete_all(["Query : test"], [0])  # the server answers now, not at the first RL search
        return engine
    model = AutoModelForCausalLM.from_pretrained(sim_path).to(ctx.device)
    return sim.SimEngine(model, world.load_tokenizer(sim_path), cfg, knowledge)
