"""Generalised advantage estimation over token sequences with masked (skipped) positions.

`gae_reference` is plain torch: the CPU path and the oracle for the Triton kernel, which runs one
program per row scanning it backwards (CUDA tensors, or ZS_TRITON=1 under TRITON_INTERPRET=1).
"""
import torch

from kernels.logprob import triton, use_triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gae_kernel(rewards_ptr, values_ptr, mask_ptr, advantages_ptr, T, gamma, lam):
        row = tl.program_id(0).to(tl.int64) * T
        next_value = tl.zeros((), tl.float32)
        next_adv = tl.zeros((), tl.float32)
        for i in range(T):
            t = row + T - 1 - i
            m = tl.load(mask_ptr + t) != 0
            value = tl.load(values_ptr + t)
            adv = tl.load(rewards_ptr + t) + gamma * next_value - value + gamma * lam * next_adv  # A_t = δ_t + γλ A_next
            tl.store(advantages_ptr + t, tl.where(m, adv, 0.0))
            next_value = tl.where(m, value, next_value)  # masked tokens are skipped: V_next, A_next carry over
            next_adv = tl.where(m, adv, next_adv)


def gae_reference(rewards, values, mask, gamma: float, lam: float):
    """rewards, values, mask: [B, T] -> (advantages, returns), [B, T] float32.

    Masked tokens (mask == 0: prompt, <information>, padding) are skipped: the recursion carries
    V_next and A_next across them, so a response token's advantage sees the next *generated* token.
      δ_t = r_t + γ V_next - V_t ;  A_t = δ_t + γλ A_next ;  returns_t = A_t + V_t
    Advantages are raw (not whitened); masked positions get A = 0, returns = V.
    """
    rewards, values, mask = rewards.float(), values.float(), mask.bool()
    if gamma == 1.0 and lam == 1.0:  # A_t = G_t - V_t with G_t the masked reward-to-go
        returns = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1])
        advantages = torch.where(mask, returns - values, torch.zeros_like(values))
        return advantages, torch.where(mask, returns, values)
    B, T = rewards.shape
    advantages = torch.zeros_like(values)
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, torch.zeros_like(adv))
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    return advantages, advantages + values


def gae(rewards, values, mask, gamma: float, lam: float):
    """Same contract as gae_reference; the Triton kernel on CUDA (or with ZS_TRITON=1)."""
    if not use_triton(rewards):
        return gae_reference(rewards, values, mask, gamma, lam)
    values = values.float().contiguous()
    advantages = torch.empty_like(values)
    _gae_kernel[(values.shape[0],)](rewards.float().contiguous(), values, mask.bool().float().contiguous(), advantages,
                                    values.shape[1], gamma, lam)
    return advantages, advantages + values
