"""Sampling with a KV cache for the policy rollouts and for the simulator.

`sample` is the one hand-written sampler: a left-padded prefill in one forward, then a decode
loop that feeds one token per row through a transformers `DynamicCache`. Rows that hit EOS or a
stop string are dropped from the batch and from the cache, so finished rows cost nothing more.
It works with any Hugging Face causal LM; test_sampler.py checks it against `model.generate`
and against an uncached forward, bench_sampler.py measures it against `model.generate`.
"""
import functools
import random
import re

import numpy as np

import torch
from transformers import DynamicCache


# ---------------------------------------------------------------- sampler

def prefill(model, prompts, max_new_tokens: int):
    """Left-pad `prompts` and run them in one forward -> (logits at the last position [B, V],
    cache, attention mask [B, P + max_new_tokens] with room for the new tokens, next positions [B, 1])."""
    P = max(len(p) for p in prompts)
    input_ids = torch.tensor([[0] * (P - len(p)) + list(p) for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * (len(p) + max_new_tokens) for p in prompts],
                        device=model.device)
    position_ids = (mask[:, :P].cumsum(-1) - 1).clamp(min=0)  # left padding: first real token at 0
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=input_ids, attention_mask=mask[:, :P], position_ids=position_ids,
                   cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    return logits, cache, mask, position_ids[:, -1:] + 1


def decode_one(model, tokens, mask, position_ids, cache):
    """tokens [b] at position_ids [b, 1]; mask [b, L] covers the cache and the new token -> logits [b, V]."""
    return model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position_ids,
                 cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


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
    stop string, or after max_new_tokens. temperature=0 is greedy."""
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
    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        logits, cache, mask, position_ids = prefill(model, prompts, max_new_tokens)
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
            uniform = 1 - torch.rand(B, generator=generator, device=device)[rows]
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
            logits = decode_one(model, tokens, mask[:, :P + t + 1], position_ids, cache)
            position_ids = position_ids + 1
    finally:
        model.train(was_training)
    tokens = [out_tokens[i, :n].tolist() for i, n in enumerate(lengths)]
    logprobs = [out_logp[i, :n].tolist() for i, n in enumerate(lengths)]
    return tokens, logprobs


# ---------------------------------------------------------------- search engines and simulator fine-tuning


def format_docs(docs):
    """The engine's output form (Search-R1/ZeroSearch): one `Doc i: text` per document."""
    return " ".join(f"Doc {i + 1}: {d}" for i, d in enumerate(docs))


def parse_docs(text, k):
    """Split a simulator's `Doc 1: ... Doc 2: ...` text into at most k non-empty documents
    (the paper cuts the text before `Doc {k+1}`). Returns [] when there is no `Doc` line."""
    parts = re.split(r"Doc\s*\d+\s*:", text)
    return [p.strip() for p in parts[1:] if p.strip()][:k]


def _words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


class Retriever:
    """BM25 (k1=0.9, b=0.4, Pyserini's defaults) over a list of documents, in numpy: the
    "real search engine" that evaluation uses and the Search-R1 baseline trains against."""

    def __init__(self, docs, k1=0.9, b=0.4):
        self.docs, self.k1, self.b = docs, k1, b
        postings = {}
        lengths = np.zeros(len(docs), dtype=np.float32)
        for i, d in enumerate(docs):
            words = _words(d)
            lengths[i] = len(words)
            for w in set(words):
                postings.setdefault(w, []).append((i, words.count(w)))
        self.norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1.0))  # k1 (1 - b + b |d| / avgdl)
        self.index = {w: (np.array([i for i, _ in p]), np.array([tf for _, tf in p], dtype=np.float32),
                          np.log(1 + (len(docs) - len(p) + 0.5) / (len(p) + 0.5)))  # idf
                      for w, p in postings.items()}

    def search(self, query, k):
        """Top-k documents for one query (ties broken by corpus order)."""
        scores = np.zeros(len(self.docs), dtype=np.float32)
        for w in set(_words(query)):
            if w in self.index:
                ids, tf, idf = self.index[w]
                scores[ids] += idf * tf * (self.k1 + 1) / (tf + self.norm[ids])
        top = np.argsort(-scores, kind="stable")[:k]
        return [self.docs[i] for i in top if scores[i] > 0]


