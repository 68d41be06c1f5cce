"""The simulated search engine of ZeroSearch, its fine-tuning, and the sampler that runs it and the policy.

The simulator: `sim_prompt` is its control prompt (query, the user's question and gold answer, useful
or noisy), `SimEngine` samples the top-k documents for every query of a turn in one batch, each call
useful or noisy as the curriculum draws (`draw_kinds`), and `read_documents` turns its text into
documents. `train_simulator` fine-tunes it on labelled rows with `sft`, which also warms up the tiny
policy. The real engines (BM25, Search-R1's retrieval server) and the served simulator are in engines.py.

The sampler: `sample` left-pads the prompts, prefills them (`prefill`) and decodes one token a row at a
time through a transformers cache (`decode_one`: the model's own forward); rows that hit EOS or a stop
string leave the batch and the cache. Its fast paths, last in this file: the cache's full-attention
layers preallocated for the whole call (`PreallocatedLayer`), and a decode step of a Llama-family model
written out from its own modules (`lean_decode_one`). tests/test_sampler.py checks both against
`model.generate` and an uncached forward; `python tools/bench.py sampler` measures them.
"""
import functools
import inspect
import math
import random
import re

import torch
from torch.distributed.tensor import DTensor
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import packing
import ppo


# ---------------------------------------------------------------- the simulator


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
        return read_documents(self.tok, texts, kinds, self.cfg, self.stats, seed if self.knowledge else None)


def with_knowledge(requests, knowledge):
    """Each request with the simulator's knowledge of what its query names, as `evidence` (the
    {evidence} slot of the prompt), when the engine has a `knowledge(query, answers) -> [statements]`
    function: the embedded world's tiny simulator reads there what a large one has memorised."""
    return [dict(r, evidence=knowledge(r["query"], r["golden_answers"])) for r in requests] if knowledge else requests


def draw_kinds(n, noise_prob, seed):
    """The curriculum's draw for each of n requests: noisy with probability noise_prob, else useful.
    `seed`: an int for the call, or one int per request (a request's draw then ignores the others)."""
    if isinstance(seed, list):
        return ["noisy" if random.Random(s).random() < noise_prob else "useful" for s in seed]
    rng = random.Random(seed)
    return ["noisy" if rng.random() < noise_prob else "useful" for _ in range(n)]


def read_documents(tok, texts, kinds, cfg, stats, seed=None):
    """The simulator's output texts -> per request at most k documents, each cut to doc_tokens. With a
    `seed` (as draw_kinds'), in a random order: the embedded world's simulator writes them in its
    knowledge's order, the one that states the answer first, and the policy reads a result list whole.
    Counts each kind, and as malformed an output with fewer than k documents (no `Doc` line, too few,
    empty): what there is is kept, so bad simulator output never stops a training step."""
    order = random.Random(f"order {seed}")
    results = []
    for i, (kind, text) in enumerate(zip(kinds, texts)):
        docs = [truncate(tok, d, cfg["doc_tokens"]) for d in parse_docs(TAG_RE.sub(" ", text), cfg["topk"])]
        stats[kind] += 1
        stats["malformed"] += len(docs) < cfg["topk"]
        if seed is not None:
            docs = (random.Random(f"order {seed[i]}") if isinstance(seed, list) else order).sample(docs, len(docs))
        results.append(docs)
    return results


def truncate(tok, text, n_tokens):
    """`text` cut to n_tokens tokens; only its first 64 characters a token are tokenized (a token is
    rarely longer), so a document of megabytes costs no more than a short one."""
    ids = tok.encode(text[:64 * n_tokens], add_special_tokens=False)  # a document is mid-sequence text: no BOS
    return text if len(ids) <= n_tokens and len(text) <= 64 * n_tokens else tok.decode(ids[:n_tokens])


# ---------------------------------------------------------------- its fine-tuning (and the policy's warm-up)


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
    for rows in packing.by_length(attention_mask, torch.arange(len(trained), device=trained.device), micro_batch_size):
        logp, _ = actor(input_ids[rows], attention_mask[rows], positions=trained[rows])  # 0 off the trained tokens
        micro_loss = -logp.sum() / n_trained  # its share of the batch's token mean
        micro_loss.backward()
        loss += micro_loss.item()
    return loss


# ---------------------------------------------------------------- the sampler: the plain path


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


def prefill(model, prompts, max_new_tokens: int, groups: int = 4):
    """Fill the cache for `prompts`, left-padded to one length P -> (logits at the last position [B, V],
    cache, attention mask [B, P + max_new_tokens] with room for the new tokens, next positions [B, 1]).
    Rows run in up to `groups` forwards of similar length, so a short prompt does not pay for the
    longest one's padding; each group's keys and
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


# ---------------------------------------------------------------- the sampler's fast paths: a preallocated cache, a lean decode step


@functools.lru_cache(maxsize=None)
def cache_keyword(model_class) -> str:
    """The forward's name for the KV cache: `cache` in newer transformers (5.24; `past_key_values` is
    deprecated there), `past_key_values` in older ones (5.17), where an unknown `cache=` is silently
    ignored and the model fills a cache of its own."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class PreallocatedLayer(DynamicLayer):
    """One attention layer's KV cache in buffers [B, H, capacity, D] sized for the whole call, so a
    decode step writes its key and value in place where DynamicLayer `torch.cat`s the whole cache
    again, a cost that grows with the cache. keys/values are views
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
        # batched matmuls, not SDPA, whose CPU kernel is tuned for long queries
        scores = q.reshape(b, keys.shape[1], -1, attn.head_dim) @ keys.transpose(-1, -2)  # [b, kv_heads, group, L]
        weights = (scores * attn.scaling + bias).softmax(-1, dtype=torch.float32).to(values.dtype)
        x = x + attn.o_proj((weights @ values).reshape(b, 1, -1))            # heads in order kv_head * group + g
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(m.norm(x))[:, -1]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)

