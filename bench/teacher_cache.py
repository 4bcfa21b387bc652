"""Step-2 throughput with the teacher signal read from the offline cache vs computed live, side by side.

    python bench/teacher_cache.py              # conf/tiny.yaml models and data, 40 steps per block
    python bench/teacher_cache.py --steps 80 --blocks 4

Sets up a run (``runs/bench_cache``: the config's teacher — conf/tiny.yaml's pinned one — and the tiny
student from the model cache, step 1 for one step: verbalizer quality does not change the speed), builds its teacher cache with
``jobs/teacher_cache.py``'s code on a local Ray (prints rows/s and bytes), then times step 2 in this
process, one torch thread, on the same pre-collated batches: (live) the teacher forward then the
student step, (cache) the student step with the signal read from the cache. Blocks alternate
live/cache so that machine noise hits both; prints samples/s of each and the ratio cache/live.
"""

from __future__ import annotations

import argparse
import sys
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
from vlsi_ray.data.shards import read_rows  # noqa: E402
from vlsi_ray.method.loop import Stepper  # noqa: E402
from vlsi_ray.method.steps import InteractionObjective  # noqa: E402
from vlsi_ray.models.backbone import Backbone  # noqa: E402
from vlsi_ray.models.verbalizer import Verbalizers  # noqa: E402
from vlsi_ray.prepare import check_pair, make_collator  # noqa: E402
from vlsi_ray.recipe.layout import RunLayout  # noqa: E402
from vlsi_ray.runners.local import run_local  # noqa: E402
from vlsi_ray.runners.ray.driver import connect  # noqa: E402
from vlsi_ray.teacher.cache import build_cache, open_cache, step2_inputs  # noqa: E402
from vlsi_ray.teacher.sources import in_process  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "conf" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="step-2 steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks of each kind, alternating")
    args = parser.parse_args(argv)
    cfg = load_config(
        args.config,
        [
            "name=bench_cache",
            "runner=local",
            "stages.verbalize.max_steps=1",
            "steps=[pretrain_teacher,pretrain_student,verbalize]",
            "eval_models=[]",
        ],
    )

    run_local(cfg)  # the models come from the model cache after the first run

    connect(cfg)
    started = time.perf_counter()
    manifest = build_cache(cfg, overwrite=True)
    build_s = time.perf_counter() - started
    ray.shutdown()

    torch.set_num_threads(1)
    layout = RunLayout(cfg.run_dir)
    inputs = step2_inputs(cfg)  # the config's teacher checkpoint (tiny.yaml: the pinned one) or the run's
    teacher = Backbone.from_pretrained(inputs["teacher"])
    teacher.model.eval()
    student = Backbone.from_pretrained(inputs["student"])
    t_verbs = Verbalizers.load(inputs["teacher_verbalizers"], "cpu").eval()
    s_verbs = Verbalizers.load(layout.verbalizers("student"), "cpu")
    vocab = check_pair(teacher, student)
    cache = open_cache(cfg, inputs["teacher"], inputs["student"], inputs["teacher_verbalizers"], vocab)

    rows, _ = read_rows(cfg.data.dir, split="train")
    bs = cfg.stages.interact.batch_size
    collate = make_collator(student, cfg)
    batches = [collate(rows[i * bs : (i + 1) * bs]) for i in range(args.steps + 2)]
    warm, timed = batches[:2], batches[2:]
    student.apply_lora(cfg.lora.rank, cfg.lora.alpha)

    live = in_process(cfg, teacher, t_verbs, vocab)  # the in-process runner's teacher source

    objectives = {}
    for name, source in (("live", live), ("cache", cache)):
        objective = InteractionObjective(
            student, s_verbs, source, cfg.matching, cfg.loss, generator=torch.Generator().manual_seed(0), vocab_size=vocab
        )
        objectives[name] = (objective, Stepper(objective.parameters(), cfg.stages.interact))
        student_loop(*objectives[name], warm)
    seconds = {"live": 0.0, "cache": 0.0}
    for _ in range(args.blocks):
        for name in ("live", "cache"):
            seconds[name] += student_loop(*objectives[name], timed)
    samples = args.blocks * len(timed) * bs
    live_rate, cache_rate = samples / seconds["live"], samples / seconds["cache"]
    print(
        f"cache build: {manifest['rows']} rows in {build_s:.0f}s ({manifest['rows'] / build_s:.0f} rows/s; Ray already started, the teacher actors' start included), "
        f"{manifest['bytes'] / 2**20:.1f} MiB on disk, {manifest['bytes'] / manifest['rows'] / 1024:.1f} KiB per sample"
    )
    print(f"step 2, live teacher:  {live_rate:.1f} samples/s")
    print(
        f"step 2, teacher cache: {cache_rate:.1f} samples/s   (reading {1000 * cache.read_seconds / cache.requests:.1f} ms per batch)"
    )
    print(
        f"ratio cache/live {cache_rate / live_rate:.2f}  ({args.blocks} alternating blocks of {len(timed)} steps, batch {bs}, 1 thread)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
