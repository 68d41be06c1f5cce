"""Sampling with a KV cache for the policy rollouts and for the simulator; the search engines;
simulator fine-tuning.

`sample` is the one hand-written sampler: the prompts are left-padded to one length and prefilled
in a few forwards of similar length (`prefill`), then a decode loop feeds one token per row through a
transformers `DynamicCache` whose full-attention layers are preallocated for the whole call
(`PreallocatedLayer`). Rows that hit EOS or a stop string are dropped from the batch and from the
cache, so finished rows cost nothing more. A decode step of a Llama-family model (Qwen2, Qwen3, Llama)
is written out in `lean_decode_one` from the model's own modules; any other Hugging Face causal LM
decodes through its own forward. test_sampler.py checks both against `model.generate` and against an
uncached forward; `python bench.py sampler` measures them against `model.generate`.

Search engines, all with `.search(requests, noise_prob, seed) -> documents per request` and `.stats`:
  SimEngine        search_backend=sim: the simulator LLM in this process, sampled with `sample`.
  HttpEngine       search_backend=http: the same prompts sent to a served simulator (vLLM, SGLang) at
                   `POST {sim_url}/completions`; sim_served_model names the model the server expects.
  RealEngine       search_backend=real: BM25 over a local corpus (`Retriever`, in numpy).
  RetrieverEngine  search_backend=retriever: a real engine served on Search-R1's retrieval-server
                   contract (its e5 or BM25 server over wiki-18, or its SerpAPI proxy) at retriever_url.
The real engine of evaluation (and of the baseline=true run) is `eval_backend`: real or retriever.

Simulator fine-tuning (the embedded default runs the same `train_simulator` on the world's rows):
    python sim.py train data=rows.jsonl model=Qwen/Qwen2.5-7B out=my_simulator preset=paper [steps=1000 batch_size=2 lr=1e-6 seed=0]
rows.jsonl holds one JSON object a line:
    {"query": "...", "question": "...", "answer": "...", "label": "useful" | "noisy",
     "documents": ["first document", "second document", ...] | "Doc 1: ... Doc 2: ...",
     "evidence": ["...", ...]}   # optional: facts shown to the simulator (`{evidence}` in the template)
The simulator learns to write the documents after the control prompt it will be served with,
`sim_template_{sim_style}` with `topk` as k, from the config chosen as for zerosearch.py: config.yaml
< preset=NAME < --config FILE < any other config key=value. preset=paper gives the paper's prompt
and k=5; without it the prompt is the tiny world's, k=3. data, steps, batch_size, lr and seed are
the fine-tuning's own, not the RL config's. The loss is on the documents only. Defaults are the
paper's SFT (1000 steps, batch 2, lr 1e-6); it runs in one process, on the GPU if there is one.
"""
import array
import collections
import functools
import http.client
import inspect
import json
import math
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.distributed.tensor import DTensor
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import DynamicLayer

import config
import ppo
import reward
import world


# ---------------------------------------------------------------- sampler

class PreallocatedLayer(DynamicLayer):
    """One attention layer's KV cache in buffers [B, H, capacity, D] sized for the whole call, so a
    decode step writes its key and value in place where DynamicLayer `torch.cat`s the whole cache
    again (the cat was 20% of a decode step at batch 64 on the tiny policy). keys/values are views
    of the filled part. `sample` only calls update, get_seq_length and batch_select_indices."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states, value_states, batch_size=None):
        B, H, _, D = key_states.shape
        B = batch_size or B
        self.device = key_states.device
        # zeros: positions a group's prefill leaves unwritten are masked, but 0 * NaN from garbage is NaN
        self.key_buffer = key_states.new_zeros(B, H, self.capacity, D)
        self.value_buffer = value_states.new_zeros(B, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def write(self, rows, start: int, keys, values, batch_size: int):
        """Prefill of a group of rows: their keys and values [len(rows), H, n, D] go to positions
        start .. start + n, which must end where the other groups' end."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values, batch_size)
        self.key_buffer[rows, :, start:start + keys.shape[-2]] = keys
        self.value_buffer[rows, :, start:start + values.shape[-2]] = values
        self.length = start + keys.shape[-2]
        self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices):
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self.keys, self.values = self.key_buffer[:, :, :self.length], self.value_buffer[:, :, :self.length]


