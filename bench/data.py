"""Real-data pipeline, side by side in one run: conversion rate, the input stream against step 2's consumption,
and padding with and without length grouping.

    python bench/data.py                    # 200 records per sample source, batch 8, 30 timed batches
    python bench/data.py --rows 400 --batches 60

1. **Conversion.** Writes the sample sources of every format (``vlsi_ray.data.samples``: one image, two
   images, three turns with a system turn, text only, and bad rows) with ``--rows`` records each, and
   converts them with ``jobs/prepare_data.py``'s code on a local Ray (2 CPUs), token counts measured with
   the conf/tiny.yaml student's processor: with 1 conversion worker, then 2. Prints rows/s of each and
   their ratio.
2. **Input stream vs consumption.** (a) the train split through the Ray runner's stream (the run's index,
   ``train_dataset``'s seeded order, ``iter_torch_batches`` with the collator: images decoded and
   processed as a Train worker does), samples/s; (b) the student's step 2 on the same batches, in this
   process: LoRA + verbalizer forward, backward and AdamW, the teacher's signal precomputed (in a run it
   comes from the teacher's own GPUs), samples/s. Ratio a/b: above 1, the input is not the bottleneck.
   Models are random-init tiny ones of conf/tiny.yaml's sizes: speed does not depend on what they know.
3. **Padding.** The share of padding in the train split's batches, shuffled vs length-grouped
   (``data.group_by_length``, ``data.length_group_batches``), and the ratio.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

import ray  # noqa: E402
import torch  # noqa: E402

from bench.pipeline import student_loop  # noqa: E402
from vlsi_ray.config import load_config  # noqa: E402
from vlsi_ray.data.index import read_index  # noqa: E402
from vlsi_ray.data.mixture import load_mixture, prepare  # noqa: E402
from vlsi_ray.data.order import BatchOrder, padding_fraction  # noqa: E402
from vlsi_ray.data.ray_dataset import RayCollate, train_dataset, train_split  # noqa: E402
from vlsi_ray.data.samples import write_samples  # noqa: E402
from vlsi_ray.method.loop import Stepper  # noqa: E402
from vlsi_ray.method.steps import InteractionObjective  # noqa: E402
from vlsi_ray.models.tokenizer import train_tokenizer  # noqa: E402
from vlsi_ray.prepare import build_model, make_collator, new_verbalizers  # noqa: E402
from vlsi_ray.teacher.sources import in_process  # noqa: E402

MAX_LENGTH = 1024


def convert(mixture_file: Path, out: Path, collator, workers: int) -> float:
    """Convert the mixture with ``workers`` conversion workers; rows/s (kept and skipped rows)."""
    manifest = prepare(
        load_mixture(mixture_file), out, collator=collator, max_length=MAX_LENGTH, concurrency=workers, command="bench"
    )
    return manifest["rows_per_second"]


def input_stream(data_dir: Path, collator, batch_size: int, batches: int, seed: int) -> tuple[float, list[dict]]:
    """Samples/s of ``batches`` collated batches from the Ray runner's train stream (after 2 warm-up
    batches), and the batches themselves."""
    index = read_index(data_dir, "train", MAX_LENGTH, "skip", None)
    split = train_split(data_dir, index.excluded(), sort_in_memory_mb=512)
    dataset = train_dataset(split, (), seed, batch_size, batches + 2, index.ids())
    stream = iter(dataset.iter_torch_batches(batch_size=batch_size, collate_fn=RayCollate(collator), drop_last=True))
    warm = [next(stream) for _ in range(2)]
    started = time.perf_counter()
    timed = [next(stream) for _ in range(batches)]
    return batches * batch_size / (time.perf_counter() - started), warm + timed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "tiny.yaml"))
    parser.add_argument("--rows", type=int, default=200, help="records per sample source")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=30, help="timed batches of the input stream and of step 2")
    args = parser.parse_args(argv)
    cfg = load_config(
        args.config, ["teacher.path=null", f"data.max_length={MAX_LENGTH}"]
    )  # random-init tiny models  # the mixture's longest rows fit
    tmp = tempfile.TemporaryDirectory()
    synthetic = {"train": 4 * args.rows, "val": 8, "test": 8}
    mixture_file = write_samples(Path(tmp.name) / "samples", rows=args.rows, synthetic=synthetic)

    tokenizer = train_tokenizer(_sample_texts(mixture_file), cfg.student.family)
    student = build_model(cfg, "student", tokenizer, torch.device("cpu"))
    teacher = build_model(cfg, "teacher", tokenizer, torch.device("cpu"))
    collator = make_collator(student, cfg)

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates = {}
    for workers in (1, 2):
        rates[workers] = convert(mixture_file, Path(tmp.name) / f"shards-{workers}", collator, workers)
    data_dir = Path(tmp.name) / "shards-2"
    input_rate, batches = input_stream(data_dir, collator, args.batch_size, args.batches, cfg.seed)
    ray.shutdown()

    t_verbs, s_verbs = new_verbalizers(cfg, "teacher", teacher, 3), new_verbalizers(cfg, "student", student, 4)
    student.apply_lora(cfg.lora.rank, cfg.lora.alpha)
    teacher_fn = in_process(cfg, teacher, t_verbs)
    signals = {tuple(b["ids"]): teacher_fn(b) for b in batches}
    objective = InteractionObjective(
        student, s_verbs, lambda b: signals[tuple(b["ids"])], cfg.matching, cfg.loss, generator=torch.Generator().manual_seed(0)
    )
    stepper = Stepper(objective.parameters(), cfg.stages.interact)
    student_loop(objective, stepper, batches[:2])  # warm-up
    consumption = args.batches * args.batch_size / student_loop(objective, stepper, batches[2:])

    index = read_index(data_dir, "train", MAX_LENGTH, "skip", None)
    lengths = index.lengths()
    group_rows = cfg.data.length_group_batches * args.batch_size
    padding = {}
    for name, kwargs in (("shuffled", {}), ("grouped", {"lengths": lengths, "group_rows": group_rows})):
        order = BatchOrder(index.ids(), args.batch_size, cfg.seed, **kwargs)
        epoch = itertools.islice(order, order.batches_per_epoch)
        padding[name] = padding_fraction([lengths[i] for i in batch] for batch in epoch)
    tmp.cleanup()

    rows = len(lengths)
    print(f"conversion ({rows:,} train rows of {args.rows} records per source, 2 CPUs): "
          f"{rates[1]:.1f} rows/s with 1 worker, {rates[2]:.1f} rows/s with 2; ratio {rates[2] / rates[1]:.2f}")  # fmt: skip
    print(f"input stream (Ray Data + collator, batch {args.batch_size}): {input_rate:.1f} samples/s; "
          f"step 2's student: {consumption:.1f} samples/s; input/consumption {input_rate / consumption:.2f}")  # fmt: skip
    print(f"padding of the train batches: {padding['shuffled']:.3f} shuffled, {padding['grouped']:.3f} length-grouped "
          f"(groups of {cfg.data.length_group_batches} batches); ratio {padding['grouped'] / padding['shuffled']:.2f}")  # fmt: skip
    return 0


def _sample_texts(mixture_file: Path) -> list[str]:
    """Every text of the sample sources (for the tiny tokenizer): their files read as text."""
    return [p.read_text(errors="ignore") for p in mixture_file.parent.rglob("*") if p.suffix in {".json", ".jsonl", ".yaml"}]


if __name__ == "__main__":
    sys.exit(main())
