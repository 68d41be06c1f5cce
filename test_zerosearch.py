"""Tests of the loop: reward, curriculum, config, the rollout on a scripted policy, the world,
the retriever and simulator glue, and the smoke run end to end. Oracles are written from the
formulas (SQuAD's definition, the curriculum equation) or are hand-checked token lists."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

import build
import config
import engines
import parallel
import reward
import sim
import world
import zerosearch as zs

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- reward
@pytest.mark.parametrize("text, expected", [
    ("The  Eiffel Tower!", "eiffel tower"),
    ("an apple, a pear", "apple pear"),
    ("  THEATRE  ", "theatre"),          # "the" inside a word stays
    ("1,000 years.", "1000 years"),
])
def test_normalize_answer_follows_squad(text, expected):
    assert reward.normalize_answer(text) == expected


def test_extract_answer_takes_the_last_answer_of_the_response():
    assert reward.extract_answer("<answer> a </answer> then <answer> b </answer>") == "b"
    assert reward.extract_answer("<answer>\nmulti\nline </answer>") == "multi\nline"
    assert reward.extract_answer("no tags here") is None
    assert reward.extract_answer("<answer> unclosed") is None
    assert reward.extract_answer(None) is None


def test_scores_of_a_missing_answer_are_zero_and_never_raise():
    for fn in (reward.f1_score, reward.exact_match, reward.substring_match):
        assert fn(None, ["x"]) == 0.0
        assert fn("", ["x"]) == 0.0


def test_f1_is_word_overlap_f1_max_over_golds():
    # pred "the red big house" -> [red, big, house]; gold "big house" -> p = 2/3, r = 1, F1 = 0.8
    assert reward.f1_score("the red big house", ["big house"]) == pytest.approx(0.8)
    assert reward.f1_score("the red big house", ["nothing", "big house", "red big house"]) == pytest.approx(1.0)
    assert reward.f1_score("Paris", ["London"]) == 0.0
    assert reward.f1_score("a", ["the"]) == 0.0  # both normalise to nothing


def test_exact_and_substring_match():
    assert reward.exact_match("The Beatles.", ["beatles"]) == 1.0
    assert reward.exact_match("The Beatles band", ["beatles"]) == 0.0
    assert reward.substring_match("The Beatles band", ["beatles"]) == 1.0
    assert reward.substring_match("Beatlesque", ["beatles"]) == 1.0  # a plain substring, as the official check
    assert reward.substring_match("1990s", ["1990"]) == 1.0 and reward.substring_match("1989", ["1990"]) == 0.0
    assert reward.substring_match("anything", [""]) == 0.0


# ----------------------------------------------------------------------------- curriculum
def test_noise_probability_follows_the_paper_equation():
    # p_i = p_s + (b^(i/m) - 1)/(b - 1) (p_e - p_s); the paper's b = 4, p_s = 0, p_e = 0.5
    assert zs.noise_probability(0, 100, 0.0, 0.5, 4.0) == 0.0
    assert zs.noise_probability(100, 100, 0.0, 0.5, 4.0) == pytest.approx(0.5)
    for i, expected in [(25, 0.069), (50, 0.167), (75, 0.305)]:  # the values the paper publishes for b = 4, p_e = 0.5
        assert zs.noise_probability(i, 100, 0.0, 0.5, 4.0) == pytest.approx(expected, abs=1e-3)
    i, m, ps, pe, b = 37, 90, 0.1, 0.7, 2.5
    assert zs.noise_probability(i, m, ps, pe, b) == pytest.approx(ps + (b ** (i / m) - 1) / (b - 1) * (pe - ps))
    values = [zs.noise_probability(i, 50, 0.0, 0.5, 4.0) for i in range(51)]
    assert values == sorted(values)


# ----------------------------------------------------------------------------- config
def test_config_overrides_parse_types_and_presets_apply():
    cfg = config.load_config(["steps=7", "actor_lr=1e-4", "curriculum=false", "kl_target=null"])
    assert cfg["steps"] == 7 and cfg["actor_lr"] == 1e-4 and cfg["curriculum"] is False and cfg["kl_target"] is None
    smoke = config.load_config(["preset=smoke", "steps=5"])
    assert smoke["tiny_hidden"] == 32 and smoke["steps"] == 5  # the command line beats the preset


def test_unknown_config_key_is_one_line_error_naming_the_nearest_key(capsys):
    with pytest.raises(SystemExit) as e:
        config.load_config(["actor_lrr=0.1"])
    msg = str(e.value)
    assert "actor_lrr" in msg and "'actor_lr'" in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="not key=value"):
        config.load_config(["steps"])
    with pytest.raises(SystemExit, match="config file not found"):
        config.load_config(["preset=nonexistent"])


@pytest.mark.parametrize("arg, message", [
    ("reward=F1", "reward must be one of f1, em; got 'F1'"),
    ("sim_style=finetune", "sim_style must be one of finetuned, prompted"),
    ("algo=dpo", "algo must be one of ppo, grpo, reinforce, reinforce[+][+]"),
    ("curriculum_base=1", "curriculum_base .* must be positive and not 1"),
    ("steps=0", "steps must be at least 1, got 0"),
    ("steps=2.5", "steps must be a whole number, got 2.5"),
    ("actor_lr=abc", "actor_lr must be a number, got 'abc'"),
    ("curriculum=maybe", "curriculum must be true or false"),
    ("p_end=1.5", "p_start and p_end are probabilities")])
def test_bad_config_values_are_one_line_errors_before_anything_runs(arg, message):
    with pytest.raises(SystemExit, match="error: " + message) as e:
        config.load_config([arg])
    assert "\n" not in str(e.value)


def test_whole_numbers_may_be_written_as_floats():
    assert config.load_config(["steps=1e3"])["steps"] == 1000 and isinstance(config.load_config(["steps=1e3"])["steps"], int)


def test_with_a_data_file_evaluation_needs_a_real_corpus(tmp_path):
    """The simulator is shown the gold answer: it must never be the engine the results are measured with."""
    import parallel
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q0", "golden_answers": ["one"]}\n')
    cfg = config.load_config([f"data={data}", f"eval_data=nq={data}", "policy_model=some/model", "search_backend=http"])
    with pytest.raises(SystemExit, match="evaluation needs a real engine: set corpus="):
        build.setup(cfg, parallel.Ctx())


def test_a_real_policy_on_the_embedded_world_keeps_its_own_tokenizer(monkeypatch):
    """policy_model=... with data=world: the world's tiny tokenizer must not encode for that model."""
    import parallel
    loaded = []
    monkeypatch.setattr(build, "prepare_embedded", lambda cfg, cache, **k: (
        type("W", (), {"train": [], "test": [], "docs": []})(), None, "sim_dir", "warmup_dir"))
    monkeypatch.setattr(world, "load_tokenizer", lambda path: loaded.append(path))
    monkeypatch.setattr(world, "knowledge_index", lambda docs: None)
    build.setup(config.load_config(["policy_model=org/real-model"]), parallel.Ctx())
    build.setup(config.load_config([]), parallel.Ctx())
    assert loaded == ["org/real-model", "warmup_dir"]


