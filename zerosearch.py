"""zerosearch: train an LLM to search with RL, where the search engine is itself an LLM.

A minimal reference implementation of ZeroSearch (Sun et al., 2025, arXiv 2505.04588): the reward,
the curriculum, the multi-turn rollout with search, evaluation and the RL loop (`train`, one step
as numbered stages). README.md explains the method, the embedded default and the differences
from the paper; config.yaml lists every key.

    python zerosearch.py                  # the embedded default on a 2-core CPU (a 9-min build, then 4 min of RL)
    python zerosearch.py preset=smoke     # the whole pipeline in under a minute
    python zerosearch.py algo=grpo steps=40 out_dir=out/grpo   # any key of config.yaml as key=value
    torchrun --nproc_per_node=8 zerosearch.py preset=paper data=... eval_data=... corpus=...
"""
import json
import os
import random
import sys
import time
import urllib.parse

import torch
import yaml
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification
from transformers.utils import logging as hf_logging

import build
import config
import parallel
import plots
import ppo
import reward
import sim
import world


# ----------------------------------------------------------------------------- curriculum
def noise_probability(step, total_steps, p_start, p_end, base):
    """p_i = p_s + (b^(i/m) - 1) / (b - 1) * (p_e - p_s): the chance a search returns noisy documents."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return p_start + (base ** frac - 1) / (base - 1) * (p_end - p_start)


def curriculum_noise(step, cfg):
    """The noisy probability of a step: the curriculum's p_i, or p_end throughout with curriculum=false."""
    if not cfg["curriculum"]:
        return cfg["p_end"]
    return noise_probability(step, cfg["steps"], cfg["p_start"], cfg["p_end"], cfg["curriculum_base"])


# ----------------------------------------------------------------------------- batches and reward
def to_batch(ro, pad_id, device, mask_information=True):
    """Right-padded tensors [B, T] of prompt + response; response_mask is 1 on the tokens trained: the
    sampled ones, or with mask_information=False every response token, <information> included."""
    seqs = [p + r for p, r in zip(ro.prompt_ids, ro.response_ids)]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), T, dtype=torch.long)
    response_mask = torch.zeros(len(seqs), T)
    for b, (p, s, m) in enumerate(zip(ro.prompt_ids, seqs, ro.response_mask)):
        input_ids[b, :len(s)] = torch.tensor(s)
        attention_mask[b, :len(s)] = 1
        response_mask[b, len(p):len(s)] = torch.tensor(m, dtype=torch.float) if mask_information else 1.0
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)


def score(ro, questions, kind="f1"):
    """Per-sequence outcome reward: F1 (paper) or strict EM of the answer against the golds."""
    fn = reward.f1_score if kind == "f1" else reward.exact_match
    return [fn(a, q["golden_answers"]) for a, q in zip(ro.answers, questions)]


# ----------------------------------------------------------------------------- evaluation
def evaluate(policy, tok, eval_sets, engine, cfg, ctx, max_turns=None, template=None, predictions=None):
    """Greedy rollouts on each evaluation set -> {set: {"em", "substring_em", "f1", "n"}}; the
    questions are sharded over processes and the sums reduced. `predictions`, a list: one row per
    question is appended on process 0 (set, question, golden answers, the whole response, the
    queries, the prediction and its scores)."""
    out = {}
    for name, questions in eval_sets.items():
        mine = questions[ctx.rank::ctx.world]
        sums, rows = torch.zeros(4, dtype=torch.float64), []
        for i in range(0, len(mine), 128):
            qs = mine[i:i + 128]
            with ppo.autocast(getattr(torch, cfg["dtype"]), ctx.device):  # the precision of training's rollouts
                ro = sim.rollout(policy, tok, qs, engine, cfg, greedy=True, max_turns=max_turns, template=template)
            for a, q, response, queries in zip(ro.answers, qs, ro.response_ids, ro.queries):
                golds = q["golden_answers"]
                scores = {"em": reward.exact_match(a, golds), "substring_em": reward.substring_match(a, golds),
                          "f1": reward.f1_score(a, golds)}
                sums += torch.tensor([*scores.values(), 1.0], dtype=torch.float64)
                rows.append({"set": name, "question": q["question"], "golden_answers": golds,
                             "response": tok.decode(response), "queries": queries, "prediction": a, **scores})
        if predictions is not None:
            parts = ctx.gather(rows)  # a collective: every process calls it
            predictions += [row for part in parts for row in part] if ctx.master else []
        sums = ctx.all_sum(sums)
        n = max(sums[3].item(), 1)
        out[name] = {"em": sums[0].item() / n, "substring_em": sums[1].item() / n, "f1": sums[2].item() / n, "n": int(sums[3])}
    return out


