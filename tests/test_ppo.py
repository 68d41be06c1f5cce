"""Tests of ppo.py. Each oracle is a plain loop written from the formula, independent of ppo.py."""
import copy
import math
import os
import re
import statistics
import threading

import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, GraniteConfig,
                          GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen2ForTokenClassification)

import config
import kernels
import packing
import parallel
import ppo
import zerosearch

CFG = dict(algo="ppo", gamma=1.0, lam=1.0, kl_coef=0.001, kl_type="k3", kl_target=None, kl_horizon=10000,
           clip_ratio_low=0.2, clip_ratio_high=0.2, dual_clip=3.0, value_clip=0.5, entropy_coef=0.001, ppo_epochs=1,
           mini_batch_size=4, micro_batch_size=2, grad_clip=1.0, loss_agg_mode="token-mean", grpo_std_norm=True,
           n_samples=2, temperature=1.0, seed=0, kl_in="auto", max_response_tokens=16)


def rand(*shape, gen, low=0.0, high=1.0):
    return low + (high - low) * torch.rand(*shape, generator=gen)


def random_mask(B, T, gen):
    """Random 0/1 mask with row 0 fully masked and row 1 holding a single token."""
    mask = (torch.rand(B, T, generator=gen) < 0.6).float()
    mask[0] = 0
    mask[1] = 0
    mask[1, T // 2] = 1
    return mask


def tiny_config(**kw):
    return Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **kw)


def tiny_models(seed=0):
    torch.manual_seed(seed)
    actor = ppo.Actor(Qwen2ForCausalLM(tiny_config(initializer_range=0.2))).eval()
    critic = Qwen2ForTokenClassification(tiny_config(num_labels=1, classifier_dropout=0.0)).eval()
    return actor, critic


