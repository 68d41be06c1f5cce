"""What a run writes for people to read: results.md and results.json (`write_results`: the paper's table
and the reading check), and figures from metrics.jsonl: `curves` draws a run's training curves (out_dir/curves.png), and
`mean_curves` the mean reward of each ablation variant over its seeds, the spread shaded
(out_dir/ablate/curves.png). matplotlib is imported only here, when a figure is drawn."""
import contextlib
import json
import math
import os

import numpy as np

PANELS = [("reward", "reward (F1)"), ("em", "training EM"), ("searches", "searches per question"),
          ("queries/", "share of queries of each form"), ("noisy_share", "noisy share of searches"),
          ("rollout/kl", "KL to the reference"), ("actor/entropy", "entropy")]  # queries/: one line per form


def read_rows(metrics_path):
    """The rows of metrics.jsonl, each with `noisy_share`: the share of this step's simulator calls
    that were noisy, from the engine's running counts (0 for a real engine, which has none)."""
    rows, last = [json.loads(line) for line in open(metrics_path)], {}
    for row in rows:
        useful, noisy = row.get("sim/useful"), row.get("sim/noisy")
        if useful is None or noisy is None:  # a real engine: its documents are never noisy
            row["noisy_share"] = 0.0
        else:
            before = last.get(row["run"], (0, 0)) if row["step"] else (0, 0)
            calls = useful + noisy - sum(before)
            row["noisy_share"] = (noisy - before[1]) / calls if calls > 0 else math.nan
            last[row["run"]] = (useful, noisy)
    return rows


@contextlib.contextmanager
def figure(png_path, *grid, figsize):
    """The axes of a new figure of `grid` panels (plt.subplots), saved to png_path and closed when the block ends."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(*grid, figsize=figsize)
    yield axes
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)


def curves(metrics_path, png_path):
    """One panel per PANELS key against the step, one line per run (zerosearch, search_r1)."""
    rows = read_rows(metrics_path)
    with figure(png_path, 2, 4, figsize=(17, 6.5)) as axes:
        for ax, (key, title) in zip(axes.flat, PANELS):
            for run in dict.fromkeys(r["run"] for r in rows):
                mine = [r for r in rows if r["run"] == run]
                for k in sorted({k for r in mine for k in r if k.startswith(key)}) if key.endswith("/") else [key]:
                    ax.plot([r["step"] for r in mine], [r.get(k, math.nan) for r in mine],
                            label=f"{run} {k[len(key):]}".strip())
            ax.set(title=title, xlabel="RL step")
            if key in ("reward", "queries/"):
                ax.legend(fontsize=7)
        axes.flat[-1].axis("off")


def mean_curves(curves_by_variant, png_path):
    """curves_by_variant: {variant: [reward per step, one list per seed]} -> the mean over seeds, with
    the range of ±1 standard deviation shaded."""
    with figure(png_path, figsize=(9, 5.5)) as ax:
        for variant, runs in curves_by_variant.items():
            n = min(len(r) for r in runs)
            rewards = np.array([r[:n] for r in runs])
            mean, sd = rewards.mean(0), rewards.std(0, ddof=1) if len(runs) > 1 else np.zeros(n)
            ax.plot(range(n), mean, label=variant)
            ax.fill_between(range(n), mean - sd, mean + sd, alpha=0.2)
        ax.set(xlabel="RL step", ylabel="mean training reward (F1)")
        ax.legend(fontsize=8, ncol=2)


def reading_table(reading):
    """results.md's reading check: one row per policy, EM with the answer in Doc 1 .. Doc k."""
    k = len(next(iter(reading.values())))
    head = "| policy | " + " | ".join(f"answer in Doc {i}" for i in range(1, k + 1)) + " |\n|---|" + "---|" * k + "\n"
    rows = [f"| {label} | " + " | ".join(f"{em:.1f}" for em in res.values()) + " |" for label, res in reading.items()]
    return ("Reading check: single-hop EM (x100) with the real engine's answer-bearing document moved to each "
            "position.\n\n" + head + "\n".join(rows) + "\n")


def results_table(results, sets, strict=False):
    """The paper's table: EM (substring, as the paper's tables) per evaluation set, then (strict) strict
    EM, then F1, and their averages."""
    keys = ["substring_em"] + ["em"] * strict + ["f1"]
    head = "| policy | " + " | ".join(sets) + " | avg |\n|---|" + "---|" * (len(sets) + 1) + "\n"
    lines = []
    for label, res in results.items():
        cells = [[100 * res[s][k] for k in keys] for s in sets]
        avg = [sum(c[j] for c in cells) / len(cells) for j in range(len(keys))]
        lines.append(f"| {label} | " + " | ".join(" / ".join(f"{v:.1f}" for v in c) for c in cells + [avg]) + " |")
    what = "EM / strict EM / F1" if strict else "EM / F1"
    return (f"{what} (x100); EM = a normalised gold answer occurs in the normalised prediction, as in the paper"
            + ("; strict EM = they are equal" if strict else "") + ".\n\n" + head + "\n".join(lines) + "\n")


def search_table(results, sets):
    """results.md's searches: per policy and set, searches a question and the share of its queries of each
    form (world.query_form), where the questions are the embedded world's."""
    forms = list(dict.fromkeys(k for res in results.values() for s in sets for k in res[s] if k.startswith("queries/")))
    head = ("| policy | set | searches a question | " + " | ".join(f[len("queries/"):] for f in forms) + " |\n|---|---|"
            + "---|" * (len(forms) + 1) + "\n")
    rows = [f"| {label} | {s} | {res[s]['searches']:.2f} | " + " | ".join(f"{100 * res[s][f]:.0f}%" if f in res[s] else "" for f in forms) + " |"
            for label, res in results.items() for s in sets]
    return "Searches: how many a question, and the forms of the queries (share of all queries).\n\n" + head + "\n".join(rows) + "\n"


def write_results(results, reading, predictions, sets, cfg, ctx, argv, strict=False):
    """results.md and results.json (the table, and the reading check under `reading`, ...) and
    predictions.jsonl (a row per question of the last policy evaluated), from process 0."""
    table = results_table(results, sets, strict) + "\n" + search_table(results, sets)
    if reading:
        keys = {"(b) warm-up": "reading_warmup", "(c) ZeroSearch": "reading", "(d) Search-R1": "reading_search_r1"}
        results.update({keys.get(label, "reading"): res for label, res in reading.items()})
        table += "\n" + reading_table(reading)
    ctx.print0("\n" + table)
    if ctx.master:
        for name, text in (("results.md", f"# Results\n\n`python zerosearch.py {' '.join(argv)}`\n\n{table}"),
                           ("results.json", json.dumps(results, indent=1)),
                           ("predictions.jsonl", "".join(json.dumps(row) + "\n" for row in predictions))):
            with open(os.path.join(cfg["out_dir"], name), "w") as f:
                f.write(text)
