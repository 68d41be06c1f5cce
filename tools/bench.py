"""Benchmarks that print markdown tables: `python tools/bench.py` runs every section, `python tools/bench.py
SECTION` one (logprob, sampler, retriever, step, sft, gpu-logprob, gpu-sampler, gpu-step). `BENCH_QUICK=1` shrinks every
size to check the script runs in seconds; its figures mean nothing.

logprob  peak memory and time of per-token log-prob + entropy + backward, fused and chunked vs
         naive. Every variant runs in a fresh subprocess, so its peak memory is its own: we report
         how far the process's peak RSS (VmHWM, reset once the inputs are allocated) rises above its
         RSS at that point, and the mean wall time of two runs after one warm-up. The figures are
         for the torch (CPU) path; gpu-logprob measures the Triton kernels.
sampler  tokens/s of sim.sample against Hugging Face generate, against batch size; the same with the
         HF forward for decode steps (the plain path that lean_decode_one replaces).
retriever the in-process BM25 (engines.Retriever) on a synthetic corpus of a million passages: index time,
         peak memory (VmHWM), queries/s in batches of 128 (tests/test_retriever.py checks its results
         against BM25 written the plain way).

On a CUDA GPU (each says so in one line and measures nothing where there is none; gpu_check.sh runs them):
gpu-logprob  peak GPU memory and time of log-prob + entropy + backward from hidden states, bf16, N=8192,
             V=151936, D=896 and 2048: the Triton kernel, the chunked torch path and the naive one.
gpu-sampler  tokens/s of sim.sample against Hugging Face generate at the Qwen2.5-0.5B architecture
             (random weights), batch 64 and 256.
gpu-step     one RL step's time split (rollout sampling, log-probs, values, advantages, update) at
             that architecture, batch 64.
step     the RL step's forward passes (log-probs of policy and reference, values) and PPO update on
         the default's models and batch sizes: sequences packed several a row (packing.padding_free)
         against each in its own padded row, as before; the LM head on the response tokens alone
         against every token; micro-batches of 16 sorted by length against none; token positions a
         step and time.
sft      the build's two fine-tunings (sim.sft: the warm-up, the simulator's) on the default build's
         data: padded batches with HF's loss on every position, as before, against sim.sft now
         (micro-batches by length, packed, the LM head on the trained tokens); token positions per
         trained and per real token, seconds a step, and their losses step by step.
"""
import copy
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForTokenClassification

import build
from kernels import logprob_entropy_from_hidden, logprob_entropy_from_hidden_reference
import engines
import packing
import ppo
import sim
from sim import sample
from world import build_world, knowledge_index, make_words, simulator_rows, tiny_model, world_tokenizer
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
    logp_all = torch.log_softmax((hidden @ weight.t()).float() / TEMPERATURE, -1)  # the full [N, V] fp32 log-softmax
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
    print("\nThe Triton kernels run on a GPU only: `python tools/bench.py gpu-logprob` measures them there.\n")


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
    input_ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=model.device)
    attention_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=model.device)
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
    print("| model | batch | HF generate tok/s | sim.sample tok/s | speed-up | sim.sample, HF forward tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    models = sampler_models()
    for name, (config, batch_sizes) in models.items():
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
        model.generation_config.eos_token_id = None  # no EOS: every row makes MAX_NEW_TOKENS, in both samplers
        repeats = 1 if QUICK else 5 if config.hidden_size < 256 else 2
        for batch_size in batch_sizes:
            prompts = sampler_prompts(batch_size, config.vocab_size)
            seconds = best_seconds([hf_generate, ours, ours_hf_forward], model, prompts, repeats)
            hf, ws, wh = (len(prompts) * MAX_NEW_TOKENS / s for s in seconds)
            print(f"| {name} | {batch_size} | {hf:,.0f} | {ws:,.0f} | {ws / hf:.2f}x | {wh:,.0f} |", flush=True)
    print()


# --- retriever: the in-process BM25 at corpus scale ------------------------------------------------
# Passages of 80-120 made-up words drawn with Zipf-like frequencies (the word of rank r with p ∝ 1/r);
# a query is 8 distinct words of a random passage, so it holds frequent words as real questions do.
PASSAGES, VOCAB, QUERIES = (20_000, 5_000, 100) if QUICK else (1_000_000, 50_000, 1_000)


def synthetic_corpus(n, vocab_size, seed=0):
    words = make_words(random.Random(seed), vocab_size, 3, set())
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, vocab_size + 1)
    docs = []
    for start in range(0, n, 50_000):  # in chunks: a million passages' word ids at once are 100M Python ints
        lengths = rng.integers(80, 121, min(50_000, n - start)).tolist()
        ids = rng.choice(vocab_size, size=sum(lengths), p=p / p.sum()).tolist()
        ends = np.cumsum(lengths).tolist()
        docs += [" ".join([words[j] for j in ids[end - length:end]]) for length, end in zip(lengths, ends)]
    queries = [" ".join(rng.choice(docs[i].split(), 8, replace=False)) for i in rng.integers(0, n, QUERIES)]
    return docs, queries


