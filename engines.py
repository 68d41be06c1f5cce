"""The real search engines and the served simulator, all with `.search(requests, noise_prob, seed) ->
documents per request` and `.stats`, as sim.SimEngine:
  RealEngine       search_backend=real: BM25 over a local corpus (`Retriever`, in numpy).
  RetrieverEngine  search_backend=retriever: a real engine served on Search-R1's retrieval-server
                   contract (its e5 or BM25 server over wiki-18, or its SerpAPI proxy) at retriever_url.
  HttpEngine       search_backend=http: the simulator's prompts sent to a served simulator (vLLM, SGLang)
                   at `POST {sim_url}/completions`; sim_served_model names the model the server expects.
The real engine of evaluation (and of the baseline=true run) is `eval_backend`: real or retriever.
"""
import array
import collections
import http.client
import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from tqdm import tqdm

from sim import as_chat, draw_kinds, read_documents, sim_prompt, truncate, with_knowledge


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
        self.postings = keys % n  # int64: numpy indexes with it without a conversion, faster than int32
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
    `np.argsort(-scores, kind="stable")[:k]` of the positive ones without a sort. Partial selection finds
    the k-th highest; every score above it is in, and of those equal to it the first ones. It runs on the
    positive scores alone: most documents share no word with a query, and numpy's selection slows down
    among that many equal zeros (docs/performance.md)."""
    top = np.flatnonzero(scores > 0)
    if len(top) > k:
        found = scores[top]
        kth = np.partition(found, len(found) - k)[len(found) - k]
        above = found > kth
        top = np.concatenate([top[above], top[found == kth][:k - np.count_nonzero(above)]])
    return top[np.lexsort((top, -scores[top]))]


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
        texts = self.complete_all(prompts, seed if isinstance(seed, list) else [seed] * len(prompts))
        if 2 * sum(not text for text in texts) > len(texts):  # the server is not serving a simulator: never train on it
            cause = "choices without `text`" if None in texts else "empty completions"
            raise SystemExit(f"error: search_backend=http: {self.url} sent {cause} for {sum(not t for t in texts)} of "
                             f"{len(texts)} prompts; check that sim_served_model is a simulator the server completes text with")
        return read_documents(self.tok, [text or "" for text in texts], kinds, self.cfg, self.stats,
                              seed if self.knowledge else None)

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
        is missing gives "", one without a `text` string None)."""
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
                    texts[choice["index"]] = choice["text"] if isinstance(choice.get("text"), str) else None
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
                return read(json.load(response))
        except urllib.error.HTTPError as e:
            reason = " ".join(f"HTTP {e.code} {e.read()[:200].decode(errors='replace')}".split())  # on one line
            if 400 <= e.code < 500 and e.code not in (408, 429):  # the request itself is wrong: retrying can't help
                raise Refused(f"error: {what}: {url} refused the request: {reason}; {refused_hint}")
        except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError, AttributeError) as e:
            reason = " ".join(f"{type(e).__name__}: {e}".split())
        if attempt < attempts:
            time.sleep(RETRY_BACKOFF * 2 ** (attempt - 1))
    raise SystemExit(f"error: {what}: {url} failed after {attempts} attempts: {reason}; {down_hint}")


class RealEngine:
    """The real search engine: BM25 over a local corpus, in the same `Doc i:` form, each document cut to
    doc_tokens of `tok` (the policy's tokenizer; without one, as bench.py times the search alone, whole)."""

    def __init__(self, retriever, cfg, tok=None):
        self.retriever, self.cfg, self.tok, self.stats = retriever, cfg, tok, {}

    def search(self, requests, noise_prob=0.0, seed=0):
        return [[truncate(self.tok, d, self.cfg["doc_tokens"]) if self.tok else d
                 for d in self.retriever.search(r["query"], self.cfg["topk"])] for r in requests]


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
        self.cfg, self.tok, self.url, self.stats = cfg, tok, cfg["retriever_url"], {"malformed": 0}

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
        found = [[retrieved_document(item) for item in items] if isinstance(items, list) else [None] for items in results]
        self.stats["malformed"] += sum(None in docs for docs in found)  # a result not a list, or an item without a document
        kept = [[d for d in docs if d is not None][:self.cfg["topk"]] for docs in found]  # the SerpAPI proxy may send more
        return [[truncate(self.tok, d, self.cfg["doc_tokens"]) for d in docs] for docs in kept]

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
