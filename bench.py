"""Benchmarks that print markdown tables: `python bench.py` runs every section, `python bench.py
logprob` or `python bench.py sampler` one. `BENCH_QUICK=1` shrinks every size to check the script
runs in seconds; its figures mean nothing.

logprob  peak memory and time of per-token log-prob + entropy + backward, fused and chunked vs
         naive. Every variant runs in a fresh subprocess, so its peak memory is its own: we report
         how far the process's peak RSS (VmHWM, reset once the inputs are allocated) rises above its
         RSS at that point, and the mean wall time of two runs after one warm-up. On a CPU-only
         machine the figures are for the torch (CPU) path; GPU figures for the Triton kernels
         cannot be measured here.
sampler  tokens/s of sim.sample against Hugging Face generate, against batch size; the same with the
         HF forward for decode steps; and the matmuls alone (linear layers, attention products), which
         bound any sampler.
step     the RL step's forward passes (log-probs of policy and reference, values) and PPO update on
         the default's models and batch sizes: sequences packed several a row (ppo.padding_free)
         against each in its own padded row, as before; token positions a step and time.
"""
import copy
import json
import os
import subprocess
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForTokenClassification

from kernels import logprob_entropy_from_hidden
import ppo
import sim
from sim import sample
from world import build_world, tiny_model, world_tokenizer
from config import load_config

QUICK = os.environ.get("BENCH_QUICK") == "1"


def rss_mb(field):  # "VmRSS" (now) or "VmHWM" (peak since the last reset)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def measure(step, repeats=2):
    """-> {peak_mb, seconds} of step() in this process; the caller has just allocated its inputs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS, forgetting the peaks of imports and input set-up
    baseline = rss_mb("VmRSS")
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return {"peak_mb": rss_mb("VmHWM") - baseline, "seconds": (time.perf_counter() - start) / repeats}


# --- logprob: per-token log-prob + entropy + backward from the last hidden state -----------------
N, V, D, TEMPERATURE = (64, 1000, 32, 1.0) if QUICK else (4096, 151936, 896, 1.0)


def logprob_inputs():
    torch.manual_seed(0)
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D).mul_(0.02).requires_grad_()
    return hidden, weight, torch.randint(V, (N,))


def naive_logprob_entropy(hidden, weight, labels):
    logp_all = torch.log_softmax((hidden @ weight.t()) / TEMPERATURE, -1)  # the full [N, V] fp32 log-softmax
    logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)  # H = -Σ p log p


def logprob_variant(fn):
    hidden, weight, labels = logprob_inputs()

    def step():
        hidden.grad = weight.grad = None
        logp, entropy = fn(hidden, weight, labels)
        (logp + 0.01 * entropy).sum().backward()
    return measure(step)


VARIANTS = {  # name -> function run in a fresh process, returning {peak_mb, seconds}
    "logprob/naive": lambda: logprob_variant(naive_logprob_entropy),
    "logprob/chunked": lambda: logprob_variant(lambda h, w, y: logprob_entropy_from_hidden(h, w, y, TEMPERATURE)),
}


def in_fresh_process(variant):
    out = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def bench_logprob():
    naive, chunked = in_fresh_process("logprob/naive"), in_fresh_process("logprob/chunked")
    print(f"### logprob + entropy + backward, N={N}, V={V}, D={D}, fp32, CPU ({torch.get_num_threads()} threads)\n")
    print("| path | peak memory over inputs (MB) | time (s) |")
    print("|---|---|---|")
    print(f"| naive `log_softmax(hidden @ W.T)` | {naive['peak_mb']:.0f} | {naive['seconds']:.2f} |")
    print(f"| `logprob_entropy_from_hidden` (torch, chunked) | {chunked['peak_mb']:.0f} | {chunked['seconds']:.2f} |")
    print(f"| ratio naive / chunked | {naive['peak_mb'] / chunked['peak_mb']:.1f}x | "
          f"{naive['seconds'] / chunked['seconds']:.2f}x |")
    print("\nGPU (Triton kernel) figures cannot be measured on this CPU-only machine.\n")


# --- sampler: tokens/s of sim.sample against Hugging Face generate ----------------------------------
# Sampling at temperature 1 with EOS disabled, so both produce MAX_NEW_TOKENS per row; prompts are
# ragged (20-60 tokens).
MAX_NEW_TOKENS = 4 if QUICK else 64


def default_tiny_policy_config():
    """The embedded default's policy architecture, built as zerosearch.py builds it (random weights)."""
    cfg = load_config([])
    world = build_world(cfg["world_seed"], cfg["world_persons"], cfg["world_companies"])
    vocab_size = len(world_tokenizer(world, cfg))
    return tiny_model(vocab_size, cfg["tiny_hidden"], cfg["tiny_layers"], cfg["tiny_heads"], cfg["seed"]).config