# ----------------------------------------------------------------------------- rollout
class ScriptedPolicy:
    """Stands in for `sim.sample`: row r's k-th call returns script[r][k] (text), tokenised."""

    def __init__(self, tok, scripts, prompt_to_row):
        self.tok, self.scripts, self.prompt_to_row, self.calls = tok, scripts, prompt_to_row, []

    def __call__(self, model, prompts, max_new_tokens, stop=(), **kw):
        self.calls.append(dict(n=len(prompts), stop=stop))
        out = []
        for p in prompts:
            row = self.prompt_to_row(p)
            k = sum(1 for c in self.scripts[row]["done"])
            self.scripts[row]["done"].append(k)
            out.append(self.tok.encode(self.scripts[row]["turns"][k])[:max_new_tokens])
        return out, [[0.0] * len(o) for o in out]


class RecordingEngine:
    def __init__(self):
        self.requests, self.stats = [], {}

    def search(self, requests, noise_prob, seed):
        self.requests.append([r["query"] for r in requests])
        return [[f"{r['question'].split()[0]} doc about {r['query']} ."] for r in requests]


@pytest.fixture(scope="module")
def tiny_tok():
    texts = ["Doc 1: doc about alpha beta gamma . zeta eta theta answer one two three question q0 q1 q2 ."]
    cfg = config.load_config([])
    return world.build_tokenizer(texts + [cfg["prompt_template"], cfg["direct_template"], cfg["invalid_action"]])


