"""Serve an exported VLsI student behind an OpenAI-compatible API on Ray Serve (Ctrl-C stops it).

    python jobs/export.py --run-dir runs/tiny --out exports/tiny
    python jobs/serve.py                                  # conf/serve.yaml's app on 127.0.0.1:8000
    python jobs/serve.py model_dir=exports/other max_batch_size=8 --port 9000

``key=value`` overrides change the app's ``args`` (see ``vlsi_ray/serve/config.py``). Connects to
``RAY_ADDRESS`` when set, else starts a local Ray. ``serve run conf/serve.yaml`` deploys the same app.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlsi_ray.env import set_offline_defaults  # noqa: E402

set_offline_defaults()

import ray  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from ray import serve  # noqa: E402

from vlsi_ray.config import ConfigError  # noqa: E402
from vlsi_ray.runners.ray.driver import ray_env  # noqa: E402
from vlsi_ray.serve.app import build_app  # noqa: E402
from vlsi_ray.serve.config import serve_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default=str(ROOT / "conf" / "serve.yaml"), help="Serve config file (default: conf/serve.yaml)"
    )
    parser.add_argument("--host", default=None, help="listen address (default: the file's http_options.host)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the file's http_options.port)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the app's args, e.g. model_dir=exports/tiny")
    args = parser.parse_args(argv)
    try:
        if not Path(args.config).is_file():
            raise ConfigError(f"config file {args.config} does not exist; pass a Serve config YAML to --config.")
        file = OmegaConf.load(args.config)
        app = OmegaConf.merge(file.applications[0].args, OmegaConf.from_dotlist(args.overrides))
        app_args = OmegaConf.to_container(app)
        serve_config(app_args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    host = args.host or file.http_options.get("host", "127.0.0.1")
    port = args.port or file.http_options.get("port", 8000)

    env = ray_env()
    key_env = app_args.get("api_key_env")
    if key_env and os.environ.get(key_env):  # the replicas check the key from their own environment
        env[key_env] = os.environ[key_env]
    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), runtime_env={"env_vars": env})
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(app_args), name=file.applications[0].get("name", "vlsi"), route_prefix="/")
    print(
        f"[serve] {app_args.get('model_name') or Path(app_args['model_dir']).name} on http://{host}:{port}/v1 (Ctrl-C stops)",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
