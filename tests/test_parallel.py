"""Tests of parallel.py and of the loop's distributed, checkpoint and resume paths: torchrun with two
gloo processes on the CPU (ddp and fsdp) against one process, exact repeats of a seeded run, resume
after SIGKILL and after Ctrl-C against an uninterrupted run, atomic checkpoints, NaN, a failed process.

The oracles are runs of zerosearch.py itself under other conditions (one process, no interruption),
compared row by row; timing fields are left out. Every run shares one embedded world, built once."""
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import build as embedded
import config
import parallel
import ppo
import sim
import world
import zerosearch as zs

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# the smoke preset with a policy warmed up long enough to search, so the simulator is on the path;
# one mini-batch per PPO epoch (8 rows), so one process and two take the same optimizer steps
SMALL = ["preset=smoke", "threads=1", "eval_size=1", "warmup_steps=200", "sim_sft_steps=60",
         "batch_size=4", "n_samples=2", "mini_batch_size=8", "micro_batch_size=4"]
TIMING = {"tokens_per_s", "step_time"}


def engine_rows(policy, tok, questions, engine, cfg, n, seed=0):
    """zerosearch.collect's rows without the policy, which a 200-step warm-up leaves answering too few questions
    right: each question copied as the query, the engine's results useful where they state what it needs."""
    docs = engine.search([{"query": q["question"]} for q in questions[:n]])
    rows = [dict(query=q["question"], question=q["question"], answer=q["golden_answers"][0], documents=d,
                 label="useful" if zs.states(d, q) else "noisy") for q, d in zip(questions, docs)]
    return rows, sum(r["label"] == "useful" for r in rows), sum(r["label"] == "noisy" for r in rows)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """The embedded world, tokenizer, simulator and warm-up policy, built once and copied into each run."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("world") / "build"
    embedded.prepare_embedded(config.load_config(SMALL), str(path), log=lambda *a: None, collect=engine_rows)
    return path


def run(build, out, *args, nproc=1, wait=True):
    """zerosearch.py on `nproc` processes (torchrun, gloo) with SMALL + args, in out_dir=out."""
    if not (out / "build").exists():
        shutil.copytree(build, out / "build")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    cmd = launcher + [os.path.join(HERE, "zerosearch.py"), *SMALL, f"out_dir={out}", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    return r


def metrics(out, name="zerosearch"):
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return [{k: v for k, v in row.items() if k not in TIMING and not k.startswith("time/")}
            for row in rows if row["run"] == name]


def wait_for(condition, proc, what, timeout=120):
    start = time.time()
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: " + proc.stderr.read()[-2000:]
        assert time.time() - start < timeout, f"no {what} after {timeout} s"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- per-row random streams
def test_row_seeds_make_a_rows_samples_independent_of_its_batch():
    torch.manual_seed(0)
    model = world.tiny_model(64, 16, 1, 2, seed=0).eval()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    together, together_logp = sim.sample(model, prompts, 12, seed=[100, 200, 300], eos_token_id=[])
    for i in range(3):  # alone, or in a batch of another order, a row samples what it sampled in the batch
        alone, alone_logp = sim.sample(model, [prompts[i]], 12, seed=[[100, 200, 300][i]], eos_token_id=[])
        assert alone[0] == together[i] and alone_logp[0] == pytest.approx(together_logp[i], abs=1e-5)
    reordered, _ = sim.sample(model, prompts[::-1], 12, seed=[300, 200, 100], eos_token_id=[])
    assert reordered == together[::-1]
    assert sim.draw_kinds(3, 0.5, [1, 2, 3])[1:] == sim.draw_kinds(2, 0.5, [2, 3])


# ----------------------------------------------------------------------------- torchrun, 2 gloo processes
@pytest.fixture(scope="module")
def one_process(build, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    run(build, out, "steps=2", "save_every=1", "critic_warmup=0", "baseline=false")
    return metrics(out)


@pytest.mark.parametrize("sharding", ["sharding=ddp", "sharding=fsdp ref_offload=true grad_checkpointing=true"])
def test_two_processes_sample_the_global_batch_and_take_the_one_process_update(build, one_process, tmp_path, sharding):
    """Same global batch, same rollouts (each row keyed by its global index), same first-update loss
    (the token mean is normalised by the global token count, so DDP/FSDP's gradient average is the
    one-process gradient). Then a resume from the first checkpoint repeats the second step exactly."""
    out = tmp_path / "two"
    run(build, out, "steps=2", "save_every=1", "critic_warmup=0", "baseline=false", *sharding.split(), nproc=2)
    two = metrics(out)
    ref = one_process
    assert two[0]["searches"] > 0 or two[1]["searches"] > 0, "the simulator was never called: the test lost its power"
    for key in ("reward", "em", "searches", "rollout/score_mean", "sim/useful", "sim/noisy"):
        assert two[0][key] == pytest.approx(ref[0][key], rel=1e-9, abs=1e-12), key
    for key in ("actor/loss", "critic/loss", "actor/grad_norm", "critic/grad_norm", "rollout/kl"):
        assert two[0][key] == pytest.approx(ref[0][key], rel=1e-4), key
    # sharded (fsdp) or replicated (ddp) checkpoint of 2 processes: resume from step 1 repeats step 1
    shutil.rmtree(out / "checkpoints" / "zerosearch" / "step_000002")
    run(build, out, "steps=2", "save_every=1", "critic_warmup=0", "baseline=false", "resume=true", *sharding.split(), nproc=2)
    assert metrics(out) == two


def test_same_seed_and_world_size_repeat_the_metrics_exactly(build, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        run(build, out, "steps=2", "critic_warmup=0", "baseline=false", nproc=2)
    assert metrics(a) == metrics(b) and len(metrics(a)) == 2


# ----------------------------------------------------------------------------- resume
RESUME = ["steps=6", "save_every=2", "baseline=true"]


@pytest.fixture(scope="module")
def uninterrupted(build, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run(build, out, *RESUME)
    return out


def searched(out):
    """Both runs of `out` searched their engine and the simulator's counters moved, so the resumed run's
    equal metrics include the engines' counters restored from the checkpoint."""
    for name in ("zerosearch", "search_r1"):
        assert sum(row["searches"] for row in metrics(out, name)) > 0, f"{name} never searched: the test lost its power"
    assert metrics(out)[-1]["sim/useful"] > 0


