"""Tests on a CUDA GPU (marker `gpu`, skipped without one): the Triton kernels compiled, against fp64
oracles and as closely as torch's own computation at each dtype; sim.sample against Hugging Face
generate on CUDA, fp32 and bf16; the smoke preset in bf16 and under torchrun with NCCL; one RL step of
a policy of the Qwen2.5-0.5B architecture (random weights, built from config) on the kernel path.

`python -m pytest -m gpu test_gpu.py` (or `bash gpu_check.sh`) runs them with the kernels compiled; in
a pytest run without `-m gpu` the kernels are interpreted (conftest.py) and the tests that need them
compiled skip.

Tolerance of the kernels: each output's largest error against an fp64 oracle of the same inputs may
be at most 2x that of torch's own computation at the inputs' dtype (log_softmax in fp32 of the upcast
logits, autograd back to the logits' dtype; gae_reference), twice because two fp32 computations of one
sum in different orders differ by about that; 3x for the bf16 gradients of the hidden-state path, whose
weight gradient is rounded to bf16 once per chunk of rows. The floor is 8 fp32 ulps at the values'
scale: the kernels' backward reads Σ p z as lse - H, the two numbers it keeps, which costs a few ulps
of lse (under the CPU interpreter, 4 ulps of the gradient's scale at V=1001, T=0.7, torch's own 1.5).
"""
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2ForTokenClassification, Qwen3Config, Qwen3ForCausalLM)

import kernels.logprob
import ppo
import world
from kernels import gae, gae_reference, logprob_entropy, logprob_entropy_from_hidden
from sim import sample

pytestmark = pytest.mark.gpu

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
EPS32 = torch.finfo(torch.float32).eps
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


@pytest.fixture
def compiled():
    """The kernels as Triton compiles them for the GPU, not run through the interpreter."""
    if kernels.logprob.triton is None:
        pytest.skip("Triton is not installed")
    if type(kernels.logprob._forward_kernel).__name__ == "InterpretedFunction":
        pytest.skip("the Triton kernels are interpreted in this pytest process (TRITON_INTERPRET=1): "
                    "`python -m pytest -m gpu test_gpu.py` tests them compiled")


def max_error(got, want):
    return (got.double() - want).abs().max().item()


def assert_as_close_as_torch(name, ours, torch_own, want, factor=2.0):
    """ours' largest error against the fp64 `want` is at most `factor` times torch's own (see the module docstring)."""
    assert torch.isfinite(ours).all(), f"{name}: not finite"
    err, torch_err = max_error(ours, want), max_error(torch_own, want)
    tolerance = max(factor * torch_err, 8 * EPS32 * max(1.0, want.abs().max().item()))
    assert err <= tolerance, (f"{name}: largest error {err:.3g} against fp64, torch's own {torch_err:.3g}, "
                              f"tolerance {tolerance:.3g}")


# ----------------------------------------------------------------------------- kernels: logits -> logp, entropy
def fp64_oracle(logits, labels, temperature, g_lp, g_h):
    """fp64 log_softmax and -Σ p log p of the same logits, and the gradient of Σ g_lp logp + g_H H.
    -inf logits become -1e300: p = 0 there exactly, and so is their gradient (no 0 * inf)."""
    z = logits.detach().double().requires_grad_()
    finite = torch.where(z.isfinite(), z, torch.full_like(z, -1e300))
    logp_all = torch.log_softmax(finite / temperature, -1)
    logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    dlogits, = torch.autograd.grad((logp * g_lp + entropy * g_h).sum(), z)
    return logp, entropy, dlogits


def torch_own(logits, labels, temperature, g_lp, g_h):
    """Torch at the logits' dtype: log_softmax in fp32 of the upcast logits, the gradient cast back;
    -inf logits become -1e30, as in the oracle."""
    z = logits.detach().requires_grad_()
    finite = torch.where(z.isfinite(), z.float(), torch.full(z.shape, -1e30, device=z.device))
    logp_all = torch.log_softmax(finite / temperature, -1)
    logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    dlogits, = torch.autograd.grad((logp * g_lp + entropy * g_h).sum(), z)
    return logp, entropy, dlogits


