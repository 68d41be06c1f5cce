"""The RL maths of zerosearch: advantages (PPO/GAE, GRPO, REINFORCE, REINFORCE++), losses, the actor and
critic wrappers, and one `update` that runs the PPO epochs over a rollout batch.

Every loss is taken over `response_mask` only: tokens the policy generated. Prompt tokens,
documents injected between <information> and </information>, and padding carry mask 0 and never
contribute to the actor loss, the critic loss, the entropy bonus or the KL term.

Where the KL goes (`kl_in`; auto is as the official ZeroSearch scripts: the reward for ppo, the loss else):
  reward       r_t = -β (log π_old - log π_ref) on every generated token (+ score on the last); GRPO and
               REINFORCE, which see one outcome a row, see score - β Σ_t KL_t
  loss         loss += β agg(KL_t), KL_t of `kl_type` (k3 in the paper), with the sign that penalises
               divergence (the public code subtracted it, rewarding divergence).
No torch.distributed here: whitening takes a `reduce` callable, DDP/FSDP wrap the models outside.
"""
from dataclasses import dataclass

import torch

from kernels import gae, logprob_entropy_from_hidden
from packing import by_length, in_micro_batches, padding_free

LOG_RATIO_CLAMP = 20.0  # exp(±20) stays finite in fp32
KL_CLAMP = 10.0


@dataclass
class Learner:
    """A trained model with its optimizer and learning-rate schedule (the actor, or the critic)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] prompt + response (+ injected <information> documents)
    attention_mask: torch.Tensor  # [B, T] 1 on real tokens, 0 on padding (left or right)
    response_mask: torch.Tensor  # [B, T] 1 only on tokens the policy generated
    old_logp: torch.Tensor  # [B, T] log π_old(x_t | x_<t) at sampling time
    ref_logp: torch.Tensor  # [B, T] log π_ref(x_t | x_<t)
    advantages: torch.Tensor  # [B, T]
    values: torch.Tensor | None = None  # [B, T] V_old(s_t), PPO only
    returns: torch.Tensor | None = None  # [B, T] critic targets, PPO only


def masked_mean(x, mask, dim=None):
    """Mean of x where mask is 1 (0 if there is none); masked entries may hold anything, even NaN."""
    mask = mask.bool()
    return torch.where(mask, x, torch.zeros_like(x)).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, shift_mean=True, reduce=None):
    """(x - μ) / sqrt(σ² + 1e-8) over masked entries; masked entries become 0.

    σ² is the unbiased variance, as in veRL. `reduce(t)` must return t summed over processes
    (e.g. `dist.all_reduce(t); return t`), so μ and σ² are global; identity when None.
    """
    reduce = reduce or (lambda t: t)
    mask = mask.bool()
    zero = torch.zeros_like(x)
    sums = reduce(torch.stack([torch.where(mask, x, zero).sum(), mask.sum().to(x.dtype)]))
    n = sums[1].clamp(min=1)
    mean = sums[0] / n
    sq_dev = reduce(torch.where(mask, (x - mean) ** 2, zero).sum())
    var = sq_dev / (n - 1).clamp(min=1)  # σ² = Σ (x - μ)² / (n - 1)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, zero)


def grpo_advantages(scores, group_size, eps=1e-6, std_norm=True):
    """scores [B], each consecutive `group_size` rows one prompt's samples -> advantages [B].

    A = (s - mean_g) / (std_g + ε) with torch.std (unbiased), as veRL; Dr.GRPO (std_norm=False)
    drops the division. A group of one sample keeps its score, as veRL does.
    """
    groups = scores.float().view(-1, group_size)
    if group_size == 1:
        return groups.view(-1)
    centred = groups - groups.mean(-1, keepdim=True)
    return (centred / (groups.std(-1, keepdim=True) + eps) if std_norm else centred).view(-1)


def reinforce_pp_advantages(token_rewards, mask, gamma, reduce=None):
    """Discounted return-to-go over generated tokens, whitened over the batch -> [B, T].

    G_t = r_t + γ G_next with the next *generated* token: that is GAE with V ≡ 0 and λ = 1, so the
    skip over masked tokens is written once, in `gae`. With kl_in=reward (as the REINFORCE++ paper) the
    KL penalty is already in token_rewards.
    """
    returns, _ = gae(token_rewards, torch.zeros_like(token_rewards), mask, gamma, 1.0)
    return masked_whiten(returns, mask, reduce=reduce)


def token_level_rewards(scores, mask, kl=None, kl_coef=0.0):
    """scores [B] -> rewards [B, T]: score on each row's last generated token, -β KL_t on every one."""
    mask = mask.bool()
    T = mask.shape[1]
    rewards = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    if kl is not None:
        rewards = torch.where(mask, -kl_coef * kl.float(), rewards)  # r_t = -β KL_t
    last = T - 1 - mask.flip(-1).int().argmax(-1)  # index of the last generated token
    outcome = torch.where(mask.any(-1), scores.float(), torch.zeros_like(scores, dtype=torch.float32))
    return rewards.scatter_add(1, last.unsqueeze(1), outcome.unsqueeze(1))  # r_last += score


