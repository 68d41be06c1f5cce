"""Bad inputs and faults, each fed to the code: a clear one-line error that says what to fix, a
counted skip, or the stated recovery; never a hang, a traceback, a broken cache or a lost checkpoint.
docs/robustness.md lists the cases and what each gets."""
import errno
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import build
import config
import engines
import parallel
import ppo
import reward
import sim
import simulator
import world
import zerosearch as zs

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def one_line_error(fn, *args, match=""):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message and match in message, message
    return message


@pytest.fixture(scope="module")
def tok():
    cfg = config.load_config([])
    return world.build_tokenizer(["alpha beta gamma Doc 1: . one two", cfg["prompt_template"], cfg["direct_template"],
                                  cfg["invalid_action"]])


# ----------------------------------------------------------------------------- config and command line
@pytest.mark.parametrize("arg, match", [
    ("max_turns=-1", "max_turns must be 0 or more"), ("device=tpu", "device must be one of auto, cpu, cuda"),
    ("device=gpu", "device must be one of"), ("temperature=0", "temperature must be greater than 0"),
    ("eval_size=0", "eval_size must be at least 1"), ("out_dir=", "out_dir is empty"),
    ("rl_seed=abc", "rl_seed must be null"), ("max_prompt_tokens=0", "max_prompt_tokens must be at least 1"),
    ("sim_batching=many", "sim_batching must be one of"),
    ("ask_engine=google", "ask_engine must be one of null, sim, real, retriever, http; got 'google'"),
    ("eval_data=nq=a.jsonl", "eval_data names files but data=world")])
def test_a_bad_config_value_is_one_line(arg, match):
    one_line_error(config.load_config, [arg], match=match)


@pytest.mark.parametrize("args, match", [
    (["prompt_template=Question: {question}"], "YAML read a dict: quote text with ': '"),
    (["prompt_template=Q {foo} {question}"], "it has ['foo', 'question']"),
    (["direct_template=Answer now ."], "direct_template must hold {question}"),
    (["sim_template_finetuned=Doc {k}"], "sim_template_finetuned must hold {query}"),
    (["prompt_template=Q {question"], "prompt_template is not a template"),
    (["question=1984"], "question must be text, got 1984: quote it"),
    (["prompt_template=" + "x" * 100_001], "prompt_template is 100001 characters long"),
    (["top_p=-1"], "top_p must be greater than 0 and at most 1"), (["top_p=1.5"], "top_p must be"),
    (["temperature=inf"], "temperature must be a number, got inf"), (["sim_temperature=-1"], "sim_temperature must be 0 or more"),
    (["steps=3", "seed=1", "steps=4"], "steps given more than once on the command line"),
    (["keep_last=0"], "keep_last must be at least 1")])
def test_text_templates_ranges_and_repeated_keys_are_one_line(args, match):
    one_line_error(config.load_config, args, match=match)


def test_a_quoted_template_is_read_as_text():
    cfg = config.load_config(['prompt_template="Question: {question}"'])
    assert cfg["prompt_template"] == "Question: {question}"


def test_a_world_too_small_for_its_test_sets_is_refused_and_the_smallest_allowed_has_them():
    assert world.build_world(0, 5, 2).test == []  # the case: no question to evaluate on
    one_line_error(config.load_config, ["world_persons=5", "world_companies=2"], match="the world needs 7 to 1500 companies")
    one_line_error(config.load_config, ["world_persons=7000"], match="at most 6400 persons")
    one_line_error(config.load_config, ["world_phrasings=4"], match="world_phrasings must be 1 to 3 and world_passages 0 to 6")
    one_line_error(config.load_config, ["world_passages=9"], match="got 3 and 9")
    config.load_config(["world_persons=7", "world_companies=7"])
    for seed in range(5):
        w = world.build_world(seed, 7, 7)
        assert {q["hops"] for q in w.test} == {1, 2} and w.train