def preallocated_cache(config, capacity: int):
    """The model's DynamicCache with each full-attention layer preallocated for `capacity` positions;
    any other kind of layer (sliding window, linear attention) is kept as the model defines it."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@functools.lru_cache(maxsize=None)
def cache_keyword(model_class) -> str:
    """The forward's name for the KV cache: `cache` in newer transformers (5.24; `past_key_values` is
    deprecated there), `past_key_values` in older ones (5.17), where an unknown `cache=` is silently
    ignored and the model fills a cache of its own."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def prefill(model, prompts, max_new_tokens: int, groups: int = 4):
    """Fill the cache for `prompts`, left-padded to one length P -> (logits at the last position [B, V],
    cache, attention mask [B, P + max_new_tokens] with room for the new tokens, next positions [B, 1]).
    Rows run in up to `groups` forwards of similar length, so a short prompt does not pay for the
    longest one's padding (a third of the work for prompts of 20-60 tokens); each group's keys and
    values land in the cache's positions P - P_g .. P, where left padding puts them. Models with
    other kinds of cache layer (sliding window, ...) prefill in one forward."""
    B, P = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + max_new_tokens) for p in prompts],
                        device=model.device)
    position_ids = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)  # left padding: first real token at 0
    cache, cache_name = preallocated_cache(model.config, P + max_new_tokens), cache_keyword(type(model))
    if not all(type(layer) is PreallocatedLayer for layer in cache.layers):  # e.g. a sliding window
        logits = model(input_ids=input_ids, attention_mask=mask[:, :P], position_ids=position_ids,
                       use_cache=True, logits_to_keep=1, **{cache_name: cache}).logits[:, -1]
        return logits, cache, mask, position_ids[:, -1:] + 1
    order, groups = sorted(range(B), key=lambda i: len(prompts[i])), min(groups, B)
    for g in range(groups):
        rows = torch.tensor(order[g * B // groups:(g + 1) * B // groups], device=model.device)
        start = P - max(len(prompts[i]) for i in rows.tolist())  # the group's own left padding begins here
        part = preallocated_cache(model.config, P - start)
        out = model(input_ids=input_ids[rows, start:], attention_mask=mask[rows, start:P],
                    position_ids=position_ids[rows, start:], use_cache=True, logits_to_keep=1,
                    **{cache_name: part}).logits[:, -1]
        logits = out.new_empty(B, out.shape[-1]) if g == 0 else logits
        logits[rows] = out
        for layer, group_layer in zip(cache.layers, part.layers):
            layer.write(rows, start, group_layer.keys, group_layer.values, B)
    return logits, cache, mask, position_ids[:, -1:] + 1


def decode_one(model, tokens, mask, position_ids, cache):
    """tokens [b] at position_ids [b, 1]; mask [b, L] covers the cache and the new token -> logits [b, V]."""
    return model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position_ids,
                 use_cache=True, logits_to_keep=1, **{cache_keyword(type(model)): cache}).logits[:, -1]


LEAN_MODEL_TYPES = ("qwen2", "qwen3", "llama")  # pre-norm decoders: RMSNorm, rotary GQA attention, gated MLP


def lean_decoding(model) -> bool:
    """Can `lean_decode_one` replace the Hugging Face forward for this model? A Llama-family decoder
    with full attention in every layer, whose weights are plain tensors (not FSDP shards)."""
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"]
    return (model.config.model_type in LEAN_MODEL_TYPES and set(layer_types) == {"full_attention"}
            and not any(isinstance(p, DTensor) for p in model.parameters()))


def lean_decode_one(model, tokens, mask, position_ids, cache):
    """decode_one for a Llama-family decoder, written out: the model's own modules and math for one
    new token per row, without the generic forward's per-call work (building the 4-D mask, cache
    and output bookkeeping, attention dispatch), which is most of a decode step on a small model.
    test_sampler.py checks it token for token against `model.generate`."""
    m, b = model.model, len(tokens)
    x = m.embed_tokens(tokens[:, None])                                       # [b, 1, d]
    cos, sin = (t[:, None] for t in m.rotary_emb(x, position_ids))            # [b, 1, 1, head_dim]
    bias = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(mask == 0, float("-inf"))
    bias = bias[:, None, None, :]                                             # [b, 1, 1, L]: -inf on the left padding
    for layer, kv in zip(m.layers, cache.layers):
        attn, h = layer.self_attn, layer.input_layernorm(x)
        q, k, v = (proj(h).view(b, 1, -1, attn.head_dim) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        if hasattr(attn, "q_norm"):  # Qwen3 normalises each head's query and key
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)     # [b, heads, 1, head_dim]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin  # RoPE
        keys, values = kv.update(k, v)                                        # [b, kv_heads, L, head_dim]
        # attention for one query: the query heads of a group share their key/value head (GQA). Two
        # batched matmuls, not SDPA, whose CPU kernel is tuned for long queries and took twice as long here
        scores = q.reshape(b, keys.shape[1], -1, attn.head_dim) @ keys.transpose(-1, -2)  # [b, kv_heads, group, L]
        weights = (scores * attn.scaling + bias).softmax(-1, dtype=torch.float32).to(values.dtype)
        x = x + attn.o_proj((weights @ values).reshape(b, 1, -1))            # heads in order kv_head * group + g
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(m.norm(x))[:, -1]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def sample_next(logits, temperature: float, top_k: int, top_p: float, uniform):
    """logits [b, V], uniform [b] in (0, 1] -> (tokens [b], their log-probs [b] under the
    distribution sampled from: softmax(logits / T) after top-k and top-p filtering)."""
    logits = logits.float()
    if temperature == 0:  # greedy; log p under the raw model distribution
        tokens = logits.argmax(-1)
        return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
    z = logits / temperature
    if top_k > 0:
        kth = z.topk(min(top_k, z.shape[-1]), dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:  # keep the smallest set of top tokens whose probability reaches top_p
        sorted_z, order = z.sort(dim=-1, descending=True)
        p = sorted_z.softmax(-1)
        drop_sorted = p.cumsum(-1) - p > top_p
        z = z.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = z.softmax(-1)
    tokens = inverse_cdf(probs, uniform)
    return tokens, probs.gather(-1, tokens[:, None])[:, 0].log()


def inverse_cdf(probs, uniform):
    """probs [b, V], uniform [b] in (0, 1] -> tokens [b]: the first token whose CDF reaches u.
    One uniform per row is far cheaper on CPU than torch.multinomial's V exponentials; a
    zero-probability token is never chosen since u > 0 and its CDF step is flat."""
    cdf = probs.cumsum(-1)
    return torch.searchsorted(cdf, uniform[:, None] * cdf[:, -1:])[:, 0]


@functools.lru_cache(maxsize=8)
def stop_candidates(tokenizer, stop: tuple, vocab_size: int):
    """[V] bool: tokens that could complete a stop string, i.e. whose text holds a stop string's
    last character or a partial UTF-8 character (decoded as U+FFFD)."""
    if any(s[-1].isspace() for s in stop):  # decoders drop or merge a lone token's spaces
        return torch.ones(vocab_size, dtype=torch.bool)
    last_chars = {s[-1] for s in stop} | {"\ufffd"}
    texts = tokenizer.batch_decode([[i] for i in range(min(len(tokenizer), vocab_size))])
    could_stop = torch.zeros(vocab_size, dtype=torch.bool)
    could_stop[:len(texts)] = torch.tensor([any(c in t for c in last_chars) for t in texts])
    return could_stop


def completes_stop(tokenizer, tail_tokens, stop) -> bool:
    """Does the text of the last new tokens hold a stop string? The tail is long enough for any
    stop string, and an earlier occurrence would already have stopped the row."""
    text = tokenizer.decode(tail_tokens)
    return any(s in text for s in stop)


@torch.inference_mode()
def sample(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, stop=(),
           eos_token_id=None, seed=None, tokenizer=None):
    """prompts: list of token-id lists (ragged) -> (tokens, logprobs): per prompt the new token
    ids and their log-probs. A row ends with its EOS token or with the token that completed a
    stop string, or after max_new_tokens. temperature=0 is greedy. `seed`: an int for the batch,
    or one int per prompt, so that a row's draws do not depend on the other rows of its batch."""
    if stop and tokenizer is None:
        raise ValueError("sample(stop=...) needs a tokenizer to decode the new tokens")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("sample() got an empty prompt; start it with at least one token (e.g. BOS)")
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts], [[] for _ in prompts]
    device = model.device
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    eos = torch.tensor([] if eos_token_id is None else eos_token_id, device=device).long().view(-1)
    generator = None if seed is None or isinstance(seed, list) else torch.Generator(device).manual_seed(seed)
    if isinstance(seed, list):  # [B, max_new_tokens]: row i's t-th uniform comes from its own stream
        row_uniforms = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s))
                                    for s in seed]).to(device)
    was_training = model.training
    model.eval()
    try:
        logits, cache, mask, position_ids = prefill(model, prompts, max_new_tokens)
        decode = lean_decode_one if lean_decoding(model) else decode_one
        B, P = len(prompts), mask.shape[1] - max_new_tokens
        out_tokens = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        out_logp = torch.zeros(B, max_new_tokens, device=device)
        lengths = [max_new_tokens] * B
        rows = torch.arange(B, device=device)  # original index of each live row
        if stop:
            could_stop = stop_candidates(tokenizer, tuple(stop), logits.shape[-1]).to(device)
            # a stop string of n bytes spans <= n tokens; one more so a decoder's leading-space rule can't hide it
            tail = max(len(s.encode()) for s in stop) + 1
        for t in range(max_new_tokens):
            # one uniform per prompt, drawn for all B, so a row's draw does not depend on which rows are live
            uniform = 1 - (row_uniforms[rows, t] if isinstance(seed, list) else torch.rand(B, generator=generator, device=device)[rows])
            tokens, logp = sample_next(logits, temperature, top_k, top_p, uniform)
            out_tokens[rows, t], out_logp[rows, t] = tokens, logp
            done = torch.isin(tokens, eos)
            if stop:
                for i in could_stop[tokens].nonzero()[:, 0].tolist():
                    tail_tokens = out_tokens[rows[i], max(0, t + 1 - tail):t + 1].tolist()
                    done[i] |= completes_stop(tokenizer, tail_tokens, stop)
            if t == max_new_tokens - 1:
                break
            if done.any():
                for row in rows[done].tolist():
                    lengths[row] = t + 1
                keep = (~done).nonzero()[:, 0]
                if len(keep) == 0:
                    break
                # compacting at every finish measured as fast as waiting for several rows to finish
                rows, tokens, mask, position_ids = rows[keep], tokens[keep], mask[keep], position_ids[keep]
                cache.batch_select_indices(keep)
            logits = decode(model, tokens, mask[:, :P + t + 1], position_ids, cache)
            position_ids = position_ids + 1
    finally:
        model.train(was_training)
    tokens = [out_tokens[i, :n].tolist() for i, n in enumerate(lengths)]
    logprobs = [out_logp[i, :n].tolist() for i, n in enumerate(lengths)]
    return tokens, logprobs


