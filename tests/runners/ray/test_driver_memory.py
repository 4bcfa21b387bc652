"""The Ray driver holds the data index, never the rows: its peak memory is flat from 1,000 to 10,000 rows of
50–100 KB images, measured in a driver process of its own (``ru_maxrss``) running step 2 over shards
prepared for the run's student (token counts in the shards, as jobs/prepare_data.py writes them)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.data.fingerprint import processor_fingerprint
from vlsi_ray.data.shards import MANIFEST, write_shards
from vlsi_ray.prepare import LoadSettings, model_info

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[3]
SIZES = (1_000, 10_000)  # 56 and 560 MB of train shards: held in the object store, and streamed
#: Distinct noise images the rows cycle through; each row's bytes are made unique by a suffix after PNG's
#: end chunk (which decoders ignore), so no row shares its bytes with another.
DISTINCT_IMAGES = 64
SHARD_ROWS = 1000
#: The driver may grow by this much from the small to the large set: far below the ~500 MB of images it adds.
DRIVER_GROWTH_MB = 100
#: The driver's program. Its peak is the kernel's VmHWM of the new process image: ``ru_maxrss`` would carry
#: over the peak of the (large) test process it was forked from across ``exec``.
DRIVER = """
import json, sys
from vlsi_ray.config import load_config
from vlsi_ray.runners.ray.driver import run_ray
run_ray(load_config(None, json.loads(sys.argv[1])))
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("DRIVER_PEAK_KB", peak.split()[1], flush=True)
"""


def _noise_pngs(n: int, seed: int = 0) -> list[bytes]:
    """``n`` PNGs of uniform noise, 130–150 px a side: 50–70 KB each (noise does not compress)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        side = 130 + (i * 20) // n
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG", compress_level=1)
        out.append(buffer.getvalue())
    return out


def write_prepared(out: Path, train_rows: int, student: Path, images: list[bytes]) -> int:
    """Shards of ``train_rows`` one-image rows (16 val, 16 test) with their token counts and a manifest saying
    they were measured with ``student``'s processor; returns the bytes of the train shards."""
    info = model_info(student, LoadSettings())
    collator = ChatCollator(info.tokenizer, info.image_processor, info.family)
    question = "What colour is the shape?\nA. red\nB. green\nC. blue\nD. yellow\nAnswer with the option's letter."

    def row(split: str, i: int) -> dict:
        letter = "ABCD"[i % 4]
        messages = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": letter}]},
        ]
        image = images[i % len(images)] + f"{split}/{i}".encode().ljust(16, b"\0")
        return {"id": f"noise/{split}-{i}", "images": [image], "messages": json.dumps(messages), "answer": letter,
                "task": "colour", "source": "noise", "split": split}  # fmt: skip

    tokens = [len(collator.encode(row("train", i))[0]) for i in range(len(images))]  # a count depends on the image only
    files = {}
    for split, n in (("train", train_rows), ("val", 16), ("test", 16)):
        files[split] = []
        for start in range(0, n, SHARD_ROWS):  # one shard in memory at a time
            rows = [{**row(split, i), "tokens": tokens[i % len(images)]} for i in range(start, min(n, start + SHARD_ROWS))]
            (path,) = write_shards(rows, out / "next", split, rows_per_shard=SHARD_ROWS)
            files[split].append(path.rename(out / f"{split}-{start // SHARD_ROWS:05d}.parquet").name)
    (out / "next").rmdir()
    measured_with = processor_fingerprint(student, None, None)
    manifest = {"tokens_measured": True, "measured_with": measured_with, "splits": {s: {"files": f} for s, f in files.items()}}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return sum((out / name).stat().st_size for name in files["train"])


def driver_peak_mb(overrides: list[str]) -> float:
    """Run the Ray driver on ``overrides`` in a process of its own; its peak RSS in MB."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(overrides)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("DRIVER_PEAK_KB"))
    return int(line.split()[1]) / 1024


def test_driver_memory_is_flat_from_1k_to_10k_rows(local_ray, hub_worlds, tmp_path):
    world = hub_worlds("qwen2_vl")
    images = _noise_pngs(DISTINCT_IMAGES)
    assert 50_000 <= min(map(len, images)) and max(map(len, images)) <= 100_000
    peaks, sizes = {}, {}
    for n in SIZES:
        data = tmp_path / f"data-{n}"
        sizes[n] = write_prepared(data, n, world.student, images)
        overrides = world.overrides(
            f"memory-{n}",
            f"data.dir={data}",
            f"output_dir={tmp_path / 'runs'}",
            "steps=[interact]",  # step 2 alone: the teacher pool, the Train worker and its data stream
            "baseline_sft=false",
            "eval_models=[]",
            "stages.interact.max_steps=1",
            "stages.interact.batch_size=2",
            "train.use_gpu=false",
            f"ray.address={local_ray.get_runtime_context().gcs_address}",  # the driver joins this module's Ray
        )
        peaks[n] = driver_peak_mb([o for o in overrides if not o.startswith("data.synthetic.")])
        assert (tmp_path / "runs" / f"memory-{n}" / "interact").is_dir()
    small, large = SIZES
    print(f"driver peak RSS: {peaks[small]:.0f} MB at {small:,} rows ({sizes[small] / 2**20:.0f} MB of train shards), "
          f"{peaks[large]:.0f} MB at {large:,} rows ({sizes[large] / 2**20:.0f} MB)")  # fmt: skip
    assert sizes[large] - sizes[small] > 450 * 2**20  # the driver would hold about this much more if it read the rows
    assert peaks[large] - peaks[small] < DRIVER_GROWTH_MB, peaks
