"""Input checks shared by the ops: each error names the offending argument."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Sequence

import torch

from ..errors import ArgumentError, ArgumentTypeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PLAIN_TENSOR_TYPES = frozenset((torch.Tensor, torch.nn.Parameter))
"""Tensors that are no subclass (FakeTensor, DTensor, ...): ``type(t) in PLAIN_TENSOR_TYPES``."""


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ArgumentTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_optional_float(name: str, t: torch.Tensor | None, like: torch.Tensor, shape: Sequence[int]) -> None:
    """An optional parameter tensor: floating, on ``like``'s device, of ``shape``."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype not in FLOAT_DTYPES:
        check_float(name, t)
    if t.device != like.device:
        check_device(name, t, like)
    if t.shape != tuple(shape):
        check_shape(name, t, shape)


def check_optional_floats(
    names: Sequence[str], tensors: Sequence[torch.Tensor | None], like: torch.Tensor, shape: tuple[int, ...]
) -> None:
    """``check_optional_float`` for each of ``tensors`` (named by ``names``): a norm's
    parameters. Plain tensors that pass are checked in one loop, ``like``'s device read
    once (host time); the rest go through ``check_optional_float``, which names what fails."""
    device = like.device
    for name, t in zip(names, tensors):
        if t is not None and (
            type(t) not in PLAIN_TENSOR_TYPES or t.dtype not in FLOAT_DTYPES or t.device != device or t.shape != shape
        ):
            check_optional_float(name, t, like, shape)


