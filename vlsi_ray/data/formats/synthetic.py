"""The synthetic shapes task as one more source of a mixture: ``{name, format: synthetic, train, val, test, seed}``.

Its rows keep their own splits and the task's scorable letters (per-task accuracy in the report);
``options`` may also give the generator's difficulty settings (``max_objects``, ``dot_prob`` ...).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from vlsi_ray.data.formats import Format, Source
from vlsi_ray.data.shards import SPLITS
from vlsi_ray.data.synthetic import generate_rows


def files(source: Source) -> list[Path]:
    """One pseudo-file per split (the generator writes no input file)."""
    return [Path(split) for split in SPLITS if int(source.options.get(split, 0)) > 0]


def records(source: Source, path: Path) -> Iterator[dict]:
    """The generated rows of one split (``path`` names it)."""
    split, options = path.name, dict(source.options)
    sizes = {s: int(options.pop(s, 0)) for s in SPLITS}
    seed = int(options.pop("seed", 0))
    yield from generate_rows(split, sizes[split], seed, **options)


def convert(source: Source, record: dict, number: int) -> dict:
    """A generated row, renamed into the mixture (``<source>/<id>``, source = the mixture's name)."""
    return {**record, "id": f"{source.name}/{record['id']}", "source": source.name}


def count(source: Source, path: Path) -> int:
    """The size the mixture asks of one split."""
    return int(source.options.get(path.name, 0))


FORMAT = Format(files=files, records=records, convert=convert, count=count, splits=True)
