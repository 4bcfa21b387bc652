"""Content fingerprints of files and directories: what a cache or a prepared dataset was made from."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

#: Files up to this size are hashed whole; larger ones (a 72B checkpoint's shards) by size + first and last 8 MiB.
WHOLE_HASH_BYTES = 64 * 2**20
_EDGE_BYTES = 8 * 2**20
#: The files of a checkpoint that decide how its rows are collated: tokenizer, chat template, processor.
PROCESSOR_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template*",
    "preprocessor_config.json",
    "processor_config.json",
    "added_tokens.json",
)


def fingerprint(
    paths: Iterable[str | Path],
    patterns: Sequence[str] = ("*",),
    whole: int = WHOLE_HASH_BYTES,
    edge: int = _EDGE_BYTES,
    content: bool = True,
) -> str:
    """A SHA-256 over the files under ``paths`` (directories walked, names matching ``patterns``).

    Each file adds its name (relative to its root), size and content hash: the whole file up to
    ``whole`` bytes, else its first and last ``edge`` bytes (a 72B checkpoint is fingerprinted in
    seconds; retrained weights change bytes everywhere, and a Parquet file's footer, at its end,
    holds its row counts and column statistics). ``content=False``: names and sizes only (a folder
    of a million images).
    """
    digest = hashlib.sha256()
    for root in paths:
        root = Path(root)
        files = [root] if root.is_file() else sorted({f for p in patterns for f in root.rglob(p) if f.is_file()})
        for f in files:
            size = f.stat().st_size
            digest.update(f"{f.relative_to(root) if f != root else f.name}\0{size}\0".encode())
            if not content:
                continue
            with f.open("rb") as fh:
                if size <= whole:
                    digest.update(hashlib.sha256(fh.read()).digest())
                else:
                    head = fh.read(edge)
                    fh.seek(size - edge)
                    digest.update(hashlib.sha256(head + fh.read(edge)).digest())
    return digest.hexdigest()[:16]


def processor_fingerprint(model_dir: str | Path, min_pixels: int | None, max_pixels: int | None) -> str:
    """What decides a row's token count: the checkpoint's :data:`PROCESSOR_FILES` and the run's image resolution."""
    return f"{fingerprint([model_dir], PROCESSOR_FILES)}/{min_pixels}/{max_pixels}"