def test_rollout_stops_at_search_inserts_documents_and_masks_them(tiny_tok, monkeypatch):
    tok, cfg = tiny_tok, config.load_config(["max_turns=2"])
    questions = [dict(question="q0", golden_answers=["one"]), dict(question="q1", golden_answers=["two"])]
    scripts = [{"turns": ["<think> zeta </think> <search> alpha </search>", "<answer> one </answer>"], "done": []},
               {"turns": ["<answer> three </answer>"], "done": []}]
    prompts = [tok.encode(cfg["prompt_template"].format(question=q["question"])) for q in questions]
    scripted = ScriptedPolicy(tok, scripts, lambda p: next(i for i, pr in enumerate(prompts) if p[:len(pr)] == pr))
    monkeypatch.setattr(sim, "sample", scripted)
    engine = RecordingEngine()
    ro = zs.rollout(None, tok, questions, engine, cfg)
    assert engine.requests == [["alpha"]]                      # one batched call, only the searching row
    assert scripted.calls[0]["stop"] == ("</search>", "</answer>") and scripted.calls[1]["n"] == 1
    obs = tok.encode("\n\n<information>Doc 1: q0 doc about alpha .</information>\n\n")  # Search-R1's form
    first, second = tok.encode(scripts[0]["turns"][0]), tok.encode(scripts[0]["turns"][1])
    assert ro.response_ids[0] == first + obs + second         # the sampled ids are kept as sampled
    assert ro.response_mask[0] == [1] * len(first) + [0] * len(obs) + [1] * len(second)
    assert ro.response_mask[1] == [1] * len(tok.encode("<answer> three </answer>"))
    assert ro.answers == ["one", "three"] and ro.searches == [1, 0]
    assert zs.score(ro, questions) == [1.0, 0.0]


def test_rag_rollout_searches_the_question_once_masked_then_answers_with_search_disabled(tiny_tok, monkeypatch):
    tok, cfg = tiny_tok, config.load_config(["max_turns=2"])
    questions = [dict(question="q0", golden_answers=["one"]), dict(question="q1", golden_answers=["two"])]
    scripts = [{"turns": ["<answer> one </answer>"], "done": []}, {"turns": ["<search> beta </search>"], "done": []}]
    prompts = [tok.encode(cfg["prompt_template"].format(question=q["question"])) for q in questions]
    scripted = ScriptedPolicy(tok, scripts, lambda p: next(i for i, pr in enumerate(prompts) if p[:len(pr)] == pr))
    monkeypatch.setattr(sim, "sample", scripted)
    engine = RecordingEngine()
    ro = zs.rollout(None, tok, questions, engine, cfg, rag=True)
    assert engine.requests == [["q0", "q1"]]  # one search each, for the question itself; the policy's search is not run
    assert [c["stop"] for c in scripted.calls] == [("</answer>",)]  # one turn, search disabled
    forced = tok.encode("<search> q0 </search>\n\n<information>Doc 1: q0 doc about q0 .</information>\n\n")
    answer = tok.encode("<answer> one </answer>")
    assert ro.response_ids[0] == forced + answer and ro.response_mask[0] == [0] * len(forced) + [1] * len(answer)
    assert ro.answers == ["one", None] and ro.searches == [1, 1] and ro.queries == [["q0"], ["q1"]]


