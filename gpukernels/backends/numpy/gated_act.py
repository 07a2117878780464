"""Gated activations ``y = act(gate) * up`` elementwise, and their backward
(``act`` recomputed from ``gate``); the activations are linear_act's.

The kernels work on ``(rows, D)`` views (``row_stride``: rows may lie apart):
NumPy turns the results of 0-d arrays into scalars, which neither linear_act's
erf nor ``write`` takes. Without ``up``, gate and up are the halves of
``gate``'s last dim, and ``dgate`` takes both gradients, as ``gate`` holds them.
"""

from __future__ import annotations

import torch

from ._arrays import as_array, as_rows, write
from .linear_act import _ACTIVATIONS


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = as_rows(t)
    d = rows.shape[1] // 2
    return rows[:, :d], rows[:, d:]


def _gate_and_up(gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _halves(gate) if up is None else (as_rows(gate), as_rows(up))


def gated_act_fwd(gate, up, activation, y_out):
    act, _ = _ACTIVATIONS[activation]
    gate, up = _gate_and_up(gate, up)
    write(as_rows(y_out), act(as_array(gate)) * as_array(up))


def gated_act_bwd(dy, gate, up, activation, dgate_out, dup_out):
    act, act_grad = _ACTIVATIONS[activation]
    if up is None:
        dgate_out, dup_out = _halves(dgate_out)
    gate, up = _gate_and_up(gate, up)
    g, u, d = as_array(gate), as_array(up), as_array(as_rows(dy), gate.dtype)
    write(as_rows(dgate_out), d * u * act_grad(g))
    write(as_rows(dup_out), d * act(g))
