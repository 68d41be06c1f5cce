"""Fused log-prob/entropy and GAE: Triton kernels beside their torch references."""
from transformers.utils.import_utils import is_kernels_available

# Hugging Face's `kernels` package has this directory's import name. transformers imports it when a version
# it accepts is installed (transformers>=5.25 requires one); run from here, Python finds this directory
# instead and transformers fails on a missing name. Say so plainly.
if is_kernels_available():
    raise ImportError("Hugging Face's `kernels` package is installed, and this repository's kernels/ takes its "
                      "import name: pip uninstall -y kernels && pip install 'transformers>=5.0,<5.25'")

from kernels.gae import gae, gae_reference
from kernels.logprob import (logprob_entropy, logprob_entropy_from_hidden,
                             logprob_entropy_reference, logprob_entropy_from_hidden_reference)