def check_logits_path(logits, labels, temperature):
    g_lp, g_h = torch.randn(2, len(labels), device="cuda")
    x = logits.detach().requires_grad_()
    logp, entropy = logprob_entropy(x, labels, temperature)
    dlogits, = torch.autograd.grad((logp * g_lp + entropy * g_h).sum(), x)
    assert logp.dtype == entropy.dtype == torch.float32 and dlogits.dtype == logits.dtype
    want = fp64_oracle(logits, labels, temperature, g_lp.double(), g_h.double())
    for name, ours, own, w in zip(("logp", "entropy", "dlogits"), (logp, entropy, dlogits),
                                  torch_own(logits, labels, temperature, g_lp, g_h), want):
        assert_as_close_as_torch(name, ours, own, w)
    return dlogits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [1001, 32000, 151936])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_entropy_kernel_against_fp64_and_torch(compiled, dtype, V, temperature):
    torch.manual_seed(V)
    logits = (3 * torch.randn(64, V, device="cuda")).to(dtype)
    check_logits_path(logits, torch.randint(V, (64,), device="cuda"), temperature)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_entropy_kernel_with_minus_inf_logits(compiled, dtype):
    """Masked vocabulary entries (-inf logits, p = 0): half of each row, whole blocks at a row's start,
    and a row with five finite entries; their gradient is exactly 0."""
    torch.manual_seed(3)
    rows, V = 32, 151936
    logits = 3 * torch.randn(rows, V, device="cuda")
    labels = torch.randint(V, (rows,), device="cuda")
    logits[torch.rand(rows, V, device="cuda") < 0.5] = float("-inf")
    logits[0, :20000] = float("-inf")
    logits[1, :] = float("-inf")
    logits[1, torch.randint(V, (5,), device="cuda")] = 1.0
    logits[torch.arange(rows, device="cuda"), labels] = 1.0
    logits = logits.to(dtype)
    dlogits = check_logits_path(logits, labels, 0.7)
    assert (dlogits[logits == float("-inf")] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["row-strided", "transposed"])
def test_logprob_entropy_kernel_on_non_contiguous_logits(compiled, dtype, layout):
    torch.manual_seed(2)
    V = 32000
    if layout == "row-strided":
        logits = (3 * torch.randn(16, V + 13, device="cuda")).to(dtype)[:, :V]
    else:
        logits = (3 * torch.randn(V, 16, device="cuda")).to(dtype).t()
    assert not logits.is_contiguous()
    check_logits_path(logits, torch.randint(V, (16,), device="cuda"), 0.9)


