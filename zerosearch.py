"""zerosearch: train an LLM to search with RL, where the search engine is itself an LLM.

A minimal reference implementation of ZeroSearch (Sun et al., 2025, arXiv 2505.04588). The
policy answers a question by interleaving <think>, <search> query </search>, <information>
documents </information> and <answer>; a *simulator* LLM writes the documents, useful or
noisy, with the share of noisy ones rising along a curriculum; the reward is the F1 of the
final answer; PPO (or GRPO, REINFORCE, REINFORCE++) updates the policy with the <information> tokens
masked out of every loss. Evaluation searches a real engine.

Run
    python zerosearch.py                        # the embedded default on a 2-core CPU (about 12 min)
    python zerosearch.py preset=smoke           # the whole pipeline in under a minute
    torchrun --nproc_per_node=8 zerosearch.py preset=paper data=... eval_data=... corpus=...   # Qwen2.5-3B on 8 GPUs
    python zerosearch.py algo=grpo steps=40 out_dir=out/grpo # any key of config.yaml as key=value
    python zerosearch.py resume=true            # continue each run from its newest checkpoint

Processes (parallel.py)
    torchrun --nproc_per_node=2 zerosearch.py preset=smoke                      # 2 processes, gloo on a CPU
    torchrun --nproc_per_node=8 zerosearch.py preset=paper     # NCCL on 8 GPUs (the preset: fsdp, http simulator)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_id=zs --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 zerosearch.py preset=paper     # the same line on each of 2 nodes
The same file runs on one process or N. Each process samples its share of a step's questions
(all n samples of a question on one process, so GRPO groups stay whole); each row draws from
random streams keyed by its place in the global batch, so N processes sample what one does.
Rewards, metrics and advantage statistics are reduced over processes, the token-mean loss is
normalised by the global token count (DDP/FSDP's gradient average is then the one-process
gradient), and only process 0 logs and writes files. sharding=ddp replicates the actor and
critic; sharding=fsdp shards them with FSDP2 (ref_offload keeps the frozen reference's shards
on the CPU). Checkpoints (out_dir/checkpoints/<run>/step_N) are written every save_every steps,
at the end, and after Ctrl-C, which finishes the step, saves and exits; under torchrun give
--shutdown-timeout more seconds than a step takes, or torchrun kills the processes first.

The embedded default needs no download: it generates a synthetic world of facts (world.py),
trains a tokenizer on it, warms a tiny policy up on the *format* (on trajectories whose
queries and answers are not reliably right), and fine-tunes a copy of it into the simulator
on (query, documents, useful/noisy) rows from the world's real retriever.

Deliberate differences from the paper (and why)
1. The tiny simulator's prompt carries its knowledge: the world's statements about the
   entities the query names (world.knowledge_index, `{evidence}` in its template). A 14B
   simulator has memorised Wikipedia; a 1M-parameter one cannot memorise 11,600 facts in
   minutes. It is not a search engine (no ranking; a query that names no entity gets nothing),
   and its useful documents are faithful to the *query*: a query about the wrong entity gets
   that entity's facts, never the answer, so only a good query is rewarded.
2. The tiny policy starts from a format warm-up (world.warmup_trajectory) instead of a
   pretrained base model. Its queries name the right entity 30% of the time and are vague 45%
   of the time, so it starts honestly weak. The warm-up's loss also covers the <information>
   blocks (predicting what the engine returns for a query is how a tiny model learns to copy
   names, a skill a base LLM brings); RL masks them out of every loss, as the paper does.
3. Rollouts sample at temperature 0.5 (paper 1.0): the tiny model's distributions are flat
   and at 1.0 too few samples succeed for RL to start (TINY_WORLD in the design notes).
4. Sizes are scaled to a 2-core CPU: 3 documents a search (paper 5), short turns (48 tokens,
   paper 500), higher learning rates, 2 PPO epochs. presets/paper.yaml restores the paper's
   settings.
"""
import collections
import difflib
import json
import os
import random
import re
import string
import sys
import time
from dataclasses import dataclass

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))


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