def adaptive_kl_coef(kl_coef, kl, n_steps, kl_target, kl_horizon):
    """Ziegler et al.: β ← β (1 + clip(KL/target - 1, -0.2, 0.2) n / horizon); fixed if no target.

    kl: the rollout's mean KL (stats["rollout/kl"] of compute_advantages); n_steps: its sequences."""
    if kl_target is None:
        return kl_coef
    error = min(max(kl / kl_target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_steps / kl_horizon)


def kl_in_reward(algo, cfg):
    """Whether β KL goes into the reward (else into the loss): `kl_in`, whose auto is the official scripts'."""
    return {"auto": algo == "ppo", "reward": True, "loss": False}[cfg.get("kl_in", "auto")]


def compute_advantages(algo, scores, response_mask, old_logp, ref_logp, values, cfg, kl_coef, reduce=None):
    """-> (advantages [B, T], returns [B, T] for PPO else None, stats). Masked tokens get A = 0.
    kl_coef: β of the reward's KL (kl_in_reward), the run's current value (it adapts with kl_target)."""
    mask = response_mask.bool()
    kl = torch.where(mask, kl_penalty(old_logp, ref_logp, "k1"), torch.zeros_like(old_logp))  # the reward's KL
    kl_sum, n_tokens = (reduce or (lambda t: t))(torch.stack([kl.sum(), mask.sum().to(kl.dtype)])).tolist()
    stats = {"rollout/score_mean": scores.float().mean().item(),  # the KL over all processes: kl_coef adapts alike on each
             "rollout/kl": kl_sum / max(n_tokens, 1.0)}
    in_reward = kl_in_reward(algo, cfg)
    rewards = token_level_rewards(scores, mask, kl if in_reward else None, kl_coef)
    outcome = rewards.sum(-1) if in_reward else scores  # one outcome a row: score - β Σ_t KL_t
    if algo == "ppo":
        advantages, returns = gae(rewards, values, mask, cfg["gamma"], cfg["lam"])
        return masked_whiten(advantages, mask, reduce=reduce), returns, stats
    if algo == "grpo":
        adv = grpo_advantages(outcome, cfg["n_samples"], std_norm=cfg["grpo_std_norm"])
        return adv.unsqueeze(1) * mask, None, stats  # one advantage for all of a row's tokens
    if algo == "reinforce++":
        return reinforce_pp_advantages(rewards, mask, cfg["gamma"], reduce=reduce), None, stats
    if algo == "reinforce":  # the paper's REINFORCE: the raw outcome is every token's advantage, no baseline
        return outcome.float().unsqueeze(1) * mask, None, stats
    raise ValueError(f"algo must be ppo, grpo, reinforce or reinforce++, got {algo!r}")


# ----------------------------------------------------------------------------- losses
def kl_penalty(logp, ref_logp, kind):
    """Per-token estimate of KL(π || π_ref) from samples of π."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "abs":
        return (logp - ref_logp).abs()
    if kind == "k2":
        return 0.5 * (logp - ref_logp) ** 2
    if kind == "k3":  # k3 = exp(ref - logp) - (ref - logp) - 1 ≥ 0 (Schulman's low-variance estimator)
        d = (ref_logp - logp).clamp(-KL_CLAMP, KL_CLAMP)
        return (torch.exp(d) - d - 1).clamp(-KL_CLAMP, KL_CLAMP)
    raise ValueError(f"kl_type must be k1, abs, k2 or k3, got {kind!r}")


def agg_loss(loss, mask, agg, max_len=1):
    """Reduce a per-token loss [B, T] to a scalar (`loss_agg_mode`); rows with no unmasked token count as
    nothing. max_len: the constant L of seq-mean-token-sum-norm, the response budget."""
    if agg == "token-mean":  # mean over all unmasked tokens of the batch
        return masked_mean(loss, mask)
    mask = mask.bool()
    row_sum, row_len = torch.where(mask, loss, torch.zeros_like(loss)).sum(-1), mask.sum(-1)
    if agg == "seq-mean-token-mean":  # mean over rows of each row's token mean
        return masked_mean(row_sum / row_len.clamp(min=1), row_len > 0)
    if agg == "seq-mean-token-sum":  # mean over rows of each row's token sum
        return masked_mean(row_sum, row_len > 0)
    if agg == "seq-mean-token-sum-norm":  # Dr. GRPO: each row's token sum over one constant L, not its length
        return masked_mean(row_sum, row_len > 0) / max_len
    raise ValueError(f"loss_agg_mode must be token-mean, seq-mean-token-mean, seq-mean-token-sum or "
                     f"seq-mean-token-sum-norm, got {agg!r}")


def agg_units(mask, agg):
    """What `agg_loss` averages over: unmasked tokens, or rows that have one."""
    return mask.sum() if agg == "token-mean" else (mask.sum(-1) > 0).sum()


def policy_loss(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=0.2, dual_clip=3.0, agg="token-mean",
                max_len=1):
    """Clipped surrogate, clip-higher (DAPO: ε_high > ε_low) and dual clip c (None: none). Returns (loss,
    stats); approx_kl is k3 of KL(π_old || π)."""
    log_ratio = (logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)  # r = π / π_old
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)  # L = max(-A r, -A clip(r, 1-ε_low, 1+ε_high))
    capped = -advantages * (torch.inf if dual_clip is None else dual_clip)
    dual_active = (advantages < 0) & (capped < loss)  # for A < 0: L = min(L, -A c)
    loss = torch.where(dual_active, capped, loss)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
             "dual_clipfrac": masked_mean(dual_active.float(), mask).item(),
             "approx_kl": masked_mean(kl_penalty(old_logp, logp.detach(), "k3"), mask).item()}
    return agg_loss(loss, mask, agg, max_len), stats


def value_loss(values, old_values, returns, mask, clip=0.5):
    """Clipped value loss, token-mean. Returns (loss, clipfrac)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)  # clip(V, V_old - c, V_old + c)
    loss_unclipped, loss_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * torch.maximum(loss_unclipped, loss_clipped)  # 0.5 max((V-R)², (V_clip-R)²)
    used_clip = ((values - old_values).abs() > clip) & (loss_clipped > loss_unclipped)  # no float ties inside the range
    return masked_mean(loss, mask), masked_mean(used_clip.float(), mask).item()


