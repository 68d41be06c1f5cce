"""One RL step of the embedded default, printed for teaching, in markdown:

    python tools/walkthrough.py > docs/walkthrough.md      # [step=N] [any config key=value]

It loads (or makes) the default build, as `python zerosearch.py` does, and runs the stages of
`zerosearch.train` once, at step N (default: the first step whose update moves the actor), on a few
questions: the rollout with search, the reward, log-probs, values, advantages and the PPO update.
It prints one trajectory turn by turn, then its sampled tokens one a row with what each stage
computed for them; the `<information>` tokens carry no loss and are shown as one masked block.
"""
import contextlib
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules
import build
import config
import parallel
import ppo
import sim
import zerosearch as zs

OWN = {"step": None}
SMALL = ["batch_size=4", "mini_batch_size=16", "threads=2"]  # 4 questions, n_samples each: one step in seconds


def main(argv):
    own, argv = config.own_arguments(argv, OWN)
    given = {a.split("=", 1)[0] for a in argv}
    cfg = config.load_config([a for a in SMALL if a.split("=", 1)[0] not in given] + argv)
    first_actor_step = cfg["critic_warmup"] if cfg["algo"] == "ppo" else 0  # before it PPO trains the critic alone
    step = min(int(own["step"]) if own["step"] is not None else first_actor_step, cfg["steps"] - 1)
    ctx = parallel.init_processes(cfg)
    with contextlib.redirect_stdout(sys.stderr):  # the build's progress is not part of the page
        tok, questions, _, retriever, sim_path, policy_path, knowledge = build.setup(cfg, ctx, zs.collect)
    engine = build.make_engine(cfg["search_backend"], cfg, retriever, sim_path, ctx, knowledge, tok)
    torch.manual_seed(zs.rl_seed(cfg))
    actor, critic, ref, _ = zs.load_models(policy_path, cfg, ctx)
    order = random.Random(zs.rl_seed(cfg)).sample(range(len(questions)), len(questions))
    print(f"# One RL step, printed\n\n`{' '.join(['python tools/walkthrough.py'] + argv)}`: step {step} of {cfg['steps']} "
          f"of `{cfg['algo']}` against the `{cfg['search_backend']}` engine, {cfg['batch_size']} questions x "
          f"{cfg['n_samples']} samples, from the warm-up policy of the build in `{policy_path}`.\n")

    # 1. questions, 2. rollout with search at the curriculum's noise level
    qs, seeds = zs.step_questions(questions, order, step, cfg, ctx)
    noise = zs.curriculum_noise(step, cfg)
    ro = zs.rollout(parallel.sampler_model(actor.model, None), tok, qs, engine, cfg, noise, seeds)
    # 3. reward
    scores = torch.tensor(zs.score(ro, qs, cfg["reward"]))
    b = max(range(len(qs)), key=lambda i: (scores[i].item() > 0, ro.searches[i]))  # a trajectory worth reading
    print(f"## 1-2. The question and the rollout\n\nNoise probability at step {step}: p = {noise:.3f} "
          "(`zerosearch.noise_probability`).\n")
    print(f"**Question** (trajectory {b} of {len(qs)}): {qs[b]['question']}  \n**Gold answer**: "
          f"{', '.join(qs[b]['golden_answers'])}\n")
    kinds = iter(sim.draw_kinds(0, noise, ro.engine_seeds[b]))
    response, mask = ro.response_ids[b], ro.response_mask[b]
    for start, end in zs.segments(mask):
        text = tok.decode(response[start:end]).strip()
        who = "policy (sampled, trained)" if mask[start] else \
            f"engine, {next(kinds, 'observation')} (response_mask 0: no loss)" if text.startswith("<information>") else \
            "observation (response_mask 0)"
        print(f"- *{who}*: `{' '.join(text.split())}`")
    print(f"\n## 3. The reward\n\nThe answer read from the policy's own tokens: `{ro.answers[b]}`; reward = F1 = "
          f"{scores[b]:.3f} (`reward.f1_score`). The {cfg['n_samples']} samples of this question: "
          + ", ".join(f"{s:.2f}" for s in scores[b - b % cfg['n_samples']:][:cfg['n_samples']]) + ".\n")

    # 4. log-probs and values, 5. advantages, 6. update
    ids, attn, rmask = zs.to_batch(ro, tok.pad_token_id, ctx.device, cfg["mask_information"])
    old_logp, ref_logp = ppo.logprobs(actor.model, ids, attn, rmask, cfg), ppo.logprobs(ref, ids, attn, rmask, cfg)
    values = ppo.values(critic.model, ids, attn, cfg) if critic else None
    advantages, returns, _ = ppo.compute_advantages(cfg["algo"], scores, rmask, old_logp, ref_logp, values, cfg,
                                                    cfg["kl_coef"])
    stats = ppo.update(actor, critic, ppo.Batch(ids, attn, rmask, old_logp, ref_logp, advantages, values, returns),
                       dict(cfg, seed=zs.rl_seed(cfg)), cfg["kl_coef"], step)
    ratio = torch.exp(ppo.logprobs(actor.model, ids, attn, rmask, cfg) - old_logp)  # r_t = π_θ / π_old, after the update
    low, high = cfg["clip_ratio_low"], cfg["clip_ratio_high"]
    clipped = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - low, 1 + high))
    kl = old_logp - ref_logp  # k1, the reward's per-token KL for PPO
    print("## 4-6. Per token: log-probs, values, advantages, the ratio and the clipped loss\n\n"
          "`logp` = log π_old(x_t | x_<t) (`ppo.logprobs`), `ref` = log π_ref, `KL` = logp - ref (k1), `V` = V(x_<t) "
          "(`ppo.values`), `A` = the advantage (`ppo.compute_advantages`: GAE, whitened, for PPO), `r` = π_θ / π_old "
          "after the update (`ppo.update`), `L` = max(-A r, -A clip(r, 1-ε_low, 1+ε_high)) (`ppo.policy_loss`).\n")
    print("| t | token | logp | ref | KL | V | A | r | L |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    P, masked = len(ro.prompt_ids[b]), 0
    for t in range(P, P + len(response)):
        if not rmask[b, t]:
            masked += 1
            continue
        if masked:
            print(f"| | *{masked} tokens with response_mask 0 (`<information>` or an observation): no loss* | | | | | | | |")
            masked = 0
        v = f"{values[b, t]:.3f}" if values is not None else ""
        print(f"| {t} | `{tok.decode([ids[b, t].item()]).strip() or ' '}` | {old_logp[b, t]:.3f} | {ref_logp[b, t]:.3f} | "
              f"{kl[b, t]:.4f} | {v} | {advantages[b, t]:.3f} | {ratio[b, t]:.4f} | {clipped[b, t]:.4f} |")
    health = ", ".join(f"`{k}` {v:.4g}" for k, v in stats.items() if k.split("/")[-1] in
                       ("pg_loss", "entropy", "clipfrac", "approx_kl", "vf_loss", "explained_variance", "grad_norm"))
    print(f"\nThe update's statistics over the whole batch (what `metrics.jsonl` logs each step): {health}.")


if __name__ == "__main__":
    main(sys.argv[1:])