def test_rollout_honours_max_turns_then_disables_search(tiny_tok, monkeypatch):
    tok, cfg = tiny_tok, config.load_config(["max_turns=2"])
    q = [dict(question="q2", golden_answers=["x"])]
    scripts = [{"turns": ["<search> alpha </search>", "<search> beta </search>", "<search> gamma </search>"], "done": []}]
    scripted = ScriptedPolicy(tok, scripts, lambda p: 0)
    monkeypatch.setattr(sim, "sample", scripted)
    engine = RecordingEngine()
    ro = zs.rollout(None, tok, q, engine, cfg)
    assert engine.requests == [["alpha"], ["beta"]]             # the third search is not executed
    assert [c["stop"] for c in scripted.calls] == [("</search>", "</answer>")] * 2 + [("</answer>",)]
    assert ro.searches == [2] and ro.answers == [None]
    assert zs.score(ro, q) == [0.0]


def test_a_turn_with_neither_action_gets_the_invalid_action_observation_and_counts_as_a_turn(tiny_tok, monkeypatch):
    tok, cfg = tiny_tok, config.load_config(["max_turns=2"])
    q = [dict(question="q0", golden_answers=["one"])]
    turns = ["zeta eta", "<search> alpha </search>", "<answer> one </answer>"]
    scripted = ScriptedPolicy(tok, [{"turns": turns, "done": []}], lambda p: 0)
    monkeypatch.setattr(sim, "sample", scripted)
    engine = RecordingEngine()
    ro = zs.rollout(None, tok, q, engine, cfg)
    invalid = tok.encode(" " + cfg["invalid_action"])
    docs = tok.encode("\n\n<information>Doc 1: q0 doc about alpha .</information>\n\n")
    t0, t1, t2 = (tok.encode(t) for t in turns)
    assert ro.response_ids[0] == t0 + invalid + t1 + docs + t2
    assert ro.response_mask[0] == [1] * len(t0) + [0] * len(invalid) + [1] * len(t1) + [0] * len(docs) + [1] * len(t2)
    assert engine.requests == [["alpha"]] and ro.searches == [1] and ro.answers == ["one"]
    assert [c["stop"] for c in scripted.calls][-1] == ("</answer>",)  # the invalid turn used up turn 0 of max_turns
    # invalid_action empty: a turn without an action ends the trajectory
    monkeypatch.setattr(sim, "sample", ScriptedPolicy(tok, [{"turns": turns, "done": []}], lambda p: 0))
    ro = zs.rollout(None, tok, q, RecordingEngine(), dict(cfg, invalid_action=""))
    assert ro.response_ids[0] == t0 and ro.answers == [None]


def test_the_turns_first_action_is_taken_even_with_text_after_it(tiny_tok, monkeypatch):
    """A byte-level tokenizer's last token can hold more than the `>` of `</search>`."""
    tok, cfg = tiny_tok, config.load_config(["max_turns=2"])
    q = [dict(question="q0", golden_answers=["one"])]
    turns = ["<search> alpha </search> .", "<answer> one </answer> <search> beta </search>"]
    monkeypatch.setattr(sim, "sample", ScriptedPolicy(tok, [{"turns": turns, "done": []}], lambda p: 0))
    engine = RecordingEngine()
    ro = zs.rollout(None, tok, q, engine, cfg)
    assert engine.requests == [["alpha"]] and ro.searches == [1] and ro.answers == ["one"]


