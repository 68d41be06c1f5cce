"""Benchmarks that print markdown tables: `python tools/bench.py` runs every section, `python tools/bench.py
SECTION` one (logprob, sampler, retriever, step, sft, world, gpu-logprob, gpu-sampler, gpu-step). `BENCH_QUICK=1` shrinks
every size to check the script runs in seconds; its figures mean nothing.

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
             (random weights), batch 64 and 256: the sampler section's code with the models on the GPU.
gpu-step     one RL step's time split (rollout sampling, log-probs, values, advantages, update) at
             that architecture, batch 64: the step section's training step after a rollout of sim.sample.
step     the RL step's forward passes (log-probs of policy and reference, values) and PPO update on
         the default's models and batch sizes: sequences packed several a row (packing.padding_free)
         against each in its own padded row, as before; the LM head on the response tokens alone
         against every token; micro-batches of 16 sorted by length against none; token positions a
         step and time.
sft      the build's two fine-tunings (sim.sft: the warm-up, the simulator's) on the default build's
         data: padded batches with HF's loss on every position, as before, against sim.sft now
         (micro-batches by length, packed, the LM head on the trained tokens); token positions per
         trained and per real token, seconds a step, and their losses step by step.
world    `python tools/bench.py world [key=value ...]`: how often BM25 finds what the held-out questions need,
         by query form, in the world the config describes; then, from its build (made if missing), the
         answer in the real engine's results beside the simulator's useful and noisy documents.
"""
import copy
import itertools
import json
import os
import random
import subprocess
import sys
import time
from unittest import mock
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen2ForTokenClassification

import build
from kernels import logprob_entropy_from_hidden, logprob_entropy_from_hidden_reference
import engines
import packing
import ppo
import reward
import sim
import world
from config import load_config
import zerosearch

QUICK = os.environ.get("BENCH_QUICK") == "1"


def rss_mb(field):  # "VmRSS" (now) or "VmHWM" (peak since the last reset)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak_rss():
    """VmHWM := VmRSS, so that VmHWM is the peak from here on -> VmRSS (MB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb("VmRSS")


def timed(fn, device="cpu"):
    """-> (fn(), its wall time in seconds); on a CUDA `device` the clock stops once the work queued on it is done."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


# --- logprob: per-token log-prob + entropy + backward from the last hidden state -----------------
N, V, D = (64, 1000, 32) if QUICK else (4096, 151936, 896)  # on the CPU, fp32
GPU_N, GPU_V = (1024, 32000) if QUICK else (8192, 151936)  # on a GPU, bf16, D = 896 and 2048


def logprob_inputs(n, v, d, device="cpu", dtype=torch.float32):
    """hidden [n, d] and the LM head's weight [v, d] (both trained), labels [n]: random, seed 0."""
    torch.manual_seed(0)
    hidden = torch.randn(n, d, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, device=device) / d ** 0.5).to(dtype).requires_grad_()
    return hidden, weight, torch.randint(v, (n,), device=device)


def naive_logprob_entropy(hidden, weight, labels):
    logp_all = torch.log_softmax((hidden @ weight.t()).float(), -1)  # the full [N, V] fp32 log-softmax
    logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)  # H = -Σ p log p


def measure(fn, hidden, weight, labels, repeats=2):
    """-> {peak_mb, seconds} of a step through `fn` (its log-probs and entropies, temperature 1, and the backward
    of a loss made of both) on inputs the caller has just allocated: how far the peak memory rises above what was
    in use before (on the CPU the process's RSS, its peak VmHWM reset here to forget the peaks of imports and input
    set-up; on a GPU the memory allocated), and the mean time of `repeats` steps after one warm-up (in which Triton
    compiles its kernels and cuBLAS picks its own)."""
    def step():
        hidden.grad = weight.grad = None
        logp, entropy = fn(hidden, weight, labels)
        (logp + 0.01 * entropy).sum().backward()
    if hidden.is_cuda:  # the allocator's own counts: they need no wait for the GPU
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated() / 2 ** 20 if hidden.is_cuda else reset_peak_rss()
    step()  # warm-up
    _, seconds = timed(lambda: [step() for _ in range(repeats)], hidden.device)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if hidden.is_cuda else rss_mb("VmHWM")
    return {"peak_mb": peak - baseline, "seconds": seconds / repeats}


