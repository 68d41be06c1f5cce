"""The paper's ablations on one base config, several RL seeds each, from one shared build.

    python tools/ablate.py                                   # every variant, 3 seeds, on the embedded default
    python tools/ablate.py quick=true                        # fewer steps and seeds (QUICK), for a first look
    python tools/ablate.py variants=default,no-mask seeds=2 parallel=1 steps=40   # any config key applies to all

Each run is `python zerosearch.py` with the variant's overrides, `rl_seed` = the base's + k for its
k-th seed, `threads=1`, in out_dir/ablate/runs/<variant>/seed<k>; the embedded build (warm-up policy
and simulators) is made once in out_dir/build and linked into every run. `parallel` runs go at once.
A finished run (results.json written) is not run again, an interrupted one resumes from its
checkpoint. The runs end with ablate.py, however it ends: the kernel sends each SIGTERM (it saves and stops). Writes out_dir/ablate/results.md, results.json and curves.png.
"""
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository's modules

import build
import config
import report
import zerosearch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
WEAK_SIM_SHARE = 0.25  # weak-sim: the simulator fine-tuned for this share of the base's sim_sft_steps
VARIANTS = {  # name -> overrides of the base config (a function of it where a value depends on it)
    "default": lambda cfg: {},
    "random-noise": lambda cfg: {"curriculum": False},  # the paper's "random": p_end on every call
    "no-noise": lambda cfg: {"p_end": 0.0},
    "no-mask": lambda cfg: {"mask_information": False},
    "weak-sim": lambda cfg: {"sim_sft_steps": max(1, int(cfg["sim_sft_steps"] * WEAK_SIM_SHARE))},
    "untrained-sim": lambda cfg: {"sim_sft_steps": 0},  # the warm-up policy itself as the simulator
    "real-engine": lambda cfg: {"search_backend": "real"},  # Search-R1: RL against BM25
    "grpo": lambda cfg: {"algo": "grpo"},
    "reinforce": lambda cfg: {"algo": "reinforce"},
    "reinforce++": lambda cfg: {"algo": "reinforce++"},
}
QUICK = {"steps": 15, "eval_size": 100}  # quick=true: these overrides and 2 seeds (20 runs; on the earlier default 23 min on 2 cores given the build)
OWN = {"variants": ",".join(VARIANTS), "seeds": None, "quick": False, "parallel": 2}


def parse(argv):
    """-> (ablate's own arguments, the config arguments shared by every run)."""
    own, shared = config.own_arguments(argv, OWN)
    own = {k: config.parse_value(v) if isinstance(v, str) else v for k, v in own.items()}
    own["variants"] = [v for v in str(own["variants"]).split(",") if v]
    if not own["variants"] or not set(own["variants"]) <= VARIANTS.keys():
        raise SystemExit(f"error: variants={','.join(own['variants'])}: choose from {', '.join(VARIANTS)}")
    own["seeds"] = own["seeds"] if own["seeds"] is not None else 2 if own["quick"] is True else 3
    for key in ("seeds", "parallel"):
        if isinstance(own[key], bool) or not isinstance(own[key], int) or own[key] < 1:
            raise SystemExit(f"error: {key} must be a whole number of at least 1, got {own[key]!r}")
    if own["quick"] not in (True, False):
        raise SystemExit(f"error: quick must be true or false, got {own['quick']!r}")
    if own["quick"]:
        shared = [f"{k}={v}" for k, v in QUICK.items() if not any(a.startswith(f"{k}=") for a in shared)] + shared
    return own, shared


def plan(own, shared):
    """-> (base config, [(variant, seed index, the run's zerosearch.py arguments, its out_dir)])."""
    base = config.load_config(shared)
    if base["data"] != "world":
        raise SystemExit("error: ablate.py shares one embedded build between runs: it needs data=world")
    first_seed = base["seed"] if base["rl_seed"] is None else base["rl_seed"]
    runs = []
    for variant in own["variants"]:
        overrides = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in VARIANTS[variant](base).items()]
        for k in range(own["seeds"]):
            out = os.path.join(base["out_dir"], "ablate", "runs", variant, f"seed{k}")
            args = later_wins(shared + overrides + [f"rl_seed={first_seed + k}", "threads=1", "baseline=false", f"out_dir={out}"])
            config.load_config(args)  # a bad override stops here, before any work
            runs.append((variant, k, args, out))
    return base, runs


def end_with_parent(prctl=getattr(ctypes.CDLL(None), "prctl", lambda *args: 0)):
    """Run in each child before it starts: prctl(PR_SET_PDEATHSIG, SIGTERM), so that Linux sends the run
    SIGTERM (it saves a checkpoint and stops) when ablate.py ends, however it ends, kill -9 included."""
    prctl(1, signal.SIGTERM)


def later_wins(args):
    """key=value arguments with each key's last value only, in the key's first place (zerosearch.py refuses a key
    given twice); any other argument stays as it is."""
    return list({a.split("=", 1)[0] if "=" in a else i: a for i, a in enumerate(args)}.values())


