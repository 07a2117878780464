"""Which backend runs an op, and the error when none can.

A backend is a package ``gpukernels.backends.<name>`` that defines
``device_types()`` (the torch device types it serves) and
``unavailable_reason()`` (None when it can run here), and one module per op
family (``layer_norm.py``, ``dropout.py``, ...) holding that family's kernels
as plain functions on torch tensors. Adding a backend adds such a package and
its name to ``BACKENDS``; no op module changes.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable

import torch

from .errors import ArgumentError, BackendError

BACKENDS = ("numpy", "triton", "cupy")
# meta tensors run no kernels: the ops' fake implementations give their outputs (shapes, dtypes)
_DEFAULT_FOR_DEVICE = {"cpu": "numpy", "cuda": "triton", "meta": "numpy"}

_selected: str | None = None


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ArgumentError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


class use_backend:
    """Select the backend for every op: ``use_backend("triton")`` as a setter,
    or ``with use_backend("numpy"): ...`` to restore the previous choice on
    exit. ``None`` returns to the default (NumPy for CPU tensors, Triton for
    CUDA tensors, or ``$GPUKERNELS_BACKEND`` when set)."""

    def __init__(self, name: str | None):
        global _selected
        self._previous = _selected
        _selected = None if name is None else _check_name(name)

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        global _selected
        _selected = self._previous


_device_types: dict[torch.device, str] = {}


# A constant to torch.compile: traced, the lookup would guard the compiled code on what the
# dict holds, which calls outside the graph change (torch 2.11 then fails the guard on the
# frame that made it; 2.13 diverges when a trace restarts after a graph break).
@torch.compiler.assume_constant_result
def device_type(device: torch.device) -> str:
    """``device.type``, which builds a new string on every read: about 3k host
    instructions, a dict lookup here."""
    kind = _device_types.get(device)
    if kind is None:
        kind = _device_types[device] = device.type
    return kind


# os.environ.get raises and catches a KeyError when the variable is unset, as it is in
# most calls: the dict behind os.environ answers in a tenth of that host time.
_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("GPUKERNELS_BACKEND") if _ENVIRON is not None else None


def _chosen() -> str | None:
    """The backend chosen for every device (``use_backend``, else ``$GPUKERNELS_BACKEND``), or None."""
    if _selected is not None:
        return _selected
    if _ENVIRON is not None:
        env = _ENVIRON.get(_ENV_KEY)
        env = None if env is None else os.environ.decodevalue(env)
    else:
        env = os.environ.get("GPUKERNELS_BACKEND")
    return _check_name(env) if env else None


def backend_name(device: torch.device) -> str:
    """The backend that ops on tensors of ``device`` run on now."""
    chosen = _chosen()
    if chosen is not None:
        return chosen
    try:
        return _DEFAULT_FOR_DEVICE[device_type(device)]
    except KeyError:
        raise BackendError(f"gpukernels has no backend for device {device}") from None


def backend_for(t: torch.Tensor) -> str:
    """``backend_name(t.device)``, without making ``t.device`` (a new object on every
    read: host time) for CPU and CUDA tensors."""
    if _selected is not None:
        return _selected
    if _ENVIRON is None or _ENV_KEY in _ENVIRON:  # the variable may be set: _chosen reads it
        chosen = _chosen()
        if chosen is not None:
            return chosen
    if t.is_cuda:
        return _DEFAULT_FOR_DEVICE["cuda"]
    if t.is_cpu:
        return _DEFAULT_FOR_DEVICE["cpu"]
    return backend_name(t.device)


def _backend_package(name: str) -> ModuleType:
    return importlib.import_module(f"gpukernels.backends.{name}")


def unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run on this machine, or None."""
    return _backend_package(_check_name(name)).unavailable_reason()


# (backend, op family, kernel, device) -> the kernel, once its backend has been
# found to serve them: a dict lookup per call instead of the checks, which cost
# host time on every launch of a small kernel.
def _module(name: str, op: str, device: torch.device) -> ModuleType:
    where = f"op {op!r} on backend {name!r} for device {device}"
    package = _backend_package(name)
    reason = package.unavailable_reason()
    if reason is not None:
        raise BackendError(f"cannot run {where}: {reason}")
    if device.type not in package.device_types():
        raise BackendError(
            f"cannot run {where}: the backend serves {package.device_types()} tensors; "
            f"move the tensors or choose another backend with gpukernels.use_backend"
        )
    try:
        return importlib.import_module(f"{package.__name__}.{op}")
    except ModuleNotFoundError as e:
        if e.name != f"{package.__name__}.{op}":
            raise
        raise BackendError(f"cannot run {where}: the backend does not implement it") from None


_kernels: dict[tuple[str, str, str, torch.device], Callable] = {}


def kernel_for(backend: str, op: str, kernel: str, device: torch.device) -> Callable:
    """Kernel ``kernel`` of op family ``op`` from backend ``backend`` for
    ``device``; a BackendError that names op, backend and device otherwise."""
    key = (backend, op, kernel, device)
    found = _kernels.get(key)
    if found is None:
        module = _module(backend, op, device)
        if not hasattr(module, kernel):
            raise BackendError(f"cannot run op {op!r} on backend {backend!r}: it has no kernel {kernel!r}")
        found = getattr(module, kernel)
        wrapped = getattr(_backend_package(backend), "wrapped", None)  # a backend's own calling convention
        found = _kernels[key] = found if wrapped is None else wrapped(found)
    return found