def in_fresh_process(fn):
    """measure() of `fn` on the CPU inputs, in a process of its own, so its peak memory is its own."""
    out = subprocess.run([sys.executable, __file__, "--variant", fn.__name__], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def bench_logprob():
    naive, chunked = in_fresh_process(naive_logprob_entropy), in_fresh_process(logprob_entropy_from_hidden)
    print(f"### logprob + entropy + backward, N={N}, V={V}, D={D}, fp32, CPU ({torch.get_num_threads()} threads)\n")
    print("| path | peak memory over inputs (MB) | time (s) |\n|---|---|---|")
    print(f"| naive `log_softmax(hidden @ W.T)` | {naive['peak_mb']:.0f} | {naive['seconds']:.2f} |")
    print(f"| `logprob_entropy_from_hidden` (torch, chunked) | {chunked['peak_mb']:.0f} | {chunked['seconds']:.2f} |")
    print(f"| ratio naive / chunked | {naive['peak_mb'] / chunked['peak_mb']:.1f}x | "
          f"{naive['seconds'] / chunked['seconds']:.2f}x |")
    print("\nThe Triton kernels run on a GPU only: `python tools/bench.py gpu-logprob` measures them there.")


def fp64_logp(hidden, weight, labels, rows=512):
    """The oracle: log-probs of the labels from the same hidden states and weight in fp64, 512 rows at a time."""
    w = weight.double()
    return torch.cat([torch.log_softmax(hidden[i:i + rows].double() @ w.t(), -1)
                      .gather(-1, labels[i:i + rows, None]).squeeze(-1) for i in range(0, len(labels), rows)])


def bench_gpu_logprob():
    paths = {"naive `log_softmax(hidden @ W.T)`": naive_logprob_entropy,
             "chunked torch (`logprob_entropy_from_hidden_reference`)": logprob_entropy_from_hidden_reference,
             "Triton kernel (`logprob_entropy_from_hidden`)": logprob_entropy_from_hidden}
    print(f"### gpu-logprob: logprob + entropy + backward, N={GPU_N}, V={GPU_V}, bf16, {gpu_name()}\n")
    print("| D | path | peak memory over inputs (MB) | time (ms) | largest logp error vs fp64 |\n|---:|---|---:|---:|---:|")
    for d in (896, 2048):
        hidden, weight, labels = logprob_inputs(GPU_N, GPU_V, d, "cuda", torch.bfloat16)
        want = fp64_logp(hidden.detach(), weight.detach(), labels)
        for name, fn in paths.items():
            m = measure(fn, hidden, weight, labels, repeats=3)
            with torch.no_grad():
                error = (fn(hidden, weight, labels)[0].double() - want).abs().max().item()
            print(f"| {d} | {name} | {m['peak_mb']:,.0f} | {1000 * m['seconds']:.1f} | {error:.1e} |", flush=True)


# --- sampler: tokens/s of sim.sample against Hugging Face generate ----------------------------------
# Sampling at temperature 1 with EOS disabled, so both produce MAX_NEW_TOKENS per row; prompts are
# ragged (20-60 tokens).
MAX_NEW_TOKENS = 4 if QUICK else 64
QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=2 if QUICK else 24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)  # Qwen2.5-0.5B's architecture


def default_tiny_policy_config():
    """The embedded default's policy architecture, built as zerosearch.py builds it (random weights)."""
    cfg = load_config([])
    vocab_size = len(world.world_tokenizer(world.world_of(cfg), cfg))
    return world.tiny_model(vocab_size, cfg["tiny_hidden"], cfg["tiny_layers"], cfg["tiny_heads"], cfg["seed"]).config


