"""Evaluate a local checkpoint or a served endpoint on the synthetic test split, VLMEvalKit MCQ TSVs and POPE sets.

CPU-tiny (after `python jobs/distill.py`; about a minute):

    python jobs/eval.py --model runs/tiny/sft/student --synthetic data/synthetic --limit 200 --out runs/tiny/eval

Generated fixture sets (multiple choice + POPE, built from the synthetic scenes) and an endpoint:

    python jobs/eval.py --write-fixtures /tmp/evalsets
    python jobs/eval.py --model exports/tiny --mcq /tmp/evalsets/mcq.tsv --yes-no /tmp/evalsets/pope.tsv --out /tmp/eval
    VLSI_API_KEY=... python jobs/eval.py --endpoint http://127.0.0.1:8000 --api-key-env VLSI_API_KEY \\
        --model-name vlsi-student --mcq MMBench_DEV_EN.tsv --workers 8 --out /tmp/eval-served

Writes per set ``<name>.json``, ``<name>.md`` and ``<name>.predictions.jsonl`` (re-running the same
command resumes: answered items are skipped), then ``summary.json`` / ``summary.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

from vlsi_ray.eval.benchmarks import BenchmarkError, mcq_benchmark, synthetic_benchmark, yes_no_benchmark  # noqa: E402
from vlsi_ray.eval.fixtures import write_fixture_sets  # noqa: E402
from vlsi_ray.eval.harness import evaluate_benchmark, write_summary  # noqa: E402
from vlsi_ray.eval.predictors import EndpointError, EndpointPredictor, LocalPredictor  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    who = p.add_argument_group("model (one of)")
    who.add_argument("--model", help="local checkpoint directory (a run's stage dir or an export)")
    who.add_argument("--endpoint", help="base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    who.add_argument("--api-key-env", help="environment variable holding the endpoint's API key")
    who.add_argument("--model-name", help="model id on the endpoint (default: the first of /v1/models)")
    sets = p.add_argument_group("benchmarks (any number)")
    sets.add_argument("--synthetic", help="synthetic data directory; its test split is scored per task type")
    sets.add_argument("--mcq", action="append", default=[], help="VLMEvalKit multiple-choice TSV (repeatable)")
    sets.add_argument(
        "--yes-no", action="append", default=[], help="POPE set: VLMEvalKit TSV or original JSON lines (repeatable)"
    )
    sets.add_argument("--image-root", help="image folder of POPE JSON lines (default: next to the file)")
    p.add_argument("--out", default="eval", help="output directory (default: ./eval)")
    p.add_argument("--limit", type=int, help="score only the first N items of each set")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per answer (default 32)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per generate call for --model (default 8)")
    p.add_argument("--workers", type=int, default=4, help="concurrent requests for --endpoint (default 4)")
    p.add_argument("--device", default="cpu", help="device for --model (default cpu)")
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip", help="unusable rows: skip and count, or stop")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--write-fixtures", metavar="DIR", help="write the generated tiny fixture sets to DIR and exit")
    args = p.parse_args(argv)
    if not args.write_fixtures:
        if bool(args.model) == bool(args.endpoint):
            p.error("pass exactly one of --model DIR or --endpoint URL.")
        if not (args.synthetic or args.mcq or args.yes_no):
            p.error("pass at least one benchmark: --synthetic DIR, --mcq FILE or --yes-no FILE.")
        if args.api_key_env and not os.environ.get(args.api_key_env):
            p.error(f"--api-key-env {args.api_key_env}: that environment variable is empty; export the key first.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    if args.write_fixtures:
        sets = write_fixture_sets(args.write_fixtures)
        print(f"wrote {sets.mcq}, {sets.pope_tsv} and {', '.join(map(str, sets.pope_jsonl))}")
        return 0
    try:
        benches = (
            ([synthetic_benchmark(args.synthetic, on_error=args.on_error)] if args.synthetic else [])
            + [mcq_benchmark(f, on_error=args.on_error) for f in args.mcq]
            + [yes_no_benchmark(f, args.image_root, on_error=args.on_error) for f in args.yes_no]
        )
        names = [b.name for b in benches]
        for i, bench in enumerate(benches):  # two files with one stem must not share a predictions file
            if names.count(bench.name) > 1:
                bench.name = f"{bench.name}-{i}"
        if args.model:
            predictor = LocalPredictor(Path(args.model).resolve(), args.batch_size, args.max_tokens, args.device)
        else:
            key = os.environ.get(args.api_key_env) if args.api_key_env else None
            predictor = EndpointPredictor(args.endpoint, args.model_name, key, args.workers, args.max_tokens)
        results = [evaluate_benchmark(b, predictor, args.out, args.limit, not args.no_progress) for b in benches]
    except (BenchmarkError, EndpointError, FileNotFoundError, ValueError) as err:
        print(f"eval error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {write_summary(args.out, results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