def test_a_yaml_alias_bomb_and_a_50_mb_value_are_refused_at_once(tmp_path):
    keys = ["question", "prompt_template", "direct_template", "invalid_action", "sim_template_finetuned",
            "sim_template_prompted", "sim_template_prompted_noisy", "corpus", "data"]
    lines = ['question: &k0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"{key}: &k{i} [" + ", ".join([f"*k{i - 1}"] * 9) + "]" for i, key in enumerate(keys[1:], 1)]  # 9^9 leaves
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    (tmp_path / "big.yaml").write_text('prompt_template: "' + "x" * 50_000_000 + '"\n')
    start = time.time()
    one_line_error(config.load_config, ["--config", str(tmp_path / "bomb.yaml")], match="question must be one value")
    one_line_error(config.load_config, ["--config", str(tmp_path / "big.yaml")], match="(1 MB at most)")
    assert time.time() - start < 5


def test_bad_config_files_are_one_line(tmp_path):
    (tmp_path / "broken.yaml").write_text("steps: [1, 2\n")
    (tmp_path / "list.yaml").write_text("- steps\n- 3\n")
    (tmp_path / "latin1.yaml").write_bytes("steps: 3 # caf\xe9\n".encode("latin-1"))
    one_line_error(config.load_config, ["--config", str(tmp_path / "broken.yaml")], match="not valid YAML")
    one_line_error(config.load_config, ["--config", str(tmp_path / "list.yaml")], match="holds a list")
    one_line_error(config.load_config, ["--config", str(tmp_path / "latin1.yaml")], match="not valid YAML")
    one_line_error(config.load_config, ["--config", str(tmp_path)], match="config file not found")


@pytest.mark.parametrize("where", ["file", "dev_null", "read_only"])
def test_an_unusable_out_dir_is_one_line_before_any_work(tmp_path, where):
    if where == "read_only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    path = {"file": tmp_path / "a_file", "dev_null": "/dev/null/out", "read_only": tmp_path / "ro" / "out"}[where]
    if where == "file":
        path.write_text("")
    if where == "read_only":
        (tmp_path / "ro").mkdir(mode=0o500)
    one_line_error(config.check_folder, str(path), "out_dir", match="cannot hold files")


def test_help_prints_how_to_run_and_every_config_key():
    out = subprocess.run([sys.executable, os.path.join(HERE, "zerosearch.py"), "--help"], capture_output=True,
                         text=True, timeout=120).stdout
    assert "python zerosearch.py preset=smoke" in out
    for key in config.load_config([]):
        assert f"\n{key}:" in out


def test_a_second_run_in_the_same_out_dir_is_one_line_and_the_lock_ends_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, {HERE!r}); import config; "
                               f"lock = config.lock_folder({str(tmp_path)!r}); print('locked', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    second = subprocess.run([sys.executable, os.path.join(HERE, "zerosearch.py"), "preset=smoke", "threads=1",
                             f"out_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 1 and second.stderr.strip().splitlines() == [
        f"error: out_dir={tmp_path} is in use by another run (it holds .lock there); wait for it, or set another out_dir"]
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "build").exists()  # it wrote nothing
    holder.kill()  # as kill -9: the OS lets go of the lock with the process
    holder.wait()
    config.lock_folder(str(tmp_path)).close()


def test_resume_drops_a_metrics_line_cut_off_by_a_kill(tmp_path, capsys):
    rows = [{"run": "search_r1", "step": 0, "reward": 0.5}, {"run": "search_r1", "step": 1, "reward": 0.25}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows) + json.dumps({"run": "zerosearch", "step": 0})[:17])
    cfg = config.load_config(["resume=true"])
    assert parallel.resume_or_start_over(str(tmp_path / "checkpoints" / "zerosearch"), str(metrics), {}, None, cfg,
                                   parallel.Ctx()) == (0, cfg["kl_coef"])
    assert [json.loads(line) for line in open(metrics)] == rows
    assert capsys.readouterr().out.count("its last line was cut off by an interrupted write; it is dropped") == 1


def test_device_cuda_without_cuda_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    one_line_error(parallel.init_processes, config.load_config(["device=cuda"]), match="no CUDA GPU")


# ----------------------------------------------------------------------------- data and models
def test_a_huge_question_is_skipped_counted_and_reported_once_without_tokenizing_it(tok, capsys):
    cfg = config.load_config(["max_prompt_tokens=64"])
    questions = [{"question": "alpha beta"}, {"question": "alpha " * 2_000_000}, {"question": "one " * 70}]
    start = time.time()
    kept = build.fitting(questions, tok, cfg, "data.jsonl", parallel.Ctx())
    assert kept == questions[:1] and time.time() - start < 5
    assert capsys.readouterr().out.count("note: 2 of 3 questions of data.jsonl") == 1
    one_line_error(build.fitting, questions[1:], tok, cfg, "data.jsonl", parallel.Ctx(), match="no question")