def random_lm(config):
    """A Qwen2 LM of `config`, random weights (seed 0), that never ends a row with EOS: every row makes
    MAX_NEW_TOKENS, in both samplers."""
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def sampler_prompts(batch_size: int, vocab_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 61, (batch_size,), generator=g).tolist()
    return [torch.randint(1, vocab_size, (n,), generator=g).tolist() for n in lengths]


def hf_generate(model, prompts):
    """Hugging Face generate of the prompts, left-padded with token 0, which no prompt holds (sampler_prompts)."""
    P = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=model.device)
    model.generate(input_ids=input_ids, attention_mask=(input_ids != 0).long(), max_new_tokens=MAX_NEW_TOKENS,
                   do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)


def ours(model, prompts):
    """-> the sampled tokens of each row."""
    return sim.sample(model, prompts, MAX_NEW_TOKENS, temperature=1.0, eos_token_id=[], seed=0)[0]


def ours_hf_forward(model, prompts):
    """sim.sample with the Hugging Face forward for every decode step (lean_decode_one off)."""
    with mock.patch.object(sim, "lean_decoding", lambda model: False):
        ours(model, prompts)


def ours_under_autocast(model, prompts):
    """sim.sample of fp32 weights with bf16 compute, as zerosearch's rollouts on a GPU."""
    with ppo.autocast(torch.bfloat16, "cuda"):
        return ours(model, prompts)


def sampler_row(label, runs, prompts, repeats):
    """Prints a table row: `label`, then the tokens/s of each (sampler, model) of `runs` (three), the second's
    speed-up over the first in between. Each is the best of `repeats` timed runs after one warm-up run; runs
    interleave so that load from other processes hits them alike."""
    for fn, model in runs:  # warm-up
        fn(model, prompts)
    rounds = [[timed(lambda: fn(model, prompts), model.device)[1] for fn, model in runs] for _ in range(repeats)]
    hf, ws, other = (len(prompts) * MAX_NEW_TOKENS / min(seconds) for seconds in zip(*rounds))
    print(f"| {label} | {hf:,.0f} | {ws:,.0f} | {ws / hf:.2f}x | {other:,.0f} |", flush=True)


def bench_sampler():
    print(f"### sampler: tokens/s, {torch.get_num_threads()} torch threads, {MAX_NEW_TOKENS} new tokens a row, "
          "prompts 20-60 tokens; generated tokens over the whole call (prefill included)\n")
    print("| model | batch | HF generate tok/s | sim.sample tok/s | speed-up | sim.sample, HF forward tok/s |\n"
          "|---|---:|---:|---:|---:|---:|")
    tiny = default_tiny_policy_config()
    models = {  # name -> (config, batch sizes)
        f"default tiny policy ({tiny.vocab_size} vocab, {tiny.num_hidden_layers}x{tiny.hidden_size})":
            (tiny, [1, 8] if QUICK else [1, 8, 32, 64, 128]),
        "random Qwen2 ~100M (32k vocab, 10x640)": (Qwen2Config(
            vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=2 if QUICK else 10,
            num_attention_heads=10, num_key_value_heads=2), [2] if QUICK else [64])}
    for name, (config, batch_sizes) in models.items():
        model = random_lm(config)
        repeats = 1 if QUICK else 5 if config.hidden_size < 256 else 2
        for batch_size in batch_sizes:
            sampler_row(f"{name} | {batch_size}", [(hf_generate, model), (ours, model), (ours_hf_forward, model)],
                        sampler_prompts(batch_size, config.vocab_size), repeats)