class AnswerAt:
    """The reading check's engine: `engine`'s documents for each query, with the one that states the
    question's answer (the question's `evidence`) moved to position `at` (1-based) when it is among
    them; the others keep their order. Nothing else changes, so EM at each position measures reading."""

    def __init__(self, engine, at):
        self.engine, self.at, self.stats = engine, at, {}

    def search(self, requests, noise_prob=0.0, seed=0):
        out = []
        for docs, r in zip(self.engine.search(requests, noise_prob, seed), requests):
            stating = next((d for d in docs if d in r["evidence"]), None)
            if stating is not None:
                docs = [d for d in docs if d != stating]
                docs.insert(self.at - 1, stating)
            out.append(docs)
        return out


def reading_check(policy, tok, questions, engine, cfg, ctx):
    """{"1": EM, ..., "k": EM} (x100, as the table): `questions` (single-hop, with evidence) evaluated
    with the answer-bearing document moved to each position of the engine's top k."""
    return {str(at): 100 * evaluate(policy, tok, {"q": questions}, AnswerAt(engine, at), cfg, ctx)["q"]["substring_em"]
            for at in range(1, cfg["topk"] + 1)}


def reading_table(reading):
    """results.md's reading check: one row per policy, EM with the answer in Doc 1 .. Doc k."""
    k = len(next(iter(reading.values())))
    head = "| policy | " + " | ".join(f"answer in Doc {i}" for i in range(1, k + 1)) + " |\n|---|" + "---|" * k + "\n"
    rows = [f"| {label} | " + " | ".join(f"{em:.1f}" for em in res.values()) + " |" for label, res in reading.items()]
    return ("Reading check: single-hop EM (x100) with the real engine's answer-bearing document moved to each "
            "position.\n\n" + head + "\n".join(rows) + "\n")


# ----------------------------------------------------------------------------- training
def load_models(policy_path, cfg, ctx):
    """-> (actor, critic, ref, sampler_copy): the trained actor and (PPO) critic as ppo.Learners, the
    critic the same weights with a value head; the frozen reference; each wrapped for cfg["sharding"]
    (parallel.parallelize). With fsdp on N processes, sampler_copy is a plain copy of the policy for
    the sampler (else None: the sampler uses the actor's own model). All weights are fp32; forward
    passes, rollouts included, run in cfg["dtype"] (ppo.autocast)."""
    compute = getattr(torch, cfg["dtype"])

    def policy():
        lm = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        return ppo.Actor(lm, compute).to(ctx.device)

    def learner(model, lr, warmup):
        return ppo.Learner(model, *ppo.make_optimizer(model, lr, cfg["weight_decay"], warmup, cfg["steps"]))

    actor = learner(parallel.parallelize(policy(), cfg, ctx), cfg["actor_lr"], cfg["lr_warmup_steps"])
    ref = parallel.parallelize(policy().eval().requires_grad_(False), cfg, ctx, frozen=True)  # KL = 0 at step 0
    critic = None
    if cfg["algo"] == "ppo":
        value_config = AutoConfig.from_pretrained(policy_path, num_labels=1)
        value_config.classifier_dropout = 0.0  # no dropout in the value head (from_pretrained drops this keyword)
        head = AutoModelForTokenClassification.from_pretrained(policy_path, config=value_config, dtype=torch.float32)
        critic = learner(parallel.parallelize(head.to(ctx.device), cfg, ctx), cfg["critic_lr"], 0)
    copy = policy().eval().requires_grad_(False) if cfg["sharding"] == "fsdp" and ctx.world > 1 else None
    return actor, critic, ref, copy


