"""Settings of the Serve app: the ``args`` of ``conf/serve.yaml`` (or ``jobs/serve.py``'s flags), validated."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlsi_ray.config import ConfigError, explain_omegaconf_error


@dataclass
class Limits:
    """What one request may ask for; anything beyond gets a 4xx naming the limit."""

    max_body_bytes: int = 16 * 2**20
    max_images: int = 4  # per request
    max_image_bytes: int = 8 * 2**20  # decoded bytes of one image
    max_image_pixels: int = 4096 * 4096  # width × height of one image
    max_messages: int = 64
    max_tokens: int = 1024  # the largest max_tokens a request may set


@dataclass
class Autoscaling:
    """Ray Serve autoscaling of the model deployment (``autoscaling_config``)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0


@dataclass
class ServeConfig:
    """The app's arguments: which model, how it is batched, scaled, placed and protected."""

    model_dir: str = "exports/tiny"
    model_name: Optional[str] = None  # the OpenAI "model" id; default: the directory's name
    device: str = "auto"  # auto: CUDA when the replica has a GPU, else CPU
    dtype: Optional[str] = None  # float32 | bfloat16 | float16; default: as saved
    max_batch_size: int = 16  # serve.batch: requests decoded together (1 = no dynamic batching)
    batch_wait_timeout_s: float = 0.01
    default_max_tokens: int = 64  # when a request does not set max_tokens
    api_key_env: Optional[str] = "VLSI_API_KEY"  # when this env var is set, requests need "Authorization: Bearer <key>"
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica
    max_ongoing_requests: int = 64
    autoscaling: Autoscaling = field(default_factory=Autoscaling)
    limits: Limits = field(default_factory=Limits)

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model_dir).name


def serve_config(args: dict[str, Any] | None = None, check_model: bool = True) -> ServeConfig:
    """Validate ``args`` (a dict as Serve passes ``applications[].args``) into a :class:`ServeConfig`.

    Raises :class:`ConfigError`, one sentence naming the key and the fix.
    """
    try:
        cfg: ServeConfig = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(ServeConfig), OmegaConf.create(dict(args or {})))
        )
    except OmegaConfBaseException as err:
        raise ConfigError(explain_omegaconf_error(err, "the serve app's args")) from None
    if check_model and not (Path(cfg.model_dir) / "config.json").is_file():
        raise ConfigError(
            f"model_dir={cfg.model_dir} holds no model; export one with `python jobs/export.py --run-dir RUN --out DIR` and point model_dir at DIR."
        )
    if not (cfg.device in ("auto", "cpu") or cfg.device.startswith("cuda")):
        raise ConfigError(f"device={cfg.device!r} is not auto, cpu or cuda[:N]; pick one of those.")
    if cfg.dtype not in (None, "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype={cfg.dtype!r} is not float32, bfloat16 or float16; pick one or leave it unset.")
    if cfg.max_batch_size < 1 or cfg.batch_wait_timeout_s < 0:
        raise ConfigError("max_batch_size must be at least 1 and batch_wait_timeout_s at least 0.")
    if cfg.max_ongoing_requests < cfg.max_batch_size:
        raise ConfigError(
            f"max_ongoing_requests={cfg.max_ongoing_requests} is below max_batch_size={cfg.max_batch_size}, so batches could never fill; raise it."
        )
    if not 1 <= cfg.default_max_tokens <= cfg.limits.max_tokens:
        raise ConfigError(
            f"default_max_tokens={cfg.default_max_tokens} must be in 1..limits.max_tokens ({cfg.limits.max_tokens})."
        )
    scale = cfg.autoscaling
    if not 0 <= scale.min_replicas <= scale.max_replicas or scale.max_replicas < 1 or scale.target_ongoing_requests <= 0:
        raise ConfigError(
            "autoscaling needs 0 <= min_replicas <= max_replicas, max_replicas >= 1 and target_ongoing_requests > 0."
        )
    if any(v < 1 for v in vars(cfg.limits).values()):
        raise ConfigError("every limits.* value must be at least 1.")
    return cfg