def bench_retriever():
    t0 = time.perf_counter()
    docs, queries = synthetic_corpus(PASSAGES, VOCAB)
    made = time.perf_counter() - t0
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS, so the peak below is the index build's
    corpus_mb = rss_mb("VmRSS")
    t0 = time.perf_counter()
    retriever = engines.Retriever(docs)
    index_s, peak_mb = time.perf_counter() - t0, rss_mb("VmHWM")
    index_mb = sum(a.nbytes for a in [retriever.indptr, retriever.postings, retriever.weights, *retriever.dense.values()]) / 2**20
    n_dense = len(retriever.dense)
    engine = engines.RealEngine(retriever, {"topk": 3})
    top3, wall, cpu = [], time.perf_counter(), time.process_time()
    for i in range(0, len(queries), 128):
        top3 += engine.search([{"query": q} for q in queries[i:i + 128]])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load = os.getloadavg()[0]
    print(f"### retriever: engines.Retriever (BM25), {PASSAGES:,} synthetic passages of 80-120 words (Zipf-like over "
          f"{VOCAB:,} made-up words, made in {made:.0f} s), {len(queries):,} queries of 8 words; one process, "
          f"load average {load:.1f} on {os.cpu_count()} cores\n")
    print("| measure | value | target |\n|---|---:|---|")
    print(f"| index build (s) | {index_s:.0f} | ≤ 180 |")
    print(f"| peak memory of the process while indexing (GB; {corpus_mb / 1024:.1f} before, with the corpus) | "
          f"{peak_mb / 1024:.1f} | ≤ 8 |")
    print(f"| index size (GB: {len(retriever.postings):,} postings, {n_dense} dense rows) | {index_mb / 1024:.1f} | |")
    print(f"| queries/s, batches of 128, top 3 (wall clock) | {len(queries) / wall:.0f} | ≥ 50 |")
    print(f"| queries per CPU second (the same, without other processes' load) | {len(queries) / cpu:.0f} | |")


# --- GPU sections: the kernels, the sampler and one RL step on CUDA --------------------------------
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2 if QUICK else 24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)  # Qwen2.5-0.5B's architecture
GPU_N, GPU_V = (1024, 32000) if QUICK else (8192, 151936)


def no_cuda(section):
    """Says so in one line where there is no CUDA device: a GPU section measures nothing on a CPU."""
    if torch.cuda.is_available():
        return False
    print(f"{section}: no CUDA device here (torch.cuda.is_available() is False); nothing measured")
    return True


def gpu_name():
    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"


