"""Fused log-prob/entropy and GAE: Triton kernels beside their torch references."""
from kernels.gae import gae, gae_reference
from kernels.logprob import (logprob_entropy, logprob_entropy_from_hidden,
                             logprob_entropy_reference, logprob_entropy_from_hidden_reference)