def resume_or_start_over(run_dir, metrics_path, models, engine, cfg, ctx):
    """-> (first step to run, kl_coef). With a checkpoint to resume from (cfg["resume"]), its step and
    kl_coef, after restoring the models, optimizers, schedulers, RNG states and the engine's counters,
    and its later checkpoints removed; else 0 and cfg["kl_coef"], after removing the run's old
    checkpoints. The metrics file keeps the other runs' rows and this run's before that step."""
    start, kl_coef, checkpoint = 0, cfg["kl_coef"], parallel.checkpoint_to_resume(cfg["resume"], run_dir)
    if checkpoint:
        state = parallel.load_checkpoint(checkpoint, models, ctx)
        check_resume(checkpoint, state, cfg)
        start, kl_coef = state["step"], state["kl_coef"]
        engine.stats.update({k: v if ctx.master else 0 for k, v in state["engine_stats"].items()})  # totals
        ctx.print0(f"{os.path.basename(run_dir)}: resuming from {checkpoint} (step {start} of {cfg['steps']})")
        parallel.drop_checkpoints_after(run_dir, start, ctx)
    else:
        parallel.start_over(run_dir, ctx)
    if ctx.master:
        name = os.path.basename(run_dir)
        rows = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r.get("run") != name or r["step"] < start)
    return start, kl_coef


RESUME_KEYS = ("algo", "policy_model", "sim_model", "search_backend", "data")  # what a checkpoint continues


def check_resume(checkpoint, state, cfg):
    """A checkpoint continues the run that wrote it: the same RL algorithm, models, engine and data,
    and no more steps than this run has; anything else stops with one line."""
    for key, value in state.get("config", {}).items():
        if cfg[key] != value:
            raise SystemExit(f"error: {checkpoint} was written with {key}={value}, this run has {key}={cfg[key]}: "
                             f"set {key}={value} to continue it, or another out_dir to start a new run")
    if state["step"] > cfg["steps"]:
        raise SystemExit(f"error: {checkpoint} is at step {state['step']}, past steps={cfg['steps']}: "
                         f"set steps={state['step']} or more to continue it")


def step_questions(questions, order, step, cfg, ctx):
    """This process's questions of a step, n_samples copies each, and a seed per row. The global batch
    is strided over processes; a question's samples stay on one process (GRPO groups stay whole), and
    each row's seed is its place in the global batch, so N processes sample what one does."""
    mine = [step * cfg["batch_size"] + j for j in range(cfg["batch_size"])][ctx.rank::ctx.world]
    qs = [questions[order[i % len(order)]] for i in mine for _ in range(cfg["n_samples"])]
    seeds = [cfg["seed"] * 1_000_003 + i * cfg["n_samples"] + s for i in mine for s in range(cfg["n_samples"])]
    return qs, seeds


class Stopwatch:
    """Seconds per stage of a step: lap(name) charges the time since the last lap to `name`, less
    the seconds of `minus`, which are charged to their own names."""

    def __init__(self):
        self.start = self.last = time.time()
        self.seconds = {}

    def lap(self, name, minus=None):
        now, minus = time.time(), minus or {}
        self.seconds[name] = now - self.last - sum(minus.values())
        self.seconds.update(minus)
        self.last = now


def step_metrics(name, step, ro, qs, scores, engine, noise_prob, seconds, adv_stats, stats, ctx):
    """One metrics.jsonl row: rewards and counts summed over processes, statistics averaged; the
    step's time split as time/<stage> (this process's, or process 0's under torchrun)."""
    em = [reward.substring_match(a, q["golden_answers"]) for a, q in zip(ro.answers, qs)]
    sums = ctx.sum_stats({"reward": scores.sum().item(), "em": sum(em), "searches": sum(ro.searches),
                          "sampled": sum(sum(m) for m in ro.response_mask), "n": len(qs), **engine.stats})
    engine_totals = {f"sim/{k}": int(sums[k]) for k in engine.stats}
    return {"run": name, "step": step, "reward": sums["reward"] / sums["n"], "em": sums["em"] / sums["n"],
            "searches": sums["searches"] / sums["n"], "noise_prob": noise_prob,
            "tokens_per_s": sums["sampled"] / max(seconds["sample"], 1e-9), "step_time": sum(seconds.values()),
            **{f"time/{k}": v for k, v in seconds.items()}, **adv_stats, **ctx.mean_stats(stats), **engine_totals}