def cuda_measure(step, repeats=3):
    """-> {peak_mb, seconds} of step() on the GPU: the peak of allocated memory (torch.cuda.max_memory_allocated)
    above what was allocated before, and the mean time of `repeats` runs after one warm-up (CUDA events)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()  # warm-up: Triton compiles its kernels, cuBLAS picks its own
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        step()
    end.record()
    torch.cuda.synchronize()
    return {"peak_mb": (torch.cuda.max_memory_allocated() - baseline) / 2 ** 20,
            "seconds": start.elapsed_time(end) / 1000 / repeats}


def fp64_logp(hidden, weight, labels, rows=512):
    """The oracle: log-probs of the labels from the same hidden states and weight in fp64, 512 rows at a time."""
    w = weight.double()
    return torch.cat([torch.log_softmax(hidden[i:i + rows].double() @ w.t() / TEMPERATURE, -1)
                      .gather(-1, labels[i:i + rows, None]).squeeze(-1) for i in range(0, len(labels), rows)])


def bench_gpu_logprob():
    if no_cuda("gpu-logprob"):
        return
    paths = {"naive `log_softmax(hidden @ W.T)`": naive_logprob_entropy,
             "chunked torch (`logprob_entropy_from_hidden_reference`)": logprob_entropy_from_hidden_reference,
             "Triton kernel (`logprob_entropy_from_hidden`)": logprob_entropy_from_hidden}
    print(f"### gpu-logprob: logprob + entropy + backward, N={GPU_N}, V={GPU_V}, bf16, {gpu_name()}\n")
    print("| D | path | peak memory over inputs (MB) | time (ms) | largest logp error vs fp64 |")
    print("|---:|---|---:|---:|---:|")
    for D in (896, 2048):
        torch.manual_seed(0)
        hidden = torch.randn(GPU_N, D, device="cuda").to(torch.bfloat16).requires_grad_()
        weight = (torch.randn(GPU_V, D, device="cuda") / D ** 0.5).to(torch.bfloat16).requires_grad_()
        labels = torch.randint(GPU_V, (GPU_N,), device="cuda")
        want = fp64_logp(hidden.detach(), weight.detach(), labels)
        for name, fn in paths.items():
            def step():
                hidden.grad = weight.grad = None
                logp, entropy = fn(hidden, weight, labels)
                (logp + 0.01 * entropy).sum().backward()
            m = cuda_measure(step)
            with torch.no_grad():
                error = (fn(hidden, weight, labels)[0].double() - want).abs().max().item()
            print(f"| {D} | {name} | {m['peak_mb']:,.0f} | {1000 * m['seconds']:.1f} | {error:.1e} |", flush=True)
    print()


def synchronized(fn):
    """fn, then a wait for the GPU, so that a timed call ends when its work does."""
    def call(model, prompts):
        fn(model, prompts)
        torch.cuda.synchronize()
    return call


def ours_under_autocast(model, prompts):
    with ppo.autocast(torch.bfloat16, "cuda"):
        ours(model, prompts)


def bench_gpu_sampler():
    if no_cuda("gpu-sampler"):
        return
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).eval()  # fp32 weights, as the actor holds them
    model.generation_config.eos_token_id = None  # no EOS: every row makes MAX_NEW_TOKENS, in both samplers
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    repeats = 1 if QUICK else 2
    print(f"### gpu-sampler: tokens/s at the Qwen2.5-0.5B architecture (random weights), {MAX_NEW_TOKENS} new tokens "
          f"a row, prompts 20-60 tokens, {gpu_name()}\n")
    print("| batch | HF generate, bf16 weights tok/s | sim.sample, bf16 weights tok/s | speed-up "
          "| sim.sample, fp32 weights under bf16 autocast (zerosearch's rollouts) tok/s |")
    print("|---:|---:|---:|---:|---:|")
    for batch_size in [8] if QUICK else [64, 256]:
        prompts = sampler_prompts(batch_size, model.config.vocab_size)
        seconds = best_seconds([synchronized(hf_generate), synchronized(ours)], bf16, prompts, repeats)
        seconds += best_seconds([synchronized(ours_under_autocast)], model, prompts, repeats)
        hf, ws, wa = (batch_size * MAX_NEW_TOKENS / s for s in seconds)
        print(f"| {batch_size} | {hf:,.0f} | {ws:,.0f} | {ws / hf:.2f}x | {wa:,.0f} |", flush=True)
    print()


def right_padded(prompts, responses):
    """prompt + response of each row, right-padded as zerosearch's rollouts -> input ids, attention mask,
    response mask [B, T] on the GPU."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    input_ids = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
    attention_mask, response_mask = torch.zeros_like(input_ids), torch.zeros(input_ids.shape)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[b, :len(s)] = torch.tensor(s)
        attention_mask[b, :len(s)] = 1
        response_mask[b, len(p):len(s)] = 1
    return input_ids.cuda(), attention_mask.cuda(), response_mask.cuda()