def bench_gpu_sampler():
    with torch.device("cuda"):
        model = random_lm(Qwen2Config(**QWEN25_05B))  # fp32 weights, as the actor holds them
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    print(f"### gpu-sampler: tokens/s at the Qwen2.5-0.5B architecture (random weights), {MAX_NEW_TOKENS} new tokens "
          f"a row, prompts 20-60 tokens, {gpu_name()}\n")
    print("| batch | HF generate, bf16 weights tok/s | sim.sample, bf16 weights tok/s | speed-up "
          "| sim.sample, fp32 weights under bf16 autocast (zerosearch's rollouts) tok/s |\n|---:|---:|---:|---:|---:|")
    for batch_size in [8] if QUICK else [64, 256]:
        sampler_row(batch_size, [(hf_generate, bf16), (ours, bf16), (ours_under_autocast, model)],
                    sampler_prompts(batch_size, model.config.vocab_size), 1 if QUICK else 2)


# --- retriever: the in-process BM25 at corpus scale ------------------------------------------------
# Passages of 80-120 made-up words drawn with Zipf-like frequencies (the word of rank r with p ∝ 1/r);
# a query is 8 distinct words of a random passage, so it holds frequent words as real questions do.
PASSAGES, VOCAB, QUERIES = (20_000, 5_000, 100) if QUICK else (1_000_000, 50_000, 1_000)


def synthetic_corpus(n, vocab_size, seed=0):
    words = np.array(world.make_words(random.Random(seed), vocab_size, 3, set()))
    rng = np.random.default_rng(seed)
    p = 1 / np.arange(1, vocab_size + 1)
    docs = []
    for start in range(0, n, 50_000):  # in chunks: a million passages' word ids at once are 800 MB
        lengths = rng.integers(80, 121, min(50_000, n - start))
        ids = rng.choice(vocab_size, size=lengths.sum(), p=p / p.sum())
        docs += [" ".join(words[passage]) for passage in np.split(ids, np.cumsum(lengths)[:-1])]
    queries = [" ".join(rng.choice(docs[i].split(), 8, replace=False)) for i in rng.integers(0, n, QUERIES)]
    return docs, queries


def bench_retriever():
    (docs, queries), made = timed(lambda: synthetic_corpus(PASSAGES, VOCAB))
    corpus_mb = reset_peak_rss()  # so the peak below is the index build's
    retriever, index_s = timed(lambda: engines.Retriever(docs))
    peak_mb = rss_mb("VmHWM")
    index_mb = sum(a.nbytes for a in [retriever.indptr, retriever.postings, retriever.weights, *retriever.dense.values()]) / 2**20
    engine = engines.RealEngine(retriever, {"topk": 3})
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(queries), 128):
        engine.search([{"query": q} for q in queries[i:i + 128]])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"### retriever: engines.Retriever (BM25), {PASSAGES:,} synthetic passages of 80-120 words (Zipf-like over "
          f"{VOCAB:,} made-up words, made in {made:.0f} s), {len(queries):,} queries of 8 words; one process, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| measure | value | target |\n|---|---:|---|")
    print(f"| index build (s) | {index_s:.0f} | ≤ 180 |")
    print(f"| peak memory of the process while indexing (GB; {corpus_mb / 1024:.1f} before, with the corpus) | "
          f"{peak_mb / 1024:.1f} | ≤ 8 |")
    print(f"| index size (GB: {len(retriever.postings):,} postings, {len(retriever.dense)} dense rows) | "
          f"{index_mb / 1024:.1f} | |")
    print(f"| queries/s, batches of 128, top 3 (wall clock) | {len(queries) / wall:.0f} | ≥ 50 |")
    print(f"| queries per CPU second (the same, without other processes' load) | {len(queries) / cpu:.0f} | |")


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


