"""Kernels vs their torch references vs independent oracles (fp64 torch.log_softmax and
Categorical.entropy; textbook GAE on the unmasked tokens).

The Triton kernels run on CPU through Triton's interpreter: TRITON_INTERPRET must be set before
`kernels` is imported (its @triton.jit reads it), and the `path` fixture sets ZS_TRITON, which
the dispatch reads at call time. Tolerances:
  logp, entropy (fp32 outputs, whatever the logits dtype): atol 1e-5, rtol 1e-6 against fp64 on
    the same logits upcast; torch's own fp32 log_softmax/Categorical is off by up to 7e-5 at V=151936.
  dlogits: atol 1e-5 plus rtol of one rounding to the logits dtype: 1e-5 fp32, 2^-11 fp16, 2^-7 bf16
    (2^-7, not 2^-8: the interpreter truncates fp32 -> bf16 where GPUs round to nearest).
"""
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch
from torch.distributions import Categorical

import kernels.logprob
from kernels import gae, gae_reference, logprob_entropy, logprob_entropy_from_hidden, logprob_entropy_reference

OUT_TOL = dict(atol=1e-5, rtol=1e-6)
GRAD_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-5, rtol=2 ** -11),
            torch.bfloat16: dict(atol=1e-5, rtol=2 ** -7)}


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    monkeypatch.setenv("ZS_TRITON", "1" if request.param == "kernel" else "0")
    return request.param


def oracle(logits, labels, temperature, g_lp, g_h):
    """fp64 torch.log_softmax / Categorical.entropy of the same logits -> logp, entropy, dlogits."""
    z = logits.detach().double().requires_grad_()
    logp = torch.log_softmax(z / temperature, -1).gather(-1, labels[:, None]).squeeze(-1)
    entropy = Categorical(logits=z / temperature).entropy()
    dlogits, = torch.autograd.grad((logp * g_lp + entropy * g_h).sum(), z)
    return logp, entropy, dlogits


def oracle_on_finite_logits(logits, labels, temperature, g_lp, g_h):
    """Row by row, the oracle on the finite logits only: p = 0 at -inf, so the gradient there is 0
    (Categorical's own backward gives nan at -inf)."""
    dlogits = torch.zeros(logits.shape, dtype=torch.float64)
    outs = []
    for i, row in enumerate(logits):
        keep = row.isfinite()
        label = keep[:labels[i]].sum().view(1)  # the label's index among the finite logits
        logp, entropy, dlogits[i, keep] = oracle(row[keep][None], label, temperature, g_lp[i:i + 1], g_h[i:i + 1])
        outs.append((logp, entropy))
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), dlogits


def check_against_oracle(logits, labels, temperature=1.0, oracle=oracle):
    """Forward and the gradient under random upstream grads for both outputs."""
    g_lp, g_h = torch.randn(2, len(labels), dtype=torch.float64)
    logp, entropy = logprob_entropy(logits, labels, temperature)
    dlogits, = torch.autograd.grad((logp * g_lp + entropy * g_h).sum(), logits)
    want_logp, want_entropy, want_dlogits = oracle(logits, labels, temperature, g_lp, g_h)
    assert logp.dtype == entropy.dtype == torch.float32 and dlogits.dtype == logits.dtype
    torch.testing.assert_close(logp.double(), want_logp, **OUT_TOL)
    torch.testing.assert_close(entropy.double(), want_entropy, **OUT_TOL)
    torch.testing.assert_close(dlogits.double(), want_dlogits, **GRAD_TOL[logits.dtype])
    return logp, entropy, dlogits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V, rows", [(37, 5), (1001, 4), (32000, 2), (151936, 2)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_entropy_matches_fp64_log_softmax_and_categorical(path, dtype, V, rows, temperature):
    torch.manual_seed(V + rows)
    logits = (3 * torch.randn(rows, V)).to(dtype).requires_grad_()
    check_against_oracle(logits, torch.randint(V, (rows,)), temperature)


