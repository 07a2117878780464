"""gpukernels: hand-written GPU kernels for faster PyTorch training.

CUDA tensors run the Triton kernels, CPU tensors the NumPy ones; choose
another with ``use_backend`` or ``$GPUKERNELS_BACKEND``.
"""

from . import distributed, functional, nn, optim
from ._backend import backend_name, unavailable_reason, use_backend
from .capture import CapturedStep, capture_step
from .errors import ArgumentError, ArgumentTypeError, BackendError
from .functional import *  # noqa: F401,F403
from .functional import __all__ as _functional_all
from .patch import PatchReport, fuse_linear_cross_entropy, patch, unpatch

__version__ = "0.1.0"
__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "BackendError",
    "backend_name",
    "unavailable_reason",
    "use_backend",
    "distributed",
    "functional",
    "nn",
    "optim",
    "CapturedStep",
    "capture_step",
    "PatchReport",
    "fuse_linear_cross_entropy",
    "patch",
    "unpatch",
    *_functional_all,
]
