"""Fused log-prob/entropy and GAE: Triton kernels beside their torch references."""
import importlib.metadata

# Hugging Face's `kernels` package has this directory's import name. transformers imports it whenever it
# is installed (and transformers>=5.25 requires it); run from here, Python finds this directory instead
# and transformers fails on a missing name. Say so plainly.
try:
    importlib.metadata.version("kernels")
    raise ImportError("Hugging Face's `kernels` package is installed, and this repository's kernels/ takes its "
                      "import name: pip uninstall -y kernels && pip install 'transformers>=5.0,<5.25'")
except importlib.metadata.PackageNotFoundError:
    pass

from kernels.gae import gae, gae_reference
from kernels.logprob import (logprob_entropy, logprob_entropy_from_hidden,
                             logprob_entropy_reference, logprob_entropy_from_hidden_reference)
