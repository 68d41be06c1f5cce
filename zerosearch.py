"""zerosearch: train an LLM to search with RL, where the search engine is itself an LLM.

A minimal reference implementation of ZeroSearch (Sun et al., 2025, arXiv 2505.04588): the reward,
the curriculum, the multi-turn rollout with search, evaluation and the RL loop (`train`, one step
as numbered stages). README.md explains the method, the embedded default and the differences
from the paper; config.yaml lists every key.

    python zerosearch.py                  # the embedded default on a 2-core CPU: a build, then RL, then evaluation
    python zerosearch.py preset=smoke     # the whole pipeline in under a minute
    python zerosearch.py algo=grpo steps=40 out_dir=out/grpo   # any key of config.yaml as key=value
    torchrun --nproc_per_node=8 zerosearch.py preset=paper data=... eval_data=... corpus=...
"""
import collections
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import torch
import yaml
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification
from transformers.utils import logging as hf_logging

import build
import config
import engines
import parallel
import ppo
import report
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


# ----------------------------------------------------------------------------- the rollout with search
@dataclass
class Rollout:
    """B trajectories as token lists (ragged); zerosearch.to_batch pads them into tensors."""
    prompt_ids: list      # B x [prompt tokens]
    response_ids: list    # B x [response tokens]: sampled actions and injected observations
    response_mask: list   # B x [1 where the policy sampled the token, 0 inside <information>]
    answers: list         # B x (answer text or None), from the policy's own tokens
    searches: list        # B x number of searches made
    engine_seconds: float = 0.0  # time spent in the engine's calls (the rest of the rollout is sampling)
    queries: list = None      # B x [each search's query]
    documents: list = None    # B x [each search's documents]
    engine_seeds: list = None  # B x [each search's seed: sim.draw_kinds(n, noise_prob, seeds) says useful or noisy]


def rollout(policy, tok, questions, engine, cfg, noise_prob=0.0, seeds=None, greedy=False, max_turns=None,
            template=None, rag=False):
    """Search-R1/ZeroSearch rollout of many sequences at once. Each turn samples every active
    sequence until `</search>` or `</answer>`; the queries of the whole batch go to the engine in
    one call; its documents come back inside <information> (masked out of every loss) and
    generation resumes; a turn with neither action gets the paper's fixed "invalid action"
    observation (`invalid_action`) and tries again. After `max_turns` turns one last turn has
    search disabled. `seeds`, one int per question (default 0, 1, ...): a row's tokens and its
    searches draw from streams of its own, so a question samples the same in any batch, on one
    process or N. With `rag` (the paper's RAG row) every response starts with one search for the question
    itself, which the policy did not choose (masked as the documents are); then it answers, search disabled."""
    max_turns = 0 if rag else cfg["max_turns"] if max_turns is None else max_turns
    template = template or cfg["prompt_template"]
    prompts = [sim.prompt_ids(tok, template.format(question=q["question"]), cfg["chat_template"]) for q in questions]
    B = len(questions)
    resp, mask, queries, documents, engine_seeds = ([[] for _ in range(B)] for _ in range(5))
    searches, active, engine_seconds = [0] * B, list(range(B)), 0.0
    seeds = list(range(B)) if seeds is None else seeds
    if rag:
        forced = engine.search([dict(q, query=q["question"]) for q in questions], noise_prob, [s * 1000 + 499 for s in seeds])
        for i, (q, d) in enumerate(zip(questions, forced)):
            resp[i] = tok.encode(f"<search> {q['question']} </search>" + sim.information(d), add_special_tokens=False)
            mask[i], searches[i], queries[i], documents[i] = [0] * len(resp[i]), 1, [q["question"]], [d]
    for turn in range(max_turns + 1):
        if not active:
            break
        last = turn == max_turns
        new, _ = sim.sample(policy, [prompts[i] + resp[i] for i in active], cfg["max_turn_tokens"],
                        temperature=0.0 if greedy else cfg["temperature"], top_p=cfg["top_p"],
                        stop=("</answer>",) if last else ("</search>", "</answer>"),
                        eos_token_id=tok.eos_token_id, seed=[seeds[i] * 1000 + turn for i in active], tokenizer=tok)
        requests, invalid = [], []  # (batch row, query): rows keep their own question (fault 1 of the public code)
        for i, toks in zip(active, new):
            resp[i] += toks
            mask[i] += [1] * len(toks)
            if last or len(resp[i]) >= cfg["max_response_tokens"]:
                continue
            action = parse_action(tok.decode(toks))
            if action and action[0] == "search":
                requests.append((i, action[1]))
            elif not action and cfg["invalid_action"]:
                invalid.append(i)  # neither search nor answer: the fixed "invalid action" observation, try again
        t0 = time.time()
        engine_seed = [seeds[i] * 1000 + 500 + turn for i, _ in requests]  # not the policy's stream
        docs = engine.search([dict(questions[i], query=q) for i, q in requests], noise_prob, engine_seed) if requests else []
        engine_seconds += time.time() - t0
        observations = {i: sim.information(d) for (i, _), d in zip(requests, docs)}
        observations.update({i: " " + cfg["invalid_action"] for i in invalid})
        for i, obs in observations.items():
            obs = tok.encode(obs, add_special_tokens=False)
            resp[i] += obs
            mask[i] += [0] * len(obs)
        for (i, query), d, s in zip(requests, docs, engine_seed):
            searches[i] += 1
            queries[i].append(query)
            documents[i].append(d)
            engine_seeds[i].append(s)
        active = sorted(observations)
    # the response is cut to its budget before the answer is read: the reward is for tokens that are trained
    resp, mask = [r[:cfg["max_response_tokens"]] for r in resp], [m[:cfg["max_response_tokens"]] for m in mask]
    answers = [reward.extract_answer(tok.decode([t for t, m in zip(r, ms) if m])) for r, ms in zip(resp, mask)]
    return Rollout(prompts, resp, mask, answers, searches, engine_seconds, queries, documents, engine_seeds)