def step_models(config, cfg):
    """-> the actor (a ppo.Actor computing in cfg's dtype) and the critic (a value head on the same architecture)
    as ppo.Learners with fresh optimizers, and the reference (the actor's frozen copy): random weights of `config`
    (seed 0: the same at every call), made as zerosearch.load_models makes them."""
    torch.manual_seed(0)
    policy = ppo.Actor(Qwen2ForCausalLM(config).eval(), getattr(torch, cfg["dtype"]))
    value_config = copy.deepcopy(config)
    value_config.num_labels, value_config.classifier_dropout = 1, 0.0
    critic = Qwen2ForTokenClassification(value_config).eval()
    actor, critic = (ppo.Learner(m, *ppo.make_optimizer(m, lr, cfg["weight_decay"], 0, cfg["steps"]))
                     for m, lr in ((policy, cfg["actor_lr"]), (critic, cfg["critic_lr"])))
    return actor, critic, copy.deepcopy(policy).requires_grad_(False)


def training_step(actor, critic, ref, batch, cfg, stage=lambda name, fn: fn()):
    """Stages 4-6 of zerosearch.train on one process: old and reference log-probs and values, advantages,
    the PPO update (at a step after the critic's warm-up, so both models train) -> the update's stats,
    old log-probs, values. Each stage runs as `stage(its name, fn)` (gpu-step times them)."""
    ids, attn, response_mask, scores = batch
    old_logp, ref_logp = stage("log-probs of the policy and the reference (`ppo.logprobs`)", lambda: (
        ppo.logprobs(actor.model, ids, attn, response_mask, cfg), ppo.logprobs(ref, ids, attn, response_mask, cfg)))
    values = stage("values (`ppo.values`)", lambda: ppo.values(critic.model, ids, attn, cfg))
    advantages, returns, _ = stage("advantages (`ppo.compute_advantages`)", lambda: ppo.compute_advantages(
        "ppo", scores, response_mask, old_logp, ref_logp, values, cfg, cfg["kl_coef"]))
    batch = ppo.Batch(ids, attn, response_mask, old_logp, ref_logp, advantages, values, returns)
    stats = stage(f"update of the actor and critic (`ppo.update`, micro-batches of {cfg['micro_batch_size']})",
                  lambda: ppo.update(actor, critic, batch, cfg, cfg["kl_coef"], step=cfg["critic_warmup"]))
    return stats, old_logp, values


def lm_head_on_every_token(self, ids, attn, temperature=1.0, positions=None, forward=ppo.Actor.forward):
    """ppo.Actor.forward as before `positions`: the LM head on every real token, whatever the caller asks."""
    return forward(self, ids, attn, temperature)


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


def bench_step():
    cfg, threads = load_config([]), torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    tiny = default_tiny_policy_config()
    batch = step_batch(tiny.vocab_size)
    lengths = batch[1].sum(-1)
    packed, response, every = packing.pack_rows, ppo.Actor.forward, lm_head_on_every_token
    before = "each sequence in its own padded row, the LM head on every token, no micro-batches (before)"
    layouts = {  # name -> (rows plan, ppo.Actor.forward, micro-batch)
        before: (one_per_row, every, STEP_SEQUENCES),
        "packed rows (`packing.padding_free`), the LM head on every token, no micro-batches": (packed, every, STEP_SEQUENCES),
        "packed rows, the LM head on the response (`ppo.Actor`'s `positions`), no micro-batches": (packed, response, STEP_SEQUENCES),
        "packed rows, the LM head on the response, micro-batches of 16 by length (now)": (packed, response, cfg["micro_batch_size"])}
    counts, seconds, results = {}, {}, {}
    # the first round warms up; the layouts' runs alternate, so that load from other processes hits them alike
    for _, (name, (plan, forward, micro)) in itertools.product(range(1 if QUICK else 4), layouts.items()):
        actor, critic, ref = step_models(tiny, cfg)  # the same weights each run, and fresh optimizers
        counts[name] = {"positions": 0, "tokens": 0}
        with mock.patch.object(packing, "pack_rows", counted(plan, counts[name])), \
                mock.patch.object(ppo.Actor, "forward", forward):
            results[name], s = timed(lambda: training_step(actor, critic, ref, batch, dict(cfg, micro_batch_size=micro)))
        seconds[name] = min(seconds.get(name, s), s)
    print(f"### step: forward passes + PPO update of one RL step, {torch.get_num_threads()} threads\n")
    print(f"{STEP_SEQUENCES} synthetic sequences (mean {lengths.float().mean():.0f} tokens, median "
          f"{int(lengths.median())}, longest {int(lengths.max())}); log-probs of policy and reference and values, then "
          f"ppo_epochs={cfg['ppo_epochs']} over mini-batches of {cfg['mini_batch_size']} (actor and critic); "
          "no micro-batches: one forward pass over the batch, one a mini-batch; the best of 3 after a warm-up.\n")
    print("| rows | token positions a step | over real tokens | time (s) | speed-up |\n|---|---:|---:|---:|---:|")
    for name, c in counts.items():
        print(f"| {name} | {c['positions']:,} | {c['positions'] / c['tokens']:.2f}x | {seconds[name]:.2f} | "
              f"{seconds[before] / seconds[name]:.2f}x |")
    scored = batch[2].bool()  # where the log-probs are used
    (stats_0, logp_0, values_0), *others = results.values()
    outputs = max(max((logp_0 - logp)[scored].abs().max().item(), (values_0 - values).abs().max().item())
                  for _, logp, values in others)
    losses = max(abs(stats_0[k] - stats[k]) / abs(stats_0[k]) for stats, _, _ in others for k in ("actor/loss", "critic/loss"))
    print(f"\nThey agree: old log-probs (on the response) and values within {outputs:.1e}, the update's actor and "
          f"critic losses within {losses:.1e} (relative).")
    torch.set_num_threads(threads)


