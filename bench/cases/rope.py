"""Rotary embedding of q and k as a Llama-style attention applies it: q and k views of
their projections' (batch, time, heads, head_dim) outputs, transposed to (batch, heads,
time, head_dim); cos and sin (1, time, rotated) in their dtype: a whole head's halves
(Llama's), a quarter of each head (GPT-NeoX's partial rotation), or interleaved pairs of
half of each head (GLM-4's). Each pass reads q and k and writes their rotations (cos and
sin are read once a position).

Liger-Kernel's rope is not timed here: it writes its results over q and k, so each call
would rotate the last call's results and its gradients would reach other tensors than the
case's inputs. Its rope runs in the Llama training comparison (``gpukernels.train``)."""

import torch

import gpukernels as gk

from ..harness import Case, per_mode, providers

# (batch, time, q heads, k heads, head_dim, rotated, interleaved): the training preset's 148M
# Llama-style model (12 heads of 64), a Llama-3-8B-like layer (32 q heads, 8 k heads of 128),
# a Pythia-1.4B-like one (16 heads of 128, a quarter rotated), a GLM-4-9B-like one (32 q heads,
# 2 k heads of 128, interleaved pairs of half of each)
SHAPES = [
    (16, 2048, 12, 12, 64, 64, False),
    (4, 4096, 32, 8, 128, 128, False),
    (8, 2048, 16, 16, 128, 32, False),
    (4, 4096, 32, 2, 128, 64, True),
]
QUICK_SHAPES = SHAPES[:1]
CPU_SHAPES = [(2, 64, 4, 2, 16, 16, False), (2, 64, 4, 2, 16, 8, True)]


def rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def eager_rope(q, k, cos, sin, interleaved):
    """transformers' apply_rotary_pos_emb: Llama's, GPT-NeoX's partial one, Cohere's interleaved."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rotated = cos.shape[-1]

    def embed(x):
        if rotated == x.shape[-1]:
            return x * cos + rotate_half(x, interleaved) * sin
        x_rot = x[..., :rotated]
        return torch.cat((x_rot * cos + rotate_half(x_rot, interleaved) * sin, x[..., rotated:]), dim=-1)

    return embed(q), embed(k)


def case(shape: tuple[int, int, int, int, int, int, bool], device: torch.device, dtype: torch.dtype) -> Case:
    batch, time, q_heads, k_heads, head_dim, rotated, interleaved = shape
    q_proj = torch.randn(batch, time, q_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    k_proj = torch.randn(batch, time, k_heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotated, 2, device=device, dtype=torch.float32) / rotated)
    angles = torch.arange(time, device=device, dtype=torch.float32)[:, None] * inv_freq
    angles = (angles.repeat_interleave(2, dim=-1) if interleaved else torch.cat((angles, angles), dim=-1))[None]
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

    def views():
        return q_proj.transpose(1, 2), k_proj.transpose(1, 2), cos, sin

    elements = batch * time * (q_heads + k_heads) * head_dim
    io = 2 * elements * q_proj.element_size() + 2 * cos.numel() * cos.element_size()
    form = ("" if rotated == head_dim else f" rotated {rotated}") + (" interleaved" if interleaved else "")
    return Case(
        f"{batch}x{time}x{q_heads}/{k_heads}x{head_dim}{form}",
        elements,
        providers(
            lambda: gk.apply_rotary_pos_emb(*views(), interleaved=interleaved),
            lambda: eager_rope(*views(), interleaved),
            device,
            "rope",
        ),
        [q_proj, k_proj],
        bytes=per_mode(io, io),
    )
