"""ablate.py: variants and their overrides, a two-variant two-seed grid at smoke size from one shared
build, the table's mean ± sd recomputed from the runs' own results files, resume, and the
<information> mask switch checked on the tokens that carry loss."""
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

import ablate
import config
import zerosearch as zs

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")  # ablate.py
SMOKE = ["preset=smoke", "baseline=false", "eval_size=4"]


def test_variants_parse_into_overrides_of_the_base_config():
    own, shared = ablate.parse(["variants=no-mask,weak-sim", "seeds=2", "steps=4", "out_dir=/tmp/x"])
    assert own["variants"] == ["no-mask", "weak-sim"] and own["seeds"] == 2 and shared == ["steps=4", "out_dir=/tmp/x"]
    base, runs = ablate.plan(own, shared)
    assert [(v, k) for v, k, _, _ in runs] == [("no-mask", 0), ("no-mask", 1), ("weak-sim", 0), ("weak-sim", 1)]
    cfgs = [config.load_config(args) for _, _, args, _ in runs]
    assert cfgs[0]["mask_information"] is False and cfgs[0]["steps"] == 4
    assert cfgs[2]["sim_sft_steps"] == int(base["sim_sft_steps"] * ablate.WEAK_SIM_SHARE)
    assert [c["rl_seed"] for c in cfgs] == [base["seed"], base["seed"] + 1] * 2 and all(c["seed"] == base["seed"] for c in cfgs)
    assert ablate.parse(["quick=true"])[0]["seeds"] == 2 and "steps=15" in ablate.parse(["quick=true"])[1]
    with pytest.raises(SystemExit, match="choose from"):
        ablate.parse(["variants=default,nope"])
    with pytest.raises(SystemExit, match="unknown config key"):
        ablate.plan(*ablate.parse(["variants=default", "stepz=3"]))


def test_a_key_that_ablate_also_sets_reaches_each_run_once_the_last_value_winning(tmp_path):
    base, runs = ablate.plan(*ablate.parse(["quick=true", "steps=40", "variants=default", "seeds=1", f"out_dir={tmp_path}"]))
    args = runs[0][2]
    assert sorted(a.split("=")[0] for a in args) == sorted({a.split("=")[0] for a in args})  # zerosearch.py takes each key once
    cfg = config.load_config(args)
    assert cfg["steps"] == 40 and cfg["eval_size"] == ablate.QUICK["eval_size"] and cfg["out_dir"] == runs[0][3] != base["out_dir"]


def test_a_second_ablate_in_the_same_out_dir_is_one_line(tmp_path):
    lock = config.lock_folder(str(tmp_path))
    with pytest.raises(SystemExit, match=r"^error: out_dir=.* is in use by another run"):
        ablate.main(["variants=default", "seeds=1", f"out_dir={tmp_path}"])
    lock.close()
    assert not (tmp_path / "build").exists()


def test_killing_ablate_with_sigkill_ends_its_runs(tmp_path):
    """A run stands in for zerosearch.py: it writes its pid and sleeps; ablate.py is then killed with SIGKILL."""
    (tmp_path / "zerosearch.py").write_text("import os, time\nopen('pid', 'w').write(str(os.getpid()))\ntime.sleep(120)\n")
    script = (f"import sys; sys.path.insert(0, {HERE!r}); import ablate; ablate.HERE = {str(tmp_path)!r}; "
              f"ablate.run_all([('default', 0, [], {str(tmp_path)!r})], 1)")
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.DEVNULL)
    start = time.time()
    while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
        assert time.time() - start < 60 and parent.poll() is None, "the run never started"
        time.sleep(0.05)
    child = int((tmp_path / "pid").read_text())
    parent.kill()
    parent.wait()
    while alive(child):
        assert time.time() - start < 60, "the run outlived ablate.py"
        time.sleep(0.05)


def alive(pid):
    """Is `pid` running (not gone, nor a zombie that nobody has reaped yet)?"""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_two_variant_two_seed_grid_shares_one_build_and_resume_skips_finished_runs(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["variants=default,untrained-sim", "seeds=2", *SMOKE, f"out_dir={out}"]
    ablate.main(argv)
    builds = os.listdir(out / "build")
    assert len(builds) == 1  # one warm-up, and beside it one simulator per variant's fine-tuning
    assert sorted(d.split("-")[0] for d in os.listdir(out / "build" / builds[0])) == ["simulator", "simulator", "warmup"]
    for variant in ("default", "untrained-sim"):
        for k in (0, 1):
            run = out / "ablate" / "runs" / variant / f"seed{k}"
            assert os.path.realpath(run / "build") == os.path.realpath(out / "build")
            assert "embedded default built" not in open(run / "log.txt").read()  # it loaded the shared build
            rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
            assert sum(row["searches"] for row in rows) > 0  # the variant's simulator was searched
    result = json.load(open(out / "ablate" / "results.json"))
    assert list(result) == ["default", "untrained-sim"] and all(len(seeds) == 2 for seeds in result.values())
    md = open(out / "ablate" / "results.md").read()
    for variant in result:  # mean ± sd of single-hop EM, recomputed from each run's own results.json
        ems = [100 * next(v for k, v in json.load(open(out / "ablate" / "runs" / variant / f"seed{k}" / "results.json"))
                          .items() if k.startswith("(c)"))["single-hop"]["substring_em"] for k in (0, 1)]
        assert f"| {variant} | 2 | {statistics.mean(ems):.1f} ± {statistics.stdev(ems):.1f} |" in md
    assert (out / "ablate" / "curves.png").stat().st_size > 0
    capsys.readouterr()
    stamp = os.path.getmtime(out / "ablate" / "runs" / "default" / "seed0" / "results.json")
    ablate.main(argv)
    assert "4 of 4 runs already done" in capsys.readouterr().out
    assert os.path.getmtime(out / "ablate" / "runs" / "default" / "seed0" / "results.json") == stamp


def test_no_mask_trains_the_information_tokens_as_if_the_policy_wrote_them():
    ro = zs.Rollout(prompt_ids=[[5, 6], [7]], response_ids=[[8, 9, 10, 11], [12]], response_mask=[[1, 0, 0, 1], [1]],
                    answers=[None, None], searches=[1, 0])
    _, attn, masked = zs.to_batch(ro, pad_id=0, device="cpu")
    _, _, unmasked = zs.to_batch(ro, pad_id=0, device="cpu", mask_information=False)
    assert masked.tolist() == [[0, 0, 1, 0, 0, 1], [0, 1, 0, 0, 0, 0]]
    assert unmasked.tolist() == [[0, 0, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]]  # the response, documents included
    assert torch.equal(unmasked.bool(), unmasked.bool() & attn.bool())