@pytest.mark.parametrize("content, match", [
    (b'{"question": "q", "golden_answers": true}\n', "golden_answers is true"),
    (b'{"question": "q", "golden_answers": ["caf\xe9"]}\n', "data.jsonl:1: not UTF-8"),
    (b'{"question": "q", "golden_answers": ["a"]}\n[1, 2]\n', "data.jsonl:2: not a JSON object")])
def test_bad_data_rows_are_one_line_with_file_and_line(tmp_path, content, match):
    (tmp_path / "data.jsonl").write_bytes(content)
    one_line_error(world.load_questions, str(tmp_path / "data.jsonl"), match=match)


def test_a_corpus_that_is_not_utf8_or_is_a_folder_is_one_line(tmp_path):
    (tmp_path / "corpus.jsonl").write_bytes(b'{"contents": "fine"}\n{"contents": "\xff\xfe"}\n')
    one_line_error(world.load_corpus, str(tmp_path / "corpus.jsonl"), match="corpus.jsonl:2: not UTF-8")
    one_line_error(lambda path: list(world.read_jsonl(path)), str(tmp_path), match="is a folder")


def test_a_model_that_cannot_load_is_one_line_before_the_build(tmp_path):
    one_line_error(build.check_model, "policy_model", str(tmp_path / "nope"), match="no such model folder")
    (tmp_path / "empty").mkdir()
    one_line_error(build.check_model, "sim_model", str(tmp_path / "empty"), match="needs config.json and the weights")
    model = world.tiny_model(16, 8, 1, 2, seed=0)
    model.save_pretrained(tmp_path / "good")
    one_line_error(build.check_model, "policy_model", str(tmp_path / "good"), match="no tokenizer in the folder")
    world.build_tokenizer(["alpha beta"]).save_pretrained(tmp_path / "good")
    build.check_model("policy_model", str(tmp_path / "good"))
    model.config.auto_map = {"AutoModelForCausalLM": "modeling_mine.MyModel"}  # what a model with its own code declares
    model.save_pretrained(tmp_path / "custom")
    world.build_tokenizer(["alpha beta"]).save_pretrained(tmp_path / "custom")
    one_line_error(build.check_model, "policy_model", str(tmp_path / "custom"), match="needs its own code (auto_map")


def test_a_corpus_without_a_word_is_one_line(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"contents": ""}\n{"contents": " . , "}\n')
    one_line_error(world.load_corpus, str(tmp_path / "corpus.jsonl"), match="no documents in the corpus hold a word")


def test_the_real_engine_cuts_a_huge_document_to_doc_tokens_at_once(tok):
    cfg = config.load_config(["doc_tokens=5"])
    huge = "alpha beta " * 100_000 + "gamma"  # 1.1 MB on one corpus line
    engine = build.make_engine("real", cfg, engines.Retriever([huge, "one two"]), None, parallel.Ctx(), tok=tok)
    start = time.time()
    docs = engine.search([{"query": "gamma"}, {"query": "two"}])
    assert time.time() - start < 2 and docs == [["alpha beta alpha beta alpha"], ["one two"]]
    assert len(tok.encode(docs[0][0], add_special_tokens=False)) == 5 and huge.startswith(docs[0][0])


@pytest.mark.parametrize("args, match", [(["topk=100000"], "topk=100000 documents of doc_tokens=40 tokens do not fit in max_response_tokens=400"),
                                         (["topk=4"], "topk=4 is more than the corpus holds: set topk=3 or less")])
