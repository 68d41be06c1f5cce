"""The search engines and simulator fine-tuning of sim.py. The http engine is tested against a real
HTTP server on loopback that serves a tiny simulator through `sim.sample`; the oracle for its
documents is a simulator whose greedy output is known by construction (a word-successor table)."""
import contextlib
import http.server
import json
import math
import os
import random
import socket
import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import build
import config
import engines
import packing
import ppo
import sim
import simulator
import world
import zerosearch

TEMPLATE = "Write {k} {kind} documents . {Kind} Query : {query}"  # ends with the query, so each query has its own chain
CFG = dict(topk=3, doc_tokens=40, sim_style="finetuned", sim_template_finetuned=TEMPLATE, sim_temperature=0.0,
           sim_max_tokens=24, sim_url=None, sim_timeout=5, sim_retries=3, sim_chat_template=False, sim_batching="list")


def chain(i, n_docs):
    """Query word q{i}, then n_docs documents `a{i}{d} b{i}{d}`, each after its own `Doc` label."""
    words = [f"q{i}"]
    for d in range(1, n_docs + 1):
        words += [f"Doc{'0' * i}{d}:", f"a{i}{d}", f"b{i}{d}"]  # zeros keep labels distinct across chains
    return words


N_DOCS = [3, 3, 1, 4, 0, 3]  # 1 and 0 documents are malformed; 4 is cut to k = 3
CHAINS = [chain(i, n) for i, n in enumerate(N_DOCS)]
REQUESTS = [dict(question=f"question {i}", golden_answers=["x"], query=f"q{i}") for i in range(len(CHAINS))]
SEEDS = [101, 102, 103, 104, 105, 106]  # one per request, as the rollout passes them
EXPECTED_DOCS = [[f"a{i}{d} b{i}{d}" for d in range(1, min(n, 3) + 1)] for i, n in enumerate(N_DOCS)]


def successor_simulator(path):
    """Save to `path` a one-layer Qwen2 and a word-level tokenizer whose greedy continuation of a
    prompt follows CHAINS from the prompt's last word, then EOS: its layer adds nothing (o_proj and
    down_proj are zero), the embeddings are one-hot, and the lm_head maps each word to the next."""
    words = ["<pad>", "<unk>", "<eos>"] + sorted({w for c in CHAINS for w in c} | set(TEMPLATE.split()) | {"useful", "noisy"})
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    H = 128
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(words), hidden_size=H, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         eos_token_id=vocab["<eos>"], pad_token_id=0))
    with torch.no_grad():
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(words), H))
        head = torch.zeros(len(words), H)
        head[vocab["<eos>"], :len(words)] = 0.5  # EOS unless the word has a successor
        for c in CHAINS:
            for word, successor in zip(c, c[1:]):
                head[vocab[successor], vocab[word]] = 1.0
        model.lm_head.weight.copy_(head)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@contextlib.contextmanager
