"""Convert instruction data (LLaVA, ShareGPT, Hugging Face Parquet/Arrow, the synthetic task) into the run's shards.

    python jobs/prepare_data.py MIXTURE.yaml --out /data/vlsi --config conf/qwen2vl_72b_to_7b.yaml student.path=/ckpt/Qwen2-VL-7B

The mixture file lists the sources (see ``vlsi_ray.data.mixture``); the config gives the student whose
processor measures each row's tokens (``student.path``; without one, token counts are left empty),
``data.max_length`` (longer rows are bad rows), ``data.on_error`` (``skip``: count and list bad rows in
the manifest; ``raise``: stop at the first) and ``images.min_pixels``/``max_pixels``. Conversion runs on
Ray Data: the cluster at ``ray.address``/``RAY_ADDRESS``, a Ray running on this machine, or a local one.
Then train on the result with ``data.dir=/data/vlsi``.

Try it offline on small samples of every format (one image, two images, multi-turn, text only, and
bad rows of each kind):

    python jobs/prepare_data.py --write-samples /tmp/samples
    python jobs/prepare_data.py /tmp/samples/mixture.yaml --out /tmp/samples/shards
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `ray job submit --working-dir .` and a plain checkout both import vlsi_ray

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

from vlsi_ray.config import ConfigError, RunConfig, load_config  # noqa: E402
from vlsi_ray.data.collate import ChatCollator  # noqa: E402
from vlsi_ray.data.fingerprint import processor_fingerprint  # noqa: E402
from vlsi_ray.data.mixture import MixtureError, load_mixture, prepare  # noqa: E402
from vlsi_ray.data.samples import write_samples  # noqa: E402
from vlsi_ray.prepare import LoadSettings, model_info  # noqa: E402
from vlsi_ray.runners.ray.driver import connect  # noqa: E402


def student_collator(cfg: RunConfig) -> ChatCollator | None:
    """The collator of ``student.path`` (its tokenizer, chat template and processor at the run's image
    resolution), untruncated: it measures rows. None for the tiny student (its tokenizer is trained later)."""
    if cfg.student.path is None:
        return None
    info = model_info(cfg.student.path, LoadSettings.of(cfg, "student"))
    return ChatCollator(info.tokenizer, info.image_processor, info.family, max_length=None, cache_size=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mixture", nargs="?", help="mixture YAML listing the sources")
    parser.add_argument("--out", help="directory for the shards and manifest.json (its old shards are replaced)")
    parser.add_argument("--config", default=str(ROOT / "conf" / "tiny.yaml"), help="YAML config (default: conf/tiny.yaml)")
    parser.add_argument("--workers", type=int, default=None, help="conversion workers (default: the cluster's CPUs)")
    parser.add_argument("--write-samples", metavar="DIR", help="write small sample sources and DIR/mixture.yaml, then exit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. student.path=/ckpt data.max_length=4096")
    args = parser.parse_intermixed_args(argv)
    if args.write_samples:
        path = write_samples(args.write_samples)
        print(
            f"[prepare] samples written; convert them with: python jobs/prepare_data.py {path} --out {Path(args.write_samples) / 'shards'}"
        )
        return 0
    if not args.mixture or not args.out:
        parser.error("give a MIXTURE.yaml and --out DIR (or --write-samples DIR)")
    try:
        cfg = load_config(args.config, args.overrides)
        mixture = load_mixture(args.mixture)
        collator = student_collator(cfg)
    except (ConfigError, MixtureError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if collator is None:
        print("[prepare] no student.path: token counts are left empty and data.max_length is not checked here", flush=True)
    print(f"[prepare] Ray: {connect(cfg)}", flush=True)
    command = shlex.join(["python", "jobs/prepare_data.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        prepare(
            mixture,
            args.out,
            collator=collator,
            max_length=cfg.data.max_length if collator is not None else None,
            on_error=cfg.data.on_error,
            command=command,
            student=cfg.student.path,
            measured_with=processor_fingerprint(cfg.student.path, cfg.images.min_pixels, cfg.images.max_pixels)
            if collator is not None
            else None,
            concurrency=args.workers,
        )
    except MixtureError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