def rollout_batch(actor, critic, algo, B=4, T=12, seed=0, lengths=None):
    """Random rows: prompt (mask 0), response, an <information> span (mask 0), response, right padding
    (rows of `lengths` tokens; by default row 1 is 2 tokens short)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 97, (B, T), generator=gen)
    lengths = torch.tensor(lengths or [T, T - 2] + [T] * (B - 2))
    attention_mask = (torch.arange(T) < lengths[:, None]).long()
    response_mask = torch.zeros(B, T)
    response_mask[:, 3:5] = 1
    response_mask[:, 8:] = 1  # positions 5..7: injected <information> tokens
    response_mask *= attention_mask
    ref_actor = copy.deepcopy(actor)
    with torch.no_grad():
        for p in ref_actor.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        old_logp, _ = actor(input_ids, attention_mask)
        ref_logp, _ = ref_actor(input_ids, attention_mask)
        values = ppo.token_values(critic, input_ids, attention_mask) if algo == "ppo" else None
    scores = torch.rand(B, generator=gen)
    cfg = dict(CFG, algo=algo)
    adv, ret, _ = ppo.compute_advantages(algo, scores, response_mask, old_logp, ref_logp, values, cfg, cfg["kl_coef"])
    return ppo.Batch(input_ids, attention_mask, response_mask, old_logp, ref_logp, adv, values, ret), cfg


def optimizers(actor, critic, lr=1e-2):
    actor_opt, actor_sched = ppo.make_optimizer(actor, lr, 0.0, 0, 10)
    critic_opt, critic_sched = (None, None) if critic is None else ppo.make_optimizer(critic, lr, 0.0, 0, 10)
    return actor_opt, critic_opt, actor_sched, critic_sched


def run_update(actor, critic, batch, cfg, lr=1e-2, step=0):
    a_opt, c_opt, a_sched, c_sched = optimizers(actor, critic, lr)
    return ppo.update(ppo.Learner(actor, a_opt, a_sched), critic and ppo.Learner(critic, c_opt, c_sched), batch, cfg,
                      cfg["kl_coef"], step=step)


class GradRecorder:
    """Stands in for an optimizer (and a scheduler): `step` records the gradients, moves nothing."""

    def __init__(self, model):
        self.model, self.grads, self.param_groups = model, [], [{"lr": 0.0}]

    def step(self):
        self.grads.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                           for p in self.model.parameters()])

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def update_gradients(actor, critic, batch, cfg):
    """The gradients of each optimizer step of one `update`, actor's then critic's (no clipping)."""
    a_opt, c_opt, no_schedule = GradRecorder(actor), GradRecorder(critic), GradRecorder(torch.nn.Linear(1, 1))
    ppo.update(ppo.Learner(actor, a_opt, no_schedule), critic and ppo.Learner(critic, c_opt, no_schedule), batch,
               dict(cfg, grad_clip=1e9), cfg["kl_coef"])
    return [g for grads in a_opt.grads + c_opt.grads for g in grads]


# ---------------------------------------------------------------- advantages

def gae_loop(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T), values.clone()
    for b in range(B):
        next_v, next_a = 0.0, 0.0
        for t in reversed([t for t in range(T) if mask[b, t]]):
            delta = rewards[b, t] + gamma * next_v - values[b, t]  # δ_t = r_t + γ V_next - V_t
            next_a = delta + gamma * lam * next_a  # A_t = δ_t + γλ A_next
            next_v = values[b, t]
            adv[b, t], ret[b, t] = next_a, next_a + values[b, t]
    return adv, ret


def test_ppo_gae_is_the_kernels_gae():
    assert ppo.gae is kernels.gae


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.95), (0.99, 1.0)])
def test_gae_matches_loop_skipping_masked_tokens(gamma, lam):
    gen = torch.Generator().manual_seed(1)
    r, v, m = torch.randn(6, 9, generator=gen), torch.randn(6, 9, generator=gen), random_mask(6, 9, gen)
    adv, ret = ppo.gae(r, v, m, gamma, lam)
    adv_ref, ret_ref = gae_loop(r, v, m, gamma, lam)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)


def test_gae_with_gamma_lam_one_is_masked_reward_to_go_minus_value():
    gen = torch.Generator().manual_seed(2)
    r, v, m = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen), random_mask(5, 7, gen)
    adv, _ = ppo.gae(r, v, m, 1.0, 1.0)
    for b in range(5):
        for t in range(7):
            expected = sum(r[b, k] for k in range(t, 7) if m[b, k]) - v[b, t] if m[b, t] else 0.0
            assert abs(adv[b, t] - expected) < 1e-5


def test_masked_mean_and_whiten_match_loop_and_ignore_masked_entries():
    gen = torch.Generator().manual_seed(3)
    x, m = torch.randn(5, 8, generator=gen), random_mask(5, 8, gen)
    x_dirty = torch.where(m.bool(), x, torch.full_like(x, float("nan")))
    vals = [x[b, t].item() for b in range(5) for t in range(8) if m[b, t]]
    mu, sd = statistics.mean(vals), statistics.stdev(vals)  # veRL whitens with the unbiased std
    assert abs(ppo.masked_mean(x_dirty, m).item() - mu) < 1e-5
    assert ppo.masked_mean(x, torch.zeros_like(m)).item() == 0.0
    for shift_mean, offset in [(True, 0.0), (False, mu)]:
        w = ppo.masked_whiten(x_dirty, m, shift_mean=shift_mean)
        expected = torch.where(m.bool(), (x - mu) / math.sqrt(sd ** 2 + 1e-8) + offset, torch.zeros_like(x))
        torch.testing.assert_close(w, expected)


def test_masked_whiten_with_reduce_uses_statistics_of_all_processes():
    gen = torch.Generator().manual_seed(4)
    x, m = torch.randn(6, 5, generator=gen), random_mask(6, 5, gen)
    slots, barrier, out = [None, None], threading.Barrier(2), [None, None]

    def worker(rank):  # two "processes": reduce sums a tensor over both, like dist.all_reduce
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        out[rank] = ppo.masked_whiten(x[rank * 3:rank * 3 + 3], m[rank * 3:rank * 3 + 3], reduce=reduce)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    torch.testing.assert_close(torch.cat(out), ppo.masked_whiten(x, m))


def test_kl_penalty_estimators_match_their_formulas():
    gen = torch.Generator().manual_seed(5)
    logp, ref = -torch.rand(20, generator=gen) * 3, -torch.rand(20, generator=gen) * 3
    for i in range(20):
        d = logp[i].item() - ref[i].item()
        expected = {"k1": d, "abs": abs(d), "k2": 0.5 * d * d, "k3": math.exp(-d) + d - 1}
        for kind, value in expected.items():
            assert abs(ppo.kl_penalty(logp[i:i + 1], ref[i:i + 1], kind).item() - value) < 1e-5
    assert ppo.kl_penalty(torch.tensor([0.0]), torch.tensor([100.0]), "k3").item() == 10.0  # clamped


def test_grpo_advantages_match_per_group_loop_and_dr_grpo():
    gen = torch.Generator().manual_seed(6)
    scores, g = torch.rand(15, generator=gen), 5
    adv, adv_dr = ppo.grpo_advantages(scores, g), ppo.grpo_advantages(scores, g, std_norm=False)
    for start in range(0, 15, g):
        group = scores[start:start + g].tolist()
        mu, sd = statistics.mean(group), statistics.stdev(group)  # torch.std is unbiased, as veRL
        for i, s in enumerate(group):
            assert abs(adv[start + i] - (s - mu) / (sd + 1e-6)) < 1e-5
            assert abs(adv_dr[start + i] - (s - mu)) < 1e-6
    assert torch.equal(ppo.grpo_advantages(torch.ones(4), 2), torch.zeros(4))  # equal scores: no signal
    torch.testing.assert_close(ppo.grpo_advantages(scores, 1), scores)


def test_reinforce_pp_advantages_are_whitened_discounted_returns_over_generated_tokens():
    gen = torch.Generator().manual_seed(7)
    r, m, gamma = torch.randn(6, 9, generator=gen), random_mask(6, 9, gen), 0.9
    returns = torch.zeros(6, 9)
    for b in range(6):
        g = 0.0
        for t in reversed([t for t in range(9) if m[b, t]]):
            g = r[b, t] + gamma * g  # G_t = r_t + γ G_next
            returns[b, t] = g
    vals = [returns[b, t].item() for b in range(6) for t in range(9) if m[b, t]]
    mu, sd = statistics.mean(vals), statistics.stdev(vals)
    expected = torch.where(m.bool(), (returns - mu) / sd, torch.zeros_like(r))
    torch.testing.assert_close(ppo.reinforce_pp_advantages(r, m, gamma), expected, atol=1e-5, rtol=1e-5)


def test_reinforce_advantage_is_the_raw_score_on_every_generated_token():
    """The paper's REINFORCE row: advantage = raw F1, no baseline, 0 off the response."""
    gen = torch.Generator().manual_seed(9)
    m, scores = random_mask(5, 7, gen), torch.rand(5, generator=gen)
    adv, returns, _ = ppo.compute_advantages("reinforce", scores, m, torch.zeros(5, 7), torch.zeros(5, 7), None, CFG, CFG["kl_coef"])
    expected = [[scores[b].item() if m[b, t] else 0.0 for t in range(7)] for b in range(5)]
    assert returns is None and adv.tolist() == expected


def test_token_level_rewards_put_score_on_last_generated_token_and_kl_on_every_one():
    gen = torch.Generator().manual_seed(8)
    m, scores, kl = random_mask(5, 7, gen), torch.rand(5, generator=gen), torch.randn(5, 7, generator=gen)
    rewards = ppo.token_level_rewards(scores, m, kl, kl_coef=0.1)
    for b in range(5):
        tokens = [t for t in range(7) if m[b, t]]
        for t in range(7):
            outcome = scores[b] if tokens and t == tokens[-1] else 0.0
            expected = (-0.1 * kl[b, t] if m[b, t] else 0.0) + outcome
            assert abs(rewards[b, t] - expected) < 1e-6


