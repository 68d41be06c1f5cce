import random
import re
import numpy as np


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
    import math, random as _random
    import torch
    from tqdm import tqdm
    rng, device = _random.Random(seed), next(model.parameters()).device
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
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.tok, self.cfg = AutoTokenizer.from_pretrained(path), cfg
        self.template = cfg[f"sim_template_{cfg['sim_style']}"]
        self.stats = {"useful": 0, "noisy": 0, "malformed": 0}

    def search(self, requests, noise_prob, seed):
        from sim import sample
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