# ----------------------------------------------------------------------------- kernels: hidden states -> logp, entropy
def ragged_attention_mask(B, T, generator):
    """[B, T]: rows of 5..T real tokens, left-padded in even rows and right-padded in odd ones."""
    lengths = torch.randint(5, T + 1, (B,), generator=generator)
    positions = torch.arange(T)
    mask = torch.stack([positions >= T - n if b % 2 == 0 else positions < n for b, n in enumerate(lengths)])
    return mask.long()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_from_hidden_kernel_on_the_rows_of_a_ragged_batch(compiled, dtype, temperature):
    """The rows ppo.Actor scores in a batch with left and right padding (about 500 rows: chunks of
    256, 256 and a ragged last one), V = 151936; gradients of the hidden states and the lm_head weight."""
    g = torch.Generator().manual_seed(1)
    B, T, D, V = 12, 80, 64, 151936
    scored = ppo.scored_positions(ragged_attention_mask(B, T, g)).cuda()
    input_ids = torch.randint(V, (B, T), generator=g).cuda()
    all_hidden = torch.randn(B, T, D, generator=g).cuda().to(dtype)
    hidden = all_hidden[:, :-1][scored[:, 1:]].requires_grad_()  # [N, D], as ppo.Actor selects them
    labels = input_ids[:, 1:][scored[:, 1:]]
    weight = (3 / math.sqrt(D) * torch.randn(V, D, generator=g)).cuda().to(dtype).requires_grad_()
    g_lp, g_h = torch.randn(2, len(labels), generator=g).cuda()

    def grads(logp, entropy, inputs):
        return torch.autograd.grad((logp * g_lp.to(logp.dtype) + entropy * g_h.to(logp.dtype)).sum(), inputs)

    logp, entropy = logprob_entropy_from_hidden(hidden, weight, labels, temperature)
    ours = (logp, entropy, *grads(logp, entropy, (hidden, weight)))
    logp_all = torch.log_softmax((hidden @ weight.t()).float() / temperature, -1)  # torch's own: the naive path
    naive = logp_all.gather(-1, labels[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)
    own = (*naive, *grads(*naive, (hidden, weight)))
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logp_all = torch.log_softmax(h64 @ w64.t() / temperature, -1)
    exact = logp_all.gather(-1, labels[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)
    want = (*exact, *grads(*exact, (h64, w64)))
    assert ours[2].dtype == ours[3].dtype == dtype
    for name, o, t, w in zip(("logp", "entropy", "grad_hidden", "grad_weight"), ours, own, want):
        assert_as_close_as_torch(name, o, t, w, factor=3.0 if dtype == torch.bfloat16 and "grad" in name else 2.0)


# ----------------------------------------------------------------------------- kernels: GAE
def ragged_response_mask(B, T, generator):
    """[B, T] bool: per row a prompt, generated tokens with an injected <information> block between them,
    then right padding; one row all masked, one with a single token, one all generated."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        prompt, end = sorted(torch.randint(0, T, (2,), generator=generator).tolist())
        mask[b, prompt:end + 1] = True
        info = torch.randint(prompt, end + 1, (1,), generator=generator).item()
        mask[b, info:info + 20] = False
    mask[0], mask[1], mask[2] = False, False, True
    mask[1, T // 2] = True
    return mask


def textbook_gae(rewards, values, mask, gamma, lam):
    """GAE run on each row's unmasked tokens only (A = 0, returns = V elsewhere), in fp64, one token at a
    time on the CPU -> (advantages, returns) on the inputs' device."""
    device = values.device
    rewards, values, mask = rewards.double().cpu(), values.double().cpu(), mask.cpu()
    advantages = torch.zeros_like(values)
    for b in range(len(rewards)):
        next_value = next_adv = 0.0
        r, v = rewards[b].tolist(), values[b].tolist()
        for t in reversed(mask[b].nonzero().flatten().tolist()):
            delta = r[t] + gamma * next_value - v[t]  # δ_t = r_t + γ V_next - V_t
            next_adv = advantages[b, t] = delta + gamma * lam * next_adv  # A_t = δ_t + γλ A_next
            next_value = v[t]
    return advantages.to(device), (advantages + values).to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.5)])
def test_gae_kernel_on_ragged_masks(compiled, dtype, gamma, lam):
    """Against textbook GAE in fp64, as closely as gae_reference (torch, fp32) on the same CUDA tensors.
    γ = λ = 1 runs the same kernel; the reference's cumsum shortcut for it is tested on CPU (test_kernels.py)."""
    g = torch.Generator().manual_seed(5)
    B, T = 64, 300
    rewards, values = (torch.randn(B, T, generator=g).to(dtype).cuda() for _ in range(2))
    mask = ragged_response_mask(B, T, g).cuda()
    ours = gae(rewards, values, mask, gamma, lam)
    own = gae_reference(rewards, values, mask, gamma, lam)
    for name, o, t, w in zip(("advantages", "returns"), ours, own, textbook_gae(rewards, values, mask, gamma, lam)):
        assert_as_close_as_torch(name, o, t, w)
    assert (ours[0][~mask] == 0).all() and torch.equal(ours[1][~mask], values[~mask].float())


# ----------------------------------------------------------------------------- sampler against generate
VOCAB = 64
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
MID = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
           num_attention_heads=8, num_key_value_heads=2)


