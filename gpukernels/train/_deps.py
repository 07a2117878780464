"""Optional packages the main job needs, with the message that names what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (package on PyPI, gpukernels extra that installs it)
OPTIONAL = {
    "transformers": ("transformers", "train"),
    "tokenizers": ("tokenizers", "train"),
    "matplotlib": ("matplotlib", "train"),
    "sklearn": ("scikit-learn", "train"),
    "timm": ("timm", "models"),
    "liger_kernel": ("liger-kernel", "models"),
}


class MissingPackage(ImportError):
    """An optional package the chosen model or way needs is not importable."""


def install_hint(module: str) -> str:
    package, extra = OPTIONAL[module.partition(".")[0]]
    return f"pip install 'gpukernels[{extra}]' (or: pip install {package})"


def require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` (a package or one of its submodules) or raise ``MissingPackage``
    naming the package and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = OPTIONAL[module.partition(".")[0]][0]
        raise MissingPackage(
            f"{purpose} needs the {package!r} package, which is not importable ({error}). "
            f"Install it: {install_hint(module)}"
        ) from error


def optional(module: str) -> ModuleType | None:
    """``module`` if it imports, else None (for packages the job can do without)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None