def test_resume_after_sigkill_repeats_the_uninterrupted_run(build, uninterrupted, tmp_path):
    proc = run(build, tmp_path, *RESUME, wait=False)
    first = tmp_path / "checkpoints" / "zerosearch" / "step_000002"
    wait_for(first.exists, proc, "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = parallel.checkpoints(str(tmp_path / "checkpoints" / "zerosearch"))
    assert saved and not saved[-1].endswith("step_000006"), "killed too late: the run had finished"
    r = run(build, tmp_path, *RESUME, "resume=true")
    assert "zerosearch: resuming from" in r.stdout
    searched(uninterrupted)
    for name in ("zerosearch", "search_r1"):
        assert metrics(tmp_path, name) == metrics(uninterrupted, name)
    assert json.load(open(tmp_path / "results.json")) == json.load(open(uninterrupted / "results.json"))


def test_ctrl_c_saves_at_the_end_of_the_step_and_resume_repeats_the_uninterrupted_run(build, uninterrupted, tmp_path):
    proc = run(build, tmp_path, *RESUME, wait=False)
    rows = tmp_path / "metrics.jsonl"  # Ctrl-C in the second run: the first is finished
    wait_for(lambda: rows.exists() and '"run": "search_r1"' in rows.read_text(), proc, "a search_r1 step")
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    done = len(metrics(tmp_path, "search_r1"))
    assert f"stopped after step {done} of search_r1" in stdout and "Traceback" not in stderr
    assert parallel.checkpoints(str(tmp_path / "checkpoints" / "search_r1"))[-1].endswith(f"step_{done:06d}")
    assert not (tmp_path / "results.json").exists()
    r = run(build, tmp_path, *RESUME, "resume=true")
    assert "zerosearch: resuming from" in r.stdout and "(step 6 of 6)" in r.stdout  # the finished run is not redone
    searched(uninterrupted)
    for name in ("zerosearch", "search_r1"):
        assert metrics(tmp_path, name) == metrics(uninterrupted, name)
    assert json.load(open(tmp_path / "results.json")) == json.load(open(uninterrupted / "results.json"))


# ----------------------------------------------------------------------------- checkpoint files
def tiny_models():
    model = ppo.Actor(world.tiny_model(64, 16, 1, 2, seed=0))
    opt, sched = ppo.make_optimizer(model, 1e-2, 0.0, 0, 10)
    model(torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.long))[0].sum().backward()
    opt.step()
    sched.step()
    return {"actor": ppo.Learner(model, opt, sched)}


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole_and_is_never_resumed(tmp_path, monkeypatch):
    ctx, run_dir = parallel.Ctx(), tmp_path / "checkpoints" / "zerosearch"
    models = tiny_models()
    before = {k: v.clone() for k, v in models["actor"].model.state_dict().items()}
    parallel.save_checkpoint(str(run_dir / "step_000002"), models, {"step": 2}, ctx, keep_last=2)
    import torch.distributed.checkpoint as dcp

    def dies_half_way(state_dict, checkpoint_id, **kw):
        open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", dies_half_way)
    with torch.no_grad():
        for p in models["actor"].model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        parallel.save_checkpoint(str(run_dir / "step_000004"), models, {"step": 4}, ctx, keep_last=2)
    assert (run_dir / "step_000004.tmp").exists()  # the partial write is there, but only under .tmp
    assert parallel.checkpoint_to_resume(True, str(run_dir)) == str(run_dir / "step_000002")
    fresh = tiny_models()
    assert parallel.load_checkpoint(str(run_dir / "step_000002"), fresh, ctx)["step"] == 2
    assert all(torch.equal(before[k], v) for k, v in fresh["actor"].model.state_dict().items())
    monkeypatch.undo()
    for step in (6, 8):  # the next saves clear the partial folder and keep the newest keep_last
        parallel.save_checkpoint(str(run_dir / f"step_{step:06d}"), models, {"step": step}, ctx, keep_last=2)
    assert sorted(os.listdir(run_dir)) == ["step_000006", "step_000008"]