def bench_gpu_step():
    if no_cuda("gpu-step"):
        return
    B, micro = (8, 4) if QUICK else (64, 16)
    torch.manual_seed(0)
    with torch.device("cuda"):
        actor = ppo.Actor(Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)), torch.bfloat16)
        critic = Qwen2ForTokenClassification(Qwen2Config(**QWEN25_05B, num_labels=1, classifier_dropout=0.0))
    ref = copy.deepcopy(actor).requires_grad_(False)
    learners = [ppo.Learner(m, *ppo.make_optimizer(m, 1e-6, 0.0, 0, 10)) for m in (actor, critic)]
    cfg = dict(algo="ppo", gamma=1.0, lam=1.0, kl_type="k3", clip_ratio_low=0.2, clip_ratio_high=0.2, dual_clip=3.0,
               value_clip=0.5, entropy_coef=0.0, ppo_epochs=1, mini_batch_size=B, micro_batch_size=micro, grad_clip=1.0,
               loss_agg_mode="token-mean", critic_warmup=0, temperature=1.0, seed=0, dtype="bfloat16")
    prompts = sampler_prompts(B, QWEN25_05B["vocab_size"])

    def rl_step():
        seconds = {}

        def stage(name, fn):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            seconds[name] = time.perf_counter() - start
            return out

        with ppo.autocast(torch.bfloat16, "cuda"):  # the rollout's precision, as zerosearch.train
            responses, _ = stage("rollout sampling (`sim.sample`)", lambda: sample(
                actor.lm, prompts, MAX_NEW_TOKENS, temperature=1.0, eos_token_id=[], seed=0))
        ids, attn, response_mask = right_padded(prompts, responses)
        with torch.no_grad():
            old_logp, ref_logp = stage("log-probs of the policy and the reference (`ppo.Actor`)",
                                       lambda: (actor(ids, attn)[0], ref(ids, attn)[0]))
            values = stage("values (`ppo.token_values`)", lambda: ppo.token_values(critic, ids, attn, torch.bfloat16))
        scores = torch.rand(B, device="cuda")
        advantages, returns, _ = stage("advantages (`ppo.compute_advantages`)", lambda: ppo.compute_advantages(
            "ppo", scores, response_mask, old_logp, ref_logp, values, cfg, 0.001))
        batch = ppo.Batch(ids, attn, response_mask, old_logp, ref_logp, advantages, values, returns)
        stage(f"update of the actor and critic (`ppo.update`, micro-batches of {micro})",
              lambda: ppo.update(*learners, batch, cfg, 0.001))
        return seconds

    rl_step()  # warm-up: Triton compiles, cuBLAS picks its kernels, Adam allocates its states
    torch.cuda.reset_peak_memory_stats()
    seconds = rl_step()
    total = sum(seconds.values())
    print(f"### gpu-step: one PPO step at the Qwen2.5-0.5B architecture (random weights, actor, reference and "
          f"critic), batch {B}, {MAX_NEW_TOKENS} new tokens a row, bf16 compute with fp32 weights, {gpu_name()}\n")
    print("| stage | time (s) | share |")
    print("|---|---:|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} | {100 * s / total:.0f}% |")
    print(f"| total | {total:.2f} | |")
    print(f"\nPeak GPU memory allocated during the step: {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB.\n")


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


def lm_head_on_every_token(forward):
    """ppo.Actor.forward as before `positions`: the LM head on every real token, whatever the caller asks."""
    return lambda self, ids, attn, temperature=1.0, positions=None: forward(self, ids, attn, temperature)


def one_per_row(lengths):
    """packing.pack_rows's plan for the layout before packing: each sequence in its own row, padded to the longest."""
    return [[b] for b in range(len(lengths))], max(1, max(lengths))


def counted(plan, counts):
    """`plan` (as packing.pack_rows) that adds its rows' token positions and the real tokens to `counts`."""
    def pack(lengths):
        rows, width = plan(lengths)
        counts["positions"] += len(rows) * width
        counts["tokens"] += sum(lengths)
        return rows, width
    return pack