def test_compute_advantages_ppo_is_whitened_gae_of_kl_penalised_rewards_and_zero_off_response():
    gen = torch.Generator().manual_seed(9)
    m = random_mask(6, 8, gen)
    old, ref, v = rand(6, 8, gen=gen, low=-1), rand(6, 8, gen=gen, low=-1), torch.randn(6, 8, generator=gen)
    scores = torch.rand(6, generator=gen)
    adv, ret, stats = ppo.compute_advantages("ppo", scores, m, old, ref, v, CFG, CFG["kl_coef"])
    rewards = torch.zeros(6, 8)
    for b in range(6):
        tokens = [t for t in range(8) if m[b, t]]
        for t in tokens:
            rewards[b, t] = -CFG["kl_coef"] * (old[b, t] - ref[b, t]) + (scores[b] if t == tokens[-1] else 0)
    adv_raw, ret_ref = gae_loop(rewards, v, m, 1.0, 1.0)
    vals = [adv_raw[b, t].item() for b in range(6) for t in range(8) if m[b, t]]
    whitened = (adv_raw - statistics.mean(vals)) / statistics.stdev(vals)
    expected = torch.where(m.bool(), whitened, torch.zeros(6, 8))
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ret, ret_ref)
    adv_grpo, ret_grpo, _ = ppo.compute_advantages("grpo", scores, m, old, ref, None, CFG, CFG["kl_coef"])
    assert ret_grpo is None and torch.all(adv_grpo[m == 0] == 0)
    group_adv = ppo.grpo_advantages(scores, CFG["n_samples"])
    assert torch.all(adv_grpo[m == 1] == group_adv.unsqueeze(1).expand(6, 8)[m == 1])


def test_kl_in_reward_puts_beta_k1_in_each_algorithms_reward_and_kl_in_loss_keeps_it_out_of_ppos():
    """kl_in=reward: r_t = -β (log π_old - log π_ref) on each generated token, the score on the last; the
    outcome methods see score - β Σ_t k1. kl_in=loss: PPO's reward is the score alone."""
    gen = torch.Generator().manual_seed(16)
    m = random_mask(6, 8, gen)
    old, ref, v = rand(6, 8, gen=gen, low=-1), rand(6, 8, gen=gen, low=-1), torch.randn(6, 8, generator=gen)
    scores, beta = torch.rand(6, generator=gen), 0.1
    rewards, plain = torch.zeros(6, 8), torch.zeros(6, 8)  # with the KL, and the score alone
    for b in range(6):
        tokens = [t for t in range(8) if m[b, t]]
        for t in tokens:
            last = scores[b] if t == tokens[-1] else 0.0
            rewards[b, t], plain[b, t] = -beta * (old[b, t] - ref[b, t]) + last, last
    outcome = rewards.sum(-1)  # score - β Σ_t k1 (0 for a row with no generated token)
    cfg = dict(CFG, kl_in="reward", n_samples=3)

    def advantages(algo, cfg):
        return ppo.compute_advantages(algo, scores, m, old, ref, v, cfg, beta)[0]

    for start in range(0, 6, 3):
        group = outcome[start:start + 3].tolist()
        mu, sd = statistics.mean(group), statistics.stdev(group)
        for b in range(start, start + 3):
            want = torch.where(m[b].bool(), (outcome[b] - mu) / (sd + 1e-6), torch.tensor(0.0))
            torch.testing.assert_close(advantages("grpo", cfg)[b], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(advantages("reinforce", cfg), outcome[:, None] * m)
    torch.testing.assert_close(advantages("reinforce++", cfg), ppo.reinforce_pp_advantages(rewards, m, 1.0))
    adv_raw, _ = gae_loop(plain, v, m, 1.0, 1.0)
    vals = [adv_raw[b, t].item() for b in range(6) for t in range(8) if m[b, t]]
    whitened = torch.where(m.bool(), (adv_raw - statistics.mean(vals)) / statistics.stdev(vals), torch.zeros(6, 8))
    torch.testing.assert_close(advantages("ppo", dict(CFG, kl_in="loss")), whitened, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algo, kl_in, in_loss", [("ppo", "auto", False), ("ppo", "loss", True),
                                                  ("grpo", "auto", True), ("grpo", "reward", False)])
def test_kl_in_decides_whether_update_adds_the_kl_loss(algo, kl_in, in_loss):
    """Zero advantages and no entropy bonus: the actor moves only if the KL to the (perturbed) reference
    is in the loss."""
    actor, critic = tiny_models()
    batch, cfg = rollout_batch(actor, critic, algo)
    batch.advantages = torch.zeros_like(batch.advantages)
    cfg = dict(cfg, kl_in=kl_in, entropy_coef=0.0, kl_coef=1.0)
    grads = update_gradients(actor, critic if algo == "ppo" else None, batch, cfg)[:len(list(actor.parameters()))]
    assert any(g.abs().sum() > 0 for g in grads) == in_loss


def test_adaptive_kl_controller_follows_ziegler_and_is_fixed_without_target():
    assert ppo.adaptive_kl_coef(0.1, 5.0, 64, None, 1000) == 0.1
    assert abs(ppo.adaptive_kl_coef(0.1, 0.012, 64, 0.01, 1000) - 0.1 * (1 + 0.2 * 64 / 1000)) < 1e-12
    assert abs(ppo.adaptive_kl_coef(0.1, 0.0, 64, 0.01, 1000) - 0.1 * (1 - 0.2 * 64 / 1000)) < 1e-12
    assert abs(ppo.adaptive_kl_coef(0.1, 0.011, 10, 0.01, 100) - 0.1 * (1 + 0.1 * 10 / 100)) < 1e-12


# ---------------------------------------------------------------- losses

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def agg_loop(per_row, agg, max_len=1):
    """per_row: each row's per-token losses -> the scalar of `agg`, rows without a token counting as nothing."""
    if agg == "token-mean":
        flat = [x for row in per_row for x in row]
        return sum(flat) / max(len(flat), 1)
    rows = [sum(row) / (len(row) if agg == "seq-mean-token-mean" else max_len if agg.endswith("-norm") else 1)
            for row in per_row if row]
    return sum(rows) / max(len(rows), 1)