# ---------------------------------------------------------------- the policy's rollout with search

@dataclass
class Rollout:
    """B trajectories as token lists (ragged); zerosearch.to_batch pads them into tensors."""
    prompt_ids: list      # B x [prompt tokens]
    response_ids: list    # B x [response tokens]: sampled actions and injected observations
    response_mask: list   # B x [1 where the policy sampled the token, 0 inside <information>]
    answers: list         # B x (answer text or None), from the policy's own tokens
    searches: list        # B x number of searches made
    engine_seconds: float = 0.0  # time spent in the engine's calls (the rest of the rollout is sampling)
    queries: list = None      # B x [each search's query]
    documents: list = None    # B x [each search's documents]
    engine_seeds: list = None  # B x [each search's seed: sim.draw_kinds(n, noise_prob, seeds) says useful or noisy]


def rollout(policy, tok, questions, engine, cfg, noise_prob=0.0, seeds=None, greedy=False, max_turns=None,
            template=None):
    """Search-R1/ZeroSearch rollout of many sequences at once. Each turn samples every active
    sequence until `</search>` or `</answer>`; the queries of the whole batch go to the engine in
    one call; its documents come back inside <information> (masked out of every loss) and
    generation resumes; a turn with neither action gets the paper's fixed "invalid action"
    observation (`invalid_action`) and tries again. After `max_turns` turns one last turn has
    search disabled. `seeds`, one int per question (default 0, 1, ...): a row's tokens and its
    searches draw from streams of its own, so a question samples the same in any batch, on one
    process or N."""
    max_turns = cfg["max_turns"] if max_turns is None else max_turns
    template = template or cfg["prompt_template"]
    prompts = [prompt_ids(tok, template.format(question=q["question"]), cfg["chat_template"]) for q in questions]
    B = len(questions)
    resp, mask, searches = [[] for _ in range(B)], [[] for _ in range(B)], [0] * B
    queries, documents, engine_seeds = [[] for _ in range(B)], [[] for _ in range(B)], [[] for _ in range(B)]
    active, engine_seconds = list(range(B)), 0.0
    seeds = list(range(B)) if seeds is None else seeds
    for turn in range(max_turns + 1):
        if not active:
            break
        last = turn == max_turns
        new, _ = sample(policy, [prompts[i] + resp[i] for i in active], cfg["max_turn_tokens"],
                        temperature=0.0 if greedy else cfg["temperature"], top_p=cfg["top_p"],
                        stop=("</answer>",) if last else ("</search>", "</answer>"),
                        eos_token_id=tok.eos_token_id, seed=[seeds[i] * 1000 + turn for i in active], tokenizer=tok)
        requests, invalid = [], []  # (batch row, query): rows keep their own question (fault 1 of the public code)
        for i, toks in zip(active, new):
            resp[i] += toks
            mask[i] += [1] * len(toks)
            if last or len(resp[i]) >= cfg["max_response_tokens"]:
                continue
            action = parse_action(tok.decode(toks))
            if action and action[0] == "search":
                requests.append((i, action[1]))
            elif not action and cfg["invalid_action"]:
                invalid.append(i)  # neither search nor answer: the fixed "invalid action" observation, try again
        t0 = time.time()
        engine_seed = [seeds[i] * 1000 + 500 + turn for i, _ in requests]  # not the policy's stream
        docs = engine.search([dict(questions[i], query=q) for i, q in requests], noise_prob, engine_seed) if requests else []
        engine_seconds += time.time() - t0
        observations = {i: information(d) for (i, _), d in zip(requests, docs)}
        observations.update({i: " " + cfg["invalid_action"] for i in invalid})
        for i, obs in observations.items():
            obs = tok.encode(obs, add_special_tokens=False)
            resp[i] += obs
            mask[i] += [0] * len(obs)
        for (i, query), d, s in zip(requests, docs, engine_seed):
            searches[i] += 1
            queries[i].append(query)
            documents[i].append(d)
            engine_seeds[i].append(s)
        active = sorted(observations)
    # the response is cut to its budget before the answer is read: the reward is for tokens that are trained
    resp, mask = [r[:cfg["max_response_tokens"]] for r in resp], [m[:cfg["max_response_tokens"]] for m in mask]
    answers = [reward.extract_answer(tok.decode([t for t, m in zip(r, ms) if m])) for r, ms in zip(resp, mask)]
    return Rollout(prompts, resp, mask, answers, searches, engine_seconds, queries, documents, engine_seeds)


