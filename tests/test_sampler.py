"""sim.sample against independent oracles: Hugging Face generate (greedy), an uncached forward
re-run at every step, one prompt at a time, and a full decode of the sampled text for stop strings.
Models are tiny and random, built from config."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from sim import decode_one, lean_decode_one, lean_decoding, prefill, sample

VOCAB = 64
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def tiny_model(kind="qwen2"):
    """Qwen2 and Llama use rotary positions; GPT-2's learned absolute positions make wrong
    position_ids under left padding visible. Eval mode: GPT-2 has dropout."""
    torch.manual_seed(0)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    elif kind == "qwen2-sliding":  # layer 0 full attention (a preallocated cache), layer 1 a 4-token window (HF's own)
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    elif kind == "qwen3":  # per-head RMSNorm of query and key
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                           bos_token_id=0, eos_token_id=0))
    return model.eval()


def ragged_prompts(lengths=(5, 12, 1, 8), vocab_size=VOCAB, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(model, prompts, max_new_tokens, eos_token_id=None):
    """Left-padded HF generate; returns the new tokens of each row."""
    P = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=0, eos_token_id=eos_token_id)
    return out[:, P:].tolist()


@torch.no_grad()
def uncached_logits(model, sequence):
    """Slow reference: the full forward over prompt + tokens so far, no cache -> logits [T, V]."""
    return model(input_ids=torch.tensor([sequence])).logits[0].float()


def uncached_greedy(model, prompt, max_new_tokens):
    sequence = list(prompt)
    for _ in range(max_new_tokens):
        sequence.append(int(uncached_logits(model, sequence)[-1].argmax()))
    return sequence[len(prompt):]


def upto_first(tokens, eos):
    return tokens[:tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3", "gpt2"])
def test_greedy_equals_hf_generate_on_ragged_prompts(kind):
    model, prompts = tiny_model(kind), ragged_prompts()
    tokens, _ = sample(model, prompts, 16, temperature=0, eos_token_id=[])
    assert tokens == hf_greedy(model, prompts, 16)
    eos = tokens[1][5]  # a token that occurs: rows must agree up to and including their first EOS
    tokens, _ = sample(model, prompts, 16, temperature=0, eos_token_id=eos)
    expected = [upto_first(row, eos) for row in hf_greedy(model, prompts, 16, eos_token_id=eos)]
    assert tokens == expected
    assert any(len(row) < 16 for row in tokens) and any(len(row) == 16 for row in tokens)


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3", "gpt2", "qwen2-sliding"])
def test_cached_decode_equals_uncached_forward(kind):
    model, prompts = tiny_model(kind), ragged_prompts()
    tokens, _ = sample(model, prompts, 12, temperature=0, eos_token_id=[])
    assert tokens == [uncached_greedy(model, p, 12) for p in prompts]


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3", "gpt2", "qwen2-sliding"])
def test_lean_decode_step_equals_the_hf_forward(kind):
    """The written-out decode step against the model's own forward: same logits, same cache, three
    steps on; models it does not cover (GPT-2, a sliding window) go through the HF forward."""
    model, prompts = tiny_model(kind), ragged_prompts()
    assert lean_decoding(model) == (kind in ("qwen2", "llama", "qwen3"))
    if not lean_decoding(model):
        return
    with torch.no_grad():
        logits, hf_cache, mask, pos = prefill(model, prompts, 3)
        _, lean_cache, _, _ = prefill(model, prompts, 3)
        P = mask.shape[1] - 3
        for t in range(3):
            tokens = logits.argmax(-1)
            logits = decode_one(model, tokens, mask[:, :P + t + 1], pos + t, hf_cache)
            lean = lean_decode_one(model, tokens, mask[:, :P + t + 1], pos + t, lean_cache)
            torch.testing.assert_close(lean, logits, atol=1e-5, rtol=1e-5)
        for hf_layer, lean_layer in zip(hf_cache.layers, lean_cache.layers):
            torch.testing.assert_close(lean_layer.keys, hf_layer.keys)
            torch.testing.assert_close(lean_layer.values, hf_layer.values)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_grouped_prefill_equals_one_padded_forward(kind):
    """Prefill in groups of similar length against one left-padded forward: the same last logits
    and the same keys and values wherever the mask lets attention see them."""
    model, prompts = tiny_model(kind), ragged_prompts((3, 17, 9, 1, 6, 11, 2))
    with torch.no_grad():
        one_logits, one_cache, mask, one_pos = prefill(model, prompts, 4, groups=1)
        logits, cache, _, pos = prefill(model, prompts, 4, groups=3)
    torch.testing.assert_close(logits, one_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(pos, one_pos)
    seen = mask[:, None, :17, None].bool()  # [B, 1, P, 1]: the real prompt tokens
    for layer, one_layer in zip(cache.layers, one_cache.layers):
        assert layer.get_seq_length() == one_layer.get_seq_length() == 17
        torch.testing.assert_close(layer.keys * seen, one_layer.keys * seen, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values * seen, one_layer.values * seen, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["qwen2", "gpt2"])
def test_batched_equals_one_prompt_at_a_time(kind):
    model, prompts = tiny_model(kind), ragged_prompts((3, 17, 9, 1, 6, 11))
    batched, batched_logp = sample(model, prompts, 10, temperature=0, eos_token_id=[])
    for prompt, row, row_logp in zip(prompts, batched, batched_logp):
        alone, alone_logp = sample(model, [prompt], 10, temperature=0, eos_token_id=[])
        assert alone[0] == row
        torch.testing.assert_close(torch.tensor(alone_logp[0]), torch.tensor(row_logp), atol=1e-5, rtol=0)


def test_logprobs_equal_log_softmax_of_the_model_logits():
    model, prompts = tiny_model(), ragged_prompts()
    for kwargs in (dict(temperature=1.0), dict(temperature=0), dict(temperature=0.7, top_k=5)):
        tokens, logprobs = sample(model, prompts, 8, eos_token_id=[], seed=0, **kwargs)
        for prompt, row, row_logp in zip(prompts, tokens, logprobs):
            logits = uncached_logits(model, prompt + row)[len(prompt) - 1:-1]  # logits that produced row
            if kwargs.get("top_k"):
                kth = logits.topk(5, dim=-1).values[:, -1:]
                assert (logits.gather(-1, torch.tensor(row)[:, None]) >= kth).all()
                logits = logits.masked_fill(logits < kth, float("-inf"))
            expected = (logits / (kwargs["temperature"] or 1.0)).log_softmax(-1)[torch.arange(len(row)), row]
            torch.testing.assert_close(torch.tensor(row_logp), expected, atol=1e-4, rtol=0)


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model, prompts = tiny_model(), ragged_prompts()
    a = sample(model, prompts, 12, seed=1, eos_token_id=[])
    assert a == sample(model, prompts, 12, seed=1, eos_token_id=[])
    assert a[0] != sample(model, prompts, 12, seed=2, eos_token_id=[])[0]


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model, prompts = tiny_model(), ragged_prompts()
    greedy, _ = sample(model, prompts, 10, temperature=0, eos_token_id=[])
    assert sample(model, prompts, 10, top_k=1, seed=0, eos_token_id=[])[0] == greedy
    assert sample(model, prompts, 10, top_p=1e-6, seed=0, eos_token_id=[])[0] == greedy


def test_eos_stops_its_row_and_other_rows_continue():
    model, prompts = tiny_model(), ragged_prompts()
    free, free_logp = sample(model, prompts, 20, seed=3, eos_token_id=[])
    eos = next(tok for tok in free[0][2:] if tok not in free[0][:2] and tok not in free[1])
    tokens, logprobs = sample(model, prompts, 20, seed=3, eos_token_id=[eos, VOCAB + 5])
    assert tokens[0] == upto_first(free[0], eos) and tokens[0][-1] == eos and len(tokens[0]) < 20
    assert tokens[1] == free[1]
    for row, free_row, logp, free_row_logp in zip(tokens, free, logprobs, free_logp):
        assert row == upto_first(free_row, eos)
        torch.testing.assert_close(torch.tensor(logp), torch.tensor(free_row_logp[:len(logp)]), atol=1e-5, rtol=0)


def test_default_eos_comes_from_the_generation_config():
    model, prompts = tiny_model(), ragged_prompts()
    free, _ = sample(model, prompts, 12, temperature=0, eos_token_id=[])
    model.generation_config.eos_token_id = free[1][4]
    tokens, _ = sample(model, prompts, 12, temperature=0)
    assert tokens[1] == upto_first(free[1], free[1][4])


# A word-level tokenizer whose decoder glues tokens together, so "</search>" is one token
# or three ("</" "search" ">"), as a stop string may span several tokens of a real BPE.
WORDS = ["<pad>", "</search>", "</", "search", ">", "x", "y", "y ", "<answer>", "</answer>"]


def tiny_tokenizer():
    vocab = {w: i for i, w in enumerate(WORDS + [f"w{i}" for i in range(VOCAB - len(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def biased_model(words, tokenizer):
    """The tiny model with an lm_head bias that makes `words` (about) the only tokens it samples."""
    model = tiny_model()
    head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    head.weight.data.copy_(model.lm_head.weight.data)
    head.bias.data.fill_(-30.0)
    head.bias.data[tokenizer.convert_tokens_to_ids(words)] = 0.0
    model.lm_head = head
    return model


def first_stop(tokenizer, row, stop):
    """Oracle: the shortest prefix of `row` whose full decoded text holds a stop string."""
    for n in range(1, len(row) + 1):
        if any(s in tokenizer.decode(row[:n]) for s in stop):
            return row[:n]
    return row


def test_stop_strings_end_a_row_with_the_completing_token():
    tokenizer = tiny_tokenizer()
    model = biased_model(["</search>", "</", "search", ">", "x"], tokenizer)
    prompts = ragged_prompts((4, 9, 2, 6, 3, 7, 5, 8))
    free, _ = sample(model, prompts, 30, seed=0, eos_token_id=[])
    stop = ["</search>"]
    tokens, _ = sample(model, prompts, 30, seed=0, eos_token_id=[], stop=stop, tokenizer=tokenizer)
    assert tokens == [first_stop(tokenizer, row, stop) for row in free]
    ends = [tokenizer.convert_ids_to_tokens(row[-1]) for row in tokens if len(row) < 30]
    assert "</search>" in ends and ">" in ends  # stopped by the single token and by a 3-token span


def test_multi_token_stop_string_and_a_row_that_never_stops():
    tokenizer = tiny_tokenizer()
    model = biased_model(["x", "y"], tokenizer)
    prompts = ragged_prompts((4, 9, 2, 6))
    free, _ = sample(model, prompts, 25, seed=5, eos_token_id=[])
    stop = ["xyyx", "never"]
    tokens, _ = sample(model, prompts, 25, seed=5, eos_token_id=[], stop=stop, tokenizer=tokenizer)
    assert tokens == [first_stop(tokenizer, row, stop) for row in free]
    assert any(len(row) < 25 for row in tokens)


def test_stop_string_ending_in_whitespace():
    tokenizer = tiny_tokenizer()
    model = biased_model(["x", "y", "y "], tokenizer)
    prompts = ragged_prompts((4, 9, 2, 6))
    free, _ = sample(model, prompts, 25, seed=5, eos_token_id=[])
    stop = ["xy "]
    tokens, _ = sample(model, prompts, 25, seed=5, eos_token_id=[], stop=stop, tokenizer=tokenizer)
    assert tokens == [first_stop(tokenizer, row, stop) for row in free]
    assert any(len(row) < 25 for row in tokens)


def test_stop_without_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="tokenizer"):
        sample(tiny_model(), ragged_prompts(), 4, stop=["</search>"])


def test_max_new_tokens_and_empty_inputs():
    model, prompts = tiny_model(), ragged_prompts()
    tokens, logprobs = sample(model, prompts, 7, seed=0, eos_token_id=[])
    assert [len(row) for row in tokens] == [7] * 4 and [len(row) for row in logprobs] == [7] * 4
    assert sample(model, prompts, 0) == ([[]] * 4, [[]] * 4)
    assert sample(model, [], 5) == ([], [])
    assert sample(model, [[3]], 1, temperature=0, eos_token_id=[])[0] == [uncached_greedy(model, [3], 1)]


def test_training_flag_is_restored():
    model = tiny_model()
    model.train()
    sample(model, ragged_prompts(), 3, seed=0)
    assert model.training
    model.eval()
    sample(model, ragged_prompts(), 3, seed=0)
    assert not model.training


def test_bench_sampler_runs():
    """tools/bench.py's sampler section, shrunk (BENCH_QUICK=1): one table row per model and batch size,
    each with a positive speed-up; the README's figures come from its full run."""
    import os
    import subprocess
    import sys
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(here, "tools", "bench.py"), "sampler"], capture_output=True, text=True,
                         env={**os.environ, "BENCH_QUICK": "1"}, cwd=here, check=True).stdout
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and "tok/s" not in line]
    assert [(r[0].strip().split(" (")[0], r[1].strip()) for r in rows] == [
        ("default tiny policy", "1"), ("default tiny policy", "8"), ("random Qwen2 ~100M", "2")]
    assert all(float(r[4].strip().rstrip("x")) > 0 for r in rows)
