"""Triton kernels: the default backend for CUDA tensors.

With ``TRITON_INTERPRET=1`` (read when the kernel modules are imported) the
same kernels run on CPU tensors through Triton's interpreter; that is how CI
tests them without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_types() -> tuple[str, ...]:
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def unavailable_reason() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA GPU is visible (TRITON_INTERPRET=1 runs the kernels on CPU tensors, slowly)"
    return None
