"""zerosearch: train an LLM to search with RL, where the search engine is itself an LLM.

A minimal reference implementation of ZeroSearch (Sun et al., 2025, arXiv 2505.04588): the reward,
the curriculum, the multi-turn rollout with search, evaluation and the RL loop (`train`, one step
as numbered stages). README.md explains the method, the embedded default and the differences
from the paper; config.yaml lists every key.

    python zerosearch.py                  # the embedded default on a 2-core CPU (about 13 min)
    python zerosearch.py preset=smoke     # the whole pipeline in under a minute
    python zerosearch.py algo=grpo steps=40 out_dir=out/grpo   # any key of config.yaml as key=value
    torchrun --nproc_per_node=8 zerosearch.py preset=paper data=... eval_data=... corpus=...
"""
import collections
import json
import os
import random
import re
import string
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
import parallel
import ppo
import sim
import world


# ----------------------------------------------------------------------------- reward
def normalize_answer(text):
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse white space."""
    text = "".join(ch for ch in str(text).lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def extract_answer(response_text):
    """The text inside the last <answer>...</answer> of the response, or None. Pass the
    *response* only: the prompt holds example tags that must never be scored."""
    found = re.findall(r"<answer>(.*?)</answer>", response_text or "", flags=re.DOTALL)
    return found[-1].strip() if found else None


def f1_score(prediction, golds):
    """Word-level F1 (SQuAD), max over the gold answers; 0 for no answer."""
    if prediction is None:
        return 0.0
    pred, best = normalize_answer(prediction).split(), 0.0
    for gold in golds:
        gold = normalize_answer(gold).split()
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def exact_match(prediction, golds):
    """Strict EM: the normalised prediction equals a normalised gold answer."""
    return float(prediction is not None and normalize_answer(prediction) in {normalize_answer(g) for g in golds})


def substring_match(prediction, golds):
    """What the paper's tables call EM (the official code's check): a normalised gold answer occurs
    in the normalised prediction, as a plain substring ("1990" is in "1990s")."""
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(g) in pred for g in golds if normalize_answer(g)))


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


# ----------------------------------------------------------------------------- rollout
@dataclass
class Rollout:
    """B trajectories as token lists (ragged); `to_batch` pads them into tensors."""
    prompt_ids: list      # B x [prompt tokens]
    response_ids: list    # B x [response tokens]: sampled actions and injected observations
    response_mask: list   # B x [1 where the policy sampled the token, 0 inside <information>]
    answers: list         # B x (answer text or None), from the policy's own tokens
    searches: list        # B x number of searches made


def rollout(policy, tok, questions, engine, cfg, noise_prob=0.0, seeds=None, greedy=False, max_turns=None, template=None):
    """Search-R1/ZeroSearch rollout of many sequences at once. Each turn samples every active
    sequence until `</search>` or `</answer>`; the queries of the whole batch go to the engine
    in one call; its documents come back inside <information> (masked out of every loss) and
    generation resumes; a turn with neither action gets the paper's fixed "invalid action" observation
    (`invalid_action`) and tries again. After `max_turns` turns one last turn has search disabled. `seeds`, one
    int per question (default 0, 1, ...): a row's tokens and its searches draw from streams of its
    own, so a question samples the same in any batch, on one process or N."""
    max_turns = cfg["max_turns"] if max_turns is None else max_turns
    template = template or cfg["prompt_template"]
    prompts = [sim.prompt_ids(tok, template.format(question=q["question"]), cfg["chat_template"]) for q in questions]
    resp, mask, searches = [[] for _ in questions], [[] for _ in questions], [0] * len(questions)
    active = list(range(len(questions)))
    seeds = list(range(len(questions))) if seeds is None else seeds
    for turn in range(max_turns + 1):
        if not active:
            break
        last = turn == max_turns
        new, _ = sim.sample(policy, [prompts[i] + resp[i] for i in active], cfg["max_turn_tokens"],
                        temperature=0.0 if greedy else cfg["temperature"], top_p=cfg["top_p"],
                        stop=("</answer>",) if last else ("</search>", "</answer>"),
                        eos_token_id=tok.eos_token_id, seed=[seeds[i] * 1000 + turn for i in active], tokenizer=tok)
        requests, invalid = [], []  # (batch row, query): rows are kept with their own question (fault 1 of the public code)
        for i, toks in zip(active, new):
            resp[i] += toks
            mask[i] += [1] * len(toks)
            text = tok.decode(toks)
            if last or len(resp[i]) >= cfg["max_response_tokens"]:
                continue
            action = re.search(r"<(search|answer)>(.*?)</\1>", text, flags=re.DOTALL)  # the turn's first action
            if action and action.group(1) == "search":
                requests.append((i, action.group(2).strip()))
            elif not action and cfg["invalid_action"]:
                invalid.append(i)  # neither search nor answer: the fixed "invalid action" observation, try again
        docs = engine.search([dict(questions[i], query=q) for i, q in requests], noise_prob,
                             [seeds[i] * 1000 + 500 + turn for i, _ in requests]) if requests else []  # not the policy's stream
        observations = {i: sim.information(d) for (i, _), d in zip(requests, docs)}
        observations.update({i: " " + cfg["invalid_action"] for i in invalid})
        for i, obs in observations.items():
            obs = tok.encode(obs, add_special_tokens=False)
            resp[i] += obs
            mask[i] += [0] * len(obs)
        for i, _ in requests:
            searches[i] += 1
        active = sorted(observations)
    # the response is cut to its budget before the answer is read: the reward is for tokens that are trained
    resp, mask = [r[:cfg["max_response_tokens"]] for r in resp], [m[:cfg["max_response_tokens"]] for m in mask]
    answers = [extract_answer(tok.decode([t for t, m in zip(r, ms) if m])) for r, ms in zip(resp, mask)]
    return Rollout(prompts, resp, mask, answers, searches)


def to_batch(ro, pad_id, device):
    """Right-padded tensors [B, T] of prompt + response; response_mask is 1 only on sampled tokens."""
    seqs = [p + r for p, r in zip(ro.prompt_ids, ro.response_ids)]
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), T, dtype=torch.long)
    response_mask = torch.zeros(len(seqs), T)
    for b, (p, s, m) in enumerate(zip(ro.prompt_ids, seqs, ro.response_mask)):
        input_ids[b, :len(s)] = torch.tensor(s)
        attention_mask[b, :len(s)] = 1
        response_mask[b, len(p):len(s)] = torch.tensor(m, dtype=torch.float)
    return input_ids.to(device), attention_mask.to(device), response_mask.to(device)


def score(ro, questions, kind="f1"):
    """Per-sequence outcome reward: F1 (paper) or strict EM of the answer against the golds."""
    fn = f1_score if kind == "f1" else exact_match
    return [fn(a, q["golden_answers"]) for a, q in zip(ro.answers, questions)]


# ----------------------------------------------------------------------------- evaluation
def evaluate(policy, tok, eval_sets, engine, cfg, ctx, max_turns=None, template=None):
    """Greedy rollouts on each evaluation set -> {set: {"em", "substring_em", "f1", "n"}}; the
    questions are sharded over processes and the sums reduced."""
    out = {}
    for name, questions in eval_sets.items():
        mine = questions[ctx.rank::ctx.world]
        sums = torch.zeros(4, dtype=torch.float64)
        for i in range(0, len(mine), 128):
            qs = mine[i:i + 128]
            with ppo.autocast(getattr(torch, cfg["dtype"]), ctx.device):  # the precision of training's rollouts
                ro = rollout(policy, tok, qs, engine, cfg, greedy=True, max_turns=max_turns, template=template)
            for a, q in zip(ro.answers, qs):
                sums += torch.tensor([exact_match(a, q["golden_answers"]), substring_match(a, q["golden_answers"]),
                                      f1_score(a, q["golden_answers"]), 1.0], dtype=torch.float64)
        sums = ctx.all_sum(sums)
        n = max(sums[3].item(), 1)
        out[name] = {"em": sums[0].item() / n, "substring_em": sums[1].item() / n, "f1": sums[2].item() / n, "n": int(sums[3])}
    return out


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


def step_questions(questions, order, step, cfg, ctx):
    """This process's questions of a step, n_samples copies each, and a seed per row. The global batch
    is strided over processes; a question's samples stay on one process (GRPO groups stay whole), and
    each row's seed is its place in the global batch, so N processes sample what one does."""
    mine = [step * cfg["batch_size"] + j for j in range(cfg["batch_size"])][ctx.rank::ctx.world]
    qs = [questions[order[i % len(order)]] for i in mine for _ in range(cfg["n_samples"])]
    seeds = [cfg["seed"] * 1_000_003 + i * cfg["n_samples"] + s for i in mine for s in range(cfg["n_samples"])]
    return qs, seeds