def policy_loss_loop(logp, old, adv, mask, eps, c, agg, eps_high=None, max_len=1):
    eps_high = eps if eps_high is None else eps_high
    B, T = logp.shape
    per_row = []
    for b in range(B):
        losses = []
        for t in range(T):
            if not mask[b, t]:
                continue
            r, a = math.exp(logp[b, t] - old[b, t]), adv[b, t].item()
            loss = max(-a * r, -a * min(max(r, 1 - eps), 1 + eps_high))
            losses.append(min(loss, -a * c) if a < 0 and c is not None else loss)
        per_row.append(losses)
    return agg_loop(per_row, agg, max_len)


@pytest.mark.parametrize("agg", AGGS)
def test_policy_loss_matches_loop_for_each_aggregation_without_nan_on_empty_rows(agg):
    gen = torch.Generator().manual_seed(10)
    m = random_mask(6, 8, gen)
    logp, old, adv = rand(6, 8, gen=gen, low=-2), rand(6, 8, gen=gen, low=-2), torch.randn(6, 8, generator=gen)
    loss, stats = ppo.policy_loss(logp, old, adv, m, 0.2, 0.2, 3.0, agg)
    assert torch.isfinite(loss)
    assert abs(loss.item() - policy_loss_loop(logp, old, adv, m, 0.2, 3.0, agg)) < 1e-5
    empty, _ = ppo.policy_loss(logp, old, adv, torch.zeros_like(m), agg=agg)
    assert empty.item() == 0.0
    for eps_high, c, max_len in [(0.28, None, 8), (0.5, 2.0, 3)]:  # clip-higher, no dual clip, Dr. GRPO's L
        loss, _ = ppo.policy_loss(logp, old, adv, m, 0.2, eps_high, c, agg, max_len)
        assert abs(loss.item() - policy_loss_loop(logp, old, adv, m, 0.2, c, agg, eps_high, max_len)) < 1e-5


def test_clip_higher_clips_the_ratio_to_one_minus_eps_low_and_one_plus_eps_high():
    """DAPO's clip-higher: with ε_low = 0.2, ε_high = 0.28 a token of A > 0 may rise to r = 1.28, one of
    A < 0 may fall to r = 0.8; past those the loss is flat (zero gradient)."""
    log_r = torch.tensor([[math.log(1.25), math.log(1.5), math.log(0.85), math.log(0.5)]], requires_grad=True)
    adv, m = torch.tensor([[1.0, 1.0, -1.0, -1.0]]), torch.ones(1, 4)
    per_token = [ppo.policy_loss(log_r[:, i:i + 1], torch.zeros(1, 1), adv[:, i:i + 1], m[:, i:i + 1], 0.2, 0.28)[0]
                 for i in range(4)]
    assert [x.item() for x in per_token] == pytest.approx([-1.25, -1.28, 0.85, 0.8])
    sum(per_token).backward()
    assert log_r.grad.tolist()[0] == pytest.approx([-1.25, 0.0, 0.85, 0.0])  # ∂(-A r)/∂log r = -A r where unclipped


def test_dual_clip_null_leaves_the_loss_of_a_negative_advantage_unbounded():
    logp, old, adv, m = torch.tensor([[5.0]]), torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1)
    assert ppo.policy_loss(logp, old, adv, m, dual_clip=None)[0].item() == pytest.approx(math.exp(5.0))
    assert ppo.policy_loss(logp, old, adv, m, dual_clip=3.0)[0].item() == pytest.approx(3.0)


def test_dual_clip_is_null_or_above_one_else_a_one_line_error():
    assert config.load_config(["dual_clip=null"])["dual_clip"] is None
    with pytest.raises(SystemExit, match=r"^error: dual_clip .* must be above 1, or null for none; got 0.5$"):
        config.load_config(["dual_clip=0.5"])


def test_policy_loss_zero_advantages_give_zero_gradient():
    logp = torch.randn(3, 5).requires_grad_()
    loss, _ = ppo.policy_loss(logp, torch.randn(3, 5), torch.zeros(3, 5), torch.ones(3, 5))
    loss.backward()
    assert torch.all(logp.grad == 0)


def test_policy_loss_identical_logprobs_give_ratio_one_no_clipping_and_zero_kl():
    gen = torch.Generator().manual_seed(11)
    logp, adv, m = -torch.rand(4, 6, generator=gen), torch.randn(4, 6, generator=gen), random_mask(4, 6, gen)
    loss, stats = ppo.policy_loss(logp, logp.clone(), adv, m)
    assert abs(loss.item() + ppo.masked_mean(adv, m).item()) < 1e-6  # L = -A · 1
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0


def test_dual_clip_bounds_the_loss_only_for_negative_advantages():
    logp, old = torch.tensor([[5.0, 5.0, 0.0]]), torch.zeros(1, 3)  # r = e^5 ≈ 148 on tokens 0, 1
    adv, m = torch.tensor([[-1.0, 1.0, -1.0]]), torch.ones(1, 3)
    per_token = [ppo.policy_loss(logp[:, i:i + 1], old[:, i:i + 1], adv[:, i:i + 1], m[:, i:i + 1])[0].item()
                 for i in range(3)]
    assert per_token[0] == pytest.approx(3.0)  # A < 0, huge r: min(148, -A c) = 3
    assert per_token[1] == pytest.approx(-1.2)  # A > 0: clipped at 1 + ε, dual clip untouched
    assert per_token[2] == pytest.approx(1.0)  # A < 0, r = 1: below the cap
    assert ppo.policy_loss(logp, old, adv, m)[1]["dual_clipfrac"] == pytest.approx(1 / 3)