def parse_action(text):
    """The turn's first action, as Search-R1 reads it: ("search" | "answer", its text), or None."""
    found = re.search(r"<(search|answer)>(.*?)</\1>", text, flags=re.DOTALL)
    return (found.group(1), found.group(2).strip()) if found else None


# ----------------------------------------------------------------------------- RL
def train(policy_path, tok, questions, engine, cfg, ctx, name):
    """RL on `questions` against `engine`, resumed from a checkpoint if cfg["resume"] says so; returns
    the trained Hugging Face policy, with full weights on every process."""
    cfg = dict(cfg, mini_batch_size=cfg["mini_batch_size"] // ctx.world, seed=rl_seed(cfg))  # per process
    compute = getattr(torch, cfg["dtype"])  # fp32 weights on every path, forward passes in `dtype`
    actor, critic, ref, sampler_copy = load_models(policy_path, cfg, ctx)
    models = {"actor": actor, **({"critic": critic} if critic else {})}
    run_dir = os.path.join(cfg["out_dir"], "checkpoints", name)
    metrics_path = os.path.join(cfg["out_dir"], "metrics.jsonl")
    start, kl_coef = parallel.resume_or_start_over(run_dir, metrics_path, models, engine, cfg, ctx)
    order = random.Random(cfg["seed"]).sample(range(len(questions)), len(questions))
    ctrl_c, restore_sigint = parallel.catch_ctrl_c()
    backend = cfg["search_backend"] if name == "zerosearch" else "real"
    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], disable=not ctx.master,
               desc=f"RL {name} ({cfg['algo']}, {backend} search)")
    previous = None  # the last step's row: the engine's counters are totals
    for step in bar:
        clock = Stopwatch()
        # 1. this process's questions of the step, n samples each
        qs, seeds = step_questions(questions, order, step, cfg, ctx)
        # 2. rollout with search; the curriculum sets how often a search returns noisy documents
        noise_prob = curriculum_noise(step, cfg)
        with ppo.autocast(compute, ctx.device):  # one precision on every path: N processes as one
            ro = rollout(parallel.sampler_model(actor.model, sampler_copy), tok, qs, engine, cfg, noise_prob, seeds)
        clock.lap("sample", minus={"engine": ro.engine_seconds})
        # 3. reward: F1 of the final answer
        scores = torch.tensor(score(ro, qs, cfg["reward"]), device=ctx.device)
        # 4. log-probs of the sampled tokens under the policy and the reference; values (PPO)
        ids, attn, mask = to_batch(ro, tok.pad_token_id, ctx.device, cfg["mask_information"])
        old_logp, ref_logp = ppo.logprobs(actor.model, ids, attn, mask, cfg), ppo.logprobs(ref, ids, attn, mask, cfg)
        clock.lap("logprob")
        values = ppo.values(critic.model, ids, attn, cfg) if critic else None
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
            raise SystemExit(f"error: {e}; {parallel.last_good(run_dir)}")
        clock.lap("update")
        # 7. log, 8. checkpoint every save_every steps, at the end, and after Ctrl-C (then stop)
        row = step_metrics(name, step, ro, qs, scores, engine, noise_prob, clock.seconds,
                           adv_stats, stats, ctx, cfg)
        log_step(row, metrics_path, bar, ctx, previous)
        previous = row
        interrupted = ctx.any(ctrl_c[0])
        if (step + 1) % cfg["save_every"] == 0 or step + 1 == cfg["steps"] or interrupted:
            parallel.save_step(run_dir, step, models, row, kl_coef, cfg, ctx)
            if ctx.master:
                report.curves(metrics_path, os.path.join(cfg["out_dir"], "curves.png"))
        if interrupted:
            ctx.print0(f"stopped after step {step + 1} of {name}; checkpoint in {run_dir}; "
                       "continue with resume=true")
            parallel.close(ctx)
            raise SystemExit(0)
    restore_sigint()
    if ctx.master:
        report.curves(metrics_path, os.path.join(cfg["out_dir"], "curves.png"))
    return parallel.sampler_model(actor.model, sampler_copy)