def serve(respond, path="/v1/completions", url_path="/v1"):
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) whose POST `path` answers respond(request
    body) -> (status, reply body), or bytes: the whole raw reply, then the connection closes; yields
    (its url: the server and `url_path`, list of request bodies)."""
    bodies = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            answer = respond(body) if self.path == path else (404, {"error": "not found"})
            if isinstance(answer, bytes):
                self.wfile.write(answer)
                return
            status, reply = answer
            data = json.dumps(reply).encode() if not isinstance(reply, bytes) else reply
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.handle_error = lambda *args: None  # a client that timed out and left is expected here
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{url_path}", bodies
    finally:
        server.shutdown()
        server.server_close()


def sampling_server(path):
    """What vLLM does with a completions request, with sim.sample: tokenize each prompt, sample,
    decode without special tokens; the choices come back in reverse order, as `index` says which is which."""
    model, tok = Qwen2ForCausalLM.from_pretrained(path).eval(), world.load_tokenizer(path)

    def respond(body):
        outs, _ = sim.sample(model, [tok.encode(p) for p in body["prompt"]], body["max_tokens"],
                             temperature=body["temperature"], top_p=body["top_p"], eos_token_id=tok.eos_token_id,
                             seed=body["seed"])
        choices = [{"index": i, "text": tok.decode(o, skip_special_tokens=True)} for i, o in enumerate(outs)]
        return 200, {"object": "text_completion", "choices": choices[::-1]}
    return respond


def test_http_engine_gives_the_documents_of_the_in_process_simulator(tmp_path, monkeypatch):
    path = successor_simulator(tmp_path / "sim")
    monkeypatch.setattr(engines, "HTTP_CHUNK", 4)  # 6 requests -> 2 requests of 4 and 2 prompts
    with serve(sampling_server(path)) as (url, bodies):
        engine = engines.HttpEngine(dict(CFG, sim_url=url + "/"), world.load_tokenizer(path), "tiny-sim")
        docs = engine.search(REQUESTS, noise_prob=0.5, seed=SEEDS)
    local = sim.SimEngine(Qwen2ForCausalLM.from_pretrained(path), world.load_tokenizer(path), CFG)
    assert docs == local.search(REQUESTS, noise_prob=0.5, seed=SEEDS) == EXPECTED_DOCS
    assert engine.stats == local.stats == {"useful": engine.stats["useful"], "noisy": 6 - engine.stats["useful"],
                                           "malformed": 2}
    assert 0 < engine.stats["useful"] < 6
    kinds = sim.draw_kinds(6, 0.5, SEEDS)
    sent = sorted(bodies, key=lambda b: len(b["prompt"]), reverse=True)
    assert [p for b in sent for p in b["prompt"]] == [sim.sim_prompt(CFG, r, kind) for r, kind in zip(REQUESTS, kinds)]
    assert all(b["model"] == "tiny-sim" and b["max_tokens"] == 24 and b["temperature"] == 0.0 for b in bodies)
    assert [b["seed"] for b in sent] == [SEEDS[0], SEEDS[4]]  # one seed a request: its first prompt's


def test_the_embedded_simulators_documents_come_in_a_random_order_each_requests_its_own(tmp_path):
    """With knowledge (the embedded world's), the written documents are shown in a random order, drawn from each
    request's seed: the same documents, the same order for a request whatever the others in its call."""
    path = successor_simulator(tmp_path / "sim")
    engine = sim.SimEngine(Qwen2ForCausalLM.from_pretrained(path), world.load_tokenizer(path), CFG, lambda query, answers: [])
    docs = engine.search(REQUESTS, noise_prob=0.5, seed=SEEDS)
    assert [sorted(d) for d in docs] == EXPECTED_DOCS and docs != EXPECTED_DOCS  # written in order, shown shuffled
    assert engine.search(REQUESTS[3:], noise_prob=0.5, seed=SEEDS[3:]) == docs[3:]


def test_http_engine_renders_the_chat_template_when_sim_chat_template_is_true(tmp_path):
    tok = world.load_tokenizer(successor_simulator(tmp_path / "sim"))
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} <assistant>{% endif %}"
    reply = {"choices": [{"index": 0, "text": "Doc 1: a"}]}
    with serve(lambda body: (200, reply)) as (url, bodies):
        engines.HttpEngine(dict(CFG, sim_url=url, sim_chat_template=True), tok, "m").search(REQUESTS[:1], 0.0, 0)
    assert bodies[0]["prompt"] == ["<user> Write 3 useful documents . Useful Query : q0 <assistant>"]
    tok.chat_template = None
    with pytest.raises(SystemExit, match="has no chat template; set it to false"):
        engines.HttpEngine(dict(CFG, sim_url=url, sim_chat_template=True), tok, "m").search(REQUESTS[:1], 0.0, 0)


class WhitespaceTok:
    """Stands in for a tokenizer where documents are never cut: one token a word."""
    def encode(self, text, add_special_tokens=True):
        return text.split()


def bos_tokenizer(texts):
    """A word-level tokenizer that adds BOS to every encode, as Llama-3's, Mistral's and Gemma's do."""
    from tokenizers import processors
    inner = world.build_tokenizer(texts).backend_tokenizer
    inner.add_special_tokens(["<bos>"])
    inner.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", inner.token_to_id("<bos>"))])
    return PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>")


def test_documents_and_the_simulator_target_hold_no_bos(monkeypatch):
    tok = bos_tokenizer([TEMPLATE, "useful Useful Doc 1 : 2 alpha beta gamma zeta eta theta q0 question"])
    assert tok.encode("alpha")[0] == tok.bos_token_id  # the tokenizer does add BOS
    doc = "alpha beta gamma zeta eta theta"
    assert sim.truncate(tok, doc, 5) == "alpha beta gamma zeta eta"  # the first 5 words, nothing else
    examples = []
    monkeypatch.setattr(sim, "sft", lambda model, ex, *args, **kwargs: examples.extend(ex) or 0.0)
    row = dict(query="q0", question="question", answer="alpha", label="useful", documents=["beta gamma", "zeta"])
    sim.train_simulator(None, tok, [row], CFG, steps=1, batch_size=1, lr=1e-6)
    (ids, mask), = examples
    target = [t for t, m in zip(ids, mask) if m]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in target  # the prompt keeps its BOS, the target has none
    assert tok.decode(target) == "Doc 1 : beta gamma Doc 2 : zeta <eos>"