def test_value_loss_matches_loop_and_clips():
    gen = torch.Generator().manual_seed(12)
    v, old, ret = (torch.randn(5, 7, generator=gen) for _ in range(3))
    m = random_mask(5, 7, gen)
    loss, clipfrac = ppo.value_loss(v, old, ret, m, clip=0.5)
    losses, clipped_count = [], 0
    for b in range(5):
        for t in range(7):
            if m[b, t]:
                vc = min(max(v[b, t].item(), old[b, t].item() - 0.5), old[b, t].item() + 0.5)
                unclipped, clipped = (v[b, t].item() - ret[b, t].item()) ** 2, (vc - ret[b, t].item()) ** 2
                losses.append(0.5 * max(unclipped, clipped))
                clipped_count += clipped > unclipped
    assert abs(loss.item() - sum(losses) / len(losses)) < 1e-5
    assert abs(clipfrac - clipped_count / len(losses)) < 1e-6
    far = torch.tensor([[3.0]], requires_grad=True)  # moved 3 away from V_old = 0 towards R = 10: clipped
    loss, clipfrac = ppo.value_loss(far, torch.zeros(1, 1), torch.full((1, 1), 10.0), torch.ones(1, 1))
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * 9.5 ** 2) and clipfrac == 1.0 and far.grad.item() == 0.0


def test_k3_kl_loss_gradient_step_reduces_kl_to_reference():
    torch.manual_seed(13)
    logits, ref_logits = torch.randn(4, 11, requires_grad=True), torch.randn(4, 11)

    def true_kl():  # KL(π || π_ref), exact over the vocabulary
        p, ref = torch.log_softmax(logits, -1), torch.log_softmax(ref_logits, -1)
        return (p.exp() * (p - ref)).sum(-1).mean().item()

    before = true_kl()
    for _ in range(5):
        with torch.no_grad():
            tokens = torch.distributions.Categorical(logits=logits).sample((2000,)).T  # [4, 2000] from π
        logp = torch.log_softmax(logits, -1).gather(-1, tokens)
        ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, tokens)
        kl_loss = ppo.masked_mean(ppo.kl_penalty(logp, ref_logp, "k3"), torch.ones_like(logp))
        logits.grad = None
        kl_loss.backward()
        with torch.no_grad():
            logits -= 4.0 * logits.grad
    assert true_kl() < 0.8 * before


def test_masked_positions_never_change_any_loss_or_gradient():
    gen = torch.Generator().manual_seed(14)
    m = random_mask(5, 8, gen)
    inputs = [rand(5, 8, gen=gen, low=-1) for _ in range(4)] + [torch.randn(5, 8, generator=gen) for _ in range(3)]
    junk = [torch.where(m.bool(), x, torch.full_like(x, 1e4) * (-1) ** i) for i, x in enumerate(inputs)]

    def losses_and_grad(logp, old, ref, entropy, adv, values, returns):
        logp, values = logp.clone().requires_grad_(), values.clone().requires_grad_()
        out = [ppo.policy_loss(logp, old, adv, m, agg=agg)[0] for agg in
               ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]]
        out += [ppo.masked_mean(entropy, m), ppo.masked_mean(ppo.kl_penalty(logp, ref, "k3"), m),
                ppo.value_loss(values, old, returns, m)[0]]
        torch.stack(out).sum().backward()
        return torch.stack(out).detach(), logp.grad, values.grad

    clean, dirty = losses_and_grad(*inputs), losses_and_grad(*junk)
    for a, b in zip(clean, dirty):
        torch.testing.assert_close(a, b)
    assert torch.all(dirty[1][m == 0] == 0) and torch.all(dirty[2][m == 0] == 0)


# ---------------------------------------------------------------- models

def tiny_lm(kind):
    """A tiny causal LM of each kind of output head: h W^T (Qwen2, Llama, GPT-2), h W^T + b (Phi, its bias
    drawn nonzero), c tanh(h W^T / c) (Gemma-2; c = 2 where its default 30 would barely touch a tiny model's
    logits). GPT-2's absolute positions test the position_ids."""
    torch.manual_seed(0)
    size = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, initializer_range=0.2)
    if kind == "qwen2":
        return tiny_models()[0].lm
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                          bos_token_id=0, eos_token_id=0)).eval()
    if kind == "phi":
        lm = PhiForCausalLM(PhiConfig(**size)).eval()
        torch.nn.init.normal_(lm.lm_head.bias)
        return lm
    return {"llama": lambda: LlamaForCausalLM(LlamaConfig(**size)),
            "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**size, head_dim=8, final_logit_softcapping=2.0))}[kind]().eval()


@pytest.mark.parametrize("lm", ["qwen2", "gpt2", "llama", "phi", "gemma2"])
def test_actor_logp_and_entropy_equal_log_softmax_of_lm_logits_for_right_and_left_padding(lm):
    """Against the model's own logits (its whole head) on each row alone. fp32 throughout: the two differ
    by summation order alone (packed rows, the fused log-softmax), about 1e-6, so 1e-5."""
    actor = ppo.Actor(tiny_lm(lm))
    gen = torch.Generator().manual_seed(15)
    lengths, T, temperature = [9, 6, 4, 3], 9, 0.7  # 6 and 3 share a packed row
    rows = [torch.randint(0, 97, (n,), generator=gen) for n in lengths]
    for side in ["right", "left"]:
        ids, attn = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
        for b, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(T - len(row), T)
            ids[b, span], attn[b, span] = row, 1
        logp, entropy = actor(ids, attn, temperature)
        for b, row in enumerate(rows):
            with torch.no_grad():  # the oracle: the plain LM on the unpadded row alone
                logits = actor.lm(row.unsqueeze(0)).logits[0, :-1] / temperature
            ref_logp = torch.log_softmax(logits, -1).gather(-1, row[1:, None]).squeeze(-1)
            ref_entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
            start = 0 if side == "right" else T - len(row)
            torch.testing.assert_close(logp[b, start + 1:start + len(row)], ref_logp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(entropy[b, start + 1:start + len(row)], ref_entropy, atol=1e-5, rtol=1e-5)
            assert logp[b, start] == 0 and torch.all(logp[b, attn[b] == 0] == 0)
            if lm in ("phi", "gemma2"):  # the test bites: h W^T alone, without the bias or the cap, is far off
                with torch.no_grad():
                    hidden = actor.lm.get_decoder()(row[None]).last_hidden_state[0, :-1]
                    weight_only = kernels.logprob_entropy_from_hidden(hidden, actor.lm.get_output_embeddings().weight,
                                                                      row[1:], temperature)[0]
                assert (weight_only - ref_logp).abs().max() > 0.1


def test_a_head_that_does_more_than_a_weight_bias_and_soft_cap_is_refused_naming_the_model_type():
    """Granite divides its logits by `logits_scaling`: the fused head would give another distribution."""
    lm = GraniteForCausalLM(GraniteConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, logits_scaling=4.0))
    with pytest.raises(SystemExit, match=r"^error: granite's output head does more than") as e:
        ppo.Actor(lm)
    assert "\n" not in str(e.value)


def test_token_values_at_t_are_critic_outputs_at_t_minus_one_also_when_left_padded():
    _, critic = tiny_models()
    row = torch.randint(0, 97, (6,), generator=torch.Generator().manual_seed(16))
    ids, attn = torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long)
    ids[0, 2:], attn[0, 2:] = row, 1
    with torch.no_grad():
        values = ppo.token_values(critic, ids, attn)
        plain = critic(row.unsqueeze(0)).logits[0, :, 0]
    torch.testing.assert_close(values[0, 3:], plain[:-1], atol=1e-5, rtol=1e-5)
    assert torch.all(values[0, :3] == 0)  # padding and the first real token have no preceding state