def explained_variance(values, returns, mask):
    """1 - Var(R - V) / Var(R) over masked tokens: 1 is a perfect critic, ≤ 0 a useless one."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return (1 - var_residual / var_returns.clamp(min=1e-8)).item()


class NonFiniteError(RuntimeError):
    """A loss or gradient is NaN or infinite; raised before the optimizer step, so no weight changes."""


def _check_finite(value, model, what, step):
    if not torch.isfinite(value).all():
        raise NonFiniteError(f"NaN in {model} {what} at step {step}: lower {model}_lr or check the rewards")


def update(actor, critic, batch, cfg, kl_coef, step=0, mean_over_processes=None):
    """PPO epochs over the batch: mini-batches of rows (one optimizer step each) made of micro-batches
    (gradient accumulation). `actor` and `critic` (None but for PPO) are Learners; kl_coef is β of
    the KL loss (kl_in: loss). Returns means over micro-batches (over optimizer steps for grad_norm, lr and
    the objective actor/loss, critic/loss); critic/explained_variance compares the rollout's values (before
    this update) with the returns. Train/eval mode of the models is the caller's: this function never
    switches it. With N processes whose gradients DDP/FSDP average, `mean_over_processes(t)` returns t
    averaged over them, and each process's `batch` is its share of the global mini-batches."""
    algo, mask_all = cfg["algo"], batch.response_mask.bool()
    agg = cfg["loss_agg_mode"], cfg.get("max_response_tokens", 1)  # the mode, and L of seq-mean-token-sum-norm
    mean_over_processes = mean_over_processes or (lambda t: t)
    use_critic = algo == "ppo"
    train_actor = not use_critic or step >= cfg.get("critic_warmup", 0)  # veRL's critic warm-up: the critic learns first
    stepping = {**({"actor": actor} if train_actor else {}), **({"critic": critic} if use_critic else {})}
    stats = {}

    def log(values):
        for k, v in values.items():
            stats.setdefault(k, []).append(float(v))

    generator = torch.Generator().manual_seed(cfg["seed"] + step)
    for _ in range(cfg["ppo_epochs"]):
        for rows in torch.randperm(len(mask_all), generator=generator).split(cfg["mini_batch_size"]):
            # each micro loss is its own mean; weighting by its share of the mini-batch's units makes
            # the accumulated gradient equal to the gradient of the mini-batch mean. With N processes the
            # share is of the mean over processes: the gradient average DDP/FSDP take is then the gradient
            # of the mean over the global mini-batch, the same as one process with the whole batch
            units = mean_over_processes(agg_units(mask_all[rows], agg[0]).float()).clamp(min=1e-8)
            tokens = mean_over_processes(mask_all[rows].sum().float()).clamp(min=1e-8)
            objective = {"actor": 0.0, "critic": 0.0}  # what this optimizer step minimises (this process's share)
            # micro-batches of similar lengths: a forward pass is as wide as its longest sequence, and the
            # default run's sequences are too alike to pack two a row (`bench.py step`)
            for micro in by_length(batch.attention_mask, rows, cfg["micro_batch_size"]):
                mask = mask_all[micro]
                ids, attn = batch.input_ids[micro], batch.attention_mask[micro]
                if train_actor:
                    logp, entropy = actor.model(ids, attn, cfg["temperature"], mask)
                    pg_loss, pg_stats = policy_loss(logp, batch.old_logp[micro], batch.advantages[micro], mask,
                                                    cfg["clip_ratio_low"], cfg["clip_ratio_high"], cfg["dual_clip"],
                                                    *agg)
                    entropy_agg = agg_loss(entropy, mask, *agg)
                    token_loss = -cfg["entropy_coef"] * entropy_agg  # L = L_clip - c_H H (+ β KL), each term by agg
                    if not kl_in_reward(algo, cfg):  # + β KL_t(π || π_ref): a penalty, so descent lowers the KL
                        kl_loss = agg_loss(kl_penalty(logp, batch.ref_logp[micro], cfg["kl_type"]), mask, *agg)
                        token_loss = token_loss + kl_coef * kl_loss
                        log({"actor/kl_loss": kl_loss.item()})
                    n = agg_units(mask, agg[0])
                    loss = pg_loss * n / units + token_loss * n / units
                    _check_finite(loss, "actor", "loss", step)
                    loss.backward()
                    objective["actor"] += loss.item()
                    log({"actor/pg_loss": pg_loss.item(), "actor/entropy": entropy_agg.item(),
                         "actor/clipfrac": pg_stats["clipfrac"], "actor/approx_kl": pg_stats["approx_kl"]})
                if use_critic:
                    vpred = token_values(critic.model, ids, attn, getattr(torch, cfg.get("dtype", "float32")))
                    vf_loss, vf_clipfrac = value_loss(vpred, batch.values[micro], batch.returns[micro], mask,
                                                      cfg["value_clip"])
                    _check_finite(vf_loss, "critic", "loss", step)
                    weighted = vf_loss * mask.sum() / tokens
                    weighted.backward()
                    objective["critic"] += weighted.item()
                    log({"critic/vf_loss": vf_loss.item(), "critic/clipfrac": vf_clipfrac,
                         "critic/vpred_mean": masked_mean(vpred.detach(), mask).item()})
            for name, learner in stepping.items():
                grad_norm = torch.nn.utils.clip_grad_norm_(learner.model.parameters(), cfg["grad_clip"])  # pre-clip
                _check_finite(grad_norm, name, "gradient", step)
                log({f"{name}/loss": objective[name], f"{name}/grad_norm": grad_norm.item(),
                     f"{name}/lr": learner.optimizer.param_groups[0]["lr"]})
                learner.optimizer.step()
                learner.optimizer.zero_grad(set_to_none=True)
    for learner in stepping.values():
        learner.scheduler.step()  # once per RL step, as veRL: the warm-up counts RL steps, not optimizer steps
    if use_critic:
        log({"critic/explained_variance": explained_variance(batch.values, batch.returns, mask_all)})
    return {k: sum(v) / len(v) for k, v in stats.items()}