def test_a_resume_from_an_older_checkpoint_removes_the_later_ones(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"step_{step:06d}").mkdir()
    parallel.drop_checkpoints_after(str(tmp_path), 4, parallel.Ctx())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000004"]


def test_sigterm_like_ctrl_c_asks_the_loop_to_save_and_stop():
    flag, restore = parallel.catch_ctrl_c()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        assert flag == [True]
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_resume_picks_the_newest_complete_checkpoint_or_the_named_one_for_its_own_run(tmp_path):
    for run_name, step in [("zerosearch", 2), ("zerosearch", 4), ("search_r1", 2), ("search_r1", 4)]:
        (tmp_path / run_name / f"step_{step:06d}").mkdir(parents=True)
    (tmp_path / "zerosearch" / "step_000006.tmp").mkdir()  # a save that never finished
    zs_dir, r1_dir = str(tmp_path / "zerosearch"), str(tmp_path / "search_r1")
    assert parallel.checkpoint_to_resume(False, zs_dir) is None
    assert parallel.checkpoint_to_resume(True, zs_dir) == os.path.join(zs_dir, "step_000004")
    named = str(tmp_path / "search_r1" / "step_000002")
    assert parallel.checkpoint_to_resume(named, r1_dir) == named  # its own run: that one
    assert parallel.checkpoint_to_resume(named, zs_dir) == os.path.join(zs_dir, "step_000004")  # the other: the newest
    assert parallel.checkpoint_to_resume(True, str(tmp_path / "nothing_yet")) is None