@pytest.mark.parametrize("algo", ["ppo", "grpo", "reinforce++"])
def test_update_runs_end_to_end_with_finite_stats(algo):
    actor, critic = tiny_models()
    batch, cfg = rollout_batch(actor, critic, algo)
    stats = run_update(actor, critic if algo == "ppo" else None, batch, cfg)
    keys = ["actor/pg_loss", "actor/entropy", "actor/clipfrac", "actor/approx_kl", "actor/grad_norm", "actor/lr"]
    keys += (["critic/vf_loss", "critic/vpred_mean", "critic/clipfrac", "critic/explained_variance",
              "critic/grad_norm"] if algo == "ppo" else ["actor/kl_loss"])
    assert set(keys) <= set(stats) and all(math.isfinite(v) for v in stats.values())
    assert (algo == "ppo") == ("critic/vf_loss" in stats) and (algo != "ppo") == ("actor/kl_loss" in stats)


def test_ppo_updates_raise_the_logprob_of_a_token_with_positive_advantage():
    actor, critic = tiny_models()
    batch, cfg = rollout_batch(actor, critic, "ppo")
    batch.advantages = torch.zeros_like(batch.advantages)
    batch.advantages[2, 9] = 1.0
    before = batch.old_logp[2, 9].item()
    for step in range(3):
        run_update(actor, critic, batch, dict(cfg, entropy_coef=0.0), lr=1e-2, step=step)
    with torch.no_grad():
        after = actor(batch.input_ids, batch.attention_mask)[0][2, 9].item()
    assert after > before + 0.05


def test_grpo_kl_loss_in_update_pulls_the_policy_towards_the_reference():
    actor, _ = tiny_models()
    batch, cfg = rollout_batch(actor, None, "grpo")
    batch.advantages = torch.zeros_like(batch.advantages)
    cfg = dict(cfg, kl_coef=1.0, entropy_coef=0.0)
    kl = [run_update(actor, None, batch, cfg, lr=3e-3, step=s)["actor/kl_loss"] for s in range(4)]
    assert kl[-1] < kl[0]


def test_information_tokens_change_no_update():
    actor, critic = tiny_models()
    batch, cfg = rollout_batch(actor, critic, "ppo", T=12)
    batch.response_mask[:, 8:] = 0  # rows now end in a 4-token <information> block
    changed = copy.deepcopy(batch)
    changed.input_ids[:, 8:] = (changed.input_ids[:, 8:] + 13) % 97
    grads, grads_changed = update_gradients(actor, critic, batch, cfg), update_gradients(actor, critic, changed, cfg)
    assert any(g.abs().sum() > 0 for g in grads)
    for g, h in zip(grads, grads_changed):
        torch.testing.assert_close(g, h, atol=0, rtol=0)


def test_micro_batch_accumulation_equals_one_pass_over_the_mini_batch():
    for agg in AGGS:
        actor, critic = tiny_models()
        batch, cfg = rollout_batch(actor, critic, "ppo")
        one_pass, accumulated = (update_gradients(actor, critic, batch, dict(cfg, micro_batch_size=micro, loss_agg_mode=agg))
                                 for micro in [4, 1])
        for g, h in zip(one_pass, accumulated):  # gradients are O(0.1-0.5): 1e-6 is summation order, not scaling
            torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("agg", AGGS)
def test_loss_agg_mode_aggregates_the_entropy_and_kl_terms_as_it_does_the_policy_term(agg):
    """One GRPO update (KL in the loss) of two micro-batches takes the gradient of agg(-A r - c_H H + β k3),
    agg written as a loop over rows (`agg_loop`), L = max_response_tokens for seq-mean-token-sum-norm."""
    actor, _ = tiny_models()
    batch, cfg = rollout_batch(actor, None, "grpo")
    cfg = dict(cfg, loss_agg_mode=agg, entropy_coef=0.1, kl_coef=0.5, max_response_tokens=16)
    got = update_gradients(actor, None, batch, cfg)
    logp, entropy = actor(batch.input_ids, batch.attention_mask, cfg["temperature"], batch.response_mask)
    per_row = []
    for b in range(len(logp)):
        terms = []
        for t in [t for t in range(logp.shape[1]) if batch.response_mask[b, t]]:
            r = torch.exp(logp[b, t] - batch.old_logp[b, t])  # 1 up to rounding: no clip bites
            d = batch.ref_logp[b, t] - logp[b, t]
            terms.append(-batch.advantages[b, t] * r - 0.1 * entropy[b, t] + 0.5 * (torch.exp(d) - d - 1))
        per_row.append(terms)
    want = torch.autograd.grad(agg_loop(per_row, agg, 16), list(actor.parameters()))
    for g, h in zip(got, want):  # as the accumulation test: summation order, not scaling
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-4)


def test_seq_mean_token_sum_norm_divides_each_rows_token_sum_by_one_constant_not_by_its_length():
    """Dr. GRPO: rows of 1 and 3 tokens of loss 1 give (1/8 + 3/8) / 2 at L = 8; seq-mean-token-mean 1."""
    loss, mask = torch.ones(2, 4), torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 0]])
    assert ppo.agg_loss(loss, mask, "seq-mean-token-sum-norm", max_len=8).item() == pytest.approx(0.25)
    assert ppo.agg_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(1.0)