def bench_gpu_step():
    B, micro = (8, 4) if QUICK else (64, 16)
    cfg = dict(load_config([]), mini_batch_size=B, micro_batch_size=micro, dtype="bfloat16", actor_lr=1e-6,
               critic_lr=1e-5)  # the paper's learning rates
    with torch.device("cuda"):
        actor, critic, ref = step_models(Qwen2Config(**QWEN25_05B), cfg)
    prompts, seconds = sampler_prompts(B, QWEN25_05B["vocab_size"]), {}

    def stage(name, fn):  # fn() timed into seconds[name]
        out, seconds[name] = timed(fn, "cuda")
        return out
    for _ in range(2):  # the first warms up: Triton compiles, cuBLAS picks its kernels, Adam allocates its states
        torch.cuda.reset_peak_memory_stats()
        responses = stage("rollout sampling (`sim.sample`)", lambda: ours_under_autocast(actor.model.lm, prompts))
        rollout = zerosearch.Rollout(prompts, responses, [[1] * len(r) for r in responses], None, None)
        training_step(actor, critic, ref, (*zerosearch.to_batch(rollout, 0, "cuda"), torch.rand(B, device="cuda")),
                      cfg, stage)
    total = sum(seconds.values())
    print(f"### gpu-step: one PPO step at the Qwen2.5-0.5B architecture (random weights, actor, reference and "
          f"critic), batch {B}, {MAX_NEW_TOKENS} new tokens a row, bf16 compute with fp32 weights, {gpu_name()}\n")
    print("| stage | time (s) | share |\n|---|---:|---:|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} | {100 * s / total:.0f}% |")
    print(f"| total | {total:.2f} | |")
    print(f"\nPeak GPU memory allocated during the step: {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB.")


def gpu_name():
    return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"


# --- sft: the warm-up and the simulator's fine-tuning (sim.sft), padded against now --------------------
SFT_STEPS, SFT_ROUNDS = (3, 1) if QUICK else (6, 4)  # steps a run; runs of each path, alternating


def padded_sft_backward(actor, input_ids, attention_mask, trained):
    """sim.sft_backward as before: one forward of the padded batch, the LM head and HF's loss on every position."""
    loss = actor.lm(input_ids=input_ids, attention_mask=attention_mask, labels=torch.where(trained, input_ids, -100)).loss
    loss.backward()
    return loss.item()