def build_once(runs, base):
    """Every build the runs need, made in this process into out_dir/build and linked into each run."""
    shared_build = os.path.abspath(os.path.join(base["out_dir"], "build"))
    for _, _, args, out in runs:
        cfg = config.load_config(args)
        torch.set_num_threads(cfg["threads"])  # as zerosearch.py builds: the same floats, and no idle threads
        build.prepare_embedded(cfg, shared_build, collect=zerosearch.collect)
        os.makedirs(out, exist_ok=True)
        if not os.path.lexists(os.path.join(out, "build")):
            os.symlink(shared_build, os.path.join(out, "build"))


def run_all(runs, parallel):
    """Run what is not finished, `parallel` at a time, with a progress line after each finish."""
    todo = [r for r in runs if not os.path.exists(os.path.join(r[3], "results.json"))]
    print(f"ablate: {len(runs) - len(todo)} of {len(runs)} runs already done", flush=True)
    running, started, done = [], time.time(), 0
    while todo or running:
        while todo and len(running) < parallel:
            variant, k, args, out = todo.pop(0)
            resume = ["resume=true"] if os.path.isdir(os.path.join(out, "checkpoints")) else []
            log = open(os.path.join(out, "log.txt"), "a")
            cmd = [sys.executable, os.path.join(HERE, "zerosearch.py"), *args, *resume]
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=end_with_parent), variant, k, out))
        time.sleep(2)
        for proc, variant, k, out in [r for r in running if r[0].poll() is not None]:
            running = [r for r in running if r[0] is not proc]
            if proc.returncode != 0:
                raise SystemExit(f"error: run {variant} seed {k} failed (exit {proc.returncode}); see {out}/log.txt")
            done += 1
            left = (time.time() - started) / done * (len(todo) + len(running))  # wall time per finished run x runs left
            print(f"ablate: {variant} seed {k} done; {done} of {done + len(todo) + len(running)} this time, "
                  f"about {left / 60:.0f} min left", flush=True)


def summarise(runs):
    """{variant: per seed: the EM of row (c) on each evaluation set and their average, the reading check,
    the mean reward of the last 10 steps, and the reward curve}."""
    out = {}
    for variant, k, args, run_dir in runs:
        results = json.load(open(os.path.join(run_dir, "results.json")))
        row = next(v for label, v in results.items() if label.startswith("(c)"))
        rewards = [r["reward"] for r in report.read_rows(os.path.join(run_dir, "metrics.jsonl")) if r["run"] == "zerosearch"]
        em = {name: 100 * scores["substring_em"] for name, scores in row.items()}  # every evaluation set
        seed = {**em, "avg": statistics.mean(em.values()), "reward_last10": statistics.mean(rewards[-10:])}
        out.setdefault(variant, []).append({**seed, "reading": results.get("reading", {}), "rewards": rewards})
    return out


def mean_sd(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(summary):
    """results.md's table: mean ± sd over seeds, and the difference of the means to `default`."""
    keys = [k for k in next(iter(summary.values()))[0] if k not in ("reward_last10", "reading", "rewards")]  # sets, avg
    base = {k: mean_sd([s[k] for s in summary["default"]])[0] for k in keys} if "default" in summary else None
    lines = ["| variant | seeds | " + " | ".join(f"{k} EM" for k in keys) + " | Δ avg vs default | reward, last 10 steps |"
             " reading Doc 1 / 2 / 3 |", "|---|---|" + "---|" * (len(keys) + 3)]
    for variant, seeds in summary.items():
        cells = [f"{m:.1f} ± {sd:.1f}" for m, sd in (mean_sd([s[k] for s in seeds]) for k in keys)]
        delta = f"{mean_sd([s['avg'] for s in seeds])[0] - base['avg']:+.1f}" if base else "-"
        reward = "{:.3f} ± {:.3f}".format(*mean_sd([s["reward_last10"] for s in seeds]))
        reading = " / ".join(f"{mean_sd([s['reading'][p] for s in seeds])[0]:.1f}"
                             for p in seeds[0]["reading"]) if all(s["reading"] for s in seeds) else "-"
        lines.append(f"| {variant} | {len(seeds)} | " + " | ".join(cells) + f" | {delta} | {reward} | {reading} |")
    return "\n".join(lines) + "\n"


def main(argv):
    own, shared = parse(argv)
    base, runs = plan(own, shared)
    config.check_folder(base["out_dir"], "out_dir")
    with config.lock_folder(base["out_dir"]):  # held to the end: a second ablate.py here stops with one line
        build_once(runs, base)
        run_all(runs, own["parallel"])
        summary = summarise(runs)
        folder = os.path.join(base["out_dir"], "ablate")
        with open(os.path.join(folder, "results.md"), "w") as f:
            f.write(f"# Ablations\n\n`{' '.join(['python tools/ablate.py', *argv])}`\n\nEM (x100) of row (c), evaluated with "
                    f"the real engine, mean ± sd over seeds.\n\n{table(summary)}")
        with open(os.path.join(folder, "results.json"), "w") as f:
            json.dump({v: [{k: x for k, x in s.items() if k != "rewards"} for s in seeds] for v, seeds in summary.items()},
                      f, indent=1)
        report.mean_curves({v: [s["rewards"] for s in seeds] for v, seeds in summary.items()},
                          os.path.join(folder, "curves.png"))
        print(table(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