def step_metrics(name, step, ro, qs, scores, engine, noise_prob, timing, adv_stats, stats, ctx):
    """One metrics.jsonl row: rewards and counts summed over processes, statistics averaged."""
    em = [substring_match(a, q["golden_answers"]) for a, q in zip(ro.answers, qs)]
    sums = ctx.sum_stats({"reward": scores.sum().item(), "em": sum(em), "searches": sum(ro.searches),
                          "sampled": sum(sum(m) for m in ro.response_mask), "n": len(qs), **engine.stats})
    engine_totals = {f"sim/{k}": int(sums[k]) for k in engine.stats}
    return {"run": name, "step": step, "reward": sums["reward"] / sums["n"], "em": sums["em"] / sums["n"],
            "searches": sums["searches"] / sums["n"], "noise_prob": noise_prob,
            "tokens_per_s": sums["sampled"] / max(timing["rollout"], 1e-9), "step_time": timing["step"],
            **adv_stats, **ctx.mean_stats(stats), **engine_totals}


def log_step(row, metrics_path, bar, ctx):
    if ctx.master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(reward=f"{row['reward']:.3f}", em=f"{row['em']:.2f}", noise=f"{row['noise_prob']:.2f}",
                        tok_s=f"{row['tokens_per_s']:.0f}")