def test_malformed_output_is_counted_and_never_raises():
    texts = ["no document lines here", "Doc 1: only one", "", "Doc 1: a Doc 2: b Doc 3: c Doc 4: d"]
    # the fifth prompt gets no choice at all, and a stray index is ignored
    reply = {"choices": [{"index": i, "text": t} for i, t in enumerate(texts)] + [{"index": 9, "text": "Doc 1: x"}]}
    with serve(lambda body: (200, reply)) as (url, _):
        engine = engines.HttpEngine(dict(CFG, sim_url=url), WhitespaceTok(), "m")
        docs = engine.search(REQUESTS[:5], noise_prob=0.0, seed=0)
    assert docs == [[], ["only one"], [], ["a", "b", "c"], []]
    assert engine.stats == {"useful": 5, "noisy": 0, "malformed": 4}


def test_server_errors_are_retried_sim_retries_times_then_one_clear_error(monkeypatch):
    monkeypatch.setattr(engines, "RETRY_BACKOFF", 0.01)
    with serve(lambda body: (500, {"error": "overloaded"})) as (url, bodies):
        engine = engines.HttpEngine(dict(CFG, sim_url=url, sim_retries=3), WhitespaceTok(), "m")
        with pytest.raises(SystemExit, match=r"search_backend=http: .*/v1/completions failed after 3 attempts: HTTP 500.*"
                                             r"check sim_url and that the server is up"):
            engine.search(REQUESTS[:2], 0.0, 0)
    assert len(bodies) == 3