def parse_action(text):
    """The turn's first action, as Search-R1 reads it: ("search" | "answer", its text), or None."""
    found = re.search(r"<(search|answer)>(.*?)</\1>", text, flags=re.DOTALL)
    return (found.group(1), found.group(2).strip()) if found else None


# ---------------------------------------------------------------- search engines and simulator fine-tuning


def format_docs(docs):
    """The engine's output form (Search-R1/ZeroSearch): one `Doc i: text` a line; a document in
    Search-R1's titled form `(Title: <title>) <text>` (the retriever engine's) as Search-R1 writes it,
    `Doc i(Title: <title>) <text>`."""
    return "\n".join(f"Doc {i + 1}{'' if d.startswith('(Title: ') else ': '}{d}" for i, d in enumerate(docs))


def information(docs):
    """The observation a search appends to the policy's response, as Search-R1/ZeroSearch write it."""
    return f"\n\n<information>{format_docs(docs)}</information>\n\n"


def parse_docs(text, k):
    """Split a simulator's `Doc 1: ... Doc 2: ...` text into at most k non-empty documents
    (the paper cuts the text before `Doc {k+1}`). Returns [] when there is no `Doc` line."""
    parts = re.split(r"Doc\s*\d+\s*:", text)
    return [p.strip() for p in parts[1:] if p.strip()][:k]


WORD_RE = re.compile(r"[a-z0-9]+")


def _words(text):
    return WORD_RE.findall(text.lower())


class Retriever:
    """BM25 (k1=0.9, b=0.4, Pyserini's defaults) over a list of documents, in numpy: the
    "real search engine" that evaluation uses and the Search-R1 baseline trains against.

    The index is a term-document matrix in CSR form: for word t, `postings[indptr[t]:indptr[t + 1]]`
    are the documents that hold it (ascending) and `weights[...]` its BM25 term in each,
    idf(t) * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl)). It is built with numpy from one array
    of every token's word id, and holds a million passages of 100 words (`python bench.py retriever`);
    past that, serve the corpus with Search-R1's retrieval server (eval_backend=retriever). A score is
    the float32 sum of float64 terms in query-word order, as a loop over the postings of a word-keyed
    dict adds them, so results, ties included, are those of that plain algorithm (test_retriever.py
    checks it against one)."""

    def __init__(self, docs, k1=0.9, b=0.4):
        self.docs, n = docs, len(docs)
        self.vocab = collections.defaultdict()
        self.vocab.default_factory = self.vocab.__len__  # a new word gets the next id
        tokens, lengths = array.array("i"), np.zeros(n, dtype=np.int64)  # [T] word id of every token; |d|
        for i, d in enumerate(tqdm(docs, desc="BM25 index", unit=" docs", delay=2)):
            words = _words(d)
            lengths[i] = len(words)
            tokens.extend(map(self.vocab.__getitem__, words))
        keys = np.frombuffer(tokens, dtype=np.intc).astype(np.int64)
        del tokens
        keys *= n
        keys += np.repeat(np.arange(n), lengths)  # word * n + document: one key per token
        keys, tf = np.unique(keys, return_counts=True)  # [P] one per (word, document), word-major; its count
        df = np.bincount(keys // n, minlength=len(self.vocab))
        self.indptr = np.concatenate([[0], np.cumsum(df)])
        self.postings = keys % n  # int64: numpy indexes with it without a conversion (a third faster than int32)
        del keys
        lengths = lengths.astype(np.float32)
        norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1.0))  # k1 (1 - b + b |d| / avgdl)
        # idf = log(1 + (N - df + 0.5) / (df + 0.5)), word by word: a vectorised log may round the last bit otherwise
        idf = [np.log(1 + (n - f + 0.5) / (f + 0.5)) for f in df.tolist()]
        tf = tf.astype(np.float32)
        self.weights = np.repeat(idf, df)  # [P] idf * tf * (k1 + 1) / (tf + norm): float64, in that order, tf + norm in float32
        self.weights *= tf
        self.weights *= k1 + 1
        self.weights /= tf + norm[self.postings]
        # a word in a quarter of the documents or more is also kept as a dense row [n], 0 where it is absent
        # (adding 0 leaves a sum as it is): adding a whole row costs less than scattering that many postings
        self.dense = {}
        for t in np.flatnonzero(df >= n / 4).tolist():
            span = slice(self.indptr[t], self.indptr[t + 1])
            self.dense[t] = np.zeros(n)
            self.dense[t][self.postings[span]] = self.weights[span]

    def search(self, query, k):
        """Top-k documents for one query (ties broken by corpus order)."""
        return [self.docs[i] for i in top_k(self.scores(query), k)]

    def scores(self, query):
        """[N] float32: every document's BM25 score for `query`."""
        scores = np.zeros(len(self.docs), dtype=np.float32)
        for w in dict.fromkeys(_words(query)):  # a fixed order: float sums, hence ties, do not depend on PYTHONHASHSEED
            t = self.vocab.get(w)  # .get never adds a word
            if t in self.dense:
                scores += self.dense[t]  # float32 += float64: added in float64, rounded to float32, as below
            elif t is not None:
                span = slice(self.indptr[t], self.indptr[t + 1])
                scores[self.postings[span]] += self.weights[span]
        return scores


def top_k(scores, k):
    """Indices of the (at most) k positive scores that rank first, highest first, ties in index order:
    `np.argsort(-scores, kind="stable")[:k]` without the sort of all N. Partial selection finds the
    k-th highest score; every score above it is in, and of those equal to it the first ones."""
    if k < len(scores):
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        top = np.flatnonzero(scores > kth)
        if kth > 0:
            top = np.concatenate([top, np.flatnonzero(scores == kth)[:k - len(top)]])
    else:
        top = np.flatnonzero(scores > 0)
    return top[np.lexsort((top, -scores[top]))]