def cuda_model(kind):
    """Random models built from config, on CUDA: the Llama family sim.sample decodes with lean_decode_one
    (Qwen2 at two sizes, Llama, Qwen3), and GPT-2, which it decodes through the Hugging Face forward."""
    torch.manual_seed(0)
    model = {"qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY)),
             "qwen2-mid": lambda: Qwen2ForCausalLM(Qwen2Config(**MID)),
             "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
             "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16)),
             "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                                        bos_token_id=0, eos_token_id=0))}[kind]()
    model.generation_config.eos_token_id = None  # generate stops at EOS only when a test passes one
    return model.to("cuda").eval()


def ragged_prompts(model, n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 41, (n,), generator=g).tolist()
    return [torch.randint(0, model.config.vocab_size, (k,), generator=g).tolist() for k in lengths]


def hf_greedy(model, prompts, max_new_tokens, eos_token_id=None):
    """Left-padded HF generate on the model's device; the new tokens of each row."""
    P = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0, eos_token_id=eos_token_id)
    return out[:, P:].tolist()


def upto_first(tokens, eos):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("kind", ["qwen2", "qwen2-mid", "llama", "qwen3", "gpt2"])
def test_greedy_sample_equals_generate_on_cuda_fp32(kind):
    model = cuda_model(kind)
    prompts = ragged_prompts(model, n=32 if kind == "qwen2-mid" else 12)
    tokens, _ = sample(model, prompts, 24, temperature=0, eos_token_id=[])
    assert tokens == hf_greedy(model, prompts, 24)
    eos = tokens[1][5]  # a token that occurs: rows agree up to and including their first EOS
    tokens, _ = sample(model, prompts, 24, temperature=0, eos_token_id=eos)
    assert tokens == [upto_first(row, eos) for row in hf_greedy(model, prompts, 24, eos_token_id=eos)]


@torch.no_grad()
def last_logits(model, sequence):
    return model(input_ids=torch.tensor([sequence], device=model.device)).logits[0, -1].float()


@pytest.mark.parametrize("kind", ["qwen2-mid", "qwen2", "gpt2"])
def test_greedy_sample_in_bf16_leaves_generate_only_at_near_ties(kind):
    """bf16 rounds differently in the two samplers (grouped prefill, the written-out decode step), so a
    row's greedy tokens may part where two tokens are nearly tied. Tolerance: at a row's first difference,
    the fp32 logits (the same bf16 weights, in fp32) of the two tokens differ by at most 4x the bf16
    forward's largest logit error there; each sampler's argmax can be off by twice its own error, and
    the factor 2 leaves room for the cached computations' rounding beside the uncached forward's."""
    model = cuda_model(kind).to(torch.bfloat16)
    exact = copy.deepcopy(model).float()
    prompts = ragged_prompts(model, n=32)
    tokens, _ = sample(model, prompts, 24, temperature=0, eos_token_id=[])
    expected = hf_greedy(model, prompts, 24)
    for prompt, ours, theirs in zip(prompts, tokens, expected):
        t = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if t is None:
            continue
        prefix = prompt + ours[:t]
        reference = last_logits(exact, prefix)
        bf16_error = (last_logits(model, prefix) - reference).abs().max().item()
        gap = (reference[ours[t]] - reference[theirs[t]]).abs().item()
        assert gap <= 4 * bf16_error, f"token {t}: fp32 logit gap {gap:.3g}, bf16 error {bf16_error:.3g}"


