"""The errors gpukernels raises: for bad arguments, and when no backend can run an op.

PyTorch's ops raise RuntimeError for most bad input (mismatched shapes or dtypes,
tensors on different devices), Python code ValueError and TypeError. The argument
errors here are both, so that code written against either catches ours.
"""

from __future__ import annotations

__all__ = ["ArgumentError", "ArgumentTypeError", "BackendError"]


class ArgumentError(ValueError, RuntimeError):
    """A bad argument value, shape, choice or device. A ValueError, as Python code
    expects, and a RuntimeError, as PyTorch raises for such input (``except
    RuntimeError`` around a drop-in for a torch op catches it)."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype. A TypeError, as Python code expects,
    and a RuntimeError, as PyTorch raises for a tensor of the wrong dtype."""


class BackendError(RuntimeError):
    """No backend can run this op on this device."""