def sft(model, examples, steps, batch_size, lr, seed=0, desc="sft", pad_id=0):
    """Supervised fine-tuning of a causal LM on (token ids, loss mask) examples: AdamW, linear
    warm-up then cosine decay to 10%, next-token cross-entropy on the masked-in tokens only
    (`sft_backward`). Used for the simulator's fine-tuning and for the tiny policy's format warm-up."""
    rng, device, actor = random.Random(seed), next(model.parameters()).device, ppo.Actor(model)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        batch = rng.sample(examples, min(batch_size, len(examples)))
        rows = [torch.tensor(x) for x, _ in batch]
        ids = pad_sequence(rows, batch_first=True, padding_value=pad_id)  # [B, T], right-padded
        attn = pad_sequence([torch.ones_like(x) for x in rows], batch_first=True)
        trained = pad_sequence([torch.tensor(m, dtype=torch.bool) for _, m in batch], batch_first=True)
        loss = sft_backward(actor, ids.to(device), attn.to(device), trained.to(device))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss:.3f}")
    model.eval()
    return loss


def sft_backward(actor, input_ids, attention_mask, trained, micro_batch_size=8):
    """Adds to the gradients that of L = mean over the batch's trained tokens of -log p(x_t | x_<t)
    (HF's `labels` loss, -100 off `trained` [B, T]) -> L. The batch runs as the RL update does
    (`ppo.update`): micro-batches of similar lengths, packed rows, the LM head on trained tokens only.
    Groups of 8 keep the warm-up's spread of lengths near the real tokens' count, and are still large
    enough matmuls on a CPU (`python bench.py sft`)."""
    n_trained = (ppo.scored_positions(attention_mask) & trained).sum()
    loss = 0.0
    for rows in ppo.by_length(attention_mask, torch.arange(len(trained), device=trained.device), micro_batch_size):
        logp, _ = actor(input_ids[rows], attention_mask[rows], positions=trained[rows])  # 0 off the trained tokens
        micro_loss = -logp.sum() / n_trained  # its share of the batch's token mean
        micro_loss.backward()
        loss += micro_loss.item()
    return loss


TAG_RE = re.compile(r"</?(think|search|information|answer)>")


def as_chat(tok, text):
    """`text` as the user's message in the tokenizer's chat template, ready for the reply (how an
    instruct model is prompted; the paper prompts a base model with the plain text)."""
    if not getattr(tok, "chat_template", None):
        raise SystemExit(f"error: chat_template/sim_chat_template is true but the tokenizer of {tok.name_or_path!r} "
                         "has no chat template; set it to false (a base model takes plain text)")
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def prompt_ids(tok, text, chat=False):
    """The token ids of a prompt: plain text, or with `chat` through the chat template (which
    writes any BOS itself)."""
    return tok.encode(as_chat(tok, text), add_special_tokens=False) if chat else tok.encode(text)


def sim_prompt(cfg, request, kind):
    """The simulator's control prompt for one request, `sim_template_{sim_style}` with topk as k: the
    query, the user's question and gold answer, and useful/noisy (in the fine-tuned style the only
    word that changes between the two). The prompted style's noisy variant, as the paper's, leaves
    the question and answer out: `sim_template_prompted_noisy`."""
    style = cfg["sim_style"] + ("_noisy" if cfg["sim_style"] == "prompted" and kind == "noisy" else "")
    return cfg[f"sim_template_{style}"].format(
        k=cfg["topk"], kind=kind, Kind=kind.capitalize(), question=request["question"], answer=request["golden_answers"][0],
        evidence=format_docs(request.get("evidence", [])), query=request["query"])


class SimEngine:
    """ZeroSearch's simulated search engine: an LLM writes the top-k documents for each query,
    useful or noisy as the curriculum draws per call. All the requests of a turn, across the
    whole batch, are sampled together in one `sample` call with a KV cache."""

    def __init__(self, model, tok, cfg, knowledge=None):
        self.model, self.tok, self.cfg, self.knowledge = model.eval(), tok, cfg, knowledge
        self.stats = {"useful": 0, "noisy": 0, "malformed": 0}

    def search(self, requests, noise_prob, seed):
        requests = with_knowledge(requests, self.knowledge)
        kinds = draw_kinds(len(requests), noise_prob, seed)
        prompts = [prompt_ids(self.tok, sim_prompt(self.cfg, r, kind), self.cfg["sim_chat_template"])
                   for r, kind in zip(requests, kinds)]
        outs, _ = sample(self.model, prompts, self.cfg["sim_max_tokens"], temperature=self.cfg["sim_temperature"],
                         eos_token_id=self.tok.eos_token_id, seed=seed)
        texts = [self.tok.decode(out, skip_special_tokens=True) for out in outs]
        return read_documents(self.tok, texts, kinds, self.cfg, self.stats)


def with_knowledge(requests, knowledge):
    """Each request with the simulator's knowledge of what its query names, as `evidence` (the
    {evidence} slot of the prompt), when the engine has a `knowledge(query) -> [statements]`
    function: the embedded world's tiny simulator reads there what a large one has memorised."""
    return [dict(r, evidence=knowledge(r["query"])) for r in requests] if knowledge else requests


def draw_kinds(n, noise_prob, seed):
    """The curriculum's draw for each of n requests: noisy with probability noise_prob, else useful.
    `seed`: an int for the call, or one int per request (a request's draw then ignores the others)."""
    if isinstance(seed, list):
        return ["noisy" if random.Random(s).random() < noise_prob else "useful" for s in seed]
    rng = random.Random(seed)
    return ["noisy" if rng.random() < noise_prob else "useful" for _ in range(n)]


def read_documents(tok, texts, kinds, cfg, stats):
    """The simulator's output texts -> per request at most k documents, each cut to doc_tokens.
    Counts each kind, and as malformed an output with fewer than k documents (no `Doc` line, too
    few, empty): what there is is kept, so bad simulator output never stops a training step."""
    results = []
    for kind, text in zip(kinds, texts):
        docs = parse_docs(TAG_RE.sub(" ", text), cfg["topk"])
        stats[kind] += 1
        stats["malformed"] += len(docs) < cfg["topk"]
        results.append([truncate(tok, d, cfg["doc_tokens"]) for d in docs])
    return results