# ----------------------------------------------------------------------------- one RL step at the 0.5B architecture
def test_one_rl_step_of_a_qwen25_05b_policy_on_the_kernel_path(compiled, monkeypatch):
    """ppo.Actor, ppo.token_values, ppo.compute_advantages and ppo.update as zerosearch.train runs them,
    bf16 compute with fp32 weights, on a batch with left and right padding and an <information> block:
    the Triton kernel computes the log-probs, every statistic is finite and both models' weights move."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        actor = ppo.Actor(Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)), torch.bfloat16).eval()
        critic = Qwen2ForTokenClassification(Qwen2Config(**QWEN25_05B, num_labels=1, classifier_dropout=0.0)).eval()
    ref = copy.deepcopy(actor).requires_grad_(False)
    B, T = 8, 128
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, QWEN25_05B["vocab_size"], (B, T), generator=g).cuda()
    attention_mask = ragged_attention_mask(B, T, g).cuda()
    response_mask = torch.zeros(B, T, device="cuda")
    response_mask[:, T // 2:] = 1
    response_mask[:, T // 2 + 20:T // 2 + 40] = 0  # an injected <information> block
    response_mask *= attention_mask
    scores = torch.rand(B, generator=g).cuda()
    cfg = dict(algo="ppo", gamma=1.0, lam=0.95, kl_type="k3", clip_ratio_low=0.2, clip_ratio_high=0.2, dual_clip=3.0,
               value_clip=0.5, entropy_coef=0.01, ppo_epochs=1, mini_batch_size=8, micro_batch_size=4, grad_clip=1.0,
               loss_agg_mode="token-mean", critic_warmup=0, temperature=1.0, seed=0, dtype="bfloat16")
    calls = []
    monkeypatch.setattr(kernels.logprob, "_forward_triton",
                        lambda *args, f=kernels.logprob._forward_triton: calls.append(1) or f(*args))

    with torch.no_grad():
        old_logp, _ = actor(input_ids, attention_mask, cfg["temperature"])
        ref_logp, _ = ref(input_ids, attention_mask, cfg["temperature"])
        values = ppo.token_values(critic, input_ids, attention_mask, torch.bfloat16)
    assert calls, "the Triton kernel did not run"
    advantages, returns, adv_stats = ppo.compute_advantages("ppo", scores, response_mask, old_logp, ref_logp,
                                                            values, cfg, 0.01)
    batch = ppo.Batch(input_ids, attention_mask, response_mask, old_logp, ref_logp, advantages, values, returns)
    learners = [ppo.Learner(model, *ppo.make_optimizer(model, 1e-5, 0.0, 0, 10)) for model in (actor, critic)]
    watched = [actor.lm.model.layers[-1].self_attn.q_proj.weight, critic.score.weight]
    before = [w.detach().clone() for w in watched]
    stats = ppo.update(*learners, batch, cfg, 0.01)
    assert torch.isfinite(old_logp).all() and torch.isfinite(values).all() and torch.isfinite(advantages).all()
    assert all(math.isfinite(v) for v in {**adv_stats, **stats}.values()), {**adv_stats, **stats}
    assert {"actor/pg_loss", "critic/vf_loss", "actor/grad_norm", "critic/grad_norm"} <= stats.keys()
    assert all(not torch.equal(w, b) for w, b in zip(watched, before)), "a model's weights did not move"


# ----------------------------------------------------------------------------- zerosearch.py end to end
def child_env():
    """The environment for a child process on the GPU: without the interpreter, so Triton compiles."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ZS_TRITON")}


def metric_rows(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def smoke_bf16(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smoke") / "out")
    r = subprocess.run([sys.executable, os.path.join(HERE, "zerosearch.py"), "preset=smoke", "device=cuda",
                        "dtype=bfloat16", f"out_dir={out}"], capture_output=True, text=True, timeout=300,
                       env=child_env(), cwd=HERE)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    return out


def test_end_to_end_smoke_preset_on_cuda_in_bf16(smoke_bf16):
    rows = metric_rows(smoke_bf16)
    assert [(row["run"], row["step"]) for row in rows] == [(run, step) for run in ("zerosearch", "search_r1")
                                                           for step in range(3)]
    assert all(math.isfinite(row["reward"]) for row in rows)
    results = json.load(open(os.path.join(smoke_bf16, "results.json")))
    assert len(results) == 5 and all(set(v) == set(world.TEST_SETS) for v in results.values())


def test_end_to_end_torchrun_one_process_with_nccl(smoke_bf16, tmp_path):
    """torchrun sets RANK, so parallel.init_processes starts an NCCL process group on cuda:0 (fp32, the
    smoke run's embedded build reused)."""
    assert torch.distributed.is_nccl_available()
    out = tmp_path / "out"
    shutil.copytree(os.path.join(smoke_bf16, "build"), out / "build")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        os.path.join(HERE, "zerosearch.py"), "preset=smoke", "device=cuda", "steps=2",
                        "baseline=false", f"out_dir={out}"], capture_output=True, text=True, timeout=300,
                       env=child_env(), cwd=HERE)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    rows = metric_rows(out)
    assert [(row["run"], row["step"]) for row in rows] == [("zerosearch", 0), ("zerosearch", 1)]
    assert all(math.isfinite(row["reward"]) for row in rows)