# ----------------------------------------------------------------------------- config
def load_config(argv):
    """config.yaml < presets/<preset>.yaml < --config FILE < key=value arguments."""
    with open(os.path.join(HERE, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    args, files = [], []
    it = iter(argv)
    for a in it:
        if a == "--config" or a.startswith("--config="):
            files.append(a.split("=", 1)[1] if "=" in a else next(it, None))
        elif "=" in a:
            args.append(a.split("=", 1))
        else:
            raise SystemExit(f"error: argument {a!r} is not key=value (e.g. steps=10) or --config FILE")
    overrides = {k.lstrip("-"): _parse_value(v) for k, v in args}
    preset = overrides.get("preset", cfg["preset"])
    if preset:
        files.insert(0, os.path.join(HERE, "presets", f"{preset}.yaml"))
    for path in files:
        if not path or not os.path.exists(path):
            raise SystemExit(f"error: config file not found: {path} (presets are in {os.path.join(HERE, 'presets')})")
        with open(path) as f:
            _merge(cfg, yaml.safe_load(f) or {}, path)
    _merge(cfg, overrides, "the command line")
    return check_values(cfg)


CHOICES = {"algo": ("ppo", "grpo", "reinforce", "reinforce++"), "reward": ("f1", "em"), "dtype": ("float32", "bfloat16"),
           "search_backend": ("sim", "real", "http"), "sim_style": ("finetuned", "prompted"), "sharding": ("ddp", "fsdp"),
           "loss_agg": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"), "kl_type": ("k1", "abs", "k2", "k3")}
AT_LEAST_ONE = ["steps", "batch_size", "n_samples", "mini_batch_size", "micro_batch_size", "ppo_epochs", "topk", "doc_tokens",
                "max_turn_tokens", "max_response_tokens", "sim_max_tokens", "eval_size", "threads", "sim_retries"]


def check_values(cfg):
    """Each value of the right kind, one clear line if not: a number where config.yaml has a number
    (1e3 is taken as 1000 where a whole number is due), a choice from CHOICES, counts of at least 1."""
    with open(os.path.join(HERE, "config.yaml")) as f:
        defaults = yaml.safe_load(f)
    for key, default in defaults.items():
        value = cfg[key]
        if isinstance(default, bool) and not isinstance(value, bool) and key != "resume":  # resume may name a folder
            raise SystemExit(f"error: {key} must be true or false, got {value!r}")
        if type(default) is int and isinstance(value, float) and value.is_integer():
            cfg[key] = value = int(value)
        if type(default) in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                or type(default) is int and not isinstance(value, int)):
            raise SystemExit(f"error: {key} must be a {'whole ' if type(default) is int else ''}number, got {value!r}")
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise SystemExit(f"error: {key} must be one of {', '.join(allowed)}; got {cfg[key]!r}")
    for key in AT_LEAST_ONE:
        if cfg[key] < 1:
            raise SystemExit(f"error: {key} must be at least 1, got {cfg[key]}")
    if not 0 <= cfg["p_start"] <= 1 or not 0 <= cfg["p_end"] <= 1:
        raise SystemExit("error: p_start and p_end are probabilities: each must be between 0 and 1")
    if cfg["curriculum_base"] <= 0 or cfg["curriculum_base"] == 1:
        raise SystemExit(f"error: curriculum_base (b in (b^(i/m) - 1)/(b - 1)) must be positive and not 1, got {cfg['curriculum_base']}")
    return cfg


def _parse_value(text):
    value = yaml.safe_load(text)
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _merge(cfg, new, source):
    for k, v in new.items():
        if k not in cfg:
            near = difflib.get_close_matches(k, cfg, n=1)
            raise SystemExit(f"error: unknown config key {k!r} in {source}" + (f"; did you mean {near[0]!r}?" if near else ""))
        cfg[k] = v


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
    from sim import information, prompt_ids, sample
    max_turns = cfg["max_turns"] if max_turns is None else max_turns
    template = template or cfg["prompt_template"]
    prompts = [prompt_ids(tok, template.format(question=q["question"]), cfg["chat_template"]) for q in questions]
    resp, mask, searches = [[] for _ in questions], [[] for _ in questions], [0] * len(questions)
    active = list(range(len(questions)))
    seeds = list(range(len(questions))) if seeds is None else seeds
    for turn in range(max_turns + 1):
        if not active:
            break
        last = turn == max_turns
        new, _ = sample(policy, [prompts[i] + resp[i] for i in active], cfg["max_turn_tokens"],
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
        observations = {i: information(d) for (i, _), d in zip(requests, docs)}
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
    import torch
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
    import torch
    import ppo
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
    """The trained actor, its frozen reference and (PPO) a critic -- the same weights with a value head --
    each wrapped for cfg["sharding"] (parallel.parallelize); and with fsdp on N processes a plain copy of
    the policy for the sampler (else None: the sampler uses the actor's own model). All weights are
    fp32; forward passes, rollouts included, run in cfg["dtype"] (ppo.autocast)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForTokenClassification
    import parallel
    import ppo
    compute = getattr(torch, cfg["dtype"])  # fp32 weights, compute in `dtype` (ppo.autocast)

    def policy():
        return ppo.Actor(AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32), compute).to(ctx.device)

    actor = parallel.parallelize(policy(), cfg, ctx)
    ref = parallel.parallelize(policy().eval().requires_grad_(False), cfg, ctx, frozen=True)  # fp32 too: KL = 0 at step 0
    critic = None
    if cfg["algo"] == "ppo":
        config = AutoConfig.from_pretrained(policy_path, num_labels=1)
        config.classifier_dropout = 0.0  # no dropout in the value head (from_pretrained drops this keyword)
        critic = AutoModelForTokenClassification.from_pretrained(policy_path, config=config, dtype=torch.float32).to(ctx.device)
        critic = parallel.parallelize(critic, cfg, ctx)
    sampler_copy = policy().eval().requires_grad_(False) if cfg["sharding"] == "fsdp" and ctx.world > 1 else None
    return actor, ref, critic, sampler_copy


def resume_or_start_over(run_dir, metrics_path, models, engine, cfg, ctx):
    """-> the first step to run. With a checkpoint to resume from (cfg["resume"]), its step, after
    restoring the models, optimizers, schedulers, RNG states, kl_coef (into cfg) and the engine's
    counters, and its later checkpoints removed; else 0, after removing the run's old checkpoints. The
    metrics file keeps the other runs' rows and this run's before that step: the steps after it are
    written again."""
    import parallel
    start, checkpoint = 0, parallel.checkpoint_to_resume(cfg["resume"], run_dir)
    if checkpoint:
        state = parallel.load_checkpoint(checkpoint, models, ctx)
        start, cfg["kl_coef"] = state["step"], state["kl_coef"]
        engine.stats.update({k: v if ctx.master else 0 for k, v in state["engine_stats"].items()})  # totals over processes
        ctx.print0(f"{os.path.basename(run_dir)}: resuming from {checkpoint} (step {start} of {cfg['steps']})")
        parallel.drop_checkpoints_after(run_dir, start, ctx)
    else:
        parallel.start_over(run_dir, ctx)
    if ctx.master:
        name, rows = os.path.basename(run_dir), [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
        with open(metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows if r.get("run") != name or r["step"] < start)
    return start


def train(policy_path, tok, questions, engine, cfg, ctx, name):
    """RL on `questions` against `engine`, resumed from a checkpoint if cfg["resume"] says so; returns
    the trained Hugging Face policy, with full weights on every process."""
    import torch
    from tqdm import tqdm
    import parallel
    import ppo
    cfg = dict(cfg, mini_batch_size=cfg["mini_batch_size"] // ctx.world)  # per process; kl_coef may adapt in this run
    compute = getattr(torch, cfg["dtype"])  # fp32 weights on every path, forward passes in `dtype` (ppo.autocast)
    actor, ref, critic, sampler_copy = load_models(policy_path, cfg, ctx)
    actor_opt, actor_sched = ppo.make_optimizer(actor, cfg["actor_lr"], cfg["weight_decay"], cfg["lr_warmup_steps"], cfg["steps"])
    critic_opt, critic_sched = ppo.make_optimizer(critic, cfg["critic_lr"], cfg["weight_decay"], 0, cfg["steps"]) if critic else (None, None)
    models = {"actor": (actor, actor_opt, actor_sched), **({"critic": (critic, critic_opt, critic_sched)} if critic else {})}
    run_dir, metrics_path = os.path.join(cfg["out_dir"], "checkpoints", name), os.path.join(cfg["out_dir"], "metrics.jsonl")
    start = resume_or_start_over(run_dir, metrics_path, models, engine, cfg, ctx)
    order = random.Random(cfg["seed"]).sample(range(len(questions)), len(questions))
    ctrl_c, restore_sigint = parallel.catch_ctrl_c()
    bar = tqdm(range(start, cfg["steps"]), initial=start, total=cfg["steps"], disable=not ctx.master,
               desc=f"RL {name} ({cfg['algo']}, {cfg['search_backend'] if name == 'zerosearch' else 'real'} search)")
    for step in bar:
        t0 = time.time()
        # 1. questions of this step: the global batch, strided over processes; n samples each, kept together (GRPO groups).
        #    Each row draws from its own random streams, keyed by its place in the global batch, so N processes sample what one does
        mine = [step * cfg["batch_size"] + j for j in range(cfg["batch_size"])][ctx.rank::ctx.world]
        qs = [questions[order[i % len(order)]] for i in mine for _ in range(cfg["n_samples"])]
        seeds = [cfg["seed"] * 1_000_003 + i * cfg["n_samples"] + s for i in mine for s in range(cfg["n_samples"])]
        # 2. rollout with search; the curriculum sets how often a search returns noisy documents
        p_noise = noise_probability(step, cfg["steps"], cfg["p_start"], cfg["p_end"], cfg["curriculum_base"]) if cfg["curriculum"] else cfg["p_end"]
        with ppo.autocast(compute, ctx.device):  # the same precision on every path, so N processes sample as one
            ro = rollout(parallel.sampler_model(actor, sampler_copy), tok, qs, engine, cfg, noise_prob=p_noise, seeds=seeds)
        t_rollout = time.time() - t0
        # 3. reward: F1 of the final answer
        scores = torch.tensor(score(ro, qs, cfg["reward"]))
        # 4. log-probs of the sampled tokens under the policy and the frozen reference; values (PPO)
        input_ids, attention_mask, response_mask = to_batch(ro, tok.pad_token_id, ctx.device)
        with torch.no_grad():
            old_logp, _ = actor(input_ids, attention_mask, cfg["temperature"])
            ref_logp, _ = ref(input_ids, attention_mask, cfg["temperature"])
            values = ppo.token_values(critic, input_ids, attention_mask, compute) if critic else None
        # 5. advantages (GAE / group-normalised / REINFORCE++), whitened with global statistics
        advantages, returns, adv_stats = ppo.compute_advantages(cfg["algo"], scores.to(ctx.device), response_mask, old_logp,
                                                                ref_logp, values, cfg, reduce=ctx.all_sum)
        adv_stats = ctx.mean_stats(adv_stats)  # the same on every process, so is kl_coef
        cfg["kl_coef"] = ppo.adaptive_kl_coef(cfg["kl_coef"], adv_stats["rollout/kl"], len(qs) * ctx.world,
                                              cfg["kl_target"], cfg["kl_horizon"])  # fixed when kl_target is null
        # 6. PPO epochs over mini-batches; DDP/FSDP average the gradients over processes
        batch = ppo.Batch(input_ids, attention_mask, response_mask, old_logp, ref_logp, advantages, values, returns)
        try:
            stats = ppo.update(actor, critic, actor_opt, critic_opt, actor_sched, critic_sched, batch, cfg, step, ctx.all_mean)
        except ppo.NonFiniteError as e:
            raise SystemExit(f"error: {e}; the last good weights are in the newest checkpoint in {run_dir}") from None
        # 7. log: sums over processes
        sampled = sum(sum(m) for m in ro.response_mask)
        em = [substring_match(a, q["golden_answers"]) for a, q in zip(ro.answers, qs)]
        local = [scores.sum().item(), sum(em), sum(ro.searches), sampled, len(qs), *engine.stats.values()]
        total = ctx.all_sum(torch.tensor(local, dtype=torch.float64)).tolist()
        engine_totals = {k: int(v) for k, v in zip(engine.stats, total[5:])}
        row = {"run": name, "step": step, "reward": total[0] / total[4], "em": total[1] / total[4], "searches": total[2] / total[4],
               "noise_prob": p_noise, "tokens_per_s": total[3] / max(t_rollout, 1e-9), "step_time": time.time() - t0,
               **adv_stats, **ctx.mean_stats(stats), **{f"sim/{k}": v for k, v in engine_totals.items()}}
        if ctx.master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(reward=f"{row['reward']:.3f}", em=f"{row['em']:.2f}", noise=f"{p_noise:.2f}", tok_s=f"{row['tokens_per_s']:.0f}")
        # 8. checkpoint every save_every steps, at the end, and after Ctrl-C (then stop)
        interrupted = ctx.any(ctrl_c[0])
        if (step + 1) % cfg["save_every"] == 0 or step + 1 == cfg["steps"] or interrupted:
            state = {"step": step + 1, "kl_coef": cfg["kl_coef"], "noise_prob": p_noise, "engine_stats": engine_totals}
            parallel.save_checkpoint(os.path.join(run_dir, f"step_{step + 1:06d}"), models, state, ctx, cfg["keep_last"])
        if interrupted:
            ctx.print0(f"stopped after step {step + 1} of {name}; checkpoint in {run_dir}; continue with resume=true")
            parallel.close(ctx)
            raise SystemExit(0)
    restore_sigint()
    return parallel.sampler_model(actor, sampler_copy)


# ----------------------------------------------------------------------------- main
def setup(cfg, ctx):
    """Tokenizer, train questions, evaluation sets, the real retriever, the simulator's
    and the starting policy's paths: built here for the embedded world, else from the config."""
    import sim
    import world
    if cfg["data"] == "world":
        cache = os.path.join(cfg["out_dir"], "build")
        if ctx.master:  # one process builds, the others wait and load
            world.prepare_embedded(cfg, cache, log=ctx.print0)
        ctx.barrier()
        w, retriever, sim_path, policy_path = world.prepare_embedded(cfg, cache, log=lambda *a: None)
        tok = world.load_tokenizer(cfg["policy_model"] or policy_path)  # a real policy on the world keeps its own
        test = {"single-hop": [q for q in w.test if q["hops"] == 1], "two-hop": [q for q in w.test if q["hops"] == 2]}
        eval_sets = {k: v[:cfg["eval_size"] // 2] for k, v in test.items()}
        knowledge = None if cfg["sim_model"] else world.knowledge_index(w.docs)  # a real simulator has its own
        return tok, world.split_train(w.train, cfg["rl_share"])[1], eval_sets, retriever, cfg["sim_model"] or sim_path, cfg["policy_model"] or policy_path, knowledge
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
    import sim
    if backend == "real":
        return sim.RealEngine(retriever, cfg)
    if backend == "http":
        if not sim_path:
            raise SystemExit("error: search_backend=http needs sim_model (the served simulator's name or path; "
                             "its tokenizer cuts documents to doc_tokens)")
        import world
        return sim.HttpEngine(cfg, world.load_tokenizer(sim_path), cfg["sim_served_model"] or sim_path, knowledge)
    if backend == "sim":
        if not sim_path:
            raise SystemExit("error: search_backend=sim needs sim_model (a fine-tuned simulator's name or path)")
        return sim.SimEngine(sim_path, cfg, ctx.device, knowledge)
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
    return "EM / F1 (x100); EM = a normalised gold answer occurs in the normalised prediction, as in the paper.\n\n" + head + "\n".join(lines) + "\n"


def main(argv):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    import parallel
    hf_logging.set_verbosity_error()
    cfg = load_config(argv)
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
    results = {"(a) warm-up, no search": evaluate(start, tok, eval_sets, real, cfg, ctx, max_turns=0, template=cfg["direct_template"]),
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