HTTP_CHUNK = 64  # prompts per request; vLLM and SGLang batch a request's list of prompts
SINGLE_POOL = 16  # requests at once to a server that takes one prompt a request
RETRY_BACKOFF = 1.0  # seconds before the second attempt, doubled after each failure


class Refused(SystemExit):
    """A server's HTTP 4xx: the request itself is wrong, so it is not retried (HttpEngine's auto
    batching then tries one prompt a request)."""


class HttpEngine:
    """The simulated search engine served elsewhere (vLLM or SGLang on their own GPUs, as the paper
    serves its 7B/14B simulator): the same draws, prompts and parsing as SimEngine, sent as text to
    an OpenAI-compatible `POST {sim_url}/completions`, HTTP_CHUNK prompts a request, all requests of
    a call at once. A server that takes one prompt a request (`transformers serve`) gets them one by
    one, SINGLE_POOL at a time, each with its own seed: sim_batching=single, or auto once it refuses
    a list. `tok` (the simulator's tokenizer) only cuts documents to doc_tokens."""

    def __init__(self, cfg, tok, served_model, knowledge=None):
        self.cfg, self.tok, self.served_model, self.knowledge = cfg, tok, served_model, knowledge
        self.batching = cfg["sim_batching"]
        self.url = cfg["sim_url"].rstrip("/") + "/completions"
        self.stats = {"useful": 0, "noisy": 0, "malformed": 0}

    def search(self, requests, noise_prob, seed):
        if not requests:
            return []
        requests = with_knowledge(requests, self.knowledge)
        kinds = draw_kinds(len(requests), noise_prob, seed)
        prompts = [sim_prompt(self.cfg, r, kind) for r, kind in zip(requests, kinds)]
        if self.cfg["sim_chat_template"]:  # the completions endpoint takes text: render the chat template here
            prompts = [as_chat(self.tok, p) for p in prompts]
        # the API takes one seed a request: with a seed per request, each chunk sends its first one
        seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
        return read_documents(self.tok, self.complete_all(prompts, seeds), kinds, self.cfg, self.stats)

    def complete_all(self, prompts, seeds):
        """The texts of all prompts, in order: HTTP_CHUNK a request, or one a request."""
        if self.batching != "single":
            starts = range(0, len(prompts), HTTP_CHUNK)
            try:
                with ThreadPoolExecutor(len(starts)) as pool:
                    replies = pool.map(lambda i: self.complete(prompts[i:i + HTTP_CHUNK], seeds[i]), starts)
                    return [text for reply in replies for text in reply]
            except Refused:
                if self.batching != "auto":
                    raise
                self.batching = "single"
        with ThreadPoolExecutor(min(SINGLE_POOL, len(prompts))) as pool:
            return [reply[0] for reply in pool.map(lambda i: self.complete([prompts[i]], seeds[i]), range(len(prompts)))]

    def complete(self, prompts, seed: int):
        """One request for a list of prompts (or, with batching single, the one prompt as a string) ->
        their texts (choices ordered by `index`, or in list order when no choice has one; a choice that
        is missing gives "")."""
        prompt = prompts[0] if self.batching == "single" else prompts
        body = {"model": self.served_model, "prompt": prompt, "max_tokens": self.cfg["sim_max_tokens"],
                "temperature": self.cfg["sim_temperature"], "top_p": 1.0, "seed": seed}

        def texts(reply):
            choices = reply["choices"]
            if not any("index" in choice for choice in choices):  # a server that omits it answers in order
                if len(choices) != len(prompts):
                    raise SystemExit(f"error: search_backend=http: {self.url} returned {len(choices)} choices without "
                                     f"`index` for {len(prompts)} prompts; the server must answer every prompt")
                choices = [dict(choice, index=i) for i, choice in enumerate(choices)]
            texts = [""] * len(prompts)
            for choice in choices:
                if choice.get("index") in range(len(prompts)):
                    texts[choice["index"]] = choice.get("text") or ""
            return texts
        return post_json(self.url, body, self.cfg["sim_timeout"], self.cfg["sim_retries"], texts, "search_backend=http",
                         f"check sim_served_model (sent {self.served_model!r})", "check sim_url and that the server is up")