def check_device(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise ArgumentError(f"{name} is on {t.device} but input is on {like.device}; move them to one device")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if t.shape != tuple(shape):
        raise ArgumentError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_normalized_shape(input: torch.Tensor, normalized_shape: int | Sequence[int]) -> tuple[tuple[int, ...], int]:
    """``normalized_shape``, positive ints that are ``input``'s trailing dims, as a
    tuple, and their product: the length of the rows a norm normalises."""
    try:  # ints of any integer type (NumPy's, a 0-d integer tensor), as torch takes them; bools refused
        dims = (normalized_shape,) if hasattr(normalized_shape, "__index__") else tuple(normalized_shape)
        shape = tuple(operator.index(s) for s in dims if not isinstance(s, bool))
        if len(shape) != len(dims):
            raise TypeError
    except TypeError:
        raise ArgumentTypeError(
            f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        ) from None
    if not shape or min(shape) < 1:
        raise ArgumentError(f"normalized_shape must be positive ints, got {normalized_shape!r}")
    d = math.prod(shape)
    if input.shape[-len(shape) :] != shape:
        raise ArgumentError(
            f"normalized_shape {shape} does not match the trailing dims of input of shape {tuple(input.shape)}"
        )
    return shape, d


def check_norm_input(
    input: torch.Tensor, normalized_shape: int | Sequence[int], names: Sequence[str], params: Sequence
) -> tuple[tuple[int, ...], int]:
    """A norm's ``check_float`` of input, ``check_normalized_shape`` and
    ``check_optional_floats`` of its ``params`` (named by ``names``) in one: returns
    ``(shape, d)``. The usual call (plain tensors, one normalized dim given as an int or a
    1-tuple or torch.Size: a weight's shape) passes in one pass of reads, each attribute read
    once (host time); anything else goes through those checks, which name what fails."""
    shape = (normalized_shape,) if type(normalized_shape) is int else normalized_shape
    if (
        type(input) in PLAIN_TENSOR_TYPES
        and input.dtype in FLOAT_DTYPES
        and (type(shape) is tuple or type(shape) is torch.Size)
        and len(shape) == 1
        and type(shape[0]) is int
        and shape[0] > 0
        and input.dim()
        and input.shape[-1] == shape[0]  # an index, not a slice: a slice makes a torch.Size (host time)
    ):
        device = input.device
        for t in params:
            if t is not None and not (
                type(t) in PLAIN_TENSOR_TYPES and t.dtype in FLOAT_DTYPES and t.shape == shape and t.device == device
            ):
                break
        else:
            return shape, shape[0]
    check_float("input", input)
    shape, d = check_normalized_shape(input, normalized_shape)
    check_optional_floats(names, params, input, shape)
    return shape, d


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def check_int(
    name: str, value, *, low: int | None = None, what: str = "an int", not_int: type[Exception] = ArgumentTypeError
) -> int:
    """An integer as torch takes one (a Python or NumPy int, a one-element integer tensor;
    not a bool), at least ``low`` when given; returns it as an int. ``what`` says what
    ``name`` may be, for the errors; ``not_int`` is the error for a value of another type."""
    if type(value) is not int:
        try:
            if isinstance(value, bool) or isinstance(value, torch.Tensor) and value.dtype == torch.bool:
                raise TypeError
            value = operator.index(value)
        except TypeError:
            raise not_int(f"{name} must be {what}, got {type(value).__name__}") from None
    if low is not None and value < low:
        raise ArgumentError(f"{name} must be {what} >= {low}, got {value}")
    return value


def check_ignore_index(ignore_index) -> int:
    """A cross-entropy's ``ignore_index``: an int that an int64 holds (the targets' dtype)."""
    ignore_index = check_int("ignore_index", ignore_index)
    if not INT64_MIN <= ignore_index <= INT64_MAX:
        raise ArgumentError(f"ignore_index must fit in an int64, got {ignore_index}")
    return ignore_index


def check_number(
    name: str,
    value,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in [low, high] (open ends where asked); returns it as float."""
    if type(value) is not float:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ArgumentError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):  # NumPy's floats and ints too
            raise ArgumentTypeError(f"{name} must be a real number, got {type(value).__name__}")
        value = float(value)
    # comparisons, not math.isfinite: under torch.compile a float argument that
    # changed between calls is symbolic, and math.isfinite does not trace
    if value != value or abs(value) == math.inf:
        raise ArgumentError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ArgumentError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ArgumentError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def autocast_enabled(t: torch.Tensor) -> bool:
    """``torch.is_autocast_enabled(t.device.type)``, asking first the cheaper question
    whether autocast is on for any device (it is off in most calls)."""
    return torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(t.device.type)


OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_residual(residual: torch.Tensor, input: torch.Tensor) -> None:
    """A residual added to a norm's input or output: a floating tensor of input's shape on
    its device (any floating dtype: the sum's is promoted). The usual one passes in one
    pass of reads (host time)."""
    if not (
        type(residual) is type(input)
        and residual.dtype in FLOAT_DTYPES
        and residual.shape == input.shape
        and residual.device == input.device
    ):
        check_float("residual", residual)
        check_device("residual", residual, input)
        check_shape("residual", residual, input.shape)


def check_out_dtype(out_dtype, input: torch.Tensor):
    """A norm's ``out_dtype``: None, or float16, bfloat16 or float32 for input that is
    not float64 (its kernels compute in fp32 and round once to it)."""
    if out_dtype is not None and (out_dtype not in OUT_DTYPES or input.dtype == torch.float64):
        if not isinstance(out_dtype, torch.dtype):
            raise ArgumentTypeError(f"out_dtype must be a torch.dtype or None, got {type(out_dtype).__name__}")
        if out_dtype not in OUT_DTYPES:
            raise ArgumentError(f"out_dtype must be one of float16, bfloat16, float32 or None, got {out_dtype}")
        raise ArgumentError(f"out_dtype={out_dtype} needs input in float16, bfloat16 or float32, got float64")
    return out_dtype


def cast_as_autocast(*tensors: torch.Tensor | None) -> tuple:
    """``tensors`` as autocast casts a matmul's inputs, to the autocast dtype of the first's
    device: every floating tensor but fp64 (None stays None). Under ``autocast_enabled``."""
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(t if t is None or t.dtype == torch.float64 else t.to(dtype) for t in tensors)


def autocast_dtype(t: torch.Tensor):
    """The autocast dtype of ``t``'s device when autocast is on there, else None."""
    if not autocast_enabled(t):
        return None
    return torch.get_autocast_dtype(t.device.type)


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ArgumentError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def contiguous_param(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t.contiguous()``, None for None: the kernels read a parameter (a norm's weight,
    say) element after element, so a view that steps over elements (``w[::2]``) is
    copied (a contiguous tensor is itself, no copy)."""
    return None if t is None else t.contiguous()


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """Placeholder output for a gradient that was not asked for (custom ops
    cannot return None)."""
    return like.new_empty(0)
