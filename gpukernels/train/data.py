"""Training data that is already on the machine: nothing is downloaded.

Text: the Python standard library's own ``.py`` sources, tokenized by a
byte-level BPE trained here with HF ``tokenizers``; the tokenizer and the
token ids are cached under the cache directory, keyed by the corpus (Python
version, file names and sizes, byte budget) and the vocabulary size.
Images: scikit-learn's bundled handwritten digits (1797 8x8 images).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ArgumentError
from ._deps import require

END_OF_TEXT = "<|endoftext|>"


def default_cache_dir() -> Path:
    """``$GPUKERNELS_CACHE``, else ``$XDG_CACHE_HOME/gpukernels``, else ``~/.cache/gpukernels``."""
    if os.environ.get("GPUKERNELS_CACHE"):
        return Path(os.environ["GPUKERNELS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpukernels"


def stdlib_sources(max_bytes: int | None = None) -> list[Path]:
    """The standard library's ``.py`` files (installed packages left out), in a fixed
    order; with ``max_bytes``, the leading files that fit in that many bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"no .py sources under the standard library folder {root}")
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for path in files:
        total += path.stat().st_size
        if total > max_bytes and chosen:
            break
        chosen.append(path)
    return chosen


def _corpus_key(files: list[Path], max_bytes: int | None) -> str:
    listing = "\n".join(f"{p}:{p.stat().st_size}" for p in files)
    text = f"python {platform.python_version()}\nbudget {max_bytes}\n{listing}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read(path: Path) -> str:
    # A few stdlib files (test data) are not valid UTF-8; byte-level BPE takes any text.
    return path.read_bytes().decode("utf-8", errors="replace")


def _train_tokenizer(texts: list[str], vocab_size: int):
    tokenizers = require("tokenizers", "training the byte-level BPE tokenizer")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _write_atomically(path: Path, write) -> None:
    """Another process may read the cache while this one fills it."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    write(partial)
    os.replace(partial, path)


def _save_array(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as file:  # a file object: np.save would add ".npy" to a path
        np.save(file, array)


@dataclass
class TokenData:
    tokens: np.ndarray  # the corpus's token ids, files separated by END_OF_TEXT
    vocab_size: int  # of the trained tokenizer (the model's embedding may be larger)
    folder: Path  # the cache entry: tokenizer.json, tokens.npy, corpus.json
    files: int
    corpus_bytes: int
    trained: bool  # False when the cached tokenizer and tokens were reused

    def describe(self) -> dict:
        return {
            "corpus": "Python standard library .py sources",
            "files": self.files,
            "bytes": self.corpus_bytes,
            "tokens": int(self.tokens.size),
            "tokenizer_vocab": self.vocab_size,
            "cache": str(self.folder),
            "tokenizer": "trained" if self.trained else "reused from cache",
        }


def stdlib_tokens(vocab_size: int, max_bytes: int | None, cache_dir: Path) -> TokenData:
    """Token ids of the stdlib corpus under a byte-level BPE of ``vocab_size``,
    trained on that corpus the first time and read from ``cache_dir`` after."""
    if vocab_size <= 257:
        raise ArgumentError(f"vocab_size must exceed the 256 byte tokens and {END_OF_TEXT}, got {vocab_size}")
    files = stdlib_sources(max_bytes)
    folder = Path(cache_dir) / f"stdlib-bpe-{_corpus_key(files, max_bytes)}-v{vocab_size}"
    tokenizer_path, tokens_path, meta_path = folder / "tokenizer.json", folder / "tokens.npy", folder / "corpus.json"
    trained = not (tokenizer_path.exists() and tokens_path.exists() and meta_path.exists())
    if trained:
        folder.mkdir(parents=True, exist_ok=True)
        texts = [_read(p) for p in files]
        tokenizer = _train_tokenizer(texts, vocab_size)
        eot = tokenizer.token_to_id(END_OF_TEXT)
        ids = [token for encoding in tokenizer.encode_batch(texts) for token in (*encoding.ids, eot)]
        dtype = np.uint16 if vocab_size <= 2**16 else np.int32
        _write_atomically(tokens_path, lambda p: _save_array(p, np.asarray(ids, dtype=dtype)))
        _write_atomically(tokenizer_path, lambda p: tokenizer.save(str(p)))
        meta = {
            "files": len(files),
            "bytes": sum(p.stat().st_size for p in files),
            "vocab_size": tokenizer.get_vocab_size(),
        }
        _write_atomically(meta_path, lambda p: p.write_text(json.dumps(meta)))
    meta = json.loads(meta_path.read_text())
    return TokenData(np.load(tokens_path), meta["vocab_size"], folder, meta["files"], meta["bytes"], trained)


def batch_order(items: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Indices of each step's batch: a fresh permutation of ``items`` each epoch,
    the last incomplete batch of an epoch dropped (every step has the same shape)."""
    if batch_size > items:
        raise ArgumentError(f"batch_size {batch_size} exceeds the {items} training examples")
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(items, generator=generator)
        batches += [order[i : i + batch_size] for i in range(0, items - batch_size + 1, batch_size)]
    return batches[:steps]


def load_digits(device: torch.device, seed: int = 0):
    """Train/test split (80/20, fixed) of scikit-learn's digits: (x, y) pairs, x flat
    64-pixel rows scaled to [0, 1]."""
    datasets = require("sklearn.datasets", "the digits data set")
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return (x[train].to(device), y[train].to(device)), (x[test].to(device), y[test].to(device))


def digit_images(flat: torch.Tensor, size: int, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Digits rows (64 pixels in [0, 1]) -> 3-channel ``size`` x ``size`` images in [-1, 1] (bilinear)."""
    images = F.interpolate(flat.view(-1, 1, 8, 8), size=(size, size), mode="bilinear", align_corners=False)
    return (2 * images - 1).expand(-1, 3, -1, -1).contiguous(memory_format=memory_format)