def log_step(row, metrics_path, bar, ctx):
    if ctx.master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        slowest = sorted((k for k in row if k.startswith("time/")), key=row.get)[-2:][::-1]  # the two largest
        bar.set_postfix(reward=f"{row['reward']:.3f}", em=f"{row['em']:.2f}", noise=f"{row['noise_prob']:.2f}",
                        **{k[len("time/"):]: f"{row[k]:.1f}s" for k in slowest})


def save_step(run_dir, step, models, row, kl_coef, cfg, ctx):
    """A checkpoint after `step` (numbered step + 1, the next step to run)."""
    engine_totals = {k[len("sim/"):]: v for k, v in row.items() if k.startswith("sim/")}
    state = {"step": step + 1, "kl_coef": kl_coef, "noise_prob": row["noise_prob"], "engine_stats": engine_totals,
             "config": {k: cfg[k] for k in RESUME_KEYS}}
    parallel.save_checkpoint(os.path.join(run_dir, f"step_{step + 1:06d}"), models, state, ctx, cfg["keep_last"])


def train(policy_path, tok, questions, engine, cfg, ctx, name):
    """RL on `questions` against `engine`, resumed from a checkpoint if cfg["resume"] says so; returns
    the trained Hugging Face policy, with full weights on every process."""
    cfg = dict(cfg, mini_batch_size=cfg["mini_batch_size"] // ctx.world, seed=rl_seed(cfg))  # per process
    compute = getattr(torch, cfg["dtype"])  # fp32 weights on every path, forward passes in `dtype`
    actor, critic, ref, sampler_copy = load_models(policy_path, cfg, ctx)
    models = {"actor": actor, **({"critic": critic} if critic else {})}
    run_dir = os.path.join(cfg["out_dir"], "checkpoints", name)
    metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
    start, kl_coef = resume_or_start_over(run_dir, metrics_path, models, engine, cfg, ctx)
    order = random.Random(cfg["seed"]).sample(range(len(questions)), len(questions))
    ctrl_c, restore_sigint = parallel.catch_ctrl_c()
    backend = cfg["search_backend"] if name == "zerosearch" else "real"
    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], disable=not ctx.master,
               desc=f"RL {name} ({cfg['algo']}, {backend} search)")
    for step in bar:
        clock = Stopwatch()
        # 1. this process's questions of the step, n samples each
        qs, seeds = step_questions(questions, order, step, cfg, ctx)
        # 2. rollout with search; the curriculum sets how often a search returns noisy documents
        noise_prob = curriculum_noise(step, cfg)
        with ppo.autocast(compute, ctx.device):  # one precision on every path: N processes as one
            policy = parallel.sampler_model(actor.model, sampler_copy)
            ro = sim.rollout(policy, tok, qs, engine, cfg, noise_prob=noise_prob, seeds=seeds)
        clock.lap("sample", minus={"engine": ro.engine_seconds})
        # 3. reward: F1 of the final answer
        scores = torch.tensor(score(ro, qs, cfg["reward"]), device=ctx.device)
        # 4. log-probs of the sampled tokens under the policy and the reference; values (PPO); each
        #    forward pass runs on micro-batches of similar lengths, on their real tokens alone (ppo.padding_free)
        ids, attn, mask = to_batch(ro, tok.pad_token_id, ctx.device, cfg["mask_information"])
        with torch.no_grad():
            old_logp, ref_logp = ppo.in_micro_batches(lambda r: (actor.model(ids[r], attn[r], cfg["temperature"], mask[r])[0],
                                                                 ref(ids[r], attn[r], cfg["temperature"], mask[r])[0]),
                                                      attn, cfg["micro_batch_size"])
            clock.lap("logprob")
            values = ppo.in_micro_batches(lambda r: [ppo.token_values(critic.model, ids[r], attn[r], compute)],
                                          attn, cfg["micro_batch_size"])[0] if critic else None
            clock.lap("values")
        # 5. advantages (GAE, group-normalised, REINFORCE, REINFORCE++), whitened over all processes
        advantages, returns, adv_stats = ppo.compute_advantages(
            cfg["algo"], scores, mask, old_logp, ref_logp, values, cfg, kl_coef, ctx.all_sum)
        adv_stats = ctx.mean_stats(adv_stats)  # the same on every process, so is kl_coef
        kl_coef = ppo.adaptive_kl_coef(kl_coef, adv_stats["rollout/kl"], len(qs) * ctx.world,
                                       cfg["kl_target"], cfg["kl_horizon"])  # fixed if no kl_target
        # 6. PPO epochs over mini-batches; DDP/FSDP average the gradients over processes
        batch = ppo.Batch(ids, attn, mask, old_logp, ref_logp, advantages, values, returns)
        try:
            stats = ppo.update(actor, critic, batch, cfg, kl_coef, step, ctx.all_mean)
        except ppo.NonFiniteError as e:
            raise SystemExit(f"error: {e}; {last_good(run_dir)}")
        clock.lap("update")
        # 7. log, 8. checkpoint every save_every steps, at the end, and after Ctrl-C (then stop)
        row = step_metrics(name, step, ro, qs, scores, engine, noise_prob, clock.seconds,
                           adv_stats, stats, ctx)
        log_step(row, metrics_path, bar, ctx)
        interrupted = ctx.any(ctrl_c[0])
        if (step + 1) % cfg["save_every"] == 0 or step + 1 == cfg["steps"] or interrupted:
            save_step(run_dir, step, models, row, kl_coef, cfg, ctx)
            if ctx.master:
                plots.curves(metrics_path, os.path.join(cfg["out_dir"], "curves.png"))
        if interrupted:
            ctx.print0(f"stopped after step {step + 1} of {name}; checkpoint in {run_dir}; "
                       "continue with resume=true")
            parallel.close(ctx)
            raise SystemExit(0)
    restore_sigint()
    if ctx.master:
        plots.curves(metrics_path, os.path.join(cfg["out_dir"], "curves.png"))
    return parallel.sampler_model(actor.model, sampler_copy)