def bench_sft():
    """The default build's two fine-tunings (its warm-up data, and the simulator's rows collected with its warm-up
    policy, the build made if missing) from one start, padded (before) and as sim.sft runs them now, the
    runs alternating. sim.sft_backward is swapped for one that records when it began (a step is timed from
    one call to the next: the whole step), its loss, and the positions computed (for the packed path, as
    `packing.pack_rows` plans them), the real tokens and the trained ones."""
    cfg, threads = load_config([]), torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    w, retriever, _, policy_path = build.prepare_embedded(cfg, os.path.join(cfg["out_dir"], "build"), collect=zerosearch.collect)
    tok, trajectories = build.warmup_data(w, retriever, cfg)
    rows = build.simulator_rows(AutoModelForCausalLM.from_pretrained(policy_path), tok, w, retriever, cfg, zerosearch.collect)
    model = world.tiny_model(len(tok), cfg["tiny_hidden"], cfg["tiny_layers"], cfg["tiny_heads"], cfg["seed"])
    start = copy.deepcopy(model.state_dict())
    runs = {"warm-up": lambda: sim.sft(model, trajectories, SFT_STEPS, cfg["warmup_batch_size"], cfg["warmup_lr"],
                                       cfg["seed"], "warm-up", tok.pad_token_id),
            "simulator": lambda: sim.train_simulator(model, tok, rows, cfg, SFT_STEPS, cfg["sim_sft_batch_size"],
                                                     cfg["sim_sft_lr"], cfg["seed"])}
    paths = {"padded (before)": padded_sft_backward, "packed, micro-batches by length (now)": sim.sft_backward}
    print(f"### sft: sim.sft on the default build's data and batch sizes, {cfg['threads']} threads, {SFT_ROUNDS} runs "
          f"of {SFT_STEPS} steps a path from one start, alternating; the LM head on every position (padded) or on "
          "the trained tokens alone (now)\n")
    print("| fine-tuning | path | positions / trained token | positions / real token | s/step (median) | speed-up |\n"
          "|---|---|---:|---:|---:|---:|")
    for run_name, run in runs.items():
        counts = {path: dict(positions=0, tokens=0, trained=0, seconds=[], losses=[]) for path in paths}
        for _, (path, backward) in itertools.product(range(SFT_ROUNDS), paths.items()):
            c, stamps = counts[path], []

            def recorded(actor, ids, attn, trained):  # run() below calls it: c, stamps, backward are this round's
                stamps.append(time.perf_counter())
                c["trained"] += (ppo.scored_positions(attn) & trained).sum().item()
                if backward is padded_sft_backward:
                    c["positions"], c["tokens"] = c["positions"] + ids.numel(), c["tokens"] + attn.sum().item()
                c["losses"].append(backward(actor, ids, attn, trained))
                return c["losses"][-1]
            model.load_state_dict(start)
            with mock.patch.object(sim, "sft_backward", recorded), \
                    mock.patch.object(packing, "pack_rows", counted(packing.pack_rows, c)):
                run()
            c["seconds"] += [b - a for a, b in zip(stamps, stamps[1:])]
        median = [np.median(c["seconds"]) for c in counts.values()]
        for (path, c), seconds in zip(counts.items(), median):
            print(f"| {run_name} | {path} | {c['positions'] / c['trained']:.2f} | {c['positions'] / c['tokens']:.2f} | "
                  f"{seconds:.3f} | {median[0] / seconds:.2f}x |", flush=True)
        gap = max(abs(a - b) for a, b in zip(*(c["losses"] for c in counts.values())))
        print(f"| {run_name} | the two paths' losses, step by step, agree within {gap:.1e} | | | | |")
    torch.set_num_threads(threads)