def sampler_models():  # name -> (config, batch sizes)
    tiny = default_tiny_policy_config()
    return {
        f"default tiny policy ({tiny.vocab_size} vocab, {tiny.num_hidden_layers}x{tiny.hidden_size})":
            (tiny, [1, 8] if QUICK else [1, 8, 32, 64, 128]),
        "random Qwen2 ~100M (32k vocab, 10x640)": (Qwen2Config(
            vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=2 if QUICK else 10,
            num_attention_heads=10, num_key_value_heads=2), [2] if QUICK else [64]),
    }


def sampler_prompts(batch_size: int, vocab_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 61, (batch_size,), generator=g).tolist()
    return [torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in lengths]


def hf_generate(model, prompts):
    P = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS,
                   do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)


def ours(model, prompts):
    sample(model, prompts, MAX_NEW_TOKENS, temperature=1.0, eos_token_id=[], seed=0)


def ours_hf_forward(model, prompts):
    """sim.sample with the Hugging Face forward for every decode step (lean_decode_one off)."""
    lean_decoding, sim.lean_decoding = sim.lean_decoding, lambda model: False
    try:
        ours(model, prompts)
    finally:
        sim.lean_decoding = lean_decoding


def matmul_floor(config, prompts):
    """A run of the matmuls no sampler can skip: every linear layer once for each prompt token (no
    padding) and each new token, the LM head once for each new token, and each decode step's two
    attention products per layer (query x keys, weights x values, over the mean prompt length plus
    the tokens so far); fp32, inputs preallocated. Norms, RoPE, softmax, cache writes and sampling
    are left out, so HF generate's time over this bounds any speed-up."""
    d, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    hd = d // heads
    shapes = [(d, heads * hd), (d, kv_heads * hd), (d, kv_heads * hd), (heads * hd, d),
              (d, config.intermediate_size), (d, config.intermediate_size), (config.intermediate_size, d)]
    weights = [torch.randn(n_out, n_in) for n_in, n_out in shapes]
    head = torch.randn(config.vocab_size, d)
    B, prompt_tokens = len(prompts), sum(len(p) for p in prompts)
    inputs = {rows: {n_in: torch.randn(rows, n_in) for n_in, _ in shapes} for rows in (prompt_tokens, B)}
    L = prompt_tokens // B + MAX_NEW_TOKENS
    query, keys, values = torch.randn(B, kv_heads, heads // kv_heads, hd), torch.randn(B, kv_heads, L, hd), torch.randn(B, kv_heads, L, hd)
    attention_weights = torch.rand(B, kv_heads, heads // kv_heads, L)

    def layers(rows, length=None):
        for _ in range(config.num_hidden_layers):
            for w in weights:
                torch.nn.functional.linear(inputs[rows][w.shape[1]], w)
            if length:
                query @ keys[:, :, :length].transpose(-1, -2)
                attention_weights[..., :length] @ values[:, :, :length]

    def call(model, prompts):  # the sampler's signature; both are unused
        layers(prompt_tokens)
        for t in range(MAX_NEW_TOKENS):
            torch.nn.functional.linear(inputs[B][d], head)
            if t < MAX_NEW_TOKENS - 1:
                layers(B, length=L - MAX_NEW_TOKENS + t + 1)
    return call


def best_seconds(fns, model, prompts, repeats: int):
    """Best of `repeats` timed runs of each fn, after one warm-up run; runs interleave so that
    load from other processes hits them alike."""
    for fn in fns:
        fn(model, prompts)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn(model, prompts)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def bench_sampler():
    print(f"### sampler: tokens/s, {torch.get_num_threads()} torch threads, {MAX_NEW_TOKENS} new tokens a row, "
          "prompts 20-60 tokens; generated tokens over the whole call (prefill included)\n")
    print("| model | batch | HF generate tok/s | sim.sample tok/s | speed-up | sim.sample, HF forward tok/s "
          "| matmuls alone tok/s | bound |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    models = sampler_models()
    for name, (config, batch_sizes) in models.items():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
        model.generation_config.eos_token_id = None  # no EOS: every row makes MAX_NEW_TOKENS, in both samplers
        repeats = 1 if QUICK else 5 if config.hidden_size < 256 else 2
        for batch_size in batch_sizes:
            prompts = sampler_prompts(batch_size, config.vocab_size)
            seconds = best_seconds([hf_generate, ours, ours_hf_forward, matmul_floor(config, prompts)], model, prompts, repeats)
            hf, ws, wh, fl = (len(prompts) * MAX_NEW_TOKENS / s for s in seconds)
            print(f"| {name} | {batch_size} | {hf:,.0f} | {ws:,.0f} | {ws / hf:.2f}x | {wh:,.0f} | {fl:,.0f} | {fl / hf:.1f}x |",
                  flush=True)
    print()
    small_op_costs(next(iter(models.values()))[0])


def small_op_costs(config):
    """What a decode step's pieces cost one by one on the tiny policy at batch 64: the matmuls' rate
    and the eager cost of one small op, which is what the time beyond "matmuls alone" is made of."""
    d, b = config.hidden_size, 64
    model = Qwen2ForCausalLM(config).eval()
    x, y, w = torch.randn(b, 1, d), torch.randn(b, 1, d), torch.randn(config.intermediate_size, d)
    ops = {"linear": lambda: torch.nn.functional.linear(x, w), "add": lambda: x + y, "RMSNorm": lambda: model.model.norm(x)}
    with torch.inference_mode():
        seconds = dict(zip(ops, best_seconds([lambda *_, f=f: [f() for _ in range(100)] for f in ops.values()], None, None, 5)))
    gflops = 2 * b * d * config.intermediate_size * 100 / seconds["linear"] / 1e9
    print(f"At batch {b}, one decode step's [{b}x{d}] x [{d}x{config.intermediate_size}] linear runs at {gflops:.0f} GFLOP/s; "
          f"an add of two [{b}x1x{d}] tensors takes {seconds['add'] * 1e4:.1f} us and the model's RMSNorm "
          f"{seconds['RMSNorm'] * 1e4:.1f} us.\n")


# --- step: the training step's forward passes and update, packed rows against padded rows -----------
# The default run's batches, synthesised: 128 sequences (32 questions x 4 samples) of 56 + Exp(mean 48)
# tokens, cut at 200, which gives what the default run's batches measured (mean 102 tokens, median 88,
# longest 200: 13,104 real tokens in 25,600 padded positions a step). Each holds 24 sampled tokens,
# 12 after a 32-token prompt and 12 at its end; the rest stands for documents. The models are the
# default's policy architecture (and its critic) with random weights.
STEP_SEQUENCES = 16 if QUICK else 128


def step_batch(vocab_size, seed=0):
    """-> input_ids, attention_mask, response_mask [B, T] right-padded (as zerosearch.to_batch), scores [B]."""
    g = torch.Generator().manual_seed(seed)
    lengths = (56 + torch.empty(STEP_SEQUENCES).exponential_(1 / 48, generator=g)).round().clamp(max=200).long()
    columns = torch.arange(int(lengths.max()))
    attention_mask = (columns < lengths[:, None]).long()
    response_mask = (((columns >= 32) & (columns < 44)) | (columns >= lengths[:, None] - 12)).float() * attention_mask
    input_ids = torch.randint(3, vocab_size, attention_mask.shape, generator=g) * attention_mask
    return input_ids, attention_mask, response_mask, torch.rand(STEP_SEQUENCES, generator=g)


def training_step(actor, critic, ref, batch, cfg):
    """Stages 4-6 of zerosearch.train on one process: old and reference log-probs and values, advantages,
    the PPO update (at a step after the critic's warm-up, so both models train) -> the update's stats,
    old log-probs, values."""
    ids, attn, response_mask, scores = batch
    with torch.no_grad():
        old_logp, _ = actor.model(ids, attn, cfg["temperature"])
        ref_logp, _ = ref(ids, attn, cfg["temperature"])
        values = ppo.token_values(critic.model, ids, attn)
    advantages, returns, _ = ppo.compute_advantages("ppo", scores, response_mask, old_logp, ref_logp, values, cfg,
                                                    cfg["kl_coef"])
    batch = ppo.Batch(ids, attn, response_mask, old_logp, ref_logp, advantages, values, returns)
    return ppo.update(actor, critic, batch, cfg, cfg["kl_coef"], step=cfg["critic_warmup"]), old_logp, values


def bench_step():
    cfg, threads = load_config([]), torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    tiny = default_tiny_policy_config()
    torch.manual_seed(0)
    policy = ppo.Actor(Qwen2ForCausalLM(tiny).eval())
    ref = copy.deepcopy(policy).requires_grad_(False)
    value_config = copy.deepcopy(tiny)  # the critic's config as zerosearch.load_models sets it
    value_config.num_labels, value_config.classifier_dropout = 1, 0.0
    head = Qwen2ForTokenClassification(value_config).eval()
    start = {"actor": copy.deepcopy(policy.state_dict()), "critic": copy.deepcopy(head.state_dict())}
    batch = step_batch(tiny.vocab_size)
    lengths = batch[1].sum(-1)
    before = "each sequence in its own padded row (before)"  # the layout of zerosearch.to_batch
    packings = {before: lambda n: ([[b] for b in range(len(n))], max(n)),
                "packed rows (`ppo.padding_free`)": ppo.pack_rows}
    counts, seconds, results = {}, {}, {}

    def run(name):  # one step from the same starting weights and fresh optimizers
        policy.load_state_dict(start["actor"])
        head.load_state_dict(start["critic"])
        actor, critic = (ppo.Learner(m, *ppo.make_optimizer(m, lr, cfg["weight_decay"], 0, cfg["steps"]))
                         for m, lr in ((policy, cfg["actor_lr"]), (head, cfg["critic_lr"])))
        counts[name] = {"positions": 0, "tokens": 0}

        def pack(n):
            rows, width = packings[name](n)
            counts[name]["positions"] += len(rows) * width
            counts[name]["tokens"] += sum(n)
            return rows, width
        ppo.pack_rows, plan = pack, ppo.pack_rows
        try:
            t0 = time.perf_counter()
            results[name] = training_step(actor, critic, ref, batch, cfg)
            seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - t0)
        finally:
            ppo.pack_rows = plan

    for _ in range(1 if QUICK else 4):  # the first round warms up; runs alternate, so load hits both alike
        for name in packings:
            run(name)
    print(f"### step: forward passes + PPO update of one RL step, {torch.get_num_threads()} threads\n")
    print(f"{STEP_SEQUENCES} synthetic sequences (mean {lengths.float().mean():.0f} tokens, median "
          f"{int(lengths.median())}, longest {int(lengths.max())}); log-probs of policy and reference and values, then "
          f"{cfg['ppo_epochs']} epochs of mini-batch {cfg['mini_batch_size']}, micro-batch {cfg['micro_batch_size']} "
          "(actor and critic); the best of 3 after a warm-up.\n")
    print("| rows | token positions a step | over real tokens | time (s) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name in packings:
        c = counts[name]
        print(f"| {name} | {c['positions']:,} | {c['positions'] / c['tokens']:.2f}x | {seconds[name]:.2f} | "
              f"{seconds[before] / seconds[name]:.2f}x |")
    (stats_0, logp_0, values_0), (stats_1, logp_1, values_1) = results.values()
    outputs = max((logp_0 - logp_1).abs().max().item(), (values_0 - values_1).abs().max().item())
    losses = max(abs(stats_0[k] - stats_1[k]) / abs(stats_0[k]) for k in ("actor/loss", "critic/loss"))
    print(f"\nThe two agree: old log-probs and values within {outputs:.1e}, the update's actor and critic losses "
          f"within {losses:.1e} (relative).\n")
    torch.set_num_threads(threads)


SECTIONS = {"logprob": bench_logprob, "sampler": bench_sampler, "step": bench_step}

if __name__ == "__main__":
    section = sys.argv[1] if len(sys.argv) > 1 else "all"
    if section == "--variant":
        print(json.dumps(VARIANTS[sys.argv[2]]()))
    elif section != "all" and section not in SECTIONS:
        raise SystemExit(f"usage: python bench.py [{' | '.join(SECTIONS)}]  (no argument: all of them)")
    else:
        for name in SECTIONS if section == "all" else [section]:
            SECTIONS[name]()