# ----------------------------------------------------------------------------- the step's parts
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
def evaluate(policy, tok, eval_sets, engine, cfg, ctx, max_turns=None, template=None, predictions=None, rag=False):
    """Greedy rollouts on each evaluation set -> {set: {"em", "substring_em", "f1", "n", "searches", "queries/<form>"}}:
    the scores, searches a question and, for the embedded world's questions, the share of queries of each
    form (world.query_form); the questions are sharded over processes and the sums reduced. `predictions`,
    a list: one row per question is appended on process 0 (set, question, golden answers, the whole
    response, the queries, the prediction and its scores)."""
    out = {}
    for name, questions in eval_sets.items():
        mine, rows = questions[ctx.rank::ctx.world], []
        sums = dict.fromkeys(["em", "substring_em", "f1", "n", "searches"] + [f"queries/{f}" for f in world.FORMS], 0.0)
        for i in range(0, len(mine), 128):
            qs = mine[i:i + 128]
            with ppo.autocast(getattr(torch, cfg["dtype"]), ctx.device):  # the precision of training's rollouts
                ro = rollout(policy, tok, qs, engine, cfg, greedy=True, max_turns=max_turns, template=template, rag=rag)
            for a, q, response, queries in zip(ro.answers, qs, ro.response_ids, ro.queries):
                golds = q["golden_answers"]
                scores = {"em": reward.exact_match(a, golds), "substring_em": reward.substring_match(a, golds),
                          "f1": reward.f1_score(a, golds)}
                for key, value in [*scores.items(), ("n", 1), ("searches", len(queries)), *query_forms(queries, q, cfg)]:
                    sums[key] += value
                rows.append({"set": name, "question": q["question"], "golden_answers": golds,
                             "response": tok.decode(response), "queries": queries, "prediction": a, **scores})
        if predictions is not None:
            parts = ctx.gather(rows)  # a collective: every process calls it
            predictions += [row for part in parts for row in part] if ctx.master else []
        sums = ctx.sum_stats(sums)
        searched = sum(v for k, v in sums.items() if k.startswith("queries/"))
        out[name] = {k: v / (searched if k.startswith("queries/") else max(sums["n"], 1)) for k, v in sums.items()
                     if k != "n" and (searched or not k.startswith("queries/"))} | {"n": int(sums["n"])}
    return out


