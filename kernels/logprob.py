"""Per-token log-probability and entropy from logits, or from hidden states and the lm_head
(weight, bias, final-logit soft-capping), without materialising an [N, V] fp32 log_softmax (nor, from
hidden, the [N, V] logits).

From hidden, the logits are the head's: h W^T + b, then c tanh(· / c) where the model soft-caps (Gemma-2).
With z = logits / T, p = softmax(z), y the label:
  forward   lse = log Σ_v exp(z_v),  logp = z_y - lse,  H = -Σ p log p = lse - Σ p z
  backward  dz = g_lp (onehot_y - p) - g_H p (z - (lse - H)),  dlogits = dz / T
Only lse and H ([N] each) are kept for backward, which recomputes p from the logits.

Each pass exists twice behind one signature: a Triton kernel (one program per row, streaming
over V in blocks with an online logsumexp) and a plain torch version over chunks of rows, which
is the CPU path and the oracle the kernel is tested against. `use_triton` picks one: the kernel
for CUDA tensors, or anywhere with ZS_TRITON=1 (on CPU, with TRITON_INTERPRET=1 set before
`kernels` is imported, as its @triton.jit reads it).
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton (e.g. macOS): the torch path runs everywhere
    triton = None

CHUNK_ROWS = 256  # rows per chunk: one chunk's [rows, V] fp32 temporaries are the extra memory


def use_triton(x):
    return triton is not None and (x.is_cuda or os.environ.get("ZS_TRITON") == "1")


if triton is not None:
    @triton.jit
    def _forward_kernel(logits_ptr, stride_n, stride_v, labels_ptr, logp_ptr, entropy_ptr, lse_ptr, V, inv_t,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * stride_n
        m = tl.full((), -3.4028234663852886e38, tl.float32)  # running max, finite so exp(m - m_new) is never nan
        s = tl.zeros((), tl.float32)  # s = Σ exp(z - m)
        d = tl.zeros((), tl.float32)  # d = Σ exp(z - m) (z - m)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(row_ptr + cols * stride_v, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, tl.max(z, 0))
            e = tl.exp(z - m_new)
            scale = tl.exp(m - m_new)  # rescale the running sums to the new max
            d = scale * (d + (m - m_new) * s) + tl.sum(e * tl.where(e > 0, z - m_new, 0.0), 0)
            s = scale * s + tl.sum(e, 0)
            m = m_new
        lse = m + tl.log(s)
        z_y = tl.load(row_ptr + tl.load(labels_ptr + row) * stride_v).to(tl.float32) * inv_t
        tl.store(logp_ptr + row, z_y - lse)
        tl.store(entropy_ptr + row, tl.log(s) - d / s)  # H = lse - Σ p z = log s - Σ p (z - m)
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _backward_kernel(logits_ptr, stride_n, stride_v, dlogits_ptr, labels_ptr, lse_ptr, entropy_ptr,
                         g_lp_ptr, g_h_ptr, V, inv_t, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        y = tl.load(labels_ptr + row)
        lse = tl.load(lse_ptr + row)
        mean_z = lse - tl.load(entropy_ptr + row)  # Σ p z = lse - H
        g_lp = tl.load(g_lp_ptr + row)
        g_h = tl.load(g_h_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(logits_ptr + row * stride_n + cols * stride_v, mask=cols < V,
                        other=float("-inf")).to(tl.float32) * inv_t
            p = tl.exp(z - lse)
            # dz = g_lp (onehot_y - p) - g_H p (z - Σ p z), with p (z - ...) = 0 where p = 0 (z = -inf)
            dz = g_lp * ((cols == y).to(tl.float32) - p) - g_h * p * tl.where(p > 0, z - mean_z, 0.0)
            tl.store(dlogits_ptr + row * V + cols, dz * inv_t, mask=cols < V)


def _forward_triton(logits, labels, temperature):
    """logits [n, V] (any float dtype, any strides), labels [n] -> logp, entropy, lse [n] fp32."""
    n, V = logits.shape
    logp, entropy, lse = torch.empty(3, n, device=logits.device)
    _forward_kernel[(n,)](logits, logits.stride(0), logits.stride(1), labels.contiguous(), logp, entropy, lse,
                          V, 1.0 / temperature, BLOCK=min(4096, triton.next_power_of_2(V)))
    return logp, entropy, lse


def _backward_triton(logits, labels, temperature, lse, entropy, g_lp, g_h):
    """-> dlogits [n, V] in logits.dtype."""
    n, V = logits.shape
    dlogits = torch.empty((n, V), dtype=logits.dtype, device=logits.device)
    _backward_kernel[(n,)](logits, logits.stride(0), logits.stride(1), dlogits, labels.contiguous(), lse, entropy,
                           g_lp.contiguous(), g_h.contiguous(), V, 1.0 / temperature,
                           BLOCK=min(4096, triton.next_power_of_2(V)))
    return dlogits


def _scaled(logits, temperature):
    """z = logits / T in fp32 (a copy), -inf clamped to the lowest float so that p z = 0 where p = 0."""
    return (logits.float() / temperature).clamp_(min=torch.finfo(torch.float32).min)


def _forward_torch(logits, labels, temperature):
    """Same contract as _forward_triton, on one chunk of rows."""
    z = _scaled(logits, temperature)
    m = z.amax(-1, keepdim=True)
    e = (z - m).exp_()
    s = e.sum(-1)
    lse = m.squeeze(-1) + s.log()  # lse = m + log Σ exp(z - m)
    entropy = lse - torch.linalg.vecdot(e, z) / s  # H = lse - Σ p z
    return z.gather(-1, labels[:, None]).squeeze(-1) - lse, entropy, lse


def _backward_torch(logits, labels, temperature, lse, entropy, g_lp, g_h):
    """Same contract as _backward_triton, on one chunk of rows."""
    z = _scaled(logits, temperature)
    p = (z - lse[:, None]).exp_()
    # dz = -p (g_H (z - Σ p z) + g_lp) + g_lp onehot_y; p multiplies first so that p z stays 0 where p = 0
    dz = z.sub_((lse - entropy)[:, None]).mul_(p).mul_(g_h[:, None]).addcmul_(p, g_lp[:, None]).neg_()
    dz.scatter_add_(-1, labels[:, None], g_lp[:, None])
    return dz.div_(temperature).to(logits.dtype)


def _chunks(n, chunk_rows):
    return [slice(i, i + chunk_rows) for i in range(0, n, chunk_rows)]


def _logits(hidden, weight, bias, softcap):
    """A chunk's logits: hidden itself when weight is None, else the head's h W^T (+ b), soft-capped."""
    if weight is None:
        return hidden
    logits = hidden @ weight.t() if bias is None else hidden @ weight.t() + bias
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)  # z = c tanh(z / c)


class _LogprobEntropy(torch.autograd.Function):
    """Over chunks of rows. Given the lm_head weight, a chunk's logits are hidden @ W^T (+ b, soft-capped),
    computed in forward and again in backward (as in Liger's fused linear cross-entropy), so no [N, V]
    tensor ever exists and grad_weight accumulates over chunks; with weight None, hidden is the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_rows, kernel, bias, softcap):
        forward = _forward_triton if kernel else _forward_torch
        outs = [forward(_logits(hidden[s], weight, bias, softcap), labels[s], temperature)
                for s in _chunks(len(labels), chunk_rows)]
        logp, entropy, lse = (torch.cat(o) for o in zip(*outs))
        ctx.save_for_backward(hidden, weight, bias, labels, lse, entropy)
        ctx.args = temperature, chunk_rows, kernel, softcap
        return logp, entropy

    @staticmethod
    def backward(ctx, g_lp, g_h):
        hidden, weight, bias, labels, lse, entropy = ctx.saved_tensors
        temperature, chunk_rows, kernel, softcap = ctx.args
        backward = _backward_triton if kernel else _backward_torch
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[6] else None
        for s in _chunks(len(labels), chunk_rows):
            logits = _logits(hidden[s], weight, bias, softcap)
            dlogits = backward(logits, labels[s], temperature, lse[s], entropy[s], g_lp[s], g_h[s])
            if softcap is not None:  # d(c tanh(z / c))/dz = 1 - tanh² = 1 - (capped / c)²
                dlogits = dlogits * (1 - (logits / softcap) ** 2)
            if grad_hidden is not None:
                grad_hidden[s] = dlogits if weight is None else dlogits @ weight  # ∂L/∂h = dlogits W
            if grad_weight is not None and weight.dtype == torch.float32:
                grad_weight.addmm_(dlogits.t(), hidden[s])  # ∂L/∂W = Σ_chunks dlogits^T h
            elif grad_weight is not None:  # low-precision weight: accumulate the chunks in fp32
                grad_weight += dlogits.t() @ hidden[s]
            if grad_bias is not None:
                grad_bias += dlogits.sum(0)  # ∂L/∂b = Σ_rows dlogits
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None, None,
                None if grad_bias is None else grad_bias.to(bias.dtype), None)