def test_micro_batches_group_each_mini_batch_by_length():
    """Each forward pass of the update gets sequences of similar length: the mini-batch's rows sorted by
    length, then split; every row is in exactly one micro-batch of each mini-batch."""
    actor, critic = tiny_models()
    lengths = [12, 5, 9, 7, 11, 6, 8, 10]
    batch, cfg = rollout_batch(actor, critic, "ppo", B=8, lengths=lengths)
    seen, forward = [], actor.forward
    actor.forward = lambda ids, attn, *a, **k: seen.append(attn.sum(-1).tolist()) or forward(ids, attn, *a, **k)
    run_update(actor, critic, batch, dict(cfg, mini_batch_size=4, micro_batch_size=2))
    assert [len(m) for m in seen] == [2] * 4
    for first, second in (seen[0:2], seen[2:4]):  # the two mini-batches
        assert first == sorted(first) and second == sorted(second) and max(first) <= min(second)
    assert sorted(n for m in seen for n in m) == sorted(lengths)


def test_forward_in_micro_batches_equals_one_call_over_the_batch():
    """The step's log-probs and values, run a few rows at a time grouped by length, come back in the
    batch's order and equal one forward pass over the whole batch; each call gets sequences of one length group."""
    actor, critic = tiny_models()
    lengths = [12, 5, 9, 7, 11, 6, 8, 10, 4]
    batch, _ = rollout_batch(actor, critic, "ppo", B=9, lengths=lengths)
    ids, attn = batch.input_ids, batch.attention_mask
    calls = []

    def forward(rows):
        calls.append(attn[rows].sum(-1).tolist())
        return actor(ids[rows], attn[rows])[0], ppo.token_values(critic, ids[rows], attn[rows])

    with torch.no_grad():
        logp, values = packing.in_micro_batches(forward, attn, 4)
        torch.testing.assert_close(logp, actor(ids, attn)[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(values, ppo.token_values(critic, ids, attn), atol=1e-6, rtol=1e-5)
    assert calls == [[4, 5, 6, 7], [8, 9, 10, 11], [12]]


def one_sequence_a_row(lengths):
    """Today's padded layout as a packing: each sequence alone in its row, rows as long as the longest."""
    return [[b] for b in range(len(lengths))], max(lengths)


def test_pack_rows_places_each_sequence_once_first_fit_decreasing_within_the_longest():
    assert packing.pack_rows([9, 6, 3, 2]) == ([[0], [1, 2], [3]], 9)
    assert packing.pack_rows([4, 1, 3, 2, 2]) == ([[0], [2, 1], [3, 4]], 4)
    lengths = torch.randint(1, 60, (50,), generator=torch.Generator().manual_seed(17)).tolist()
    rows, width = packing.pack_rows(lengths)
    assert width == max(lengths) and len(rows) < 0.7 * len(lengths)
    assert sorted(b for row in rows for b in row) == list(range(50))
    assert all(sum(lengths[b] for b in row) <= width for row in rows)


def padded_forward(actor, critic, ids, attn, temperature):
    """The oracle: the padded batch through the plain models, padding masked by attention_mask and
    positions counting real tokens -> logp, entropy, values [B, T] at the scored positions."""
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = actor.lm(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits / temperature
        out = critic(input_ids=ids, attention_mask=attn, position_ids=position_ids).logits[..., 0]
    logp_all = torch.log_softmax(logits[:, :-1].double(), -1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return [torch.cat([torch.zeros_like(x[:, :1]), x], 1).float() for x in (logp, entropy, out[:, :-1])]


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_logp_entropy_and_values_equal_the_padded_forward_for_ragged_right_and_left_padding(
        path, attention, monkeypatch):
    monkeypatch.setenv("ZS_TRITON", "1" if path == "kernel" else "0")  # the Triton kernel, interpreted
    actor, critic = tiny_models()
    actor.lm.set_attn_implementation(attention)
    critic.set_attn_implementation(attention)
    gen = torch.Generator().manual_seed(18)
    lengths, T = [11, 1, 7, 3, 11, 5, 2, 9], 11
    rows = [torch.randint(0, 97, (n,), generator=gen) for n in lengths]
    assert len(packing.pack_rows(lengths)[0]) == 5  # 8 sequences packed into 5 rows
    for side in ["right", "left"]:
        ids, attn = torch.zeros(8, T, dtype=torch.long), torch.zeros(8, T, dtype=torch.long)
        for b, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(T - len(row), T)
            ids[b, span], attn[b, span] = row, 1
        with torch.no_grad():
            logp, entropy = actor(ids, attn, 0.7)
            values = ppo.token_values(critic, ids, attn)
        scored = ppo.scored_positions(attn)
        oracle = padded_forward(actor, critic, ids, attn, 0.7)
        for packed, padded in zip((logp, entropy, values), oracle):
            torch.testing.assert_close(packed[scored], padded[scored], atol=1e-5, rtol=1e-5)
            assert torch.all(packed[~scored] == 0)
        some = scored & (torch.rand(scored.shape, generator=gen) < 0.5)  # the LM head on these alone, as training's response mask
        with torch.no_grad():
            for packed, padded in zip(actor(ids, attn, 0.7, some), oracle):
                torch.testing.assert_close(packed[some], padded[some], atol=1e-5, rtol=1e-5)
                assert torch.all(packed[~some] == 0)


@pytest.mark.parametrize("micro_batch_size,grad_checkpointing", [(4, False), (8, False), (8, True)])
def test_one_update_on_packed_rows_takes_the_gradients_of_the_padded_update(micro_batch_size, grad_checkpointing,
                                                                            monkeypatch):
    actor, critic = tiny_models()
    lengths = [12, 3, 12, 5, 10, 7, 6, 12]
    assert len(packing.pack_rows(lengths)[0]) == 6  # a micro-batch of all 8 rows packs into 6
    batch, cfg = rollout_batch(actor, critic, "ppo", B=8, lengths=lengths)
    cfg = dict(cfg, mini_batch_size=8, micro_batch_size=micro_batch_size)
    with monkeypatch.context() as patch:
        patch.setattr(packing, "pack_rows", one_sequence_a_row)
        padded = update_gradients(actor, critic, batch, cfg)
    if grad_checkpointing:  # recomputed in the backward pass; Hugging Face checkpoints in train mode only
        for model in (actor.lm, critic):
            model.activation_checkpointing_enable()
            model.train()
    grads = update_gradients(actor, critic, batch, cfg)
    assert any(g.abs().sum() > 0 for g in grads)
    for g, h in zip(grads, padded):
        torch.testing.assert_close(g, h, atol=1e-6, rtol=1e-4)


def test_make_optimizer_first_lr_is_positive_then_warms_up_to_lr_and_stays():
    opt, sched = ppo.make_optimizer(torch.nn.Linear(2, 2), 1e-3, 0.01, 3, 100)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 4) and lrs[3:] == [pytest.approx(1e-3)] * 3
    assert opt.param_groups[0]["weight_decay"] == 0.01


def test_learning_rate_schedule_steps_once_per_update_not_per_optimizer_step():
    """The warm-up counts RL steps (veRL steps the scheduler once per update_actor), however many
    mini-batches an update has: after 2 updates of 2 optimizer steps each, warm-up 3 is at (2+1)/4."""
    actor, critic = tiny_models()
    batch, cfg = rollout_batch(actor, critic, "ppo")
    a_opt, a_sched = ppo.make_optimizer(actor, 1e-3, 0.0, 3, 100)
    c_opt, c_sched = ppo.make_optimizer(critic, 1e-2, 0.0, 3, 100)
    for step in range(2):
        ppo.update(ppo.Learner(actor, a_opt, a_sched), ppo.Learner(critic, c_opt, c_sched), batch,
                   dict(cfg, mini_batch_size=2), cfg["kl_coef"], step=step)
    assert a_opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 3 / 4)
    assert c_opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 3 / 4)


def test_each_paper_preset_is_its_official_script_as_the_table_of_docs_paper_states():
    """docs/paper.md's table, written from train_ppo.sh, train_grpo.sh and train_reinforce.sh, against the
    config each preset gives (`-`: the algorithm does not use the key)."""
    lines = open(os.path.join(os.path.dirname(ppo.__file__), "docs", "paper.md"), encoding="utf-8").read().splitlines()
    header = next(line for line in lines if line.startswith("| key | `preset="))
    presets = re.findall(r"`preset=([\w-]+)`", header)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines if line.startswith("| `")]
    assert presets == ["paper", "paper-grpo", "paper-reinforce"] and len(rows) > 30
    for i, preset in enumerate(presets):
        cfg = config.load_config([f"preset={preset}"])
        for key, *values in rows:
            if values[i] != "-":
                assert cfg[key.strip("`")] == config.parse_value(values[i]), (preset, key)


