"""The real engines: the in-process BM25 (`engines.Retriever`) against a plain per-document
implementation of the same formula, and the retriever engine (`search_backend=retriever`,
`eval_backend=retriever`) against a loopback HTTP server started here that speaks Search-R1's
retrieval-server contract over the embedded world's corpus with that in-process BM25."""
import json
import os
import random
import socket
import time

import numpy as np
import pytest
import torch

import build
import config
import engines
import sim
import test_sim
import world
import zerosearch


def plain_bm25(docs, k1=0.9, b=0.4):
    """BM25 the straightforward way, the oracle: a dict of postings built document by document; per
    query one score array and a stable sort of all of it."""
    postings, lengths = {}, np.zeros(len(docs), dtype=np.float32)
    for i, d in enumerate(docs):
        words = engines._words(d)
        lengths[i] = len(words)
        for w in set(words):
            postings.setdefault(w, []).append((i, words.count(w)))
    norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1.0))
    index = {w: (np.array([i for i, _ in p]), np.array([tf for _, tf in p], dtype=np.float32),
                 np.log(1 + (len(docs) - len(p) + 0.5) / (len(p) + 0.5))) for w, p in postings.items()}

    def search(query, k):
        scores = np.zeros(len(docs), dtype=np.float32)
        for w in dict.fromkeys(engines._words(query)):
            if w in index:
                ids, tf, idf = index[w]
                scores[ids] += idf * tf * (k1 + 1) / (tf + norm[ids])
        top = np.argsort(-scores, kind="stable")[:k]
        return [docs[i] for i in top if scores[i] > 0]
    return search


@pytest.fixture(scope="module")
def world_docs():
    return world.build_world().docs


def test_the_index_gives_the_plain_algorithms_results_ties_included(world_docs):
    # the world's sentences tie often ("born" scores every birth sentence of a length alike); repeated,
    # punctuated and empty documents too
    docs = world_docs + ["born born born in in", "Born, born!", "", "1901 1901"] + world_docs[:50]
    new, plain = engines.Retriever(docs), plain_bm25(docs)  # BM25 the straightforward way: the oracle
    assert new.dense  # the frequent words ("was", "born", ...) take the dense path, the others the postings
    words = sorted({w for d in docs for w in d.split()}) + ["unknown", "BORN", "1901,"]
    rng = random.Random(0)
    for _ in range(1500):
        query = " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))
        k = rng.choice([1, 3, 5, 40, len(docs) + 3])
        assert new.search(query, k) == plain(query, k), (query, k)
    assert new.search("born", 3) == plain("born", 3) and len(new.search("born", 3)) == 3
    assert new.search("nothing matches", 3) == []


def test_top_k_is_the_stable_sort_of_the_positive_scores():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 60))
        scores = rng.integers(0, 4, n).astype(np.float32) / 2  # many ties, zeros among them
        k = int(rng.integers(1, n + 3))
        expected = [i for i in np.argsort(-scores, kind="stable")[:k] if scores[i] > 0]
        assert engines.top_k(scores, k).tolist() == expected


# ---------------------------------------------------------------- a loopback retrieval server

def serve(respond):
    """The loopback server of test_sim.py on POST /retrieve; yields (its /retrieve URL, request bodies)."""
    return test_sim.serve(respond, path="/retrieve", url_path="/retrieve")


def bm25_server(docs, form):
    """What Search-R1's retrieval server does with a request, over `docs` with the in-process BM25:
    the top-k rows of each query, as its dense index writes them ({"id", "contents"}) or as its BM25
    index does ({"title", "text", "contents"}: the first line of contents, without quotes, and the
    rest), each {"document": row, "score": s} when scores are asked for, the bare row when not."""
    retriever = engines.Retriever(docs)

    def row(i):
        if form == "dense":
            return {"id": str(i), "contents": docs[i]}
        title, _, text = docs[i].partition("\n")
        return {"title": title.strip('"'), "text": text, "contents": docs[i]}

    def respond(body):
        result = []
        for query in body["queries"]:
            scores = retriever.scores(query)
            top = engines.top_k(scores, body["topk"])
            result.append([{"document": row(i), "score": float(scores[i])} if body["return_scores"] else row(i)
                           for i in top])
        return 200, {"result": result}
    return respond


class WordTok:
    """A tokenizer of one token a word, so that a cut to doc_tokens is easy to read."""

    def encode(self, text, add_special_tokens=True):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


CFG = dict(topk=3, doc_tokens=40, retriever_timeout=5.0, retriever_retries=3)