def training_step(actor, critic, ref, batch, cfg):
    """Stages 4-6 of zerosearch.train on one process: old and reference log-probs and values, advantages,
    the PPO update (at a step after the critic's warm-up, so both models train) -> the update's stats,
    old log-probs, values."""
    ids, attn, response_mask, scores = batch
    with torch.no_grad():
        old_logp, ref_logp, values = packing.in_micro_batches(
            lambda r: (actor.model(ids[r], attn[r], cfg["temperature"], response_mask[r])[0],
                       ref(ids[r], attn[r], cfg["temperature"], response_mask[r])[0],
                       ppo.token_values(critic.model, ids[r], attn[r])), attn, cfg["micro_batch_size"])
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
    before = "each sequence in its own padded row, the LM head on every token, no micro-batches (before)"
    layouts = {before: (one_per_row, False, STEP_SEQUENCES),  # name -> (rows plan, LM head on the response alone, micro-batch)
               "packed rows (`packing.padding_free`), the LM head on every token, no micro-batches": (packing.pack_rows, False, STEP_SEQUENCES),
               "packed rows, the LM head on the response (`ppo.Actor`'s `positions`), no micro-batches": (packing.pack_rows, True, STEP_SEQUENCES),
               "packed rows, the LM head on the response, micro-batches of 16 by length (now)": (packing.pack_rows, True, cfg["micro_batch_size"])}
    counts, seconds, results = {}, {}, {}

    def run(name):  # one step from the same starting weights and fresh optimizers
        policy.load_state_dict(start["actor"])
        head.load_state_dict(start["critic"])
        actor, critic = (ppo.Learner(m, *ppo.make_optimizer(m, lr, cfg["weight_decay"], 0, cfg["steps"]))
                         for m, lr in ((policy, cfg["actor_lr"]), (head, cfg["critic_lr"])))
        counts[name] = {"positions": 0, "tokens": 0}
        packing.pack_rows, plan, forward = counted(layouts[name][0], counts[name]), packing.pack_rows, ppo.Actor.forward
        if not layouts[name][1]:
            ppo.Actor.forward = lm_head_on_every_token(forward)
        try:
            t0 = time.perf_counter()
            results[name] = training_step(actor, critic, ref, batch, dict(cfg, micro_batch_size=layouts[name][2]))
            seconds[name] = min(seconds.get(name, float("inf")), time.perf_counter() - t0)
        finally:
            packing.pack_rows, ppo.Actor.forward = plan, forward

    for _ in range(1 if QUICK else 4):  # the first round warms up; runs alternate, so load hits all alike
        for name in layouts:
            run(name)
    print(f"### step: forward passes + PPO update of one RL step, {torch.get_num_threads()} threads\n")
    print(f"{STEP_SEQUENCES} synthetic sequences (mean {lengths.float().mean():.0f} tokens, median "
          f"{int(lengths.median())}, longest {int(lengths.max())}); log-probs of policy and reference and values, then "
          f"ppo_epochs={cfg['ppo_epochs']} over mini-batches of {cfg['mini_batch_size']} (actor and critic); "
          "no micro-batches: one forward pass over the batch, one a mini-batch; the best of 3 after a warm-up.\n")
    print("| rows | token positions a step | over real tokens | time (s) | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name in layouts:
        c = counts[name]
        print(f"| {name} | {c['positions']:,} | {c['positions'] / c['tokens']:.2f}x | {seconds[name]:.2f} | "
              f"{seconds[before] / seconds[name]:.2f}x |")
    response = batch[2].bool()  # where the log-probs are used
    (stats_0, logp_0, values_0), *others = results.values()
    outputs = max(max((logp_0 - logp)[response].abs().max().item(), (values_0 - values).abs().max().item())
                  for _, logp, values in others)
    losses = max(abs(stats_0[k] - stats[k]) / abs(stats_0[k]) for stats, _, _ in others for k in ("actor/loss", "critic/loss"))
    print(f"\nThey agree: old log-probs (on the response) and values within {outputs:.1e}, the update's actor and "
          f"critic losses within {losses:.1e} (relative).\n")
    torch.set_num_threads(threads)


# --- sft: the warm-up and the simulator's fine-tuning (sim.sft), padded against now --------------------
SFT_STEPS, SFT_ROUNDS = (3, 1) if QUICK else (6, 4)  # steps a run; runs of each path, alternating


def padded_sft_backward(actor, input_ids, attention_mask, trained):
    """sim.sft_backward as before: one forward of the padded batch, the LM head and HF's loss on every position."""
    loss = actor.lm(input_ids=input_ids, attention_mask=attention_mask, labels=torch.where(trained, input_ids, -100)).loss
    loss.backward()
    return loss.item()


def bench_sft():
    """The default build's two fine-tunings from one start, padded (before) and as sim.sft runs them now, the
    runs alternating. sim.sft_backward is swapped for one that records when it began (a step is timed from
    one call to the next: the whole step), its loss, and the positions computed (for the packed path, as
    `ppo.pack_rows` plans them), the real tokens and the trained ones."""
    cfg, threads = load_config([]), torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    w = build_world(cfg["world_seed"], cfg["world_persons"], cfg["world_companies"])
    retriever = engines.Retriever(w.docs)
    tok, trajectories, queries, rng = build.warmup_data(w, retriever, cfg)
    rows = simulator_rows(w, queries, lambda q: retriever.search(q, cfg["topk"]), knowledge_index(w.docs), rng,
                          cfg["sim_sft_noisy"])
    model = tiny_model(len(tok), cfg["tiny_hidden"], cfg["tiny_layers"], cfg["tiny_heads"], cfg["seed"])
    start, packed, plan = copy.deepcopy(model.state_dict()), sim.sft_backward, packing.pack_rows
    runs = {"warm-up": lambda: sim.sft(model, trajectories, SFT_STEPS, cfg["warmup_batch_size"], cfg["warmup_lr"],
                                       cfg["seed"], "warm-up", tok.pad_token_id),
            "simulator": lambda: sim.train_simulator(model, tok, rows, cfg, SFT_STEPS, cfg["sim_sft_batch_size"],
                                                     cfg["sim_sft_lr"], cfg["seed"])}
    paths = {"padded (before)": padded_sft_backward, "packed, micro-batches by length (now)": packed}
    print(f"### sft: sim.sft on the default build's data and batch sizes, {cfg['threads']} threads, {SFT_ROUNDS} runs "
          f"of {SFT_STEPS} steps a path from one start, alternating; the LM head on every position (padded) or on "
          "the trained tokens alone (now)\n")
    print("| fine-tuning | path | positions / trained token | positions / real token | s/step (median) | speed-up |")
    print("|---|---|---:|---:|---:|---:|")
    for run_name, run in runs.items():
        counts = {path: dict(positions=0, tokens=0, trained=0, seconds=[], losses=[]) for path in paths}
        for _, (path, backward) in itertools.product(range(SFT_ROUNDS), paths.items()):
            c, stamps = counts[path], []

            def recorded(actor, ids, attn, trained, c=c, stamps=stamps, backward=backward):
                stamps.append(time.perf_counter())
                c["trained"] += (ppo.scored_positions(attn) & trained).sum().item()
                if backward is padded_sft_backward:
                    c["positions"], c["tokens"] = c["positions"] + ids.numel(), c["tokens"] + attn.sum().item()
                c["losses"].append(backward(actor, ids, attn, trained))
                return c["losses"][-1]
            model.load_state_dict(start)
            sim.sft_backward, packing.pack_rows = recorded, counted(plan, c)
            try:
                run()
            finally:
                sim.sft_backward, packing.pack_rows = packed, plan
            c["seconds"] += [b - a for a, b in zip(stamps, stamps[1:])]
        median = [statistics.median(c["seconds"]) for c in counts.values()]
        for (path, c), seconds in zip(counts.items(), median):
            print(f"| {run_name} | {path} | {c['positions'] / c['trained']:.2f} | {c['positions'] / c['tokens']:.2f} | "
                  f"{seconds:.3f} | {median[0] / seconds:.2f}x |", flush=True)
        gap = max(abs(a - b) for a, b in zip(*(c["losses"] for c in counts.values())))
        print(f"| {run_name} | the two paths' losses, step by step, agree within {gap:.1e} | | | | |")
    torch.set_num_threads(threads)
    print()


SECTIONS = {"logprob": bench_logprob, "sampler": bench_sampler, "step": bench_step, "sft": bench_sft,
            "retriever": bench_retriever,
            "gpu-logprob": bench_gpu_logprob, "gpu-sampler": bench_gpu_sampler, "gpu-step": bench_gpu_step}

if __name__ == "__main__":
    section = sys.argv[1] if len(sys.argv) > 1 else "all"
    if section == "--variant":
        print(json.dumps(VARIANTS[sys.argv[2]]()))
    elif section != "all" and section not in SECTIONS:
        raise SystemExit(f"usage: python tools/bench.py [{' | '.join(SECTIONS)}]  (no argument: all of them)")
    else:
        for name in SECTIONS if section == "all" else [section]:
            SECTIONS[name]()
