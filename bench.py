"""Benchmarks that print markdown tables: `python bench.py <section>`, or `python bench.py all`.

Every variant runs in a fresh subprocess, so its peak memory is its own: we report how far the
process's peak RSS (VmHWM, reset once the inputs are allocated) rises above its RSS at that point,
and the mean wall time of two runs after one warm-up. On a CPU-only machine the figures are for
the torch (CPU) path; GPU figures for the Triton kernels cannot be measured here.
"""
import json
import subprocess
import sys
import time

import torch

from kernels import logprob_entropy_from_hidden


def rss_mb(field):  # "VmRSS" (now) or "VmHWM" (peak since the last reset)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def measure(step, repeats=2):
    """-> {peak_mb, seconds} of step() in this process; the caller has just allocated its inputs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS, forgetting the peaks of imports and input set-up
    baseline = rss_mb("VmRSS")
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return {"peak_mb": rss_mb("VmHWM") - baseline, "seconds": (time.perf_counter() - start) / repeats}


# --- logprob: per-token log-prob + entropy + backward from the last hidden state -----------------
N, V, D, TEMPERATURE = 4096, 151936, 896, 1.0


def logprob_inputs():
    torch.manual_seed(0)
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D).mul_(0.02).requires_grad_()
    return hidden, weight, torch.randint(V, (N,))


def naive_logprob_entropy(hidden, weight, labels):
    logp_all = torch.log_softmax((hidden @ weight.t()) / TEMPERATURE, -1)  # the full [N, V] fp32 log-softmax
    logp = logp_all.gather(-1, labels[:, None]).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)  # H = -Σ p log p


def logprob_variant(fn):
    hidden, weight, labels = logprob_inputs()

    def step():
        hidden.grad = weight.grad = None
        logp, entropy = fn(hidden, weight, labels)
        (logp + 0.01 * entropy).sum().backward()
    return measure(step)


VARIANTS = {  # name -> function run in a fresh process, returning {peak_mb, seconds}
    "logprob/naive": lambda: logprob_variant(naive_logprob_entropy),
    "logprob/chunked": lambda: logprob_variant(lambda h, w, y: logprob_entropy_from_hidden(h, w, y, TEMPERATURE)),
}


def in_fresh_process(variant):
    out = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def bench_logprob():
    naive, chunked = in_fresh_process("logprob/naive"), in_fresh_process("logprob/chunked")
    print(f"### logprob + entropy + backward, N={N}, V={V}, D={D}, fp32, CPU ({torch.get_num_threads()} threads)\n")
    print("| path | peak memory over inputs (MB) | time (s) |")
    print("|---|---|---|")
    print(f"| naive `log_softmax(hidden @ W.T)` | {naive['peak_mb']:.0f} | {naive['seconds']:.2f} |")
    print(f"| `logprob_entropy_from_hidden` (torch, chunked) | {chunked['peak_mb']:.0f} | {chunked['seconds']:.2f} |")
    print(f"| ratio naive / chunked | {naive['peak_mb'] / chunked['peak_mb']:.1f}x | "
          f"{naive['seconds'] / chunked['seconds']:.2f}x |")
    print("\nGPU (Triton kernel) figures cannot be measured on this CPU-only machine.\n")


SECTIONS = {"logprob": bench_logprob}

if __name__ == "__main__":
    section = sys.argv[1] if len(sys.argv) > 1 else "all"
    if section == "--variant":
        print(json.dumps(VARIANTS[sys.argv[2]]()))
    else:
        for name in SECTIONS if section == "all" else [section]:
            SECTIONS[name]()