@pytest.mark.parametrize("form", ["dense", "bm25"])
@pytest.mark.parametrize("scores", [True, False])
def test_the_served_bm25_gives_the_documents_of_the_in_process_one(world_docs, form, scores, monkeypatch):
    monkeypatch.setattr(engines, "RETRIEVER_CHUNK", 4)  # 10 queries -> requests of 4, 4 and 2
    respond = bm25_server(world_docs, form)
    serve_as_asked = respond if scores else (lambda body: respond(dict(body, return_scores=False)))
    questions = world.build_world().test[:8]
    requests = [dict(q, query=q["question"]) for q in questions] + [dict(query="born"), dict(query="no such words")]
    with serve(serve_as_asked) as (url, bodies):
        engine = engines.RetrieverEngine(dict(CFG, retriever_url=url), WordTok())
        docs = engine.search(requests, 0.0, 0)
    real = engines.RealEngine(engines.Retriever(world_docs), CFG)
    assert docs == real.search(requests) and docs[-1] == [] and all(len(d) == 3 for d in docs[:-1])
    assert [len(b["queries"]) for b in bodies] == [4, 4, 2]
    assert all(b["topk"] == 3 and b["return_scores"] is True for b in bodies)
    assert engine.stats == {"malformed": 0}


def test_titled_documents_reach_the_policy_as_search_r1_writes_them(monkeypatch):
    passage = '"Paris"\nParis is the capital and most populous city of France .'
    items = [{"document": {"id": "7", "contents": passage}, "score": 90.1},  # wiki-18 through the dense index
             {"title": "Paris", "text": "Paris is the capital and most populous city of France .", "contents": passage},
             {"document": {"title": "Lyon", "text": "Lyon is a city ."}},  # title and text only
             {"document": {"contents": "One line , no title ."}}]
    with serve(lambda body: (200, {"result": [items]})) as (url, _):
        docs = engines.RetrieverEngine(dict(CFG, topk=4, retriever_url=url), WordTok()).search([dict(query="paris")])
    assert sim.information(docs[0]) == (
        '\n\n<information>Doc 1(Title: "Paris") Paris is the capital and most populous city of France .\n'
        'Doc 2(Title: "Paris") Paris is the capital and most populous city of France .\n'
        "Doc 3(Title: Lyon) Lyon is a city .\n"
        "Doc 4: One line , no title .</information>\n\n")
    with serve(lambda body: (200, {"result": [items]})) as (url, _):  # cut to k, and each to doc_tokens
        docs = engines.RetrieverEngine(dict(CFG, topk=2, doc_tokens=4, retriever_url=url), WordTok()).search([dict(query="paris")])
    assert docs == [['(Title: "Paris") Paris is', '(Title: "Paris") Paris is']]


def test_results_it_cannot_read_are_counted_malformed_and_the_rest_kept():
    good = {"document": {"contents": "a b c"}, "score": 1.0}
    result = [[good, {"score": 2.0}, "a string"], None, [{"document": {"contents": 5}}], [], [good]]
    with serve(lambda body: (200, {"result": result})) as (url, _):
        engine = engines.RetrieverEngine(dict(CFG, retriever_url=url), WordTok())
        docs = engine.search([dict(query=f"q{i}") for i in range(5)])
    assert docs == [["a b c"], [], [], [], ["a b c"]]
    assert engine.stats == {"malformed": 3}  # an empty list is a query without hits, not malformed


@pytest.mark.parametrize("reply, message", [
    ({"results": []}, r'answered \{"results": \[\]\}, not \{"result": .*retrieval server\'s /retrieve'),
    ({"result": "Doc 1"}, r"answered .*, not \{\"result\""),
    ([[]], r"answered \[\[\]\], not"),
    ({"result": [[]]}, "returned 1 result lists for 2 queries; the server must answer every query"),
])
def test_a_reply_of_the_wrong_shape_is_one_clear_error_and_not_retried(reply, message):
    with serve(lambda body: (200, reply)) as (url, bodies):
        with pytest.raises(SystemExit, match=r"error: retriever: http://127\.0\.0\.1:\d+/retrieve " + message):
            engines.RetrieverEngine(dict(CFG, retriever_url=url), WordTok()).search([dict(query="a"), dict(query="b")])
    assert len(bodies) == 1


@pytest.mark.parametrize("status, reply, reason", [
    (200, b"<html>not json</html>", "JSONDecodeError"),
    (500, {"detail": "Internal Server Error"}, "HTTP 500 .*Internal Server Error"),
])
def test_a_reply_that_may_pass_is_retried_then_one_clear_error_naming_the_url(monkeypatch, status, reply, reason):
    monkeypatch.setattr(engines, "RETRY_BACKOFF", 0.01)
    with serve(lambda body: (status, reply)) as (url, bodies):
        start = time.perf_counter()
        with pytest.raises(SystemExit, match=f"error: retriever: {url} failed after 3 attempts: {reason}.*"
                                             "check retriever_url and that the server is up"):
            engines.RetrieverEngine(dict(CFG, retriever_url=url), WordTok()).search([dict(query="a")])
        assert time.perf_counter() - start < 2
    assert len(bodies) == 3


def test_a_wrong_path_is_refused_at_once():
    with serve(lambda body: (200, {"result": [[]]})) as (url, bodies):
        with pytest.raises(SystemExit, match=r"/search refused the request: HTTP 404.*check retriever_url"):
            engines.RetrieverEngine(dict(CFG, retriever_url=url.replace("/retrieve", "/search")), WordTok()).search([dict(query="a")])
    assert len(bodies) == 1


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_server_at_the_url_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(engines, "RETRY_BACKOFF", 0.01)
    url = f"http://127.0.0.1:{free_port()}/retrieve"
    with pytest.raises(SystemExit, match=f"error: retriever: {url} failed after 2 attempts: .*refused.*check retriever_url"):
        engines.RetrieverEngine(dict(CFG, retriever_url=url, retriever_retries=2), WordTok()).search([dict(query="a")])