def last_good(run_dir):
    kept = parallel.checkpoints(run_dir)
    return f"the last good weights are in {kept[-1]}" if kept else "no checkpoint was written before it"


def rl_seed(cfg):
    """RL's seed: rl_seed, or seed when it is null (the build always uses seed)."""
    return cfg["seed"] if cfg["rl_seed"] is None else cfg["rl_seed"]


# ----------------------------------------------------------------------------- main
def setup(cfg, ctx):
    """Tokenizer, train questions, evaluation sets, the in-process BM25 retriever (None when no engine
    searches it), the simulator's and the starting policy's paths: built here for the embedded world,
    else from the config."""
    if cfg["data"] == "world" and cfg["eval_data"] == "world":
        if cfg["policy_model"] and (cfg["sim_model"] or not uses_simulator(cfg)):  # no tiny model to build
            w = world.build_world(cfg["world_seed"], cfg["world_persons"], cfg["world_companies"])
            retriever, sim_path, policy_path = sim.Retriever(w.docs), None, None
        else:
            cache = os.path.join(cfg["out_dir"], "build")
            if ctx.master:  # one process builds, the others wait and load
                build.prepare_embedded(cfg, cache, log=ctx.print0)
            ctx.barrier()
            w, retriever, sim_path, policy_path = build.prepare_embedded(cfg, cache, log=lambda *a: None)
        tok = world.load_tokenizer(cfg["policy_model"] or policy_path)  # a real policy on the world keeps its own
        test = {"single-hop": [q for q in w.test if q["hops"] == 1], "two-hop": [q for q in w.test if q["hops"] == 2]}
        eval_sets = {k: fitting(v, tok, cfg, k, ctx)[:cfg["eval_size"]] for k, v in test.items()}
        knowledge = None if cfg["sim_model"] else world.knowledge_index(w.docs)  # a real simulator has its own
        train_qs = fitting(world.split_train(w.train, cfg["rl_share"])[1], tok, cfg, "the train questions", ctx)
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
        if not path:
            raise SystemExit(f"error: eval_data item {item!r} must be name=path (e.g. nq=data/nq_test.jsonl)")
        eval_sets[name] = fitting(world.load_questions(path), tok, cfg, path, ctx)[:cfg["eval_size"]]
    train_qs = fitting(world.load_questions(cfg["data"]), tok, cfg, cfg["data"], ctx) if cfg["data"] != "world" else []
    in_process = "real" in (cfg["eval_backend"], cfg["search_backend"])  # else both engines are served: no corpus here
    retriever = sim.Retriever(world.load_corpus(cfg["corpus"])) if in_process else None
    return tok, train_qs, eval_sets, retriever, cfg["sim_model"], cfg["policy_model"], None