def sft(model, examples, steps, batch_size, lr, seed=0, desc="sft", pad_id=0):
    """Supervised fine-tuning of a causal LM on (token ids, loss mask) examples: AdamW, linear
    warm-up then cosine decay to 10%, next-token cross-entropy on the masked-in tokens only.
    Used for the simulator's fine-tuning and for the tiny policy's format warm-up."""
    import math
    import torch
    from tqdm import tqdm
    rng, device = random.Random(seed), next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    bar = tqdm(range(steps), desc=desc)
    for _ in bar:
        batch = rng.sample(examples, min(batch_size, len(examples)))
        T = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), T), -100, dtype=torch.long)
        for b, (x, m) in enumerate(batch):
            ids[b, :len(x)] = torch.tensor(x)
            labels[b, :len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(x), -100)
        attn = (torch.arange(T)[None] < torch.tensor([len(x) for x, _ in batch])[:, None]).long()
        loss = model(input_ids=ids.to(device), attention_mask=attn.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return loss.item()


TAG_RE = re.compile(r"</?(think|search|information|answer)>")


def sim_prompt(template, request, kind, k):
    """The simulator's control prompt for one request: the query, the user's question and gold
    answer, and useful/noisy (the only word that changes between the two)."""
    return template.format(k=k, kind=kind, Kind=kind.capitalize(), question=request["question"],
                           answer=request["golden_answers"][0], evidence=" ".join(request.get("evidence", [])),
                           query=request["query"])


class SimEngine:
    """ZeroSearch's simulated search engine: an LLM writes the top-k documents for each query,
    useful or noisy as the curriculum draws per call. All the requests of a turn, across the
    whole batch, are sampled together in one `sample` call with a KV cache."""

    def __init__(self, path, cfg, device="cpu"):
        from transformers import AutoModelForCausalLM
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        import world
        self.tok, self.cfg = world.load_tokenizer(path), cfg
        self.template = cfg[f"sim_template_{cfg['sim_style']}"]
        self.stats = {"useful": 0, "noisy": 0, "malformed": 0}

    def search(self, requests, noise_prob, seed):
        rng, k = random.Random(seed), self.cfg["topk"]
        kinds = ["noisy" if rng.random() < noise_prob else "useful" for _ in requests]
        prompts = [self.tok.encode(sim_prompt(self.template, r, kind, k)) for r, kind in zip(requests, kinds)]
        outs, _ = sample(self.model, prompts, self.cfg["sim_max_tokens"], temperature=self.cfg["sim_temperature"],
                         eos_token_id=self.tok.eos_token_id, seed=seed)
        results = []
        for kind, out in zip(kinds, outs):
            docs = parse_docs(TAG_RE.sub(" ", self.tok.decode(out, skip_special_tokens=True)), k)
            self.stats[kind] += 1
            self.stats["malformed"] += len(docs) < k  # no Doc lines, or fewer than k: keep what there is
            results.append([truncate(self.tok, d, self.cfg["doc_tokens"]) for d in docs])
        return results


def truncate(tok, text, n_tokens):
    ids = tok.encode(text)
    return text if len(ids) <= n_tokens else tok.decode(ids[:n_tokens])


class RealEngine:
    """The real search engine: BM25 over a local corpus, in the same `Doc i:` form."""

    def __init__(self, retriever, cfg):
        self.retriever, self.k = retriever, cfg["topk"]
        self.stats = {}

    def search(self, requests, noise_prob=0.0, seed=0):
        return [self.retriever.search(r["query"], self.k) for r in requests]


def train_simulator(model, tok, rows, cfg, steps, batch_size, lr, seed=0):
    """Simulation fine-tuning: teach a causal LM to write the labelled documents of each row
    from the control prompt (query, question, answer, useful/noisy). Loss on the documents only."""
    template = cfg[f"sim_template_{cfg['sim_style']}"]
    examples = []
    for r in rows:
        request = dict(query=r["query"], question=r["question"], golden_answers=[r["answer"]], evidence=r.get("evidence", []))
        prompt = tok.encode(sim_prompt(template, request, r["label"], cfg["topk"]))
        docs = r["documents"] if isinstance(r["documents"], list) else parse_docs(r["documents"], cfg["topk"])
        target = tok.encode(" " + format_docs(docs)) + [tok.eos_token_id]
        examples.append((prompt + target, [0] * len(prompt) + [1] * len(target)))
    return sft(model, examples, steps, batch_size, lr, seed, "simulator fine-tuning", tok.pad_token_id)