# --- world: how often the real engine finds what a question needs, and what the simulator writes -------
def bench_world(argv):
    """For the world the config (`key=value ...`) describes: the share of held-out questions whose answer-
    bearing document is in BM25's top k, by query form (world.retrieval_stats); then, from the config's build
    (made in out_dir/build if it is not there), for queries that name the question's entity, the share of
    result lists that state the answer: the real engine's beside the simulator's useful and noisy ones."""
    cfg = load_config(argv)
    torch.set_num_threads(cfg["threads"])
    w = world.world_of(cfg)
    retriever = engines.Retriever(w.docs)
    stats = world.retrieval_stats(w, lambda q: retriever.search(q, cfg["topk"]), cfg["world_phrasings"])
    columns = ["question", "keyword", "synonyms", "name", "best", "two-hop question"]
    print(f"### world: {' '.join(argv) or 'the default'}; {len(w.docs):,} documents; an answer-bearing document in "
          f"BM25's top {cfg['topk']}, % of up to 400 held-out questions a set\n")
    print("| set | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for name, found in stats.items():
        if found:
            print(f"| {name} | " + " | ".join(f"{100 * found[c]:.1f}" if c in found else "" for c in columns) + " |")
    w, retriever, sim_path, _ = build.prepare_embedded(cfg, os.path.join(cfg["out_dir"], "build"), collect=zerosearch.collect)
    tok = world.load_tokenizer(sim_path)
    engine = sim.SimEngine(AutoModelForCausalLM.from_pretrained(sim_path), tok, cfg, world.knowledge_index(w.docs))
    real = engines.RealEngine(retriever, cfg, tok)
    questions = [q for q in w.test if q["hops"] == 1][:100 if QUICK else 400]
    print(f"\nThe answer in the results of a query naming the question's entity, or another one with every word for the "
          f"relation (% of {len(questions)} single-hop held-out questions), the simulator sampled as in RL:\n")
    print("| query form | real engine (BM25) | simulator, useful | simulator, noisy |\n|---|---:|---:|---:|")
    others = questions[-1:] + questions[:-1]  # another entity: the previous question's, with every word for the relation
    for form in ("question", "keyword", "synonyms", "name", "another entity"):
        about = others if form == "another entity" else questions
        requests = [dict(q, query=world.formulations(p["subject"], q["relation"], cfg["world_phrasings"])[
            "synonyms" if form == "another entity" else form]) for p, q in zip(about, questions)]
        seeds = list(range(len(requests)))
        shares = [sum(any(reward.substring_match(d, q["golden_answers"]) for d in docs) for q, docs in zip(questions, found))
                  / len(questions) for found in (real.search(requests), engine.search(requests, 0.0, seeds),
                                                  engine.search(requests, 1.0, seeds))]
        print(f"| {form} | " + " | ".join(f"{100 * s:.1f}" for s in shares) + " |")


SECTIONS = {"logprob": bench_logprob, "sampler": bench_sampler, "step": bench_step, "sft": bench_sft,
            "retriever": bench_retriever, "world": bench_world,
            "gpu-logprob": bench_gpu_logprob, "gpu-sampler": bench_gpu_sampler, "gpu-step": bench_gpu_step}

if __name__ == "__main__":
    section = sys.argv[1] if len(sys.argv) > 1 else "all"
    if section == "--variant":  # bench_logprob's child: measure() of one path, by its function's name, as JSON
        print(json.dumps(measure(globals()[sys.argv[2]], *logprob_inputs(N, V, D))))
    elif section != "all" and section not in SECTIONS:
        raise SystemExit(f"usage: python tools/bench.py [{' | '.join(SECTIONS)}]  (no argument: all of them)")
    else:
        for name in SECTIONS if section == "all" else [section]:
            if name.startswith("gpu-") and not torch.cuda.is_available():  # a GPU section says so and measures nothing
                print(f"{name}: no CUDA device here (torch.cuda.is_available() is False); nothing measured")
            else:
                SECTIONS[name](*[sys.argv[2:]] * (name == "world"))  # world takes config keys: world preset=misses
                print()  # a blank line after each section's output