def logprob_entropy_reference(logits, labels, temperature: float = 1.0, chunk_rows: int = CHUNK_ROWS):
    """logits [N, V], labels [N] -> (logp [N], entropy [N]) fp32, differentiable in logits; plain torch."""
    return _LogprobEntropy.apply(logits, None, labels, temperature, chunk_rows, False, None, None)


def logprob_entropy_from_hidden_reference(hidden, weight, labels, temperature: float = 1.0, bias=None, softcap=None,
                                          chunk_rows: int = CHUNK_ROWS):
    """hidden [N, D], weight [V, D], bias [V] or None (the lm_head), labels [N] -> (logp [N], entropy [N]) fp32
    of the logits soft-capped at `softcap` (None: not capped); plain torch."""
    return _LogprobEntropy.apply(hidden, weight, labels, temperature, chunk_rows, False, bias, softcap)


def logprob_entropy(logits, labels, temperature: float = 1.0):
    """logits [N, V], labels [N] -> (logp [N], entropy [N]) fp32, differentiable in logits."""
    return _LogprobEntropy.apply(logits, None, labels, temperature, CHUNK_ROWS, use_triton(logits), None, None)


def logprob_entropy_from_hidden(hidden, weight, labels, temperature: float = 1.0, bias=None, softcap=None):
    """hidden [N, D], weight [V, D], bias [V] or None (the lm_head), labels [N] -> (logp [N], entropy [N]) fp32
    of the logits soft-capped at `softcap` (None: not capped), differentiable in hidden, weight and bias;
    the [N, V] logits are never materialised."""
    return _LogprobEntropy.apply(hidden, weight, labels, temperature, CHUNK_ROWS, use_triton(hidden), bias, softcap)