# ----------------------------------------------------------------------------- the actor and the critic
def scored_positions(attention_mask):
    """[B, T] True where x_t and x_{t-1} are both real tokens: where logp and V mean something."""
    valid = attention_mask.bool()
    return torch.cat([torch.zeros_like(valid[:, :1]), valid[:, 1:] & valid[:, :-1]], 1)


def autocast(compute_dtype, device):
    """Mixed precision as veRL: the weights (and Adam's states) stay fp32, the decoder's matmuls run in
    compute_dtype; nothing changes for fp32. An Adam step of lr 1e-6 on bf16 weights rounds away."""
    return torch.autocast(torch.device(device).type, dtype=compute_dtype, enabled=compute_dtype != torch.float32)


class Actor(torch.nn.Module):
    """A Hugging Face causal LM that returns per-token log-probs and entropies of the given tokens;
    its decoder runs in `compute_dtype` (see `autocast`), on the real tokens alone (`padding_free`)."""

    def __init__(self, lm, compute_dtype=torch.float32):
        super().__init__()
        self.lm, self.compute_dtype = lm, compute_dtype
        with torch.no_grad():  # a head that does more than `head_logprobs` applies is refused, never approximated
            ids = torch.arange(4, device=lm.device)  # not token 0 alone: it may be padding, its embedding 0
            out = lm(input_ids=ids[None], output_hidden_states=True)
            ref = out.logits[0].float().log_softmax(-1)  # [4, V]
            got, want = self.head_logprobs(out.hidden_states[-1][0], ids), (ref[ids, ids], -(ref.exp() * ref).sum(-1))
            if not all(torch.allclose(x, y, atol=1e-4) for x, y in zip(got, want)):
                raise SystemExit(f"error: {lm.config.model_type}'s output head does more than a weight, a bias and "
                                 "soft-capping: the trainer's log-probs would not be the sampler's; use another model")

    def head_logprobs(self, hidden, labels, temperature=1.0):
        """hidden [N, D] (the decoder's output), labels [N] -> (logp, entropy) [N] under the model's whole
        head: h W^T, + b where it has a bias (Phi), soft-capped where its config says (Gemma-2), fused."""
        head = self.lm.get_output_embeddings()
        return logprob_entropy_from_hidden(hidden, head.weight, labels, temperature, head.bias,
                                           getattr(self.lm.config, "final_logit_softcapping", None))

    def forward(self, input_ids, attention_mask, temperature=1.0, positions=None):
        """-> logp [B, T], entropy [B, T]; logp[:, t] = log π(x_t | x_<t) at `temperature` where
        `positions` [B, T] (default: every real token after a row's first) is true, 0 elsewhere.
        Training passes the response mask: the LM head, a tenth of the model's matmuls here, then
        runs on the quarter of the tokens that are scored. It and the log-softmax run in the hidden
        state's dtype: fp32 under autocast, whose residual stream stays fp32."""
        decoder = self.lm.get_decoder()
        with autocast(self.compute_dtype, input_ids.device):
            hidden = padding_free(lambda ids, pos: decoder(input_ids=ids, position_ids=pos, use_cache=False)
                                  .last_hidden_state, input_ids, attention_mask)  # [B, T, D]
        scored = scored_positions(attention_mask)
        if positions is not None:
            scored = scored & positions.bool()
        logp, entropy = self.head_logprobs(hidden[:, :-1][scored[:, 1:]], input_ids[:, 1:][scored[:, 1:]], temperature)
        full = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
        return full.masked_scatter(scored, logp), full.masked_scatter(scored, entropy)