def test_topk_beyond_the_response_or_the_corpus_is_one_line_before_any_work(tmp_path, args, match):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "alpha ?", "golden_answers": ["beta"]}) + "\n")
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"contents": t}) + "\n" for t in ["alpha", "beta", "one"]))
    world.tiny_model(16, 8, 1, 2, seed=0).save_pretrained(tmp_path / "policy")
    world.build_tokenizer(["alpha beta one"]).save_pretrained(tmp_path / "policy")
    data = [f"data={tmp_path / 'q.jsonl'}", f"eval_data=q={tmp_path / 'q.jsonl'}", f"corpus={tmp_path / 'corpus.jsonl'}"]
    one_line_error(zs.main, data + [f"policy_model={tmp_path / 'policy'}", "search_backend=real", "threads=1",
                                    f"out_dir={tmp_path / 'out'}", *args], match=match)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_an_eval_set_named_twice_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "q", "golden_answers": ["a"]}) + "\n")
    monkeypatch.setattr(world, "load_tokenizer", lambda name: world.build_tokenizer(["q"]))
    cfg = config.load_config([f"data={tmp_path / 'q.jsonl'}", f"eval_data=a={tmp_path / 'q.jsonl'},a={tmp_path / 'q.jsonl'}",
                              "policy_model=org/policy", "eval_backend=retriever"])
    one_line_error(build.setup, cfg, parallel.Ctx(), match="a name no other set has")