def post_json(url, body, timeout, attempts, read, what, refused_hint, down_hint):
    """POST `body` as JSON to `url` -> read(the JSON reply). A failure that may pass (refused, timed out,
    cut off, not HTTP, HTTP 5xx, 408 or 429, not JSON, or a reply `read` cannot take) is retried with
    doubling backoff, `attempts` attempts in all, then one clear error; any other HTTP 4xx means the
    request itself is wrong, one clear error at once. The errors name `what` and the URL, and end
    with a hint of what to check."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.load(response)
            return read(reply)
        except urllib.error.HTTPError as e:
            reason = " ".join(f"HTTP {e.code} {e.read()[:200].decode(errors='replace')}".split())  # on one line
            if 400 <= e.code < 500 and e.code not in (408, 429):  # the request itself is wrong: retrying can't help
                raise Refused(f"error: {what}: {url} refused the request: {reason}; {refused_hint}")
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError, AttributeError) as e:
            reason = " ".join(f"{type(e).__name__}: {e}".split())
        if attempt < attempts:
            time.sleep(RETRY_BACKOFF * 2 ** (attempt - 1))
    raise SystemExit(f"error: {what}: {url} failed after {attempts} attempts: {reason}; {down_hint}")


def truncate(tok, text, n_tokens):
    ids = tok.encode(text, add_special_tokens=False)  # a document is mid-sequence text: no BOS
    return text if len(ids) <= n_tokens else tok.decode(ids[:n_tokens])


class RealEngine:
    """The real search engine: BM25 over a local corpus, in the same `Doc i:` form."""

    def __init__(self, retriever, cfg):
        self.retriever, self.k = retriever, cfg["topk"]
        self.stats = {}

    def search(self, requests, noise_prob=0.0, seed=0):
        return [self.retriever.search(r["query"], self.k) for r in requests]


RETRIEVER_CHUNK = 512  # queries per request


class RetrieverEngine:
    """A real search engine served elsewhere, on Search-R1's retrieval-server contract: its server
    over wiki-18 (e5 + faiss, or BM25) or its SerpAPI proxy (Google). All the queries of a call go
    in one `POST retriever_url` {"queries": [...], "topk": k, "return_scores": true} (RETRIEVER_CHUNK
    a request); the reply {"result": [[item, ...], ...]} holds one list per query, in order. Each
    document comes back as `retrieved_document` reads it, at most k a query, cut to doc_tokens of
    `tok` (the policy's tokenizer). A result the engine cannot read is counted in stats["malformed"]
    (what can be read is kept); a reply that is not of this form is one clear error."""

    def __init__(self, cfg, tok):
        self.cfg, self.tok, self.url = cfg, tok, cfg["retriever_url"]
        self.stats = {"malformed": 0}

    def search(self, requests, noise_prob=0.0, seed=0):
        queries = [r["query"] for r in requests]
        results = []
        for start in range(0, len(queries), RETRIEVER_CHUNK):
            chunk = queries[start:start + RETRIEVER_CHUNK]
            results += post_json(self.url, {"queries": chunk, "topk": self.cfg["topk"], "return_scores": True},
                                 self.cfg["retriever_timeout"], self.cfg["retriever_retries"],
                                 lambda reply: self.result_lists(reply, len(chunk)), "retriever",
                                 "check retriever_url (Search-R1's server answers POST /retrieve)",
                                 "check retriever_url and that the server is up")
        out = []
        for items in results:
            docs = [retrieved_document(item) for item in items] if isinstance(items, list) else [None]
            self.stats["malformed"] += None in docs  # a result that is not a list, or holds an item without a document
            kept = [d for d in docs if d is not None][:self.cfg["topk"]]  # the SerpAPI proxy may send more than k
            out.append([truncate(self.tok, d, self.cfg["doc_tokens"]) for d in kept])
        return out

    def result_lists(self, reply, n_queries):
        """The reply's list of results, one per query; a reply of another form is one clear error (not
        retried: the server would answer the same way again)."""
        lists = reply.get("result") if isinstance(reply, dict) else None
        if not isinstance(lists, list):
            raise SystemExit(f"error: retriever: {self.url} answered {json.dumps(reply)[:200]}, not "
                             '{"result": [[document, ...], ...]}; check that retriever_url is a Search-R1 retrieval server\'s /retrieve')
        if len(lists) != n_queries:
            raise SystemExit(f"error: retriever: {self.url} returned {len(lists)} result lists for {n_queries} queries; "
                             "the server must answer every query, in order")
        return lists


def retrieved_document(item):
    """A retrieval server's result item -> the document as the policy reads it, or None if it holds
    none. An item is {"document": doc, "score": s} or the doc itself; a doc is {"contents": ...}
    whose first line is the title (wiki-18 keeps it in double quotes) and the rest the text, or has
    `title` / `text`; `contents` is read first, as Search-R1 reads only that. A titled document is
    written `(Title: <title>) <text>`, which format_docs numbers as Search-R1 does, `Doc i(Title: <title>)
    <text>`; one without a title (one line of contents, or an empty title) is its text alone, the
    in-process BM25's form."""
    doc = item.get("document", item) if isinstance(item, dict) else None
    if not isinstance(doc, dict):
        return None
    contents = doc.get("contents")
    if isinstance(contents, str):
        title, _, text = contents.partition("\n") if "\n" in contents else ("", "", contents)
    else:
        title, text = doc.get("title", ""), doc.get("text", "")
    if not (isinstance(title, str) and isinstance(text, str)) or not (title.strip() or text.strip()):
        return None
    return f"(Title: {title}) {text}" if title.strip() else text


def train_simulator(model, tok, rows, cfg, steps, batch_size, lr, seed=0):
    """Simulation fine-tuning: teach a causal LM to write the labelled documents of each row
    from the control prompt (query, question, answer, useful/noisy). Loss on the documents only."""
    examples = []
    for r in rows:
        request = dict(query=r["query"], question=r["question"], golden_answers=[r["answer"]], evidence=r.get("evidence", []))
        prompt = prompt_ids(tok, sim_prompt(cfg, request, r["label"]), cfg["sim_chat_template"])  # as it is served
        docs = r["documents"] if isinstance(r["documents"], list) else parse_docs(r["documents"], cfg["topk"])
        # the continuation of the prompt: no BOS inside the loss-bearing target
        target = tok.encode(" " + format_docs(docs), add_special_tokens=False) + [tok.eos_token_id]
        examples.append((prompt + target, [0] * len(prompt) + [1] * len(target)))
    return sft(model, examples, steps, batch_size, lr, seed, "simulator fine-tuning", tok.pad_token_id)


# ---------------------------------------------------------------- python sim.py collect ...

COLLECT_DEFAULTS = dict(out="rows.jsonl", n=20000)  # the paper fine-tuned on about 20k rows