def test_an_answer_cut_off_by_the_response_budget_is_not_rewarded(tiny_tok, monkeypatch):
    """The reward is for the tokens that are trained: the answer is read after the cut."""
    tok = tiny_tok
    q = [dict(question="q0", golden_answers=["one"])]
    turns = ["<search> alpha </search>", "<answer> one </answer>"]
    kept = len(tok.encode(turns[0])) + len(tok.encode("\n\n<information>Doc 1: q0 doc about alpha .</information>\n\n")) + 2
    for budget, answer in ((kept, None), (kept + 10, "one")):
        monkeypatch.setattr(sim, "sample", ScriptedPolicy(tok, [{"turns": list(turns), "done": []}], lambda p: 0))
        ro = zs.rollout(None, tok, q, RecordingEngine(), config.load_config(["max_turns=2", f"max_response_tokens={budget}", "topk=1", "doc_tokens=1"]))
        assert len(ro.response_ids[0]) <= budget and ro.answers == [answer]
        assert zs.score(ro, q) == [0.0 if answer is None else 1.0]


def test_chat_template_wraps_the_policy_prompt_and_is_required_when_on(tiny_tok, monkeypatch):
    tok, cfg = tiny_tok, config.load_config(["chat_template=true"])
    q = [dict(question="q1", golden_answers=["two"])]
    monkeypatch.setattr(sim, "sample", ScriptedPolicy(tok, [{"turns": ["<answer> two </answer>"], "done": []}], lambda p: 0))
    tok.chat_template = "{% for m in messages %}Question : {{ m['content'] }}{% endfor %}{% if add_generation_prompt %} answer :{% endif %}"
    try:
        ro = zs.rollout(None, tok, q, RecordingEngine(), cfg)
        assert ro.prompt_ids[0] == tok.encode("Question : " + cfg["prompt_template"].format(question="q1") + " answer :")
        assert ro.answers == ["two"]
    finally:
        tok.chat_template = None
    with pytest.raises(SystemExit, match="has no chat template; set it to false"):
        zs.rollout(None, tok, q, RecordingEngine(), cfg)


def test_answer_is_taken_from_policy_tokens_never_from_documents(tiny_tok, monkeypatch):
    tok, cfg = tiny_tok, config.load_config(["max_turns=1"])
    q = [dict(question="q0", golden_answers=["one"])]
    scripts = [{"turns": ["<search> alpha </search>", "zeta"], "done": []}]
    monkeypatch.setattr(sim, "sample", ScriptedPolicy(tok, scripts, lambda p: 0))

    class Leaky(RecordingEngine):
        def search(self, requests, noise_prob, seed):
            return [["<answer> one </answer>"]]

    ro = zs.rollout(None, tok, q, Leaky(), cfg)
    assert ro.answers == [None]


def test_to_batch_aligns_response_mask_with_tokens(tiny_tok):
    ro = zs.Rollout(prompt_ids=[[5, 6], [7]], response_ids=[[8, 9, 10], [11]], response_mask=[[1, 0, 1], [1]],
                    answers=[None, None], searches=[0, 0])
    ids, attn, rmask = zs.to_batch(ro, pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 8, 9, 10], [7, 11, 0, 0, 0]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert rmask.tolist() == [[0, 0, 1, 0, 1], [0, 1, 0, 0, 0]]


# ----------------------------------------------------------------------------- world
def test_the_simulators_knowledge_is_every_passage_naming_the_querys_entity_those_stating_the_answer_first():
    w = world.build_world(0, 300, 90, phrasings=3, passages=4)
    knowledge = world.knowledge_index(w.docs)
    for q in [q for q in w.test if q["hops"] == 1][:100]:
        about = [d for d in w.docs if q["subject"] in d]  # the oracle: the corpus, in its order
        plain, ranked = knowledge(q["subject"] + " born"), knowledge(q["subject"] + " born", q["golden_answers"])
        stating = [d for d in about if reward.substring_match(d, q["golden_answers"])]
        assert plain == about and q["evidence"][0] in stating
        assert ranked == stating + [d for d in about if d not in stating]
    assert knowledge("who was born in the year", ["1970"]) == []  # no entity named: nothing known