def query_forms(queries, q, cfg):
    """(queries/<form>, 1) for each query about an embedded world's question, by its world.query_form."""
    return [(f"queries/{world.query_form(x, q, cfg['world_phrasings'])}", 1) for x in queries] if "subject" in q else []


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


# ----------------------------------------------------------------------------- the simulator's data
def collect(policy, tok, questions, engine, cfg, n, seed=0):
    """Simulation fine-tuning rows the paper's way: the policy answers `questions` searching the real
    `engine` (sampled, one batch at a time); each (query, documents) of a trajectory whose answer is right
    (substring EM) is labelled useful, of one whose answer is wrong noisy, and kept where the judge agrees
    (`states`: the documents state what the question needs): a failed first search of a right trajectory is
    not useful, nor a list the policy misread noisy. Useful and noisy are balanced within each form of query
    that names the question's entity (world.query_form): else the tiny simulator learns a form's effect (a
    good form mostly useful) and ignores the label. Vague and other-entity queries keep their labels in the
    share they come in, mostly noisy: balanced, they taught it to state the answer for any query. Data
    without entities is balanced as one form. -> (at most n balanced rows and the other queries' rows in
    proportion, useful rows found, noisy rows found)."""
    rng, by_form, pairs = random.Random(seed), collections.defaultdict(lambda: ([], [])), 0  # form -> (useful, noisy)
    order = rng.sample(range(len(questions)), len(questions))
    for start in range(0, len(order), 128):
        batch = [questions[i] for i in order[start:start + 128]]
        ro = rollout(policy, tok, batch, engine, cfg, seeds=[seed * 1_000_003 + start + j for j in range(len(batch))])
        for q, answer, queries, docs in zip(batch, ro.answers, ro.queries, ro.documents):
            right = bool(reward.substring_match(answer, q["golden_answers"]))
            for query, d in zip(queries, docs):
                if d and states(d, q) == right:
                    form = world.query_form(query, q, cfg["world_phrasings"]) if "subject" in q else "any"
                    by_form[form][1 - right].append(dict(query=query, question=q["question"], answer=q["golden_answers"][0],
                                                         documents=d, label="useful" if right else "noisy"))
        pairs = sum(min(len(u), len(x)) for form, (u, x) in by_form.items() if form != "other")
        if pairs >= n // 2:
            break
    share = min(1, n // 2 / pairs) if pairs else 0  # no balanced pair: no rows (build.py stops with one line)
    rows = []
    for form, (u, x) in by_form.items():
        if form != "other":
            k = int(min(len(u), len(x)) * share)
            rows += rng.sample(u, k) + rng.sample(x, k)
    other = by_form["other"][0] + by_form["other"][1]
    rows += rng.sample(other, int(len(other) * share))
    rng.shuffle(rows)
    return rows, sum(len(u) for u, _ in by_form.values()), sum(len(x) for _, x in by_form.values())


def states(docs, q):
    """The judge, exact in a world that knows its facts: the documents hold a passage the question needs
    (one of q's `evidence`, each hop's), or, for questions without evidence, one of its gold answers."""
    if q.get("evidence"):
        return any(e in docs for e in q["evidence"])
    return any(reward.substring_match(d, q["golden_answers"]) for d in docs)


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

    def learner(model, lr, warmup_ratio):  # warm-up over int(ratio * steps) RL steps, as veRL counts them
        warmup = int(warmup_ratio * cfg["steps"])
        return ppo.Learner(model, *ppo.make_optimizer(model, lr, cfg["weight_decay"], warmup, cfg["steps"]))

    actor = learner(parallel.parallelize(policy(), cfg, ctx), cfg["actor_lr"], cfg["lr_warmup_ratio"])
    ref = parallel.parallelize(policy().eval().requires_grad_(False), cfg, ctx, frozen=True)  # KL = 0 at step 0
    critic = None
    if cfg["algo"] == "ppo":
        value_config = AutoConfig.from_pretrained(policy_path, num_labels=1)
        value_config.classifier_dropout = 0.0  # no dropout in the value head (from_pretrained drops this keyword)
        head = AutoModelForTokenClassification.from_pretrained(policy_path, config=value_config, dtype=torch.float32)
        critic = learner(parallel.parallelize(head.to(ctx.device), cfg, ctx), cfg["critic_lr"],
                         cfg["critic_lr_warmup_ratio"])
    copy = policy().eval().requires_grad_(False) if cfg["sharding"] == "fsdp" and ctx.world > 1 else None
    return actor, critic, ref, copy


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


def step_metrics(name, step, ro, qs, scores, engine, noise_prob, seconds, adv_stats, stats, ctx, cfg):
    """One metrics.jsonl row: rewards and counts summed over processes, statistics averaged (the share
    of queries of each form, world.query_form, for the embedded world's questions); the step's time
    split as time/<stage> (this process's, or process 0's under torchrun)."""
    em = [reward.substring_match(a, q["golden_answers"]) for a, q in zip(ro.answers, qs)]
    forms = dict.fromkeys((f"queries/{f}" for f in world.FORMS), 0) if "subject" in qs[0] else {}
    for q, queries in zip(qs, ro.queries):
        for key, _ in query_forms(queries, q, cfg):
            forms[key] += 1
    sums = ctx.sum_stats({"reward": scores.sum().item(), "em": sum(em), "searches": sum(ro.searches),
                          "sampled": sum(sum(m) for m in ro.response_mask), "n": len(qs), **engine.stats, **forms})
    engine_totals = {f"sim/{k}": int(sums[k]) for k in engine.stats}
    forms = {k: sums[k] / max(sums["searches"], 1) for k in forms}  # the share of the step's queries of each form
    return {"run": name, "step": step, "reward": sums["reward"] / sums["n"], "em": sums["em"] / sums["n"],
            "searches": sums["searches"] / sums["n"], **forms, "noise_prob": noise_prob,
            "tokens_per_s": sums["sampled"] / max(seconds["sample"], 1e-9), "step_time": sum(seconds.values()),
            **{f"time/{k}": v for k, v in seconds.items()}, **adv_stats, **ctx.mean_stats(stats), **engine_totals}


def log_step(row, metrics_path, bar, ctx, previous=None):
    """Appends the row to metrics.jsonl and shows it on the progress bar; warns in one line when most of the
    step's simulator outputs were malformed (the engine's totals against the `previous` row's)."""
    if not ctx.master:
        return
    new = {k: row.get(f"sim/{k}", 0) - (previous or {}).get(f"sim/{k}", 0) for k in ("useful", "noisy", "malformed")}
    if new["malformed"] > (new["useful"] + new["noisy"]) / 2:
        bar.write(f"warning: step {row['step']}: {new['malformed']} of {new['useful'] + new['noisy']} simulator outputs "
                  "held fewer than topk documents; check sim_model, sim_style and sim_temperature")
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    slowest = sorted((k for k in row if k.startswith("time/")), key=row.get)[-2:][::-1]  # the two largest
    bar.set_postfix(reward=f"{row['reward']:.3f}", em=f"{row['em']:.2f}", noise=f"{row['noise_prob']:.2f}",
                    **{k[len("time/"):]: f"{row[k]:.1f}s" for k in slowest})


def rl_seed(cfg):
    """RL's seed: rl_seed, or seed when it is null (the build always uses seed)."""
    return cfg["seed"] if cfg["rl_seed"] is None else cfg["rl_seed"]


# ----------------------------------------------------------------------------- main


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
            build.check_model(key, cfg[key])
    config.check_folder(cfg["out_dir"], "out_dir")
    lock = config.lock_folder(cfg["out_dir"]) if ctx.master else None  # noqa: F841 (held until main returns)
    if ctx.master:
        with open(os.path.join(cfg["out_dir"], "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    began = time.time()
    tok, train_qs, eval_sets, retriever, sim_path, policy_path, knowledge = build.setup(cfg, ctx, collect)
    seconds = {"build": time.time() - began}  # or its loading; then each RL run, and evaluation is the rest
    build.check_engines(cfg, retriever, policy_path)
    torch.manual_seed(rl_seed(cfg))  # the critic's new head: the same whether the build was made now or loaded
    # evaluation (and the baseline) always searches a real engine, as the paper: BM25 here or a served retriever
    real = build.make_engine(cfg["eval_backend"], cfg, retriever, None, ctx, tok=tok)
    start = AutoModelForCausalLM.from_pretrained(policy_path).to(ctx.device)
    if cfg["mode"] == "ask":
        engine = build.make_engine(cfg["ask_engine"], cfg, retriever, sim_path, ctx, knowledge, tok) if cfg["ask_engine"] else real
        return ask(start, tok, engine, cfg, eval_sets | {"train": train_qs})
    if cfg["mode"] == "eval":
        return evaluate_checkpoint(start, tok, eval_sets, real, cfg, ctx, argv)
    engine = build.make_engine(cfg["search_backend"], cfg, retriever, sim_path, ctx, knowledge, tok)
    results = {"(a) warm-up, no search": evaluate(start, tok, eval_sets, real, cfg, ctx, max_turns=0,
                                                  template=cfg["direct_template"]),
               "RAG: warm-up, one real search for the question": evaluate(start, tok, eval_sets, real, cfg, ctx, rag=True),
               "(b) warm-up + real search": evaluate(start, tok, eval_sets, real, cfg, ctx)}
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
    report.write_results(results, reading, predictions, list(eval_sets), cfg, ctx, argv)
    seconds["evaluation"] = time.time() - began - sum(seconds.values())
    ctx.print0("time: " + ", ".join(f"{stage} {int(s // 60)}m{int(s % 60):02d}s" for stage, s in seconds.items()))
    if ctx.master:  # beside results.json, which runs compare whole
        with open(os.path.join(cfg["out_dir"], "time.json"), "w") as f:
            json.dump(seconds, f)
    parallel.close(ctx)


def evaluate_checkpoint(policy, tok, eval_sets, engine, cfg, ctx, argv):
    """mode=eval: policy_model evaluated on every set, greedy, no training; with the reading check
    where the data is the embedded world."""
    predictions = []
    results = {cfg["policy_model"]: evaluate(policy, tok, eval_sets, engine, cfg, ctx, predictions=predictions)}
    single_hop = [q for q in eval_sets.get("single-hop", []) if q["evidence"]]
    reading = {cfg["policy_model"]: reading_check(policy, tok, single_hop, engine, cfg, ctx)} if single_hop else {}
    report.write_results(results, reading, predictions, list(eval_sets), cfg, ctx, argv, strict=True)
    parallel.close(ctx)


def ask(policy, tok, engine, cfg, known):
    """mode=ask: each question (`question`, or one a line from standard input) answered greedily, its
    trajectory printed turn by turn: the policy's text, each query's documents (useful or noisy when a
    simulator wrote them), the answer. A question of the embedded world's sets keeps its gold answer,
    which the simulator's prompt shows it; any other gets none."""
    golds = {q["question"]: q for questions in known.values() for q in questions}
    if not cfg["question"]:
        print("question= is not set: reading questions from standard input, one a line (Ctrl-D ends)", file=sys.stderr)
    lines = [cfg["question"]] if cfg["question"] else (line.strip() for line in sys.stdin)
    simulated = isinstance(engine, (sim.SimEngine, engines.HttpEngine))
    noise = cfg["noise_prob"] or 0.0
    for text in filter(None, lines):
        q = golds.get(text, {"question": text, "golden_answers": [""], "evidence": []})
        ro = rollout(policy, tok, [q], engine, cfg, noise_prob=noise, greedy=True)
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
