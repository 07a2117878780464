"""Gated activations ``y = act(gate) * up`` elementwise on contiguous tensors,
and their backward (``act`` recomputed from ``gate``); the activations are
linear_act's.

The kernels work on flat views: NumPy turns the results of 0-d arrays into
scalars, which neither linear_act's erf nor ``write`` takes."""

from __future__ import annotations

import numpy as np
import torch

from ._arrays import as_array, write
from .linear_act import _ACTIVATIONS


def _flat(t: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    return as_array(t, dtype).reshape(-1)


def gated_act_fwd(gate, up, activation, y_out):
    act, _ = _ACTIVATIONS[activation]
    write(y_out.view(-1), act(_flat(gate)) * _flat(up))


def gated_act_bwd(dy, gate, up, activation, dgate_out, dup_out):
    act, act_grad = _ACTIVATIONS[activation]
    g, u, d = _flat(gate), _flat(up), _flat(dy, gate.dtype)
    write(dgate_out.view(-1), d * u * act_grad(g))
    write(dup_out.view(-1), d * act(g))