def token_values(critic, input_ids, attention_mask, compute_dtype=torch.float32):
    """-> values [B, T] with values[:, t] = V(x_<t): the critic's output at t-1, aligned with logp
    (0 where logp is 0). The critic is an AutoModelForTokenClassification with num_labels=1; build it
    with classifier_dropout=0.0, as the head's default dropout of 0.1 would make V noisy."""
    with autocast(compute_dtype, input_ids.device):
        out = padding_free(lambda ids, pos: critic(input_ids=ids, position_ids=pos, use_cache=False).logits,
                           input_ids, attention_mask)  # [B, T, 1]
    out = out.squeeze(-1).float()
    shifted = torch.cat([torch.zeros_like(out[:, :1]), out[:, :-1]], 1)
    return torch.where(scored_positions(attention_mask), shifted, torch.zeros_like(shifted))


def make_optimizer(model, lr, weight_decay, warmup_steps, total_steps):
    """AdamW with linear warm-up to lr, then constant (as veRL). The first step already runs at
    lr / (warmup + 1), not 0 (the public code's first update ran at lr 0); warm-up is capped at the run."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = min(warmup_steps, total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    return opt, sched


@torch.no_grad()
def logprobs(actor, input_ids, attention_mask, response_mask, cfg):
    """log π(x_t | x_<t) [B, T] of the response tokens at the rollout's temperature, in micro-batches."""
    return in_micro_batches(lambda r: actor(input_ids[r], attention_mask[r], cfg["temperature"], response_mask[r])[:1],
                            attention_mask, cfg["micro_batch_size"])[0]


@torch.no_grad()
def values(critic, input_ids, attention_mask, cfg):
    """V(x_<t) [B, T] (`token_values`), in micro-batches."""
    compute = getattr(torch, cfg["dtype"])
    return in_micro_batches(lambda r: [token_values(critic, input_ids[r], attention_mask[r], compute)],
                            attention_mask, cfg["micro_batch_size"])[0]
