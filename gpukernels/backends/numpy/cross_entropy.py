"""Cross-entropy over the rows of a contiguous (rows, C) logit matrix, with
the gradient of the reduced loss computed in the same pass.

``rows_loss_and_grad`` is the row kernel; ``cross_entropy_fwd`` (the op) and
the fused linear + cross-entropy (``linear_cross_entropy.py``, which adds a
softcap, a z-loss and per-row gradient scales) both call it.
"""

from __future__ import annotations

import numpy as np

from ._arrays import as_array, as_tensor


def kept_targets(target: np.ndarray, ignore_index: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows not ignored, and the targets with ignored rows pointed at class 0.
    Checked before any indexing, so a bad target is an error, never an out-of-bounds read."""
    kept = target != ignore_index
    bad = kept & ((target < 0) | (target >= classes))
    if bad.any():
        raise IndexError(f"target {int(target[bad][0])} is out of bounds for {classes} classes "
                         f"(and is not ignore_index)")
    return kept, np.where(kept, target, 0)


def _softcap_in_place(x: np.ndarray, softcap: float) -> np.ndarray:
    """Turns ``x`` into ``softcap * tanh(x / softcap)``; returns the slope
    ``1 - tanh**2``, as (1 - t)(1 + t), which loses no digits where t ~ 1."""
    x /= softcap
    np.tanh(x, out=x)
    slope = 1.0 - x
    slope *= 1.0 + x
    x *= softcap
    return slope


def rows_loss_and_grad(x: np.ndarray, target: np.ndarray, weight: np.ndarray | None, ignore_index: int,
                       label_smoothing: float, compute_grad: bool, softcap: float | None = None, z_loss: float = 0.0,
                       overwrite: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per row, of ``c = softcap(x)`` (``c = x`` without a softcap) and ``lse = logsumexp(c)``:
    loss_i = -(1-e) w[t_i] logp[i, t_i] - (e/C) sum_c w[c] logp[i, c] + z_loss lse_i**2 (0 on ignored rows),
    lse_i, and when ``compute_grad`` d(loss_i)/d(x_i) (unscaled: the caller scales it):
    ((1-e) w[t_i] (p - onehot(t_i)) + (e/C) (sum(w) p - w) + 2 z_loss lse_i p) * softcap'(x_i).
    ``overwrite`` lets the gradient be written over ``x`` (one (rows, C) buffer fewer);
    with smoothing or a z-loss one more is made, with a softcap one more again."""
    rows, classes = x.shape
    kept, safe_t = kept_targets(target, ignore_index, classes)
    row_index = np.arange(rows)
    w = weight if weight is not None else np.ones(classes, x.dtype)
    e = label_smoothing
    target_weight = np.where(kept, w[safe_t], 0)

    buf = x if overwrite else x.copy()
    slope = _softcap_in_place(buf, softcap) if softcap is not None else None
    row_max = buf.max(axis=1, keepdims=True)
    buf -= row_max
    shifted_target = buf[row_index, safe_t]
    # skipped at e == 0 so that -inf logits away from the target stay finite, as in PyTorch
    shifted_smoothing = buf @ w if e > 0 else 0
    np.exp(buf, out=buf)
    row_sum = buf.sum(axis=1)
    log_sum = np.log(row_sum)
    lse = row_max[:, 0] + log_sum
    loss = (1 - e) * target_weight * (log_sum - shifted_target)
    if e > 0:
        loss += (e / classes) * (w.sum() * log_sum - shifted_smoothing)
    if z_loss:
        loss += z_loss * lse * lse
    loss = np.where(kept, loss, 0)
    if not compute_grad:
        return loss, lse, None

    buf /= row_sum[:, None]  # the softmax p
    # (1-e) w[t] (p - onehot) + (e/C) (sum(w) p - w): each term is exactly 0 where p is the
    # one-hot (C == 1), which a_i p - q_i, rounded twice, is not
    proportional = None
    if e > 0 or z_loss:
        proportional = buf * ((e / classes) * w.sum() + 2 * z_loss * lse)[:, None]
        if e > 0:
            proportional -= (e / classes) * w
    buf[row_index, safe_t] -= 1
    buf *= ((1 - e) * target_weight)[:, None]
    if proportional is not None:
        buf += proportional
    buf[~kept] = 0
    if slope is not None:
        buf *= slope
    return loss, lse, buf


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
    classes = x.shape[1]
    w = as_array(weight, logits.dtype) if weight is not None else np.ones(classes, x.dtype)
    kept, safe_t = kept_targets(t, ignore_index, classes)
    target_weight = np.where(kept, w[safe_t], 0)
    loss, _, grad = rows_loss_and_grad(x, t, w, ignore_index, label_smoothing, compute_grad)
    reduced, scale = _reduce(loss, target_weight, reduction)
    # as_tensor makes arrays at least 1-D; the mean and sum are 0-D
    loss_out = as_tensor(reduced, logits.dtype).reshape(np.shape(reduced))
    if not compute_grad:
        return loss_out, logits.new_empty(0)
    grad *= scale
    return loss_out, as_tensor(grad, logits.dtype)