@pytest.mark.parametrize("raw, reason", [
    (b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n{\"choices\": [", "IncompleteRead"),  # cut off mid-body
    (b"garbage\r\n\r\n", "BadStatusLine"),  # not HTTP at all
])
def test_a_reply_cut_off_or_not_http_is_retried_then_one_clear_error(monkeypatch, raw, reason):
    monkeypatch.setattr(engines, "RETRY_BACKOFF", 0.01)
    with serve(lambda body: raw) as (url, bodies):
        engine = engines.HttpEngine(dict(CFG, sim_url=url, sim_retries=2), WhitespaceTok(), "m")
        with pytest.raises(SystemExit, match=f"failed after 2 attempts: {reason}.*check sim_url"):
            engine.search(REQUESTS[:1], 0.0, 0)
    assert len(bodies) == 2


def test_choices_without_index_are_read_in_list_order():
    reply = {"choices": [{"text": "Doc 1: first"}, {"text": "Doc 1: second"}]}
    with serve(lambda body: (200, reply)) as (url, _):
        engine = engines.HttpEngine(dict(CFG, sim_url=url), WhitespaceTok(), "m")
        assert engine.search(REQUESTS[:2], 0.0, 0) == [["first"], ["second"]]
    with serve(lambda body: (200, reply)) as (url, bodies):
        engine = engines.HttpEngine(dict(CFG, sim_url=url), WhitespaceTok(), "m")
        with pytest.raises(SystemExit, match="returned 2 choices without `index` for 3 prompts"):
            engine.search(REQUESTS[:3], 0.0, 0)
    assert len(bodies) == 1  # the server answers the same way every time: not retried


def test_a_request_the_server_rejects_is_not_retried(monkeypatch):
    monkeypatch.setattr(engines, "RETRY_BACKOFF", 0.01)
    with serve(lambda body: (404, {"error": "model 'm' does not exist"})) as (url, bodies):
        engine = engines.HttpEngine(dict(CFG, sim_url=url, sim_retries=3), WhitespaceTok(), "m")
        with pytest.raises(SystemExit, match="HTTP 404.*does not exist.*check sim_served_model"):
            engine.search(REQUESTS[:2], 0.0, 0)
    assert len(bodies) == 1


def test_the_timeout_is_honoured_on_every_attempt(monkeypatch):
    monkeypatch.setattr(engines, "RETRY_BACKOFF", 0.01)

    def slow(body):
        time.sleep(1.0)
        return 200, {"choices": []}
    with serve(slow) as (url, bodies):
        engine = engines.HttpEngine(dict(CFG, sim_url=url, sim_timeout=0.2, sim_retries=2), WhitespaceTok(), "m")
        start = time.perf_counter()
        with pytest.raises(SystemExit, match="failed after 2 attempts: .*timed out"):
            engine.search(REQUESTS[:1], 0.0, 0)
        assert time.perf_counter() - start < 1.5  # two 0.2 s timeouts, not two of the server's 1 s
    assert len(bodies) == 2


def test_no_server_at_sim_url_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(engines, "RETRY_BACKOFF", 0.01)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    engine = engines.HttpEngine(dict(CFG, sim_url=f"http://127.0.0.1:{port}/v1", sim_retries=2), WhitespaceTok(), "m")
    with pytest.raises(SystemExit, match="failed after 2 attempts: .*refused.*check sim_url"):
        engine.search(REQUESTS[:1], 0.0, 0)


def test_make_engine_builds_the_http_engine_from_the_config_and_asks_the_server_once(tmp_path):
    path = successor_simulator(tmp_path / "sim")
    with serve(lambda body: (200, {"choices": [{"index": 0, "text": "Doc 1: x"}]})) as (url, bodies):
        cfg = config.load_config(["search_backend=http", f"sim_url={url}/"])
        engine = build.make_engine("http", cfg, None, path, None)
        assert isinstance(engine, engines.HttpEngine) and engine.url == url + "/completions"
        assert engine.served_model == path  # sim_served_model null: the name vLLM gives a model served from a path
        assert len(bodies) == 1  # the server was asked before any long stage
        served = build.make_engine("http", dict(cfg, sim_served_model="sim-14b"), None, path, None)
        assert served.served_model == "sim-14b" and bodies[-1]["model"] == "sim-14b"
    with pytest.raises(SystemExit, match="search_backend=http needs sim_model"):
        build.make_engine("http", cfg, None, None, None)
    with pytest.raises(SystemExit, match="is not an http"):
        build.make_engine("http", dict(cfg, sim_url="127.0.0.1:8000/v1"), None, path, None)


# ---------------------------------------------------------------- python tools/simulator.py train

def sim_rows():
    """Rows in the documented JSONL form, documents as a list and as `Doc i:` text."""
    rows = []
    for i, (city, year) in enumerate(zip(["Bralo", "Kento", "Mirda", "Tovas"], ["1901", "1932", "1950", "1877"])):
        for label in ("useful", "noisy"):
            where = city if label == "useful" else "Zaru"
            docs = [f"Person{i} was born in {where} .", f"Person{i} was born in the year {year} ."]
            rows.append(dict(query=f"Person{i} born", question=f"Where was Person{i} born ?", answer=city, label=label,
                             documents=docs if i % 2 else sim.format_docs(docs)))
    return rows


def tiny_model_dir(path, rows):
    """A tiny random Qwen2 and a tokenizer trained on the rows and the config's template, saved as a model dir."""
    cfg = config.load_config([])
    texts = [cfg["sim_template_finetuned"], "useful noisy Useful Noisy Doc 1 : Doc 2 :"]
    texts += [" ".join([r["query"], r["question"], r["answer"], str(r["documents"])]) for r in rows]
    tok = world.build_tokenizer(texts)
    world.tiny_model(len(tok), 32, 2, 2, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), cfg


@torch.no_grad()
def documents_loss(path, rows, cfg):
    """Mean cross-entropy of each row's documents after its control prompt, under the model saved at `path`."""
    model, tok = Qwen2ForCausalLM.from_pretrained(path).eval(), world.load_tokenizer(path)
    losses = []
    for r in rows:
        request = dict(query=r["query"], question=r["question"], golden_answers=[r["answer"]])
        prompt = tok.encode(sim.sim_prompt(dict(cfg, sim_style="finetuned"), request, r["label"]))
        docs = r["documents"] if isinstance(r["documents"], list) else sim.parse_docs(r["documents"], 5)
        target = tok.encode(" " + sim.format_docs(docs), add_special_tokens=False) + [tok.eos_token_id]
        ids = torch.tensor([prompt + target])
        labels = torch.tensor([[-100] * len(prompt) + target])
        losses.append(model(input_ids=ids, labels=labels).loss.item())
    return sum(losses) / len(losses)


def test_sim_train_fine_tunes_and_saves_a_simulator_that_loads(tmp_path):
    rows = sim_rows()
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir, cfg = tiny_model_dir(tmp_path / "tiny", rows)
    out = tmp_path / "trained"
    simulator.main(["train", f"data={data}", f"model={model_dir}", f"out={out}", "steps=40", "batch_size=4", "lr=1e-2", "seed=1"])
    before, after = documents_loss(model_dir, rows, cfg), documents_loss(out, rows, cfg)
    assert after < 0.5 * before, (before, after)  # measured 5.37 -> 0.71
    engine = sim.SimEngine(Qwen2ForCausalLM.from_pretrained(out), world.load_tokenizer(str(out)),
                           dict(cfg, sim_max_tokens=8))  # loads as a simulator
    assert len(engine.search([dict(question="q", golden_answers=["a"], query="Person1 born")], 0.0, 0)) == 1


def test_sim_train_prompts_with_the_config_chosen_as_for_zerosearch_py(tmp_path, monkeypatch):
    import yaml
    rows = sim_rows()[:2]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model_dir, _ = tiny_model_dir(tmp_path / "tiny", rows)
    calls = []
    monkeypatch.setattr(sim, "train_simulator", lambda model, tok, rows, cfg, *args: calls.append((cfg, args)) or 0.0)
    train = ["train", f"data={data}", f"model={model_dir}", f"out={tmp_path / 'out'}", "steps=3", "batch_size=1", "lr=0.5", "seed=7"]
    simulator.main(train + ["preset=paper"])
    paper = yaml.safe_load(open(os.path.join(os.path.dirname(sim.__file__), "presets", "paper.yaml")))
    (cfg, args), = calls
    assert (cfg["sim_template_finetuned"], cfg["topk"]) == (paper["sim_template_finetuned"], paper["topk"]) and cfg["topk"] == 5
    assert args == (3, 1, 0.5, 7)  # steps, batch_size, lr and seed of the fine-tuning, not the RL config's
    config = tmp_path / "sim.yaml"
    config.write_text("topk: 4\nsim_style: prompted\n")
    simulator.main(train + ["--config", str(config), "doc_tokens=12"])
    cfg = calls[-1][0]
    assert (cfg["topk"], cfg["sim_style"], cfg["doc_tokens"]) == (4, "prompted", 12)


@pytest.mark.parametrize("args, message", [
    (["train", "data=rows.jsonl", "model=m", "stpes=3"], "unknown config key 'stpes' in the command line; did you mean 'steps'"),
    (["train", "data=rows.jsonl", "model=m", "steps=many"], "steps=many: set steps to a positive integer"),
    (["train", "data={good}", "model=m", "steps=0"], "steps=0: set steps to a positive integer"),
    (["train", "data={good}", "model=m", "steps=-3"], "steps=-3: set steps to a positive integer"),
    (["train", "data={good}", "model=m", "batch_size=0"], "batch_size=0: set batch_size to a positive integer"),
    (["train", "data={good}", "model=m", "batch_size=1.5"], "batch_size=1.5: set batch_size to a positive integer"),
    (["train", "data={good}", "model=m", "lr=-1e-6"], "lr=-1e-6: set lr to a positive number"),
    (["train", "data={good}", "model=m", "preset=nope"], "config file not found: .*nope.yaml"),
    (["train", "data={good}", "model=m", "oops"], "argument 'oops' is not key=value"),
    (["train", "model=m"], "needs data=rows.jsonl and model="),
    (["train", "data=/no/such/rows.jsonl", "model=m"], "data file not found: /no/such/rows.jsonl"),
    (["train", "data={bad}", "model=m"], "line 2: a row needs query, question, answer, documents, label"),
    (["train", "data={good}", "model={tmp}/no_model"], "cannot load model"),
    (["fit"], "usage: python tools/simulator.py train"),
])
def test_sim_train_errors_are_one_clear_line(tmp_path, args, message):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text(json.dumps(sim_rows()[0]) + "\n")
    bad.write_text(json.dumps(sim_rows()[0]) + "\n" + json.dumps(dict(sim_rows()[0], label="maybe")) + "\n")
    args = [a.format(bad=bad, good=good, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit, match=message):
        simulator.main(args)


# ---------------------------------------------------------------- data loaders (world.py)

@pytest.mark.parametrize("load, text, message", [
    (world.load_questions, '{"question": "q", "golden_answers": ["a"]}\n{"question": "q"\n', r"data\.jsonl:2: not a JSON object"),
    (world.load_questions, '\n{"question": null, "golden_answers": ["a"]}\n', r"data\.jsonl:2: question is null; each row needs"),
    (world.load_questions, '{"question": "q"}\n', r"data\.jsonl:1: golden_answers is null; each row needs"),
    (world.load_questions, '{"question": "q", "golden_answers": []}\n', r"data\.jsonl:1: golden_answers is \[\]"),
    (world.load_questions, '{"question": "q", "golden_answers": [""]}\n', r"data\.jsonl:1: golden_answers is \[\"\"\]"),
    (world.load_questions, "", r"data\.jsonl: no questions in the file"),
    (world.load_questions, "\n\n", r"data\.jsonl: no questions in the file"),
    (world.load_corpus, '{"contents": "a"}\nhello\n', r"data\.jsonl:2: not a JSON object"),
    (world.load_corpus, '{"title": "a"}\n', r"data\.jsonl:1: no `contents` \(or `text`\) string"),
    (world.load_corpus, "", r"data\.jsonl: no documents in the corpus"),
])
def test_data_file_errors_are_one_clear_line_naming_the_file_and_line(tmp_path, load, text, message):
    path = tmp_path / "data.jsonl"
    path.write_text(text)
    with pytest.raises(SystemExit, match=f"^error: .*{message}[^\n]*$"):
        load(str(path))


def test_loaders_skip_blank_lines_and_take_a_single_answer_as_a_list(tmp_path):
    questions, corpus = tmp_path / "q.jsonl", tmp_path / "corpus.jsonl"
    questions.write_text('{"question": " In what year? ", "golden_answers": 1990}\n\n{"question": "Who?", "golden_answers": "Ada"}\n')
    corpus.write_text('{"contents": "a\\nb"}\n\n{"text": "c"}\n')
    assert world.load_questions(str(questions)) == [dict(question="In what year?", golden_answers=["1990"], hops=1, evidence=[]),
                                                    dict(question="Who?", golden_answers=["Ada"], hops=1, evidence=[])]
    assert world.load_corpus(str(corpus)) == ["a b", "c"]


def test_prompted_style_noisy_prompt_leaves_out_the_question_and_answer():
    """As the paper's prompt-based simulator: the useful prompt holds the question and gold answer, the
    noisy one does not; the fine-tuned style shows both in both (only useful/noisy changes)."""
    request = dict(question="where was zeta born ?", golden_answers=["gammatown"], query="zeta birthplace")
    for style, noisy_has_them in (("prompted", False), ("finetuned", True)):
        cfg = config.load_config([f"sim_style={style}"])
        useful, noisy = (sim.sim_prompt(cfg, request, kind) for kind in ("useful", "noisy"))
        assert "where was zeta born ?" in useful and "gammatown" in useful and "zeta birthplace" in useful
        assert ("where was zeta born ?" in noisy, "gammatown" in noisy) == (noisy_has_them, noisy_has_them)
        assert "zeta birthplace" in noisy and "noisy" in noisy


def one_prompt_server(path):
    """Like transformers serve: one prompt a request, as a string; a list is refused with HTTP 400."""
    answer = sampling_server(path)

    def respond(body):
        if not isinstance(body["prompt"], str):
            return 400, {"detail": "prompt must be a string."}
        return answer(dict(body, prompt=[body["prompt"]]))
    return respond


@pytest.mark.parametrize("batching", ["auto", "single"])
def test_a_server_that_takes_one_prompt_a_request_gets_them_one_by_one_in_order(tmp_path, batching):
    path = successor_simulator(tmp_path / "sim")
    local = sim.SimEngine(Qwen2ForCausalLM.from_pretrained(path), world.load_tokenizer(path), CFG)
    with serve(one_prompt_server(path)) as (url, bodies):
        engine = engines.HttpEngine(dict(CFG, sim_url=url, sim_batching=batching), world.load_tokenizer(path), "tiny-sim")
        docs = engine.search(REQUESTS, 0.5, SEEDS)
        again = engine.search(REQUESTS, 0.5, SEEDS)
    assert docs == again == local.search(REQUESTS, 0.5, SEEDS)  # the same documents, in the requests' order
    singles = [b for b in bodies if isinstance(b["prompt"], str)]
    assert len(singles) == 2 * len(REQUESTS) and len(bodies) == len(singles) + (batching == "auto")  # one list refused
    assert sorted(b["seed"] for b in singles[:len(REQUESTS)]) == sorted(SEEDS)  # each prompt its own seed


def test_transformers_serve_itself_serves_the_http_engine(tmp_path):
    """`transformers serve` (transformers' own OpenAI-compatible server) with a tiny simulator, where
    transformers[serving] is installed."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import shutil
    import subprocess
    if not shutil.which("transformers"):
        pytest.skip("no transformers command line")
    path = successor_simulator(tmp_path / "sim")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(["transformers", "serve", "--port", str(port), "--host", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cfg = dict(CFG, sim_url=f"http://127.0.0.1:{port}/v1", sim_batching="auto", sim_retries=8, sim_timeout=60)
        engine = engines.HttpEngine(cfg, world.load_tokenizer(path), path)
        docs = engine.search(REQUESTS[:2], 0.0, SEEDS[:2])
        assert engine.batching == "single" and len(docs) == 2 and all(isinstance(d, list) for d in docs)
    finally:
        server.terminate()
        server.wait(timeout=30)


# ---------------------------------------------------------------- python tools/simulator.py collect

def test_collect_labels_each_search_by_the_answer_keeps_what_the_judge_confirms_and_balances_each_form(tmp_path, monkeypatch):
    """A scripted policy searches each question once, by the entity's name alone, by the question copied
    (two query forms, each finding the evidence for some questions and not others) or by another
    question's entity (form "other"), then answers the even questions right and the odd ones wrong. Rows
    are labelled by the answer, kept where the documents hold the question's evidence if and only if the
    label is useful, and balanced within each form that names the entity; the "other" rows are all kept."""
    w = world.build_world(0, 300, 90, phrasings=3, passages=4)
    cfg = config.load_config(["world_persons=300", "world_companies=90"])
    tok = world.world_tokenizer(w, cfg)
    questions = [q for q in w.train if q["hops"] == 1][:80]
    engine = engines.RealEngine(engines.Retriever(w.docs), cfg)
    row_of = {q["question"]: i for i, q in enumerate(questions)}
    form_of = {i: "name" if i < 30 else "question" if i < 60 else "other" for i in range(80)}
    query_of = {i: world.formulations(q["subject"], q["relation"], 3)[form_of[i]] for i, q in enumerate(questions[:60])}
    query_of |= {i: questions[i - 60]["subject"] for i in range(60, 80)}
    assert all(world.query_form(query_of[i], questions[i], 3) == form_of[i] for i in range(80))

    def scripted(model, prompts, max_new_tokens, **kw):
        out = []
        for p in prompts:
            text = tok.decode(p)
            i = row_of[min((q for q in row_of if q in text), key=text.index)]  # the prompt's question, not a query
            q = questions[i]
            turn = (f"<answer> {q['golden_answers'][0] if i % 2 == 0 else 'Nowhere'} </answer>" if "Doc 1" in text
                    else f"<search> {query_of[i]} </search>")
            out.append(tok.encode(turn))
        return out, [[0.0] * len(o) for o in out]

    monkeypatch.setattr(sim, "sample", scripted)
    hit = {i: questions[i]["evidence"][0] in engine.search([{"query": query_of[i]}])[0] for i in range(80)}
    useful = {f: [i for i in range(80) if form_of[i] == f and i % 2 == 0 and hit[i]] for f in ("name", "question", "other")}
    noisy = {f: [i for i in range(80) if form_of[i] == f and i % 2 == 1 and not hit[i]] for f in ("name", "question", "other")}
    k = {f: min(len(useful[f]), len(noisy[f])) for f in ("name", "question")}
    assert all(k.values()) and any(len(useful[f]) != len(noisy[f]) for f in k)  # both forms kept, something to balance
    rows, n_useful, n_noisy = zerosearch.collect(None, tok, questions, engine, cfg, n=1000)
    assert (n_useful, n_noisy) == (sum(map(len, useful.values())), sum(map(len, noisy.values())))
    for f in useful:
        mine = [r for r in rows if form_of[row_of[r["question"]]] == f]
        assert sorted(r["label"] for r in mine) == (["noisy"] * k[f] + ["useful"] * k[f] if f in k else
                                                    ["noisy"] * len(noisy[f]) + ["useful"] * len(useful[f]))
        assert all(row_of[r["question"]] in (useful if r["label"] == "useful" else noisy)[f] for r in mine)
    for r in rows:
        assert r["query"] == query_of[row_of[r["question"]]]
        assert r["documents"] == engine.search([{"query": r["query"]}])[0]
    assert noisy["other"] and len(noisy["other"]) > len(useful["other"])  # unbalanced, as another entity's search is
    few, _, _ = zerosearch.collect(None, tok, questions, engine, cfg, n=4)  # 4 balanced rows, "other" in proportion
    named = [r["label"] for r in few if form_of[row_of[r["question"]]] != "other"]
    assert len(named) <= 4 and sorted(named) == ["noisy"] * (len(named) // 2) + ["useful"] * (len(named) // 2)
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    read = simulator.read_simulator_rows(str(tmp_path / "rows.jsonl"))
    model = world.tiny_model(len(tok), 16, 1, 2, seed=0)
    assert read == rows and sim.train_simulator(model, tok, read, cfg, steps=2, batch_size=2, lr=1e-3) > 0


def test_collect_with_no_useful_search_gives_no_rows(monkeypatch):
    """Every trajectory answers wrong: no useful row in any form, so no balanced pair and no rows at all
    (not the noisy rows alone), which build.py turns into one line."""
    w = world.build_world(0, 300, 90)
    cfg = config.load_config(["world_persons=300", "world_companies=90"])
    tok = world.world_tokenizer(w, cfg)
    questions = [q for q in w.train if q["hops"] == 1][:20]
    monkeypatch.setattr(sim, "sample", lambda model, prompts, n, **kw: (
        [tok.encode("<answer> Nowhere </answer>" if "Doc 1" in tok.decode(p) else "<search> born year </search>")
         for p in prompts], None))
    rows, n_useful, n_noisy = zerosearch.collect(None, tok, questions, engines.RealEngine(engines.Retriever(w.docs), cfg), cfg, n=8)
    assert rows == [] and n_useful == 0 and n_noisy > 0


def test_collect_needs_a_policy_and_a_real_engine():
    with pytest.raises(SystemExit, match="needs policy_model"):
        simulator.main(["collect", "n=10"])
    with pytest.raises(SystemExit, match="set n to"):
        simulator.main(["collect", "n=1"])


def test_collect_writes_the_rows_and_counts_each_label_as_written(tmp_path, monkeypatch, capsys):
    """The rows are balanced within each form, and the vague and other-entity ones come in proportion, mostly
    noisy: the printed counts are the labels of the rows written, not half of them each."""
    rows = [dict(query=f"q{i}", question="Q ?", answer="A", documents=["d"], label=label)
            for i, label in enumerate(["useful", "noisy", "noisy", "noisy"])]
    monkeypatch.setattr(simulator, "load_model", lambda name, key: (None, None))
    monkeypatch.setattr(zerosearch, "collect", lambda *args: (rows, 3, 9))
    out = tmp_path / "rows.jsonl"
    simulator.main(["collect", f"out={out}", "n=4", "policy_model=org/policy", "world_persons=300", "world_companies=90"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert "4 rows (1 useful, 3 noisy; collected 3 useful and 9 noisy)" in capsys.readouterr().out


def ragged_examples(seed=0):
    """(token ids, loss mask) of 10 lengths: a prompt (mask 0) then a target (mask 1), one target with
    a gap (as the warm-up's quotes), one whose mask also covers its first token (never predicted)."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n, prompt in zip([12, 3, 12, 5, 10, 7, 6, 12, 2, 9], [4, 1, 8, 2, 3, 0, 5, 1, 1, 6]):
        mask = [0] * prompt + [1] * (n - prompt)
        examples.append((torch.randint(1, 50, (n,), generator=gen).tolist(), mask))
    examples[2][1][9] = 0
    examples[5][1][0] = 1
    return examples


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2))


def hf_padded_loss(model, examples, pad_id=0):
    """The oracle: Hugging Face's own loss on the right-padded batch, labels -100 off the loss mask."""
    T = max(len(x) for x, _ in examples)
    ids = torch.tensor([x + [pad_id] * (T - len(x)) for x, _ in examples])
    attn = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x, _ in examples])
    labels = torch.tensor([[t if m else -100 for t, m in zip(x, mask)] + [-100] * (T - len(x)) for x, mask in examples])
    return model(input_ids=ids, attention_mask=attn, labels=labels).loss