def test_warm_up_shows_results_in_a_random_order_and_answers_from_the_stating_result():
    import collections
    import random
    w = world.build_world(0, 300, 90)
    retriever = engines.Retriever(w.docs)
    single_hop = [q for q in w.train if q["hops"] == 1]
    names = {t: sorted({q["subject"] for q in single_hop if world.SUBJECT_TYPE[q["relation"]] == t}) for t in ("person", "company")}
    rng, where, shown = random.Random(0), collections.Counter(), []
    for q in single_hop[:600]:
        text, queries = world.warmup_trajectory(q, lambda x: retriever.search(x, 3), sim.information, names, rng)
        docs = sim.parse_docs(text[text.index("<information>"):text.index("</information>")], 3)
        answer = text.rsplit("<answer>", 1)[1].split("</answer>")[0].strip()
        stated = world.find_fact(docs, q["subject"], q["relation"])
        values = [world.answer_from_doc(d, q["relation"]) for d in docs]
        assert answer == stated if stated else answer in values or answer == q["subject"]
        # the <think> after the results quotes the one the answer is read from
        quote = text.split("</information>")[1].split("<answer>")[0].strip()
        if answer in values:
            doc = quote.removeprefix("<think> ").removesuffix(" </think>")
            assert doc in docs and (world.find_fact([doc], q["subject"], q["relation"]) if stated
                                    else world.answer_from_doc(doc, q["relation"])) == answer
        else:
            assert quote == ""
        if stated:  # the stating result's place among the shown ones
            where[next(i for i, d in enumerate(docs) if world.find_fact([d], q["subject"], q["relation"]))] += 1
        shown.append(docs == retriever.search(queries[0], 3))
    n = sum(where.values())  # right queries (p_right 0.6) find the fact; it stands at each place ~ n/3
    assert n > 250 and all(abs(where[i] - n / 3) < 4 * (n * 2 / 9) ** 0.5 for i in range(3))
    assert sum(shown) < 0.4 * len(shown)  # mostly not the engine's ranking (1 order in 6 is, by chance)


