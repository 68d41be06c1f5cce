"""The `gpu` marker, whether this pytest process runs the Triton kernels compiled or interpreted, and
the smoke preset's build, made once a session for the tests that run the pipeline on it.

@triton.jit reads TRITON_INTERPRET when `kernels` is first imported, so a process runs the kernels one
way only. They run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set here before
any test module imports triton), as test_kernels.py needs, unless the run selects the gpu tests
(`python -m pytest -m gpu`) on a machine with CUDA: then the variable is left unset and they test the
compiled kernels. A gpu test that needs compiled kernels in any other run skips and says so.
"""
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))  # tests import ablate, bench


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; `python -m pytest -m gpu` runs these with the "
                                       "Triton kernels compiled")
    if not (torch.cuda.is_available() and config.getoption("markexpr") == "gpu"):
        os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here"))


@pytest.fixture(scope="session")
def smoke_build(tmp_path_factory):
    """-> copy(out_dir): puts the smoke preset's build, made once a session, in out_dir/build, where a run of
    the preset finds it by its digest and loads it. test_smoke_run_end_to_end_writes_config_metrics_and_results
    and the ablation grid's test make their own from nothing."""
    import build
    import config
    import zerosearch
    made = tmp_path_factory.mktemp("smoke") / "build"
    build.prepare_embedded(config.load_config(["preset=smoke"]), str(made), log=lambda *a: None, collect=zerosearch.collect)
    return lambda out_dir: shutil.copytree(made, os.path.join(out_dir, "build"))