def collect(policy, tok, questions, engine, cfg, n, seed=0):
    """Simulation fine-tuning rows the paper's way: the policy answers `questions` searching the real
    `engine` (sampled, one batch at a time); every (query, documents) of a trajectory whose answer is
    right (substring EM, the paper's EM) is labelled useful, of one whose answer is wrong noisy; the
    two labels are balanced, n rows in all at most, in the form `python sim.py train` reads."""
    rng, useful, noisy = random.Random(seed), [], []
    order = rng.sample(range(len(questions)), len(questions))
    for start in range(0, len(order), 128):
        batch = [questions[i] for i in order[start:start + 128]]
        ro = rollout(policy, tok, batch, engine, cfg, seeds=[seed * 1_000_003 + start + j for j in range(len(batch))])
        for q, answer, queries, docs in zip(batch, ro.answers, ro.queries, ro.documents):
            right = reward.substring_match(answer, q["golden_answers"])
            rows = [dict(query=query, question=q["question"], answer=q["golden_answers"][0], documents=d,
                         label="useful" if right else "noisy") for query, d in zip(queries, docs) if d]
            (useful if right else noisy).extend(rows)
        if min(len(useful), len(noisy)) >= n // 2:
            break
    keep = min(len(useful), len(noisy), n // 2)
    rows = rng.sample(useful, keep) + rng.sample(noisy, keep)
    rng.shuffle(rows)
    return rows, len(useful), len(noisy)


# ---------------------------------------------------------------- python sim.py train ...

SIM_ROW_KEYS = ("query", "question", "answer", "documents", "label")
TRAIN_DEFAULTS = dict(data=None, model=None, out="simulator", steps=1000, batch_size=2, lr=1e-6, seed=0)  # the paper's SFT


def read_simulator_rows(path):
    """Simulation fine-tuning rows from a JSONL file (the form is in the module docstring); a row
    a user got wrong is one clear line naming it."""
    if not os.path.exists(path):
        raise SystemExit(f"error: data file not found: {path}")
    rows = []
    for n, row in world.read_jsonl(path):
        docs = row.get("documents")
        texts = ("query", "question", "answer")
        if (any(k not in row for k in SIM_ROW_KEYS) or row["label"] not in ("useful", "noisy")
                or not all(isinstance(row[k], str) and row[k].strip() for k in texts)
                or not (isinstance(docs, list) and docs and all(isinstance(d, str) and d.strip() for d in docs)
                        or isinstance(docs, str) and parse_docs(docs, 20))):
            raise SystemExit(f"error: {path} line {n}: a row needs {', '.join(SIM_ROW_KEYS)}: query, question and "
                             "answer as non-empty strings, label useful or noisy, and documents as a list of "
                             "strings or one 'Doc 1: ... Doc 2: ...' string")
        rows.append(row)
    if not rows:
        raise SystemExit(f"error: {path} holds no rows")
    return rows


def own_arguments(argv, defaults):
    """-> (the command's own key=value arguments over `defaults`, the rest: config arguments)."""
    args, config_args = dict(defaults), []
    it = iter(argv)
    for arg in it:
        key, eq, value = arg.partition("=")
        if eq and key in args:
            args[key] = value
        else:
            config_args += [arg, next(it, "")] if arg == "--config" else [arg]
    return args, config_args


def train_main(argv):
    """`python sim.py train data=rows.jsonl model=NAME_OR_DIR [out=DIR steps=N batch_size=N lr=X seed=N]
    [preset=NAME --config FILE key=value ...]`: the arguments of TRAIN_DEFAULTS are the fine-tuning's
    own; the rest choose the config (its `topk` and control prompt) exactly as for zerosearch.py."""
    args, config_args = own_arguments(argv, TRAIN_DEFAULTS)
    cfg = config.load_config(config_args)
    for key in ("steps", "batch_size", "lr", "seed"):
        kind, text = type(TRAIN_DEFAULTS[key]), args[key]
        try:
            args[key] = kind(text)
            ok = key == "seed" or args[key] > 0
        except ValueError:
            ok = False
        if not ok:
            what = ("an" if key == "seed" else "a positive") + (" integer" if kind is int else " number")
            raise SystemExit(f"error: sim.py train: {key}={text}: set {key} to {what} (default {TRAIN_DEFAULTS[key]})")
    if not args["data"] or not args["model"]:
        raise SystemExit("error: sim.py train needs data=rows.jsonl and model=... (a Hugging Face name, or a "
                         "directory holding a model and its tokenizer)")
    rows = read_simulator_rows(args["data"])
    config.check_folder(args["out"], "out", keep=False)
    try:
        tok = world.load_tokenizer(args["model"])
        model = AutoModelForCausalLM.from_pretrained(args["model"])
    except OSError as e:
        raise SystemExit(f"error: cannot load model {args['model']!r}: {str(e).splitlines()[0]}")
    if tok.eos_token_id is None:
        raise SystemExit(f"error: the tokenizer of {args['model']!r} has no EOS token to end the documents with")
    if tok.pad_token is None:  # padding is masked out of the loss; any id will do
        tok.pad_token = tok.eos_token
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args["seed"])
    loss = train_simulator(model, tok, rows, cfg, args["steps"], args["batch_size"], args["lr"], args["seed"])
    model.save_pretrained(args["out"])
    tok.save_pretrained(args["out"])
    print(f"simulator fine-tuned on {len(rows)} rows ({args['steps']} steps, last loss {loss:.3f}), saved to {args['out']}")


def collect_main(argv):
    """`python sim.py collect policy_model=NAME_OR_DIR data=train.jsonl corpus=corpus.jsonl out=rows.jsonl
    n=N [any config key=value]` (or eval_backend=retriever retriever_url=... for a served engine; with
    data=world, the embedded world's train questions and BM25)."""
    args, config_args = own_arguments(argv, COLLECT_DEFAULTS)
    cfg = config.load_config(config_args)
    try:
        n = int(args["n"])
    except ValueError:
        n = 0
    if n < 2:
        raise SystemExit(f"error: sim.py collect: n={args['n']}: set n to the number of rows wanted, 2 or more")
    if not cfg["policy_model"]:
        raise SystemExit("error: sim.py collect needs policy_model=... (the paper used an instruct model, prompted; "
                         "on the embedded world, its warm-up policy out_dir/build/<hash>/warmup)")
    config.check_folder(os.path.dirname(os.path.abspath(args["out"])), "out")
    if cfg["data"] == "world":
        w = world.build_world(cfg["world_seed"], cfg["world_persons"], cfg["world_companies"])
        questions, docs = w.train, w.docs
    else:
        questions = world.load_questions(cfg["data"])
        docs = world.load_corpus(cfg["corpus"]) if cfg["eval_backend"] == "real" and cfg["corpus"] else None
    try:
        tok = world.load_tokenizer(cfg["policy_model"])
        model = AutoModelForCausalLM.from_pretrained(cfg["policy_model"]).eval()
    except OSError as e:
        raise SystemExit(f"error: cannot load policy_model {cfg['policy_model']!r}: {str(e).splitlines()[0]}")
    if cfg["eval_backend"] == "retriever":
        engine = RetrieverEngine(cfg, tok)
    elif docs is None:
        raise SystemExit("error: sim.py collect searches a real engine: set corpus=corpus.jsonl, or "
                         "eval_backend=retriever retriever_url=... (a served one)")
    else:
        engine = RealEngine(Retriever(docs), cfg)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    rows, n_useful, n_noisy = collect(model, tok, questions, engine, cfg, n, cfg["seed"])
    with open(args["out"], "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"{len(rows)} rows ({len(rows) // 2} useful, {len(rows) // 2} noisy; collected {n_useful} useful and "
          f"{n_noisy} noisy) written to {args['out']}")


def main(argv):
    commands = {"train": train_main, "collect": collect_main}
    if not argv or argv[0] not in commands:
        raise SystemExit("usage: python sim.py train data=rows.jsonl model=NAME_OR_DIR [out=DIR steps=N batch_size=N "
                         "lr=X seed=N] [config key=value ...]\n   or: python sim.py collect policy_model=NAME_OR_DIR "
                         "data=train.jsonl corpus=corpus.jsonl out=rows.jsonl n=N [config key=value ...]")
    commands[argv[0]](argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