def test_a_checkpoint_that_cannot_be_read_stops_with_one_line(tmp_path):
    ctx = parallel.Ctx()
    parallel.save_checkpoint(str(tmp_path / "step_000002"), tiny_models(), {"step": 2}, ctx, keep_last=2)
    shard = next((tmp_path / "step_000002").glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])  # cut short, as a copy that ran out of space
    with pytest.raises(SystemExit) as e:
        parallel.load_checkpoint(str(tmp_path / "step_000002"), tiny_models(), ctx)
    assert str(e.value).startswith("error: cannot load checkpoint") and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="no such checkpoint folder"):
        parallel.check_config(config.load_config([f"resume={tmp_path / 'nope'}"]), ctx, ("zerosearch",))


class MakesAFile:
    """Pickled, a call that creates `path` when unpickled: what a shared checkpoint could hold."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_a_checkpoint_holding_a_pickled_call_is_loaded_without_running_it(tmp_path):
    ctx, marker = parallel.Ctx(), tmp_path / "code_ran"
    crafted, real = tmp_path / "crafted" / "step_000002", tmp_path / "real" / "step_000002"
    crafted.mkdir(parents=True)
    parallel.save_checkpoint(str(real), tiny_models(), {"step": 2}, ctx, keep_last=2)
    for folder in (crafted, real):  # the old format's files, and torch.distributed.checkpoint's pickled metadata
        torch.save({"step": 2, "payload": MakesAFile(marker)}, folder / "state.pt")
        (folder / ".metadata").write_bytes(pickle.dumps(MakesAFile(marker)))
    with pytest.raises(SystemExit) as e:
        parallel.load_checkpoint(str(crafted), tiny_models(), ctx)
    assert str(e.value).startswith(f"error: cannot load checkpoint {crafted}") and "\n" not in str(e.value)
    assert parallel.load_checkpoint(str(real), tiny_models(), ctx)["step"] == 2  # its own files only
    assert not marker.exists()
    pickle.loads(pickle.dumps(MakesAFile(marker)))  # the oracle: unpickled, the payload does make the file
    assert marker.exists()


def test_nan_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(build, tmp_path, monkeypatch):
    real = ppo.compute_advantages
    calls = []

    def nan_at_third_step(*args, **kw):
        advantages, returns, stats = real(*args, **kw)
        calls.append(1)
        return (advantages * float("nan") if len(calls) == 3 else advantages), returns, stats

    monkeypatch.setattr(ppo, "compute_advantages", nan_at_third_step)
    monkeypatch.setattr(signal, "signal", lambda *a: None)  # leave pytest's own Ctrl-C handler in place
    shutil.copytree(build, tmp_path / "build")
    with pytest.raises(SystemExit) as e:
        zs.main([*SMALL, f"out_dir={tmp_path}", "steps=4", "save_every=2", "critic_warmup=0", "baseline=false"])
    assert str(e.value).startswith("error: NaN in actor loss at step 2") and "\n" not in str(e.value)
    run_dir = tmp_path / "checkpoints" / "zerosearch"
    assert os.listdir(run_dir) == ["step_000002"]  # the good one, and nothing written after the NaN
    assert json.load(open(run_dir / "step_000002" / "state.json"))["step"] == 2


# ----------------------------------------------------------------------------- a failed process
FAILING = """
import sys, time, torch
sys.path.insert(0, {here!r})
import parallel
ctx = parallel.init_processes({{"threads": 1, "device": "cpu", "dist_timeout": 5}})
if ctx.rank == 1:
    {rank1}
ctx.all_sum(torch.ones(1))
"""


@pytest.mark.parametrize("rank1, expected", [("raise ValueError('rank 1 broke')", "rank 1 broke"),
                                             ("time.sleep(120)", "Timed out|timed out|timeout")])
def test_a_failed_or_hung_process_stops_the_whole_job(tmp_path, rank1, expected):
    script = tmp_path / "job.py"
    script.write_text(FAILING.format(here=HERE, rank1=rank1))
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                       capture_output=True, text=True, timeout=100, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode != 0 and time.time() - start < 60
    assert re.search(expected, r.stdout + r.stderr)
