"""Tokens/s of sim.sample against Hugging Face generate, sampling at temperature 1 with EOS
disabled so both produce max_new_tokens per row. Prompts are ragged (20-60 tokens).

    python bench_sampler.py
"""
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from sim import decode_one, prefill, sample

torch.set_num_threads(2)
MAX_NEW_TOKENS = 64
MODELS = {  # name -> (config, batch sizes)
    "tiny policy (1024 vocab, 4x128)": (Qwen2Config(
        vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), [1, 8, 32, 64, 128]),
    "random Qwen2 ~100M (32k vocab, 10x640)": (Qwen2Config(
        vocab_size=32000, hidden_size=640, intermediate_size=1728, num_hidden_layers=10,
        num_attention_heads=10, num_key_value_heads=2), [64]),
}


def ragged_prompts(batch_size: int, vocab_size: int, seed: int = 0):
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


@torch.inference_mode()
def forward_only(model, prompts):
    """The model's forwards alone (prefill + one decode per token, argmax, no bookkeeping): the
    ceiling for any sampler that calls the Hugging Face forward."""
    logits, cache, mask, position_ids = prefill(model, prompts, MAX_NEW_TOKENS)
    P = mask.shape[1] - MAX_NEW_TOKENS
    for t in range(MAX_NEW_TOKENS - 1):
        logits = decode_one(model, logits.argmax(-1), mask[:, :P + t + 1], position_ids + t, cache)


def best_seconds(fns, model, prompts, repeats: int):
    """Best of `repeats` timed runs of each fn, after one warm-up run; runs interleave so that
    load from other processes hits both alike."""
    for fn in fns:
        fn(model, prompts)
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn(model, prompts)
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


print(f"torch threads: {torch.get_num_threads()}, max_new_tokens: {MAX_NEW_TOKENS}, prompts 20-60 tokens, "
      "tokens/s counts generated tokens over the whole call (prefill included)\n")
print("| model | batch | HF generate tok/s | sim.sample tok/s | speed-up | forwards alone tok/s | ceiling |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, (config, batch_sizes) in MODELS.items():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    repeats = 3 if config.hidden_size < 256 else 2
    for batch_size in batch_sizes:
        prompts = ragged_prompts(batch_size, config.vocab_size)
        seconds = best_seconds([hf_generate, ours, forward_only], model, prompts, repeats)
        hf, ws, fw = (len(prompts) * MAX_NEW_TOKENS / s for s in seconds)
        print(f"| {name} | {batch_size} | {hf:,.0f} | {ws:,.0f} | {ws / hf:.2f}x | {fw:,.0f} | {fw / hf:.2f}x |",
              flush=True)