@pytest.mark.parametrize("micro_batch_size", [3, 8, 10])
def test_sft_backward_on_packed_micro_batches_gives_hf_padded_loss_and_gradient(micro_batch_size):
    examples = ragged_examples()
    assert len(packing.pack_rows([2, 3, 5, 6, 7, 9, 10, 12])[0]) == 5  # the 8 shortest pack into 5 rows
    model = tiny_lm()
    oracle = hf_padded_loss(model, examples)
    oracle.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    T = max(len(x) for x, _ in examples)
    ids = torch.tensor([x + [0] * (T - len(x)) for x, _ in examples])
    attn = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x, _ in examples])
    trained = torch.tensor([m + [0] * (T - len(m)) for _, m in examples]).bool()
    loss = sim.sft_backward(ppo.Actor(model), ids, attn, trained, micro_batch_size)
    assert loss == pytest.approx(oracle.item(), abs=1e-6)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-4)


def test_sft_takes_the_padded_recipes_steps_batches_drawn_as_before_and_the_same_losses(monkeypatch):
    """The oracle is the fine-tuning as it was written on padded batches: the same draws
    (`rng.sample`), AdamW, warm-up and cosine schedule, clipping; HF's loss."""
    examples, losses = ragged_examples(), []
    model, reference = tiny_lm(), tiny_lm()
    rng, steps = random.Random(3), 6  # a warm-up of max(1, steps // 20) = 1 step
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(s + 1, 0.1 + 0.45 * (1 + math.cos(math.pi * s / steps))))
    for _ in range(steps):
        loss = hf_padded_loss(reference, rng.sample(examples, 4))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step(); sched.step(); opt.zero_grad()
        losses.append(loss.item())
    sft_backward = sim.sft_backward
    packed = []
    monkeypatch.setattr(sim, "sft_backward", lambda *args: packed.append(sft_backward(*args)) or packed[-1])
    assert sim.sft(model, examples, steps, 4, 1e-2, seed=3) == packed[-1]
    assert packed == pytest.approx(losses, abs=1e-5)
    assert losses[-1] < losses[0]  # it learns, so the later steps compare trained weights too


def test_copy_pretraining_forms_the_induction_heads_a_tiny_model_lacks():
    """world.copy_sequences, as the build's pretraining (pretrain_steps) trains on them: random words written
    twice, the loss on the second copy. The oracle is the skill they stand for: a model then continues a
    repeated span of random words it was never shown, which it could not before."""
    V = 100
    examples = world.copy_sequences(V, 3, 2000, seed=0)
    for x, mask in examples[:50]:
        n = len(x) // 2
        assert x[:n] == x[n:] and mask == [0] * n + [1] * n and 4 <= n <= 40 and 3 <= min(x) and max(x) < V
    model = world.tiny_model(V, 64, 2, 2, seed=0)

    def continued():  # the share of a repeated span's second copy predicted greedy
        x = torch.randint(3, V, (64, 10), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(torch.cat([x, x], 1)).logits
        return (logits[:, 10:-1].argmax(-1) == x[:, 1:]).float().mean().item()
    before = continued()
    sim.sft(model, examples, 600, 32, 0.003)
    assert before < 0.1 and continued() > 0.6