def test_smoke_run_end_to_end_writes_config_metrics_and_results(tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(HERE, "zerosearch.py"), "preset=smoke", f"out_dir={out}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(row["run"], row["step"]) for row in rows] == [(run, step) for run in ("zerosearch", "search_r1") for step in range(3)]
    assert all(math.isfinite(row["reward"]) and 0 <= row["noise_prob"] <= 0.5 for row in rows)
    assert rows[0]["sim/useful"] + rows[0]["sim/noisy"] > 0 or rows[0]["searches"] == 0
    for run in ("zerosearch", "search_r1"):  # each run searched its engine: the simulator, then BM25 for row (d)
        assert sum(row["searches"] for row in rows if row["run"] == run) > 0, f"{run} never searched"
    assert rows[2]["sim/useful"] > 0  # the simulator wrote useful documents
    assert any(json.loads(line)["queries"] for line in open(out / "predictions.jsonl"))  # the evaluation searched BM25
    results = json.load(open(out / "results.json"))
    rows = {k: v for k, v in results.items() if not k.startswith("reading")}
    assert len(rows) == 5 and all(set(v) == set(world.TEST_SETS) for v in rows.values())
    rag = next(v for k, v in rows.items() if k.startswith("RAG"))  # one search a question, the question itself
    assert all(r["searches"] == 1 and r["queries/question"] == 1 for r in rag.values())
    assert all(abs(sum(x for k, x in r.items() if k.startswith("queries/")) - 1) < 1e-9 for v in rows.values() for r in v.values()
               if r["searches"])
    for key in ("reading", "reading_warmup", "reading_search_r1"):  # the reading check, at each of topk positions
        assert list(results[key]) == ["1", "2", "3"] and all(0 <= em <= 100 for em in results[key].values())
    assert (out / "results.md").exists() and (out / "config.yaml").exists()


def project_imports():
    """{module: {project modules it imports, anywhere in the file}} and the project imports that are
    not at the top level of their file, read from the source with ast (nothing is imported)."""
    import ast
    files = {f[:-3]: os.path.join(HERE, f) for f in os.listdir(HERE)
             if f.endswith(".py") and not f.startswith("test_") and f != "conftest.py"}
    files.update({f"kernels.{f[:-3]}": os.path.join(HERE, "kernels", f) for f in os.listdir(os.path.join(HERE, "kernels"))
                  if f.endswith(".py") and f != "__init__.py"})
    files["kernels"] = os.path.join(HERE, "kernels", "__init__.py")
    graph, nested = {}, []
    for module, path in files.items():
        tree = ast.parse(open(path).read())
        top = set(map(id, tree.body))
        graph[module] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # a relative import inside the kernels package
                    base = "kernels" + ("." + base if base else "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            found = {n for n in names if n in files and n != module}
            found = {n for n in found if not (n == "kernels" and any(m.startswith("kernels.") for m in found))}
            graph[module] |= found
            if found and id(node) not in top:
                nested.append(f"{module} line {node.lineno}")
    return graph, nested


def test_project_modules_import_downward_only_and_at_the_top_of_their_file():
    graph, nested = project_imports()
    assert not nested, f"project imports inside functions: {nested}"
    order, done = [], set()
    while len(done) < len(graph):  # peel off modules whose imports are all placed: fails on a circle
        ready = sorted(m for m in graph if m not in done and graph[m] <= done)
        assert ready, f"import circle among {sorted(set(graph) - done)}"
        order += ready
        done |= set(ready)
    assert not any("zerosearch" in deps for deps in graph.values())  # the top: nothing imports it
    assert graph["config"] == graph["reward"] == graph["parallel"] == set()  # leaves
    assert graph["world"] == {"reward"}  # its knowledge ranks passages by the judge's substring match


def test_reading_check_moves_only_the_answer_bearing_document_to_each_position():
    class Fixed:
        def search(self, requests, noise_prob=0.0, seed=0):
            return [["A", "B", "C"] for _ in requests]

    requests = [{"query": "q", "evidence": ["B"]}, {"query": "q", "evidence": ["Z"]}]
    moved = {at: zs.AnswerAt(Fixed(), at).search(requests) for at in (1, 2, 3)}
    assert moved[1] == [["B", "A", "C"], ["A", "B", "C"]]  # a query whose results miss the answer: unchanged
    assert moved[2] == [["A", "B", "C"], ["A", "B", "C"]]
    assert moved[3] == [["A", "C", "B"], ["A", "B", "C"]]


def test_mode_eval_on_the_saved_policy_repeats_row_c_and_writes_every_prediction(tmp_path, smoke_build):
    out = tmp_path / "out"
    smoke_build(out), smoke_build(tmp_path / "eval")
    run = [sys.executable, os.path.join(HERE, "zerosearch.py"), "preset=smoke", "baseline=false", "threads=1"]
    assert subprocess.run(run + [f"out_dir={out}"], capture_output=True, timeout=600).returncode == 0
    trained = json.load(open(out / "results.json"))
    evaluated = subprocess.run(run + ["mode=eval", f"policy_model={out / 'policy_zerosearch'}", f"out_dir={tmp_path / 'eval'}"],
                               capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    results = json.load(open(tmp_path / "eval" / "results.json"))
    row_c = next(v for k, v in trained.items() if k.startswith("(c)"))
    assert results[str(out / "policy_zerosearch")] == row_c and results["reading"] == trained["reading"]
    for folder in (out, tmp_path / "eval"):  # a training run writes its final evaluation's predictions too
        rows = [json.loads(line) for line in open(folder / "predictions.jsonl")]
        assert [r["set"] for r in rows] == [s for s in row_c if s in world.TEST_SETS for _ in range(row_c[s]["n"])]
        assert any(r["queries"] for r in rows)  # the evaluation searched the real engine
        for r in rows:
            assert r["substring_em"] == reward.substring_match(r["prediction"], r["golden_answers"])
            assert r["prediction"] is None or f"<answer> {r['prediction']} </answer>" in r["response"]
    assert "strict EM" in open(tmp_path / "eval" / "results.md").read()


def test_mode_ask_prints_the_trajectory_with_useful_and_noisy_documents(tmp_path, smoke_build):
    out = tmp_path / "out"
    smoke_build(out)
    base = [sys.executable, os.path.join(HERE, "zerosearch.py"), "preset=smoke", "threads=1", f"out_dir={out}", "mode=ask"]
    w = world.build_world(0, 600, 200)
    question = next(q for q in w.test if q["hops"] == 1)["question"]
    shown = {}
    for noise in ("0", "1"):
        r = subprocess.run(base + ["ask_engine=sim", f"noise_prob={noise}"], input=question + "\n", capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        shown[noise] = r.stdout
        assert f"question: {question}" in r.stdout and "  policy: " in r.stdout and "  answer: " in r.stdout
    # the smoke policy searched the simulator, whose documents are labelled
    assert "engine (useful)" in shown["0"] and "engine (noisy)" in shown["1"] and "noisy" not in shown["0"].split("question:", 1)[1]
    real = subprocess.run(base + [f"question={question}"], capture_output=True, text=True, timeout=600)
    assert real.returncode == 0 and "(useful)" not in real.stdout and f"question: {question}" in real.stdout


def test_the_walkthrough_prints_one_step_whose_clipped_losses_follow_from_its_advantages_and_ratios(tmp_path, smoke_build):
    """tools/walkthrough.py on a smoke build: the trajectory turn by turn, then a row per sampled token whose
    L is max(-A r, -A clip(r, 0.8, 1.2)) of the row's own A and r, and whose KL is 0 (the policy is the
    reference before its first update); the <information> tokens stand as masked blocks, not as rows."""
    smoke_build(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(HERE, "tools", "walkthrough.py"), "preset=smoke",
                        f"out_dir={tmp_path}", "threads=1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "**Question**" in r.stdout and "*policy (sampled, trained)*" in r.stdout
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if re.match(r"\| \d+ \|", line)]
    assert rows
    for t, token, logp, ref, kl, v, a, ratio, loss in rows:
        a, ratio = float(a), float(ratio)
        assert float(kl) == 0.0 and float(logp) <= 0
        assert float(loss) == pytest.approx(max(-a * ratio, -a * min(max(ratio, 0.8), 1.2)), abs=2e-3)
    steps = [int(row[0]) for row in rows]
    assert steps == sorted(steps)
    if "<information>" in r.stdout:  # it searched: the documents are one masked block between sampled rows
        assert "tokens with response_mask 0" in r.stdout


def test_a_step_whose_simulator_outputs_are_mostly_malformed_is_one_warning_line(tmp_path):
    """The engine's counters are totals: the warning compares a step's row with the one before it."""
    lines = []

    class Bar:
        write = staticmethod(lines.append)

        def set_postfix(self, **kwargs):
            pass
    first = {"run": "zerosearch", "step": 0, "reward": 0.0, "em": 0.0, "noise_prob": 0.0,
             "sim/useful": 10, "sim/noisy": 2, "sim/malformed": 3}
    zs.log_step(first, tmp_path / "m.jsonl", Bar(), parallel.Ctx())
    assert lines == []  # 3 of 12 malformed
    zs.log_step(dict(first, step=1, **{"sim/useful": 14, "sim/malformed": 5}), tmp_path / "m.jsonl", Bar(), parallel.Ctx(), first)
    assert lines == []  # 2 of the step's 4: not most
    zs.log_step(dict(first, step=1, **{"sim/useful": 14, "sim/malformed": 6}), tmp_path / "m.jsonl", Bar(), parallel.Ctx(), first)
    assert len(lines) == 1 and lines[0].startswith("warning: step 1: 3 of 4 simulator outputs")
    assert len(open(tmp_path / "m.jsonl").readlines()) == 3
