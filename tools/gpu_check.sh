#!/usr/bin/env bash
# The check for a machine with one CUDA GPU, from a bare copy of the repository with the machine's own
# Python (nothing is installed): the gpu tests (Triton kernels compiled, the sampler against generate,
# one RL step at the Qwen2.5-0.5B architecture, the smoke preset in bf16 and under torchrun with NCCL),
# then bench.py's GPU sections. Everything goes to gpu_check.md, in $OUT when that is set. Each stage
# has its own time limit, and together they stay under 8 minutes; a stage that fails or runs out of
# time is reported and the next one runs. Exit status 1 if any stage failed.
#     bash tools/gpu_check.sh            PYTHON=python3.12 bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
REPORT="${OUT:-.}/gpu_check.md"
unset TRITON_INTERPRET ZS_TRITON  # the kernels compile for the GPU
failed=0

stage() {  # [fence=1] stage SECONDS TITLE COMMAND...: COMMAND under a time limit, its output to the terminal and the report
    local limit=$1 title=$2 rc
    shift 2
    printf '\n## %s\n\n' "$title" | tee -a "$REPORT"
    if [ -n "${fence:-}" ]; then echo '```' >> "$REPORT"; fi  # plain text: a code block in the markdown
    timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$REPORT"
    rc=$?
    if [ -n "${fence:-}" ]; then echo '```' >> "$REPORT"; fi
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "gpu_check: '$title' stopped at its limit of $limit s" | tee -a "$REPORT"
    fi
    if [ "$rc" -ne 0 ]; then
        echo "gpu_check: '$title' failed (exit $rc)" | tee -a "$REPORT"
        failed=1
    fi
    return "$rc"
}

echo "# gpu_check $(date -u '+%Y-%m-%d %H:%M UTC')" | tee "$REPORT"

# 1. the machine: what the check needs, a missing piece said in one line (and nothing else runs)
printf '\n## machine\n\n' >> "$REPORT"
timeout -k 5 30 "$PY" - <<'EOF' 2>&1 | tee -a "$REPORT" || exit 1
import importlib, sys

def missing(what):
    print(f"gpu_check: {what}")
    sys.exit(1)

if sys.version_info < (3, 10):
    missing(f"Python {sys.version.split()[0]} is too old: the project needs 3.10 or newer")
for name in ("torch", "triton", "transformers", "tokenizers", "numpy", "yaml", "tqdm", "pytest"):
    try:
        importlib.import_module(name)
    except Exception as e:
        missing(f"cannot import {name} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                "install the packages of requirements.txt")
import torch, transformers, triton
if int(transformers.__version__.split(".")[0]) < 5:
    missing(f"transformers {transformers.__version__} is too old: the project needs 5.0 or newer")
if not torch.cuda.is_available():
    missing(f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False); this check needs an NVIDIA GPU")
if not torch.cuda.is_bf16_supported():
    missing(f"{torch.cuda.get_device_name()} does not support bfloat16")
if not torch.distributed.is_nccl_available():
    missing(f"torch {torch.__version__} was built without NCCL")
from kernels import gae
try:  # compile one of the project's kernels: a Triton that cannot compile for this GPU says so here
    gae(torch.zeros(1, 4, device="cuda"), torch.zeros(1, 4, device="cuda"), torch.ones(1, 4, device="cuda"), 1.0, 1.0)
    torch.cuda.synchronize()
except Exception as e:
    missing(f"Triton {triton.__version__} cannot compile a kernel on {torch.cuda.get_device_name()}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}; Python "
      f"{sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
      f"transformers {transformers.__version__}")
EOF

# 2. the gpu tests: in-process ones (kernels, sampler, RL step), then the end-to-end runs, each with its limit
PYTEST=("$PY" -m pytest -q -m gpu -rfEs --durations=8 -p no:cacheprovider tests/test_gpu.py)
fence=1 stage 140 "gpu tests: kernels, sampler, one RL step at 0.5B" "${PYTEST[@]}" -k "not end_to_end"
fence=1 stage 120 "gpu tests: smoke preset in bf16, torchrun with NCCL" "${PYTEST[@]}" -k "end_to_end"

# 3. GPU figures (limits: 30 + 140 + 120 + 45 + 65 + 40 s, and 5 s each to stop = 470 s in all)
stage 45 "bench.py gpu-logprob" "$PY" tools/bench.py gpu-logprob
stage 65 "bench.py gpu-sampler" "$PY" tools/bench.py gpu-sampler
stage 40 "bench.py gpu-step" "$PY" tools/bench.py gpu-step

if [ "$failed" -eq 0 ]; then outcome="every stage passed"; else outcome="a stage failed (see above)"; fi
echo "gpu_check: $outcome; the report is $REPORT" | tee -a "$REPORT"
exit "$failed"
