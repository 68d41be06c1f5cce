"""Run Triton kernels on CPU tensors through the interpreter (this machine has no GPU); set
before any test module imports triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