def test_a_server_that_never_answers_times_out_on_every_attempt(monkeypatch):
    monkeypatch.setattr(engines, "RETRY_BACKOFF", 0.01)
    with socket.socket() as listener:  # accepts connections (the kernel does) and never reads or answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/retrieve"
        engine = engines.RetrieverEngine(dict(CFG, retriever_url=url, retriever_timeout=0.2, retriever_retries=2), WordTok())
        start = time.perf_counter()
        with pytest.raises(SystemExit, match="failed after 2 attempts: .*timed out"):
            engine.search([dict(query="a")])
        assert time.perf_counter() - start < 1.5


# ---------------------------------------------------------------- the config and the whole run

def test_the_config_takes_the_retriever_keys_checks_them_and_the_server_is_asked_once_at_setup(world_docs):
    with serve(bm25_server(world_docs, "dense")) as (url, bodies):
        cfg = config.load_config(["search_backend=retriever", "eval_backend=retriever", f"retriever_url={url}"])
        engine = build.make_engine(cfg["eval_backend"], cfg, None, None, None, tok=WordTok())
        assert isinstance(engine, engines.RetrieverEngine) and engine.url == url and len(bodies) == 1
    for arg, message in [("eval_backend=sim", "eval_backend must be one of real, retriever"),
                         ("search_backend=google", "search_backend must be one of sim, real, http, retriever"),
                         ("retriever_retries=0", "retriever_retries must be at least 1"),
                         ("retriever_timeout=0", "retriever_timeout must be greater than 0")]:
        with pytest.raises(SystemExit, match=message):
            config.load_config([arg])


def test_with_a_data_file_and_served_engines_no_corpus_is_needed(tmp_path, monkeypatch):
    import parallel
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q0", "golden_answers": ["one"]}\n')
    monkeypatch.setattr(world, "load_tokenizer", lambda path: WordTok())
    args = [f"data={data}", f"eval_data=nq={data}", "policy_model=some/model"]
    retriever = build.setup(config.load_config(args + ["eval_backend=retriever"]), parallel.Ctx())[3]
    assert retriever is None
    with pytest.raises(SystemExit, match="search_backend=real searches BM25 over corpus="):
        build.setup(config.load_config(args + ["eval_backend=retriever", "search_backend=real"]), parallel.Ctx())
    with pytest.raises(SystemExit, match="evaluation needs a real engine: set corpus=.* or eval_backend=retriever"):
        build.setup(config.load_config(args), parallel.Ctx())


def test_a_run_against_the_served_engine_gives_the_results_of_the_in_process_one(tmp_path, smoke_build):
    """The smoke run twice, sharing one build: BM25 in this process for training and evaluation,
    then the same BM25 behind the loopback server (search_backend=retriever, eval_backend=retriever)."""
    out, served_out = tmp_path / "out", tmp_path / "served"
    common = ["preset=smoke", "threads=1"]
    cfg = config.load_config(common)
    smoke_build(out)  # both runs load it
    served_out.mkdir()
    os.symlink(out / "build", served_out / "build")
    docs = world.world_of(cfg).docs
    threads = torch.get_num_threads()

    def results_and_metrics(folder):  # the metrics of each step without its timings and the engine's counters
        rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
        drop = ("tokens_per_s", "step_time", "sim/malformed")
        return json.load(open(folder / "results.json")), [{k: v for k, v in r.items()
                                                            if k not in drop and not k.startswith("time/")} for r in rows]
    try:
        zerosearch.main(common + [f"out_dir={out}", "search_backend=real", "eval_backend=real"])
        results, metrics = results_and_metrics(out)
        with serve(bm25_server(docs, "dense")) as (url, bodies):
            zerosearch.main(common + [f"out_dir={served_out}", "search_backend=retriever", "eval_backend=retriever",
                                      f"retriever_url={url}"])
        served_results, served_metrics = results_and_metrics(served_out)
    finally:
        torch.set_num_threads(threads)
    rename = {"(c) ZeroSearch (ppo, real engine)": "(c) ZeroSearch (ppo, retriever engine)"}
    assert {rename.get(label, label): row for label, row in results.items()} == served_results
    rows = {k: v for k, v in served_results.items() if not k.startswith("reading")}
    assert len(rows) == 5 and all(set(v) == set(world.TEST_SETS) for v in rows.values())
    # training searched in both runs, and every loss and statistic of every step is the same: the policy read
    # the same documents; the evaluation searched the served engine too
    assert sum(r["searches"] for r in metrics) > 0 and sum(len(b["queries"]) for b in bodies) > 0
    assert any(json.loads(line)["queries"] for line in open(served_out / "predictions.jsonl"))
    assert served_metrics == metrics and [r["run"] for r in metrics] == ["zerosearch"] * 3 + ["search_r1"] * 3
