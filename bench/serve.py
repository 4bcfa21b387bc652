"""Serving throughput and latency: dynamic batching on vs off, same model, one run.

    python bench/serve.py                             # an untrained student of conf/tiny.yaml's size
    python bench/serve.py --model-dir exports/tiny    # an exported run

Deploys the Serve app twice on one local Ray, identical but for ``max_batch_size`` (16 vs 1), each
replica on one CPU with one torch thread. Then, for 1 and 16 concurrent clients, sends chat requests
(a synthetic-task image + question, greedy, ``max_tokens`` new tokens) to each app in turn and
prints requests/s, tokens/s and p50/p99 latency; all of it ``--repeats`` times (default 3), then the
batched/unbatched throughput ratio's median, min and max at 1 and 16 clients (goal: median ≥ 3× at 16). The untrained default model never stops early, so every request decodes
exactly ``max_tokens`` tokens.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

import ray  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402
from ray import serve  # noqa: E402

from vlsi_ray.config import load_config  # noqa: E402
from vlsi_ray.data.shards import read_rows  # noqa: E402
from vlsi_ray.prepare import build_model, prepare_data, tiny_tokenizer  # noqa: E402
from vlsi_ray.runners.ray.driver import ray_env  # noqa: E402
from vlsi_ray.serve.app import build_app  # noqa: E402


def untrained_student(workdir: Path) -> tuple[Path, Path]:
    """conf/tiny.yaml's student at random init, saved under ``workdir``; returns (model dir, data dir)."""
    cfg = load_config(
        ROOT / "conf" / "tiny.yaml",
        [f"data.dir={workdir / 'data'}", "data.synthetic.train=500", "data.synthetic.val=10", "data.synthetic.test=64"],
    )
    prepare_data(cfg)
    backbone = build_model(cfg, "student", tiny_tokenizer(cfg), torch.device("cpu"))
    backbone.save_pretrained(workdir / "model")
    return workdir / "model", workdir / "data"


def chat_bodies(data_dir: Path, model: str, max_tokens: int, n: int) -> list[bytes]:
    """``n`` request bodies built from the synthetic test split (image as a base64 data URI)."""
    rows = read_rows(data_dir, split="test")[0]
    bodies = []
    for i in range(n):
        row = rows[i % len(rows)]
        question = next(p["text"] for p in json.loads(row["messages"])[0]["content"] if p["type"] == "text")
        url = "data:image/png;base64," + base64.b64encode(row["images"][0]).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
        bodies.append(
            json.dumps(
                {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}
            ).encode()
        )
    return bodies


def load(url: str, bodies: list[bytes], clients: int) -> dict:
    """Send ``bodies`` from ``clients`` threads; requests/s, completion tokens/s, p50/p99 latency (s)."""

    def one(body: bytes) -> tuple[float, int]:
        started = time.perf_counter()
        reply = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=600)
        reply.raise_for_status()
        return time.perf_counter() - started, reply.json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    latencies = sorted(r[0] for r in results)
    return {
        "rps": len(bodies) / wall,
        "tok_s": sum(r[1] for r in results) / wall,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="exported model (default: an untrained tiny student)")
    parser.add_argument(
        "--data-dir", default=None, help="synthetic shards for the prompts (default: data/synthetic or the generated ones)"
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement at 16 clients (a quarter at 1 client)")
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size of the batched app")
    parser.add_argument("--batch-wait", type=float, default=0.05, help="batch_wait_timeout_s of the batched app")
    parser.add_argument(
        "--repeats", type=int, default=3, help="measurements of each case, in turn; the goal is judged on the median"
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    if args.model_dir:
        model_dir, data_dir = Path(args.model_dir), Path(args.data_dir or ROOT / "data" / "synthetic")
    else:
        model_dir, data_dir = untrained_student(work)
    ray.init(address="local", num_cpus=4, runtime_env={"env_vars": ray_env()}, include_dashboard=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {
        "model_dir": str(model_dir),
        "model_name": "bench",
        "api_key_env": None,
        "limits": {"max_tokens": max(64, args.max_tokens)},
        "default_max_tokens": args.max_tokens,
        "max_ongoing_requests": 64,
    }
    for name, batch, wait in (("batched", args.batch, args.batch_wait), ("unbatched", 1, 0.0)):
        serve.run(
            build_app({**common, "max_batch_size": batch, "batch_wait_timeout_s": wait}), name=name, route_prefix=f"/{name}"
        )
    bodies = chat_bodies(data_dir, "bench", args.max_tokens, args.requests)
    print(
        f"model {model_dir}, {args.max_tokens} new tokens per request, batched app max_batch_size={args.batch}, "
        f"batch_wait_timeout_s={args.batch_wait}",
        flush=True,
    )
    print("| repeat | clients | app | requests/s | tokens/s | p50 s | p99 s |\n|---|---|---|---|---|---|---|")
    ratios: dict[int, list[float]] = {1: [], 16: []}
    for repeat in range(1, args.repeats + 1):
        for clients in (1, 16):
            n = args.requests if clients > 1 else max(4, args.requests // 4)
            results = {}
            for name in ("batched", "unbatched"):
                url = f"http://127.0.0.1:{port}/{name}/v1/chat/completions"
                load(url, bodies[:4], min(clients, 4))  # warm-up
                r = results[name] = load(url, bodies[:n], clients)
                print(
                    f"| {repeat} | {clients} | {name} | {r['rps']:.2f} | {r['tok_s']:.1f} | {r['p50']:.3f} | {r['p99']:.3f} |",
                    flush=True,
                )
            ratios[clients].append(results["batched"]["rps"] / results["unbatched"]["rps"])
    print()
    for clients, values in ratios.items():
        median = statistics.median(values)
        goal = f" (goal >= 3x on the median: {'met' if median >= 3 else 'missed'})" if clients == 16 else ""
        print(
            f"batched / unbatched throughput at {clients} client(s): median {median:.2f}x, "
            f"min {min(values):.2f}x, max {max(values):.2f}x over {len(values)} repeats{goal}"
        )
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