def uses_simulator(cfg):
    """Does this run search a simulator (in process, or served with the embedded one's tokenizer)?"""
    backend = {"train": cfg["search_backend"], "eval": None, "ask": cfg["ask_engine"]}[cfg["mode"]]
    return backend in ("sim", "http")


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
        return
    if os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SystemExit(f"error: {key}={name}: no such model folder here")
    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {key}={name}: not a folder here, and the hub name could not be loaded "
                         f"(hub names cannot be fetched on a machine without network): {str(e).splitlines()[0]}")


def make_engine(backend, cfg, retriever, sim_path, ctx, knowledge=None, tok=None):
    """The search engine of `backend`; `knowledge(query)` (embedded world) feeds the simulator's prompt;
    `tok`, the policy's tokenizer, cuts a served retriever's documents to doc_tokens."""
    if backend == "real":
        return sim.RealEngine(retriever, cfg)
    if backend == "retriever":
        engine = sim.RetrieverEngine(cfg, tok)
        engine.search([{"query": "test"}])  # the server answers now, not at the first search
        return engine
    if backend == "http":
        url = urllib.parse.urlparse(cfg["sim_url"])
        if url.scheme not in ("http", "https") or not url.netloc:
            raise SystemExit(f"error: sim_url={cfg['sim_url']} is not an http(s) URL; e.g. sim_url=http://127.0.0.1:8000/v1")
        if not sim_path:
            raise SystemExit("error: search_backend=http needs sim_model (the served simulator's name or path; "
                             "its tokenizer cuts documents to doc_tokens)")
        engine = sim.HttpEngine(cfg, world.load_tokenizer(sim_path), cfg["sim_served_model"] or sim_path, knowledge)
        engine.complete_all(["Query : test"], [0])  # the server answers now, not at the first RL search
        return engine
    if backend == "sim":
        if not sim_path:
            raise SystemExit("error: search_backend=sim needs sim_model (a fine-tuned simulator's name or path)")
        model = AutoModelForCausalLM.from_pretrained(sim_path).to(ctx.device)
        return sim.SimEngine(model, world.load_tokenizer(sim_path), cfg, knowledge)
    raise SystemExit(f"error: search_backend must be sim, real, http or retriever, got {backend!r}")


def results_table(results, sets, strict=False):
    """The paper's table: EM (substring, as the paper's tables) per evaluation set, then (strict) strict
    EM, then F1, and their averages."""
    keys = ["substring_em"] + ["em"] * strict + ["f1"]
    head = "| policy | " + " | ".join(sets) + " | avg |\n|---|" + "---|" * (len(sets) + 1) + "\n"
    lines = []
    for label, res in results.items():
        cells = [[100 * res[s][k] for k in keys] for s in sets]
        avg = [sum(c[j] for c in cells) / len(cells) for j in range(len(keys))]
        lines.append(f"| {label} | " + " | ".join(" / ".join(f"{v:.1f}" for v in c) for c in cells + [avg]) + " |")
    what = "EM / strict EM / F1" if strict else "EM / F1"
    return (f"{what} (x100); EM = a normalised gold answer occurs in the normalised prediction, as in the paper"
            + ("; strict EM = they are equal" if strict else "") + ".\n\n" + head + "\n".join(lines) + "\n")