def test_warm_up_ratios_give_int_ratio_times_steps_rl_steps_as_the_official_code(tmp_path):
    """The official run's 0.285 and 0.015 of 203 steps: int() gives 57 and 3, so the first step runs at
    lr / 58 and critic_lr / 4; the default's 0.05 of 60 is 3 steps, lr / 4, as before the ratios."""
    path = str(tmp_path / "policy")
    tiny_models()[0].lm.save_pretrained(path)
    for steps, ratio, critic_ratio, divisors in [(203, 0.285, 0.015, (58, 4)), (60, 0.05, 0.0, (4, 1))]:
        cfg = dict(config.load_config([]), steps=steps, lr_warmup_ratio=ratio, critic_lr_warmup_ratio=critic_ratio)
        actor, critic, _, _ = zerosearch.load_models(path, cfg, parallel.Ctx())
        assert actor.optimizer.param_groups[0]["lr"] == pytest.approx(cfg["actor_lr"] / divisors[0])
        assert critic.optimizer.param_groups[0]["lr"] == pytest.approx(cfg["critic_lr"] / divisors[1])


def test_bf16_compute_keeps_fp32_weights_so_a_small_adam_step_is_not_rounded_away():
    """dtype=bfloat16 as veRL's mixed precision: the decoders run in bf16, weights and Adam stay fp32.
    Adam's first step moves every weight with a gradient by about lr; at lr 1e-6 almost none of
    those steps would survive rounding to bf16 weights (spacing ~1e-3 at 0.2)."""
    actor, critic = tiny_models()
    actor.compute_dtype = torch.bfloat16
    batch, cfg = rollout_batch(actor, critic, "ppo")
    logp, _ = actor(batch.input_ids, batch.attention_mask)
    fp32_logp, _ = ppo.Actor(actor.lm)(batch.input_ids, batch.attention_mask)
    assert 1e-4 < (logp - fp32_logp).abs().max() < 0.2  # the decoder ran in bf16, the log-probs are fp32
    assert logp.dtype == torch.float32
    before = {model: [p.detach().clone() for p in model.parameters()] for model in (actor, critic)}
    run_update(actor, critic, batch, dict(cfg, dtype="bfloat16"), lr=1e-6)
    for model, old in before.items():
        steps = torch.cat([(p.detach() - q).flatten() for p, q in zip(model.parameters(), old)])
        assert all(p.dtype == torch.float32 for p in model.parameters())
        moved = steps[steps != 0].abs()
        assert len(moved) > 0.9 * len(steps) and 0.5e-6 < moved.median() < 1.5e-6


def test_nan_in_advantages_raises_a_clear_error_before_the_optimizer_steps():
    actor, critic = tiny_models()
    batch, cfg = rollout_batch(actor, critic, "grpo")
    batch.advantages[2, 9] = float("nan")
    before = [p.clone() for p in actor.parameters()]
    with pytest.raises(RuntimeError, match="NaN in actor loss at step 12: lower actor_lr"):
        run_update(actor, None, batch, cfg, step=12)
    assert all(torch.equal(p, q) for p, q in zip(before, actor.parameters()))
