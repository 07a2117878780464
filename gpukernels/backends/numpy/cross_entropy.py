"""Cross-entropy over the rows of a (rows, C) logit matrix, and the gradient
of the reduced loss.

``row_statistics`` (loss, row max, log-sum) and ``logits_grad`` (the gradient
from those statistics, for a block of columns) serve both the class-index ops
and the fused linear + cross-entropy (``linear_cross_entropy.py``,
which adds a softcap, a z-loss, per-row gradient scales and vocabulary slices).
"""

from __future__ import annotations

import numpy as np

from ..._numerics import row_stats
from ._arrays import as_array, write


def kept_targets(target: np.ndarray, ignore_index: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows not ignored, and the targets with ignored rows pointed at class 0.
    Checked before any indexing, so a bad target is an error, never an out-of-bounds read."""
    kept = target != ignore_index
    bad = kept & ((target < 0) | (target >= classes))
    if bad.any():
        raise IndexError(
            f"target {int(target[bad][0])} is out of bounds for {classes} classes (and is not ignore_index)"
        )
    return kept, np.where(kept, target, 0)


def _softcap(x: np.ndarray, softcap: float | None, overwrite: bool) -> np.ndarray:
    """``softcap * tanh(x / softcap)`` (``x`` without a softcap), in a buffer of its own
    unless ``overwrite`` lets it be ``x``'s."""
    c = x if overwrite else x.copy()
    if softcap is not None:
        c /= softcap
        np.tanh(c, out=c)
        c *= softcap
    return c


def row_statistics(
    x: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float | None = None,
    z_loss: float = 0.0,
    overwrite: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, of ``c = softcap(x)`` (``c = x`` without a softcap): the loss
    -(1-e) w[t_i] logp[i, t_i] - (e/C) sum_c w[c] logp[i, c] + z_loss lse_i**2 (0 on ignored
    rows), the row max m_i and log-sum ``log sum_c exp(c - m_i)``; ``lse = m + log_sum``.
    m and the log-sum are kept apart so that a gradient taken from them later,
    ``exp((c - m) - log_sum)``, loses no digits to a large m. ``overwrite`` lets ``x``
    be used as the work buffer."""
    rows, classes = x.shape
    kept, safe_t = kept_targets(target, ignore_index, classes)
    w = weight if weight is not None else np.ones(classes, x.dtype)
    e = label_smoothing
    shifted = _softcap(x, softcap, overwrite)
    row_max = shifted.max(axis=1)
    shifted -= row_max[:, None]
    shifted_target = shifted[np.arange(rows), safe_t]
    # skipped at e == 0 so that -inf logits away from the target stay finite, as in PyTorch
    # a -inf logit under smoothing: an inf loss, as PyTorch's
    shifted_smoothing = shifted @ w if e > 0 else 0
    log_sum = np.log(np.exp(shifted, out=shifted).sum(axis=1))
    loss = (1 - e) * np.where(kept, w[safe_t], 0) * (log_sum - shifted_target)
    if e > 0:
        loss += (e / classes) * (w.sum() * log_sum - shifted_smoothing)
    if z_loss:
        lse = row_max + log_sum
        loss += z_loss * lse * lse
    return np.where(kept, loss, 0), row_max, log_sum


def logits_grad(
    x: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray | None,
    ignore_index: int,
    label_smoothing: float,
    row_max: np.ndarray,
    log_sum: np.ndarray,
    scale: np.ndarray | float,
    classes: int,
    col_offset: int = 0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    overwrite: bool = False,
) -> np.ndarray:
    """``scale_i`` (one value, or one per row) times d(loss_i)/dx for the columns
    ``[col_offset, col_offset + x.shape[1])`` of rows of ``classes`` logits, from the
    statistics ``row_statistics`` gave for the whole rows:
    ((1-e) w[t_i] (p - onehot(t_i)) + (e/C) (sum(w) p - w) + 2 z_loss lse_i p) * softcap'(x),
    0 on ignored rows. A target outside the columns is never read, only compared.
    ``overwrite`` lets the gradient be written over ``x``; smoothing or a z-loss take one
    more buffer, a softcap one more again."""
    rows, width = x.shape
    kept = target != ignore_index
    e = label_smoothing
    scale = np.where(kept, scale, 0)
    a = (1 - e) * scale * (weight[np.where(kept, target, 0)] if weight is not None else 1)
    b = (e / classes) * scale
    c = _softcap(x, softcap, overwrite and softcap is None)
    grad = c if softcap is None else x if overwrite else np.empty_like(x)
    np.subtract(c, row_max[:, None], out=grad)
    grad -= log_sum[:, None]
    p = np.exp(grad, out=grad)
    # a (p - onehot) + b (sum(w) p - w), not (a + b sum(w)) p - q: each term is exactly 0
    # where p is the one-hot (C == 1), which a p - q, rounded twice, is not
    proportional = None
    if e > 0 or z_loss:
        sum_w = weight.sum() if weight is not None else classes
        proportional = p * (b * sum_w + 2 * z_loss * scale * (row_max + log_sum))[:, None]
        if e > 0:
            proportional -= b[:, None] if weight is None else np.outer(b, weight[col_offset : col_offset + width])
    hit = kept & (target >= col_offset) & (target < col_offset + width)
    grad[hit, target[hit] - col_offset] -= 1
    grad *= a[:, None]
    if proportional is not None:
        grad += proportional
    if softcap is not None:
        c /= softcap  # tanh; its slope 1 - tanh**2 as (1 - t)(1 + t): no digits lost where t ~ 1
        np.subtract(1, c, out=c)
        grad *= c
        np.subtract(2, c, out=c)
        grad *= c
    return grad


def _denominator(target: np.ndarray, weight: np.ndarray, ignore_index: int) -> np.ndarray:
    """The mean's denominator: the sum of the kept rows' target weights."""
    kept, safe_t = kept_targets(target, ignore_index, weight.size)
    return np.where(kept, weight[safe_t], 0).sum()


def _class_weights(logits, weight) -> np.ndarray:
    return as_array(weight, logits.dtype) if weight is not None else np.ones(logits.shape[1], as_array(logits).dtype)


def reduced(loss: np.ndarray, reduction: str, denominator) -> np.ndarray:
    """The rows' losses summed, over ``denominator`` (``mean``: nan when it is 0, as in
    PyTorch), or as they are (``none``)."""
    if reduction == "none":
        return loss
    total = loss.sum()  # inf - inf in a sum: nan, as PyTorch's
    if reduction == "sum":
        return total
    return total / denominator if denominator != 0 else total * np.nan  # nan, not inf, from a sum that is not 0


def write_loss(out, loss: np.ndarray) -> None:
    """``write`` for a loss of any rank (NumPy hands a 0-d result back 1-d)."""
    write(out.view(-1), np.ravel(loss))


def _grad_scale(grad_loss, reduction: str, denominator, dtype) -> np.ndarray:
    """The upstream gradient of each row (``none``) or all rows, divided by the mean's
    denominator for ``mean`` (no gradient when that is 0)."""
    scale = as_array(grad_loss, dtype)
    if reduction != "mean":
        return scale
    return scale / denominator if denominator != 0 else np.zeros_like(scale)


def cross_entropy_fwd(
    logits, target, weight, ignore_index, label_smoothing, reduction, loss_dtype, loss_out, stats_out
):
    """loss_i = -(1-e) w[t_i] logp[i, t_i] - (e/C) sum_c w[c] logp[i, c], 0 on ignored rows."""
    row_max_out, log_sum_out, totals_out = row_stats(stats_out, logits.shape[0])
    x, t = as_array(logits), as_array(target)
    w = _class_weights(logits, weight)
    loss, row_max, log_sum = row_statistics(x, t, w, ignore_index, label_smoothing)
    denominator = _denominator(t, w, ignore_index)
    write_loss(loss_out, reduced(loss, reduction, denominator))
    write(row_max_out, row_max)
    write(log_sum_out, log_sum)
    write(totals_out, np.array([denominator, w.sum()]))


def cross_entropy_bwd(grad_loss, logits, target, weight, stats, ignore_index, label_smoothing, reduction, grad_out):
    """s_i ((1-e) w[t_i] (p - onehot(t_i)) + (e/C) (sum(w) p - w)), 0 on ignored rows."""
    row_max, log_sum, totals = row_stats(stats, logits.shape[0])
    x = as_array(logits)
    scale = _grad_scale(grad_loss, reduction, as_array(totals)[0], row_max.dtype)
    write(
        grad_out,
        logits_grad(
            x,
            as_array(target),
            _class_weights(logits, weight),
            ignore_index,
            label_smoothing,
            as_array(row_max),
            as_array(log_sum),
            scale,
            x.shape[1],
        ),
    )


def _target_weights(target: np.ndarray, weight: np.ndarray, label_smoothing: float) -> np.ndarray:
    """q = w * ((1-e) target + e/C): the smoothed class probabilities, weighted."""
    e = label_smoothing
    return weight * ((1 - e) * target + e / target.shape[1]) if e > 0 else weight * target


def cross_entropy_probs_fwd(logits, target, weight, label_smoothing, reduction, loss_dtype, loss_out, stats_out):
    """loss_i = -sum_c q[i, c] logp[i, c] = mass_i log_sum_i - sum_c q[i, c] (x[i, c] - m_i),
    with mass_i = sum_c q[i, c]. A class of probability 0 and logit -inf gives nan (0 * -inf),
    as in PyTorch."""
    row_max_out, log_sum_out, target_mass_out = row_stats(stats_out, logits.shape[0])
    x = as_array(logits)
    q = _target_weights(as_array(target, logits.dtype), _class_weights(logits, weight), label_smoothing)
    row_max = x.max(axis=1)
    shifted = x - row_max[:, None]
    weighted = (q * shifted).sum(axis=1)
    log_sum = np.log(np.exp(shifted).sum(axis=1))
    mass = q.sum(axis=1)
    write_loss(loss_out, reduced(mass * log_sum - weighted, reduction, x.shape[0]))
    write(row_max_out, row_max)
    write(log_sum_out, log_sum)
    write(target_mass_out, mass)


def cross_entropy_probs_bwd(
    grad_loss,
    logits,
    target,
    weight,
    stats,
    label_smoothing,
    reduction,
    grad_target,
    grad_out,
    target_grad_out,
):
    """s_i (mass_i p - q) and, when asked, d/d(target) = -s_i (1-e) w logp."""
    row_max, log_sum, target_mass = row_stats(stats, logits.shape[0])
    x = as_array(logits)
    w = _class_weights(logits, weight)
    scale = _grad_scale(grad_loss, reduction, x.shape[0], row_max.dtype)
    scale = scale[:, None] if scale.ndim else scale
    logp = x - as_array(row_max)[:, None] - as_array(log_sum)[:, None]
    q = _target_weights(as_array(target, logits.dtype), w, label_smoothing)
    write(grad_out, scale * (as_array(target_mass)[:, None] * np.exp(logp) - q))
    if grad_target:
        write(target_grad_out, -(1 - label_smoothing) * scale * w * logp)