def test_kernel_agrees_with_torch_reference(monkeypatch):
    torch.manual_seed(0)
    logits = (3 * torch.randn(3, 5000)).requires_grad_()
    labels, g = torch.randint(5000, (3,)), torch.randn(2, 3)
    monkeypatch.setenv("ZS_TRITON", "1")
    kernel = logprob_entropy(logits, labels, 0.8)
    reference = logprob_entropy_reference(logits, labels, 0.8, chunk_rows=2)
    grads = [torch.autograd.grad((lp * g[0] + h * g[1]).sum(), logits)[0] for lp, h in (kernel, reference)]
    for a, b in zip([*kernel, grads[0]], [*reference, grads[1]]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_single_row(path):
    torch.manual_seed(1)
    check_against_oracle((3 * torch.randn(1, 1001)).requires_grad_(), torch.tensor([7]), 0.7)


@pytest.mark.parametrize("layout", ["row-strided", "every-other-row", "transposed"])
def test_non_contiguous_logits(path, layout):
    torch.manual_seed(2)
    V = 1001
    base = {"row-strided": lambda: torch.randn(4, V + 13), "every-other-row": lambda: torch.randn(8, V),
            "transposed": lambda: torch.randn(V, 4)}[layout]().mul_(3).requires_grad_()
    logits = {"row-strided": lambda: base[:, :V], "every-other-row": lambda: base[::2],
              "transposed": lambda: base.t()}[layout]()
    assert not logits.is_contiguous()
    check_against_oracle(logits, torch.randint(V, (4,)), 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_inf_logits_give_finite_grads(path, dtype):
    torch.manual_seed(3)
    logits = 3 * torch.randn(4, 1001)
    labels = torch.randint(1001, (4,))
    logits[torch.rand(4, 1001) < 0.5] = float("-inf")  # p = 0 there
    logits[torch.arange(4), labels] = 1.0
    logits[0, :600] = float("-inf")  # including whole blocks of -inf at the start of a row
    logits[0, labels[0]] = 1.0
    logits = logits.to(dtype).requires_grad_()
    _, entropy, dlogits = check_against_oracle(logits, labels, 0.7, oracle=oracle_on_finite_logits)
    assert torch.isfinite(entropy).all() and torch.isfinite(dlogits).all()
    assert (dlogits[logits == float("-inf")] == 0).all()


def max_errors(grads, want_grads):
    return [(got.double() - want).abs().max().item() for got, want in zip(grads, want_grads)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_hidden_matches_naive_log_softmax_across_chunk_boundaries(path, dtype, monkeypatch):
    torch.manual_seed(4)
    N, D, V, temperature = 37, 24, 1001, 0.7
    monkeypatch.setattr(kernels.logprob, "CHUNK_ROWS", 16)  # 37 rows = 16 + 16 + 5
    hidden = torch.randn(N, D).to(dtype).requires_grad_()
    weight = torch.randn(V, D).mul_(0.5).to(dtype).requires_grad_()
    labels, (g_lp, g_h) = torch.randint(V, (N,)), torch.randn(2, N, dtype=torch.float64)
    logp, entropy = logprob_entropy_from_hidden(hidden, weight, labels, temperature)
    grads = torch.autograd.grad((logp * g_lp + entropy * g_h).sum(), (hidden, weight))
    assert grads[0].dtype == grads[1].dtype == dtype

    # oracle: fp64 log_softmax of the logits of the same matmul (in the inputs' dtype), then the chain rule
    want_logp, want_entropy, dlogits = oracle(hidden.detach() @ weight.detach().t(), labels, temperature, g_lp, g_h)
    want_grads = dlogits @ weight.double(), dlogits.t() @ hidden.double()  # ∂/∂h = dz W, ∂/∂W = dz^T h
    torch.testing.assert_close(logp.double(), want_logp, **OUT_TOL)
    torch.testing.assert_close(entropy.double(), want_entropy, **OUT_TOL)
    if dtype == torch.float32:
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got.double(), want, **GRAD_TOL[dtype])
    else:  # bf16 grads: at most 3x the error of torch's naive bf16 path (per-chunk rounding of dz^T h,
        # and the interpreter truncating dz to bf16, each cost up to ~1.5-2x; measured <= 2.7x over 8 seeds)
        logp_all = torch.log_softmax((hidden @ weight.t()).float() / temperature, -1)
        naive = logp_all.gather(-1, labels[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)
        naive_grads = torch.autograd.grad((naive[0] * g_lp + naive[1] * g_h).sum(), (hidden, weight))
        for ours, torch_own in zip(max_errors(grads, want_grads), max_errors(naive_grads, want_grads)):
            assert ours <= 3 * torch_own


def test_from_hidden_with_a_bias_and_soft_capping_matches_fp64_autograd_of_the_capped_logits(path):
    """The head of Phi (h W^T + b) and Gemma-2 (c tanh(z / c)): values and the gradients of hidden, W and b
    against fp64 autograd through the same formula. fp32 inputs, so OUT_TOL and fp32's GRAD_TOL; the
    cap c = 2 bends logits of standard deviation 2.6 hard: without it, or without b, logp moves by over 1."""
    torch.manual_seed(5)
    N, D, V, temperature, cap = 37, 24, 1001, 0.7, 2.0
    hidden, weight, bias = torch.randn(N, D), torch.randn(V, D).mul_(0.5), torch.randn(V)
    labels, (g_lp, g_h) = torch.randint(V, (N,)), torch.randn(2, N, dtype=torch.float64)
    inputs = [x.requires_grad_() for x in (hidden, weight, bias)]
    logp, entropy = logprob_entropy_from_hidden(hidden, weight, labels, temperature, bias, cap)
    grads = torch.autograd.grad((logp * g_lp + entropy * g_h).sum(), inputs)

    h, w, b = (x.detach().double().requires_grad_() for x in inputs)
    z = cap * torch.tanh((h @ w.t() + b) / cap) / temperature  # the capped logits, then the temperature
    want_logp = torch.log_softmax(z, -1).gather(-1, labels[:, None]).squeeze(-1)
    want_entropy = Categorical(logits=z).entropy()
    want_grads = torch.autograd.grad((want_logp * g_lp + want_entropy * g_h).sum(), (h, w, b))
    torch.testing.assert_close(logp.double(), want_logp.detach(), **OUT_TOL)
    torch.testing.assert_close(entropy.double(), want_entropy.detach(), **OUT_TOL)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, **GRAD_TOL[torch.float32])


def test_dispatch_runs_the_kernel_only_on_cuda_or_when_forced(monkeypatch):
    monkeypatch.delenv("ZS_TRITON", raising=False)
    assert not kernels.logprob.use_triton(torch.zeros(1))
    monkeypatch.setenv("ZS_TRITON", "1")
    assert kernels.logprob.use_triton(torch.zeros(1))
    assert type(kernels.logprob._forward_kernel).__name__ == "InterpretedFunction", \
        "kernels was imported before TRITON_INTERPRET=1 was set (run test_kernels.py on its own)"


def test_a_hub_kernels_package_beside_this_one_fails_with_what_to_do(tmp_path):
    """Hugging Face's `kernels` (required by transformers>=5.25) has this package's import name; with the
    metadata of a version transformers would import on the path, importing ours stops with the fix in one
    line, not transformers' missing name; a version transformers ignores changes nothing."""
    from transformers.utils.import_utils import KERNELS_MIN_VERSION
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def import_beside(version):
        site = tmp_path / version
        (site / f"kernels-{version}.dist-info").mkdir(parents=True)
        (site / f"kernels-{version}.dist-info" / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kernels\nVersion: {version}\n")
        return subprocess.run([sys.executable, "-c", "import kernels"], cwd=repo, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(site)))

    assert import_beside("0.0.1").returncode == 0
    out = import_beside(KERNELS_MIN_VERSION)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "ImportError: Hugging Face's `kernels` package is installed, and this repository's kernels/ takes its "
        "import name: pip uninstall -y kernels && pip install 'transformers>=5.0,<5.25'")


def gae_on_unmasked_tokens(rewards, values, mask, gamma, lam):
    """Textbook GAE run on each row's unmasked tokens only (A = 0, returns = V elsewhere), in fp64."""
    advantages = torch.zeros_like(values, dtype=torch.float64)
    for b in range(len(rewards)):
        next_value = next_adv = 0.0
        for t in reversed(mask[b].nonzero().flatten().tolist()):
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()  # δ_t = r_t + γ V_next - V_t
            next_adv = advantages[b, t] = delta + gamma * lam * next_adv  # A_t = δ_t + γλ A_next
            next_value = values[b, t].item()
    return advantages, advantages + values.double()


@pytest.mark.parametrize("gamma, lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.5)])
def test_gae_matches_textbook_gae_on_unmasked_tokens(path, gamma, lam):
    torch.manual_seed(5)
    B, T = 6, 40
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    mask = torch.rand(B, T) < 0.6
    mask[0] = False  # all masked
    mask[1] = False
    mask[1, 17] = True  # a single token
    mask[2] = True  # none masked
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    want_adv, want_returns = gae_on_unmasked_tokens(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages.double(), want_adv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(returns.double(), want_returns, atol=1e-5, rtol=1e-5)
    assert (advantages[~mask] == 0).all() and torch.equal(returns[~mask], values[~mask])


def test_gae_kernel_agrees_with_reference(monkeypatch):
    torch.manual_seed(6)
    rewards, values, mask = torch.randn(4, 33), torch.randn(4, 33), torch.rand(4, 33) < 0.5
    monkeypatch.setenv("ZS_TRITON", "1")
    for gamma, lam in [(1.0, 1.0), (0.99, 0.95)]:
        for a, b in zip(gae(rewards, values, mask, gamma, lam), gae_reference(rewards, values, mask, gamma, lam)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_training_step_gives_the_same_losses_and_weights_with_kernels_and_references(monkeypatch):
    """One PPO training step as zerosearch.train runs it (log-probs of the policy and the reference,
    critic values, GAE advantages, then `ppo.update`) from identical weights, once on the torch
    references and once on the Triton kernels: stats and updated weights agree. fp32 throughout; the
    tolerance is 1e-5 (that of the log-probs above) on losses and 1e-6 on weights after AdamW at lr 1e-3."""
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForTokenClassification

    import ppo
    config = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    actor = ppo.Actor(Qwen2ForCausalLM(Qwen2Config(**config, initializer_range=0.2))).eval()
    critic = Qwen2ForTokenClassification(Qwen2Config(**config, num_labels=1, classifier_dropout=0.0)).eval()
    ref = copy.deepcopy(actor)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    B, T = 6, 14
    input_ids = torch.randint(0, 97, (B, T))
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, -3:] = 0  # right padding
    attention_mask[2, :2] = 0  # left padding
    response_mask = torch.zeros(B, T)
    response_mask[:, 4:7] = 1
    response_mask[:, 10:] = 1  # 7..9: injected <information> tokens
    response_mask *= attention_mask
    scores = torch.rand(B)
    cfg = dict(algo="ppo", gamma=1.0, lam=0.95, kl_coef=0.01, kl_type="k3", clip_ratio_low=0.2, clip_ratio_high=0.2,
               dual_clip=3.0, value_clip=0.5, entropy_coef=0.01, ppo_epochs=2, mini_batch_size=3, micro_batch_size=2,
               grad_clip=1.0, loss_agg_mode="token-mean", critic_warmup=0, temperature=0.9, seed=0)

    def training_step(flag):
        monkeypatch.setenv("ZS_TRITON", flag)
        a, c = copy.deepcopy(actor), copy.deepcopy(critic)
        with torch.no_grad():
            old_logp, _ = a(input_ids, attention_mask, cfg["temperature"])
            ref_logp, _ = ref(input_ids, attention_mask, cfg["temperature"])
            values = ppo.token_values(c, input_ids, attention_mask)
        advantages, returns, adv_stats = ppo.compute_advantages("ppo", scores, response_mask, old_logp, ref_logp,
                                                                values, cfg, cfg["kl_coef"])
        batch = ppo.Batch(input_ids, attention_mask, response_mask, old_logp, ref_logp, advantages, values, returns)
        a_opt, a_sched = ppo.make_optimizer(a, 1e-3, 0.01, 0, 10)
        c_opt, c_sched = ppo.make_optimizer(c, 1e-3, 0.01, 0, 10)
        stats = ppo.update(ppo.Learner(a, a_opt, a_sched), ppo.Learner(c, c_opt, c_sched), batch, cfg, cfg["kl_coef"])
        return {**adv_stats, **stats}, advantages, [p.detach().clone() for p in [*a.parameters(), *c.parameters()]]

    calls = []
    monkeypatch.setattr(kernels.logprob, "_forward_triton",
                        lambda *args, f=kernels.logprob._forward_triton: calls.append(1) or f(*args))
    ref_stats, ref_adv, ref_weights = training_step("0")
    assert not calls
    kernel_stats, kernel_adv, kernel_weights = training_step("1")
    assert calls, "the Triton path did not run"
    assert ref_stats.keys() == kernel_stats.keys()
    # critic/clipfrac is left out: ppo.value_loss counts `old + (v - old) != v`, a rounding tie, as clipped,
    # so it flips on last-bit differences (0.071 vs 0.027 here while vf_loss agrees to 1e-9)
    for k in ref_stats.keys() - {"critic/clipfrac"}:
        assert kernel_stats[k] == pytest.approx(ref_stats[k], abs=1e-5, rel=1e-5), k
    torch.testing.assert_close(kernel_adv, ref_adv, atol=1e-5, rtol=1e-5)
    for got, want in zip(kernel_weights, ref_weights):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert any(not torch.equal(w, p) for w, p in zip(ref_weights, [*actor.parameters(), *critic.parameters()]))
