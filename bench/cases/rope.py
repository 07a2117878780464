"""Rotary embedding of q and k as a Llama-style attention applies it: q and k views of
their projections' (batch, time, heads, head_dim) outputs, transposed to (batch, heads,
time, head_dim); cos and sin (1, time, head_dim) in their dtype. Each pass reads q and k
and writes their rotations (cos and sin are read once a position).

Liger-Kernel's rope is not timed here: it writes its results over q and k, so each call
would rotate the last call's results and its gradients would reach other tensors than the
case's inputs. Its rope runs in the Llama training comparison (``gpukernels.train``)."""

import torch

import gpukernels as gk

from ..harness import Case, per_mode, providers

# (batch, time, q heads, k heads, head_dim): the training preset's 148M Llama-style model
# (12 heads of 64), a Llama-3-8B-like layer (32 q heads, 8 k heads of 128)
SHAPES = [(16, 2048, 12, 12, 64), (4, 4096, 32, 8, 128)]
QUICK_SHAPES = [(16, 2048, 12, 12, 64)]
CPU_SHAPES = [(2, 64, 4, 2, 16)]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rope(q, k, cos, sin):
    """transformers' apply_rotary_pos_emb."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def case(shape: tuple[int, int, int, int, int], device: torch.device, dtype: torch.dtype) -> Case:
    batch, time, q_heads, k_heads, head_dim = shape
    q_proj = torch.randn(batch, time, q_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k_proj = torch.randn(batch, time, k_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(time, device=device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)[None]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def views():
        return q_proj.transpose(1, 2), k_proj.transpose(1, 2), cos, sin

    elements = batch * time * (q_heads + k_heads) * head_dim
    io = 2 * elements * q_proj.element_size() + 2 * cos.numel() * cos.element_size()
    return Case(
        f"{batch}x{time}x{q_heads}/{k_heads}x{head_dim}",
        elements,
        providers(lambda: gk.apply_rotary_pos_emb(*views()), lambda: eager_rope(*views()), device, "rope"),
        [q_proj, k_proj],
        bytes=per_mode(io, io),
    )
