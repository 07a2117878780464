"""Cross-entropy over the rows of a contiguous (rows, C) logit matrix, with
the gradient of the reduced loss computed in the same pass."""

from __future__ import annotations

import numpy as np

from ._arrays import as_array, as_tensor


def _check_targets(target: np.ndarray, kept: np.ndarray, classes: int) -> None:
    """Checked before any indexing, so a bad target is an error, never an out-of-bounds read."""
    bad = kept & ((target < 0) | (target >= classes))
    if bad.any():
        raise IndexError(f"target {int(target[bad][0])} is out of bounds for {classes} classes "
                         f"(and is not ignore_index)")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _reduce(loss: np.ndarray, target_weight: np.ndarray, reduction: str) -> tuple[np.ndarray, float]:
    """The reduced loss and the factor by which each row's gradient is scaled.
    With every row ignored the mean is nan (as in PyTorch) but the gradient zero."""
    if reduction == "none":
        return loss, 1.0
    if reduction == "sum":
        return loss.sum(), 1.0
    denominator = target_weight.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = loss.sum() / denominator
    return mean, (1.0 / denominator if denominator != 0 else 0.0)


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, reduction, compute_grad):
    """loss_i = -(1-e) w[t_i] logp[i, t_i] - (e/C) sum_c w[c] logp[i, c]; and, when
    ``compute_grad``, d(reduced loss)/d(logits) = scale * (a_i softmax_i - q_i) with
    a_i = (1-e) w[t_i] + (e/C) sum(w) and q_i = (1-e) w[t_i] onehot(t_i) + (e/C) w
    (SPEC.md's target distribution, weighted), 0 for ignored rows."""
    x, t = as_array(logits), target.numpy()
    rows, classes = x.shape
    kept = t != ignore_index
    _check_targets(t, kept, classes)
    safe_t = np.where(kept, t, 0)
    row_index = np.arange(rows)
    w = as_array(weight, logits.dtype) if weight is not None else np.ones(classes, x.dtype)
    e = label_smoothing
    target_weight = np.where(kept, w[safe_t], 0)

    logp = _log_softmax(x)
    loss = -(1 - e) * target_weight * logp[row_index, safe_t]
    if e > 0:  # skipped at e == 0 so that -inf logits away from the target stay finite, as in PyTorch
        loss -= (e / classes) * (logp @ w)
    reduced, scale = _reduce(np.where(kept, loss, 0), target_weight, reduction)
    # as_tensor makes arrays at least 1-D; the mean and sum are 0-D
    loss_out = as_tensor(reduced, logits.dtype).reshape(np.shape(reduced))

    if not compute_grad:
        return loss_out, logits.new_empty(0)
    # (1-e) w[t] (p - onehot) + (e/C) (sum(w) p - w): each term is exactly 0 where p is the
    # one-hot (C == 1), which a_i p - q_i, rounded twice, is not
    grad = np.exp(logp)
    smoothing = np.where(kept[:, None], (e / classes) * (w.sum() * grad - w), 0) if e > 0 else 0
    grad[row_index, safe_t] -= 1
    grad *= (1 - e) * target_weight[:, None]
    grad += smoothing
    grad *= scale
    return loss_out, as_tensor(grad, logits.dtype)