def main(argv):
    if {"-h", "--help"} & set(argv):
        print(__doc__ + "\nEvery key of config.yaml, with its meaning (set any as key=value):\n")
        print(open(config.DEFAULTS).read())
        return
    hf_logging.set_verbosity_error()
    cfg = config.load_config(argv)
    ctx = parallel.init_processes(cfg)
    parallel.check_config(cfg, ctx, runs=("zerosearch", "search_r1"))
    for key in ("policy_model", "sim_model"):
        if cfg[key]:
            check_model(key, cfg[key])
    config.check_folder(cfg["out_dir"], "out_dir")
    if ctx.master:
        with open(os.path.join(cfg["out_dir"], "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    began = time.time()
    tok, train_qs, eval_sets, retriever, sim_path, policy_path, knowledge = setup(cfg, ctx)
    seconds = {"build": time.time() - began}  # or its loading; then each RL run, and evaluation is the rest
    torch.manual_seed(rl_seed(cfg))  # the critic's new head: the same whether the build was made now or loaded
    # evaluation (and the baseline) always searches a real engine, as the paper: BM25 here or a served retriever
    real = make_engine(cfg["eval_backend"], cfg, retriever, None, ctx, tok=tok)
    start = AutoModelForCausalLM.from_pretrained(policy_path).to(ctx.device)
    if cfg["mode"] == "ask":
        engine = make_engine(cfg["ask_engine"], cfg, retriever, sim_path, ctx, knowledge, tok) if cfg["ask_engine"] else real
        return ask(start, tok, engine, cfg, eval_sets | {"train": train_qs})
    if cfg["mode"] == "eval":
        return evaluate_checkpoint(start, tok, eval_sets, real, cfg, ctx, argv)
    engine = make_engine(cfg["search_backend"], cfg, retriever, sim_path, ctx, knowledge, tok)
    results = {"(a) warm-up, no search": evaluate(start, tok, eval_sets, real, cfg, ctx, max_turns=0,
                                                  template=cfg["direct_template"]),
               "(b) warm-up + real search (RAG-like)": evaluate(start, tok, eval_sets, real, cfg, ctx)}
    single_hop = [q for q in eval_sets.get("single-hop", []) if q["evidence"]]  # the embedded world's
    reading = {"(b) warm-up": reading_check(start, tok, single_hop, real, cfg, ctx)} if single_hop else {}
    ctx.print0(f"reading check of the warm-up policy: {reading}")
    rl_began = time.time()
    policy, predictions = train(policy_path, tok, train_qs, engine, cfg, ctx, "zerosearch"), []
    seconds["RL zerosearch"] = time.time() - rl_began
    results[f"(c) ZeroSearch ({cfg['algo']}, {cfg['search_backend']} engine)"] = evaluate(
        policy, tok, eval_sets, real, cfg, ctx, predictions=predictions)
    if reading:
        reading["(c) ZeroSearch"] = reading_check(policy, tok, single_hop, real, cfg, ctx)
    if ctx.master:
        policy.save_pretrained(os.path.join(cfg["out_dir"], "policy_zerosearch"))
        tok.save_pretrained(os.path.join(cfg["out_dir"], "policy_zerosearch"))
    if cfg["baseline"]:
        rl_began = time.time()
        baseline = train(policy_path, tok, train_qs, real, cfg, ctx, "search_r1")
        seconds["RL search_r1"] = time.time() - rl_began
        results[f"(d) Search-R1 ({cfg['algo']}, real engine)"] = evaluate(baseline, tok, eval_sets, real, cfg, ctx)
        if reading:
            reading["(d) Search-R1"] = reading_check(baseline, tok, single_hop, real, cfg, ctx)
    write_results(results, reading, predictions, list(eval_sets), cfg, ctx, argv)
    seconds["evaluation"] = time.time() - began - sum(seconds.values())
    ctx.print0("time: " + ", ".join(f"{stage} {int(s // 60)}m{int(s % 60):02d}s" for stage, s in seconds.items()))
    if ctx.master:  # beside results.json, which runs compare whole
        with open(os.path.join(cfg["out_dir"], "time.json"), "w") as f:
            json.dump(seconds, f)
    parallel.close(ctx)


def write_results(results, reading, predictions, sets, cfg, ctx, argv, strict=False):
    """results.md and results.json (the table, and the reading check under `reading`, ...) and
    predictions.jsonl (a row per question of the last policy evaluated), from process 0."""
    table = results_table(results, sets, strict)
    if reading:
        keys = {"(b) warm-up": "reading_warmup", "(c) ZeroSearch": "reading", "(d) Search-R1": "reading_search_r1"}
        results.update({keys.get(label, "reading"): res for label, res in reading.items()})
        table += "\n" + reading_table(reading)
    ctx.print0("\n" + table)
    if ctx.master:
        with open(os.path.join(cfg["out_dir"], "results.md"), "w") as f:
            f.write(f"# Results\n\n`python zerosearch.py {' '.join(argv)}`\n\n{table}")
        with open(os.path.join(cfg["out_dir"], "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(cfg["out_dir"], "predictions.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in predictions)


def evaluate_checkpoint(policy, tok, eval_sets, engine, cfg, ctx, argv):
    """mode=eval: policy_model evaluated on every set, greedy, no training; with the reading check
    where the data is the embedded world."""
    predictions = []
    results = {cfg["policy_model"]: evaluate(policy, tok, eval_sets, engine, cfg, ctx, predictions=predictions)}
    single_hop = [q for q in eval_sets.get("single-hop", []) if q["evidence"]]
    reading = {cfg["policy_model"]: reading_check(policy, tok, single_hop, engine, cfg, ctx)} if single_hop else {}
    write_results(results, reading, predictions, list(eval_sets), cfg, ctx, argv, strict=True)
    parallel.close(ctx)


def ask(policy, tok, engine, cfg, known):
    """mode=ask: each question (`question`, or one a line from standard input) answered greedily, its
    trajectory printed turn by turn: the policy's text, each query's documents (useful or noisy when a
    simulator wrote them), the answer. A question of the embedded world's sets keeps its gold answer,
    which the simulator's prompt shows it; any other gets none."""
    golds = {q["question"]: q for questions in known.values() for q in questions}
    lines = [cfg["question"]] if cfg["question"] else (line.strip() for line in sys.stdin)
    simulated = isinstance(engine, (sim.SimEngine, sim.HttpEngine))
    noise = cfg["noise_prob"] or 0.0
    for text in filter(None, lines):
        q = golds.get(text, {"question": text, "golden_answers": [""], "evidence": []})
        ro = sim.rollout(policy, tok, [q], engine, cfg, noise_prob=noise, greedy=True)
        kinds = sim.draw_kinds(0, noise, ro.engine_seeds[0]) if simulated else [""] * ro.searches[0]
        print(f"question: {text}")
        response, mask, search = ro.response_ids[0], ro.response_mask[0], 0
        for start, end in segments(mask):
            part = tok.decode(response[start:end]).strip()
            if mask[start]:
                print(f"  policy: {part}")
            elif part.startswith("<information>") and search < len(kinds):
                label = f" ({kinds[search]})" if kinds[search] else ""
                print(f"  engine{label}:\n    " + "\n    ".join(part.splitlines()))
                search += 1
            else:
                print(f"  (invalid action) {part}")
        print(f"  answer: {ro.answers[0]}" + (f"   (gold: {q['golden_answers'][0]})" if q["golden_answers"][0] else ""))


def segments(mask):
    """(start, end) of each run of equal values in `mask`."""
    bounds = [0] + [t for t in range(1, len(mask)) if mask[t] != mask[t - 1]] + [len(mask)]
    return list(zip(bounds, bounds[1:])) if mask else []


if __name__ == "__main__":
    main(sys.argv[1:])