def test_a_simulator_that_is_the_policy_is_one_line_before_any_training(tmp_path, monkeypatch):
    world.tiny_model(16, 8, 1, 2, seed=0).save_pretrained(tmp_path / "policy")
    world.build_tokenizer(["alpha beta"]).save_pretrained(tmp_path / "policy")
    monkeypatch.setattr(zs.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    one_line_error(zs.main, [f"policy_model={tmp_path / 'policy'}", f"sim_model={tmp_path / 'policy'}/", "world_persons=300",
                             "world_companies=90", "threads=1", f"out_dir={tmp_path / 'out'}"], match="is the policy itself")


@pytest.mark.parametrize("choice, cause", [({"text": ""}, "empty completions"), ({}, "choices without `text`")])
def test_an_http_simulator_whose_completions_are_mostly_empty_stops_the_run(monkeypatch, choice, cause):
    reply = {"choices": [dict(choice, index=i) for i in range(3)] + [{"index": 3, "text": "Doc 1: a"}]}
    monkeypatch.setattr(engines, "post_json", lambda url, body, timeout, attempts, read, *hints: read(reply))
    engine = engines.HttpEngine(config.load_config(["search_backend=http"]), world.build_tokenizer(["a"]), "sim")
    requests = [{"query": "q", "question": "q", "golden_answers": ["a"]}] * 4
    one_line_error(engine.search, requests, 0.0, [0, 1, 2, 3], match=f"sent {cause} for 3 of 4 prompts")


def test_ask_without_a_question_says_that_it_reads_standard_input(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    zs.ask(None, None, None, config.load_config(["mode=ask", 'question=""']), {})
    assert "reading questions from standard input, one a line (Ctrl-D ends)" in capsys.readouterr().err


def test_real_models_on_the_world_build_no_tiny_model(monkeypatch):
    """preset=paper without data=: the world's questions and engine, not minutes of a tiny warm-up."""
    monkeypatch.setattr(build, "prepare_embedded", lambda *a, **k: pytest.fail("built the tiny models"))
    monkeypatch.setattr(world, "load_tokenizer", lambda name: world.build_tokenizer(["x"]))
    cfg = config.load_config(["policy_model=org/policy", "sim_model=org/simulator", "world_persons=300",
                              "world_companies=90"])
    tok, train, evals, retriever, sim_path, policy_path, knowledge = build.setup(cfg, parallel.Ctx())
    assert (sim_path, policy_path, knowledge) == ("org/simulator", "org/policy", None) and train and evals


def test_eval_size_is_per_set_on_the_world(monkeypatch):
    w = world.build_world(0, 300, 90)
    monkeypatch.setattr(build, "prepare_embedded", lambda cfg, cache, **k: (w, None, "sim", "warmup"))
    monkeypatch.setattr(world, "load_tokenizer", lambda path: world.world_tokenizer(w, config.load_config([])))
    evals = build.setup(config.load_config(["eval_size=1"]), parallel.Ctx())[2]
    assert {k: len(v) for k, v in evals.items()} == {"single-hop": 1, "two-hop": 1}


# ----------------------------------------------------------------------------- checkpoints and the build
def test_a_rerun_without_resume_keeps_the_earlier_checkpoints_and_says_how_to_continue(tmp_path):
    (tmp_path / "step_000004").mkdir()
    one_line_error(parallel.start_over, str(tmp_path), parallel.Ctx(), match="continue it with resume=true")
    assert (tmp_path / "step_000004").is_dir()


@pytest.mark.parametrize("change, match", [({"algo": "grpo"}, "written with algo=ppo"),
                                           ({"policy_model": "org/other"}, "written with policy_model=None"),
                                           ({"steps": 3}, "past steps=3")])
def test_resume_refuses_a_checkpoint_of_another_run(change, match):
    cfg = config.load_config([])
    state = {"step": 4, "config": {k: cfg[k] for k in parallel.RESUME_KEYS}}
    one_line_error(parallel.check_resume, "ckpt/step_000004", state, dict(cfg, **change), match=match)
    parallel.check_resume("ckpt/step_000004", state, cfg)


def test_a_full_disk_during_a_save_names_the_intact_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    model = ppo.Actor(world.tiny_model(64, 16, 1, 2, seed=0))
    models = {"actor": ppo.Learner(model, *ppo.make_optimizer(model, 1e-3, 0.0, 0, 10))}
    run_dir = tmp_path / "zerosearch"
    parallel.save_checkpoint(str(run_dir / "step_000002"), models, {"step": 2}, parallel.Ctx(), keep_last=2)

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dcp, "save", full)
    message = one_line_error(parallel.save_checkpoint, str(run_dir / "step_000004"), models, {"step": 4},
                             parallel.Ctx(), 2, match="no space left")
    assert str(run_dir / "step_000002") in message and sorted(os.listdir(run_dir)) == ["step_000002"]


def test_a_build_killed_half_way_or_cut_short_is_built_again(tmp_path, monkeypatch):
    cfg = config.load_config(["preset=smoke", "warmup_steps=2", "sim_sft_steps=2", "world_persons=300", "world_companies=90"])
    saved = build.save_atomically
    row = dict(query="q", question="q ?", answer="a", documents=["d"], label="useful")

    def one_row(*args):  # a 2-step warm-up answers nothing right, so zerosearch.collect would find no row
        return [row, dict(row, label="noisy")], 1, 1

    def dies_while_saving_the_simulator(model, tok, path):
        if "simulator" in path:
            os.makedirs(path + ".tmp")
            open(os.path.join(path + ".tmp", "config.json"), "w").write("{")  # half a file
            raise OSError("killed")
        saved(model, tok, path)

    monkeypatch.setattr(build, "save_atomically", dies_while_saving_the_simulator)
    with pytest.raises(OSError):
        build.prepare_embedded(cfg, str(tmp_path), log=lambda *a: None, collect=one_row)
    monkeypatch.undo()
    logs = []
    _, _, sim_dir, policy_dir = build.prepare_embedded(cfg, str(tmp_path), log=logs.append, collect=one_row)
    assert "built" in logs[-1] and os.path.isdir(sim_dir) and os.path.isdir(policy_dir)
    assert not any(name.endswith(".tmp") for name in os.listdir(os.path.dirname(sim_dir)))
    sim.SimEngine(zs.AutoModelForCausalLM.from_pretrained(sim_dir), world.load_tokenizer(sim_dir), cfg)  # it loads
    weights = os.path.join(sim_dir, "model.safetensors")
    with open(weights, "r+b") as f:  # cut short, as a full disk or a copy that stopped leaves it
        f.truncate(os.path.getsize(weights) // 2)
    _, _, sim_dir, _ = build.prepare_embedded(cfg, str(tmp_path), log=logs.append, collect=one_row)
    assert "built" in logs[-1] and build.whole(sim_dir)
    sim.SimEngine(zs.AutoModelForCausalLM.from_pretrained(sim_dir), world.load_tokenizer(sim_dir), cfg)


# ----------------------------------------------------------------------------- tools/simulator.py train
def test_sim_train_checks_its_rows_and_its_output_before_any_work(tmp_path):
    good = {"query": "q", "question": "q ?", "answer": "a", "label": "useful", "documents": ["d"]}
    for bad in ({**good, "answer": None}, {**good, "documents": ["d", 3]}, {**good, "query": ""}):
        (tmp_path / "rows.jsonl").write_text(json.dumps(bad) + "\n")
        one_line_error(simulator.main, ["train", f"data={tmp_path / 'rows.jsonl'}", "model=unused"], match="line 1")
    (tmp_path / "rows.jsonl").write_text(json.dumps(good) + "\n")
    (tmp_path / "taken").write_text("")
    one_line_error(simulator.main, ["train", f"data={tmp_path / 'rows.jsonl'}", "model=unused", f"out={tmp_path / 'taken'}"],
                   match="out=")


# ----------------------------------------------------------------------------- Ctrl-C
def test_a_second_ctrl_c_stops_at_once_even_inside_one_long_torch_op(tmp_path):
    script = tmp_path / "long_op.py"
    script.write_text(f"import sys; sys.path.insert(0, {HERE!r})\n"
                      "import torch, parallel\ntorch.set_num_threads(1)\nparallel.catch_ctrl_c()\n"
                      "a = torch.rand(1500, 1500) / 1500\nprint('ready', flush=True)\n"
                      "torch.linalg.matrix_power(a, 2 ** 60)\nprint('the op finished', flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.time() - sent < 10 and "the op finished" not in out
    assert "SIGINT again: stopping now" in err


# ----------------------------------------------------------------------------- fuzz
def test_parsers_reward_and_rollout_masks_survive_random_bytes_and_token_ids(tok):
    rng = random.Random(0)
    pieces = ["<search>", "</search>", "<answer>", "</answer>", "<information>", "</information>", "alpha", " ", "\n",
              "\x00", "\ufffd", "é"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) if rng.random() < 0.7 else chr(rng.randrange(0x10FFFF // 64))
                       for _ in range(rng.randrange(30)))
        action, answer = zs.parse_action(text), reward.extract_answer(text)
        assert action is None or (action[0] in ("search", "answer") and isinstance(action[1], str))
        for fn in (reward.f1_score, reward.exact_match, reward.substring_match):
            assert 0.0 <= fn(answer, [text or "x", "alpha"]) <= 1.0
    cfg = config.load_config(["max_turns=2", "max_turn_tokens=12", "max_response_tokens=60", "doc_tokens=20"])
    model = world.tiny_model(len(tok), 16, 1, 2, seed=0)
    with torch.no_grad():  # a flat output layer: the policy samples uniformly random token ids
        model.lm_head.weight.zero_()

    class RandomDocs:
        stats = {}

        def search(self, requests, noise_prob, seed):
            return [[" ".join(rng.choice(["alpha", "<answer>", "one", "Doc"]) for _ in range(rng.randrange(8)))
                     for _ in range(rng.randrange(4))] for _ in requests]

    questions = [dict(question=f"alpha {i}", golden_answers=["one"]) for i in range(16)]
    for trial in range(3):
        ro = zs.rollout(model, tok, questions, RandomDocs(), dict(cfg, temperature=1.0), seeds=[trial * 100 + i for i in range(16)])
        for r, m, a in zip(ro.response_ids, ro.response_mask, ro.answers):
            assert len(r) == len(m) <= cfg["max_response_tokens"] and set(m) <= {0, 1}
            assert a == reward.extract_answer(tok.decode([t for t, keep in zip(r, m) if keep]))
        ids, attn, mask = zs.to_batch(ro, tok.pad_token_id, "cpu")
        assert mask.sum().item() == sum(map(sum, ro.response_mask)) and bool((mask <= attn).all())


def test_a_warm_up_that_answers_nothing_right_is_one_line_before_the_simulator_trains(tmp_path):
    cfg = config.load_config(["preset=smoke", "warmup_steps=2", "world_persons=300", "world_companies=90"])
    with pytest.raises(SystemExit, match="gave 0 useful and 5 noisy rows, and the simulator needs both; raise warmup_steps"):
        build.prepare_embedded(cfg, str(tmp_path), log=lambda *a: None, collect=lambda *a: ([], 0, 5))


def test_an_untrained_simulator_collects_no_rows_and_is_the_warm_up_policy(tmp_path):
    """sim_sft_steps=0 (ablate.py's untrained-sim): no trajectories are collected, and the simulator
    saved is the warm-up policy itself, weight for weight."""
    cfg = config.load_config(["preset=smoke", "warmup_steps=2", "world_persons=300", "world_companies=90", "sim_sft_steps=0"])

    def no_collection(*args):
        raise AssertionError("an untrained simulator collected rows")
    _, _, sim_dir, policy_dir = build.prepare_embedded(cfg, str(tmp_path), log=lambda *a: None, collect=no_collection)
    simulator, policy = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (sim_dir, policy_dir))
    assert simulator.keys() == policy.keys() and all(torch.equal(simulator[k], policy[k]) for k in policy)
