"""Per-token log-probability and entropy from logits (or from hidden states and the lm_head
weight) without materialising a full fp32 log_softmax.

The torch references are the CPU path and the oracle for the Triton kernels.
"""
import torch
from torch.utils.checkpoint import checkpoint

CHUNK_ROWS = 1024


def _logprob_entropy_dense(logits, labels, temperature: float):
    """logits [n, V], labels [n] -> logp [n], entropy [n]; fp32 math on one chunk."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - lse
    p = torch.softmax(z, dim=-1)
    entropy = lse - (p * z).sum(-1)  # H = -Σ p log p = lse - Σ p z
    return logp, entropy


def logprob_entropy_reference(logits, labels, temperature: float = 1.0, chunk_rows: int = CHUNK_ROWS):
    """logits [N, V], labels [N] -> (logp [N], entropy [N]), differentiable in logits.

    Rows are processed in chunks under activation checkpointing, so only one chunk's fp32
    softmax lives at a time, in forward and in backward.
    """
    outs = [checkpoint(_logprob_entropy_dense, logits[i:i + chunk_rows], labels[i:i + chunk_rows],
                       temperature, use_reentrant=False) if logits.requires_grad else
            _logprob_entropy_dense(logits[i:i + chunk_rows], labels[i:i + chunk_rows], temperature)
            for i in range(0, logits.shape[0], chunk_rows)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def _from_hidden_chunk(hidden, weight, labels, temperature: float):
    return _logprob_entropy_dense(hidden @ weight.t(), labels, temperature)


def logprob_entropy_from_hidden_reference(hidden, weight, labels, temperature: float = 1.0,
                                          chunk_rows: int = CHUNK_ROWS):
    """hidden [N, D], weight [V, D] (the lm_head), labels [N] -> (logp [N], entropy [N]).

    The lm_head matmul is done per chunk of rows and recomputed in backward, so the [N, V]
    logits never exist at once.
    """
    grad = hidden.requires_grad or weight.requires_grad
    outs = [checkpoint(_from_hidden_chunk, hidden[i:i + chunk_rows], weight, labels[i:i + chunk_rows],
                       temperature, use_reentrant=False) if grad else
            _from_hidden_chunk(hidden[i:i + chunk_rows], weight, labels[i:i + chunk_rows], temperature)
            for i in range(0, hidden.shape[0], chunk_rows)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def logprob_entropy(logits, labels, temperature: float = 1.0):
    """Dispatch point (the Triton kernel is added beside the reference)."""
    return logprob_entropy_reference(logits, labels, temperature)


def logprob_entropy_from_hidden(hidden, weight, labels, temperature: float = 1.0):
    """Dispatch point (the Triton kernel is added beside the reference)."""
    return logprob_entropy_from_hidden_reference(hidden, weight, labels, temperature)