def save_step(run_dir, step, models, row, kl_coef, cfg, ctx):
    """A checkpoint after `step` (numbered step + 1, the next step to run)."""
    engine_totals = {k[len("sim/"):]: v for k, v in row.items() if k.startswith("sim/")}
    state = {"step": step + 1, "kl_coef": kl_coef, "noise_prob": row["noise_prob"], "engine_stats": engine_totals}
    parallel.save_checkpoint(os.path.join(run_dir, f"step_{step + 1:06d}"), models, state, ctx, cfg["keep_last"])


def train(policy_path, tok, questions, engine, cfg, ctx, name):
    """RL on `questions` against `engine`, resumed from a checkpoint if cfg["resume"] says so; returns
    the trained Hugging Face policy, with full weights on every process."""
    cfg = dict(cfg, mini_batch_size=cfg["mini_batch_size"] // ctx.world)  # per process
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
        t0 = time.time()
        # 1. this process's questions of the step, n samples each
        qs, seeds = step_questions(questions, order, step, cfg, ctx)
        # 2. rollout with search; the curriculum sets how often a search returns noisy documents
        noise_prob = curriculum_noise(step, cfg)
        with ppo.autocast(compute, ctx.device):  # one precision on every path: N processes sample as one
            policy = parallel.sampler_model(actor.model, sampler_copy)
            ro = rollout(policy, tok, qs, engine, cfg, noise_prob=noise_prob, seeds=seeds)
        t_rollout = time.time() - t0
        # 3. reward: F1 of the final answer
        scores = torch.tensor(score(ro, qs, cfg["reward"]), device=ctx.device)
        # 4. log-probs of the sampled tokens under the policy and the frozen reference; values (PPO);
        #    each forward pass runs on the real tokens alone, several sequences a row (ppo.padding_free)
        ids, attn, response_mask = to_batch(ro, tok.pad_token_id, ctx.device)
        with torch.no_grad():
            old_logp, _ = actor.model(ids, attn, cfg["temperature"])
            ref_logp, _ = ref(ids, attn, cfg["temperature"])
            values = ppo.token_values(critic.model, ids, attn, compute) if critic else None
        # 5. advantages (GAE / group-normalised / REINFORCE / REINFORCE++), whitened over all processes
        advantages, returns, adv_stats = ppo.compute_advantages(
            cfg["algo"], scores, response_mask, old_logp, ref_logp, values, cfg, kl_coef, reduce=ctx.all_sum)
        adv_stats = ctx.mean_stats(adv_stats)  # the same on every process, so is kl_coef
        kl_coef = ppo.adaptive_kl_coef(kl_coef, adv_stats["rollout/kl"], len(qs) * ctx.world,
                                       cfg["kl_target"], cfg["kl_horizon"])  # fixed when kl_target is null
        # 6. PPO epochs over mini-batches; DDP/FSDP average the gradients over processes
        batch = ppo.Batch(ids, attn, response_mask, old_logp, ref_logp, advantages, values, returns)
        try:
            stats = ppo.update(actor, critic, batch, cfg, kl_coef, step, ctx.all_mean)
        except ppo.NonFiniteError as e:
            raise SystemExit(f"error: {e}; the last good weights are in the newest checkpoint in {run_dir}")
        # 7. log, 8. checkpoint every save_every steps, at the end, and after Ctrl-C (then stop)
        timing = {"rollout": t_rollout, "step": time.time() - t0}
        row = step_metrics(name, step, ro, qs, scores, engine, noise_prob, timing, adv_stats, stats, ctx)
        log_step(row, metrics_path, bar, ctx)
        interrupted = ctx.any(ctrl_c[0])
        if (step + 1) % cfg["save_every"] == 0 or step + 1 == cfg["steps"] or interrupted:
            save_step(run_dir, step, models, row, kl_coef, cfg, ctx)
        if interrupted:
            ctx.print0(f"stopped after step {step + 1} of {name}; checkpoint in {run_dir}; continue with resume=true")
            parallel.close(ctx)
            raise SystemExit(0)
    restore_sigint()
    return parallel.sampler_model(actor.model, sampler_copy)


# ----------------------------------------------------------------------------- main
def setup(cfg, ctx):
    """Tokenizer, train questions, evaluation sets, the real retriever, the simulator's
    and the starting policy's paths: built here for the embedded world, else from the config."""
    if cfg["data"] == "world":
        cache = os.path.join(cfg["out_dir"], "build")
        if ctx.master:  # one process builds, the others wait and load
            build.prepare_embedded(cfg, cache, log=ctx.print0)
        ctx.barrier()
        w, retriever, sim_path, policy_path = build.prepare_embedded(cfg, cache, log=lambda *a: None)
        tok = world.load_tokenizer(cfg["policy_model"] or policy_path)  # a real policy on the world keeps its own
        test = {"single-hop": [q for q in w.test if q["hops"] == 1], "two-hop": [q for q in w.test if q["hops"] == 2]}
        eval_sets = {k: v[:cfg["eval_size"] // 2] for k, v in test.items()}
        knowledge = None if cfg["sim_model"] else world.knowledge_index(w.docs)  # a real simulator has its own
        train_qs = world.split_train(w.train, cfg["rl_share"])[1]
        return tok, train_qs, eval_sets, retriever, cfg["sim_model"] or sim_path, cfg["policy_model"] or policy_path, knowledge
    if not cfg["policy_model"]:
        raise SystemExit("error: data is a file, so policy_model must name a model (e.g. policy_model=Qwen/Qwen2.5-3B)")
    if not cfg["corpus"]:  # the simulator sees the gold answer, so it must never be the evaluation's engine
        raise SystemExit("error: data is a file, so evaluation needs a real engine: set corpus=path/to/corpus.jsonl")
    tok = world.load_tokenizer(cfg["policy_model"])
    eval_sets = {}
    for item in str(cfg["eval_data"]).split(","):
        name, _, path = item.partition("=")
        if not path:
            raise SystemExit(f"error: eval_data item {item!r} must be name=path (e.g. nq=data/nq_test.jsonl)")
        eval_sets[name] = world.load_questions(path)[:cfg["eval_size"]]
    retriever = sim.Retriever(world.load_corpus(cfg["corpus"]))
    return tok, world.load_questions(cfg["data"]), eval_sets, retriever, cfg["sim_model"], cfg["policy_model"], None


def make_engine(backend, cfg, retriever, sim_path, ctx, knowledge=None):
    """The search engine of `backend`; `knowledge(query)` (embedded world) feeds the simulator's prompt."""
    if backend == "real":
        return sim.RealEngine(retriever, cfg)
    if backend == "http":
        if not sim_path:
            raise SystemExit("error: search_backend=http needs sim_model (the served simulator's name or path; "
                             "its tokenizer cuts documents to doc_tokens)")
        return sim.HttpEngine(cfg, world.load_tokenizer(sim_path), cfg["sim_served_model"] or sim_path, knowledge)
    if backend == "sim":
        if not sim_path:
            raise SystemExit("error: search_backend=sim needs sim_model (a fine-tuned simulator's name or path)")
        model = AutoModelForCausalLM.from_pretrained(sim_path).to(ctx.device)
        return sim.SimEngine(model, world.load_tokenizer(sim_path), cfg, knowledge)
    raise SystemExit(f"error: search_backend must be sim, real or http, got {backend!r}")


def results_table(results, sets):
    """The paper's table: EM (substring, as the paper's tables) per evaluation set, then F1."""
    head = "| policy | " + " | ".join(sets) + " | avg |\n|---|" + "---|" * (len(sets) + 1) + "\n"
    lines = []
    for label, res in results.items():
        em = [100 * res[s]["substring_em"] for s in sets]
        f1 = [100 * res[s]["f1"] for s in sets]
        lines.append(f"| {label} | " + " | ".join(f"{e:.1f} / {f:.1f}" for e, f in zip(em, f1)) +
                     f" | {sum(em) / len(em):.1f} / {sum(f1) / len(f1):.1f} |")
    return ("EM / F1 (x100); EM = a normalised gold answer occurs in the normalised prediction, as in the paper.\n\n"
            + head + "\n".join(lines) + "\n")


def main(argv):
    hf_logging.set_verbosity_error()
    cfg = config.load_config(argv)
    ctx = parallel.init_processes(cfg)
    parallel.check_config(cfg, ctx, runs=("zerosearch", "search_r1"))
    os.makedirs(cfg["out_dir"], exist_ok=True)
    if ctx.master:
        with open(os.path.join(cfg["out_dir"], "config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f, sort_keys=False)
    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    tok, train_qs, eval_sets, retriever, sim_path, policy_path, knowledge = setup(cfg, ctx)
    real = make_engine("real", cfg, retriever, None, ctx)  # evaluation always searches the real engine, as the paper
    start = AutoModelForCausalLM.from_pretrained(policy_path).to(ctx.device)
    results = {"(a) warm-up, no search": evaluate(start, tok, eval_sets, real, cfg, ctx, max_turns=0,
                                                  template=cfg["direct_template"]),
               "(b) warm-up + real search (RAG-like)": evaluate(start, tok, eval_sets, real, cfg, ctx)}
    engine = make_engine(cfg["search_backend"], cfg, retriever, sim_path, ctx, knowledge)
    policy = train(policy_path, tok, train_qs, engine, cfg, ctx, "zerosearch")
    results[f"(c) ZeroSearch ({cfg['algo']}, {cfg['search_backend']} engine)"] = evaluate(policy, tok, eval_sets, real, cfg, ctx)
    if ctx.master:
        policy.save_pretrained(os.path.join(cfg["out_dir"], "policy_zerosearch"))
        tok.save_pretrained(os.path.join(cfg["out_dir"], "policy_zerosearch"))
    if cfg["baseline"]:
        baseline = train(policy_path, tok, train_qs, real, cfg, ctx, "search_r1")
        results[f"(d) Search-R1 ({cfg['algo']}, real engine)"] = evaluate(baseline, tok, eval_sets, real, cfg, ctx)
    table = results_table(results, list(eval_sets))
    ctx.print0("\n" + table)
    if ctx.master:
        with open(os.path.join(cfg["out_dir"], "results.md"), "w") as f:
            f.write(f"# Results\n\n`python zerosearch.py {' '.join(argv)}`\n\n{table}")
        with open(os.path.join(cfg["out_dir"], "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    parallel.close(ctx)


if __name__ == "__main__":
    main(sys.argv[1:])
