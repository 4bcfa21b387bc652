"""Pinned checkpoints: a small pretrained model kept in the repository with the provenance that reproduces it.

A pinned directory is a checkpoint (``config.json``, weights, tokenizer, chat template, processor
config) plus ``MANIFEST.json``. Its weights are the run's ``model.safetensors`` as trained, or (``dtype``)
the Hub's released layout: cast (e.g. to bfloat16) and sharded with ``model.safetensors.index.json``
(:func:`vlsi_ray.models.hub_layout.write_hub_checkpoint`)::

    {"produced_by": "<the command that trained it>",
     "weights_sha256": "<sha256 of model.safetensors>",   # sharded: {"<shard file>": "<sha256>", ...}
     "written_as": null,                                  # or {"dtype": "bfloat16", "layout": "hub", "shards": 3}
     "stage": {"steps": 12000, "seconds": ..., "first_loss": ..., "last_loss": ...},
     "config": {"seed": 0, "model": {...}, "optim": {...}},          # what decided its weights
     "data": {"generator": {...}, "train_fingerprint": "<sha256 of the train shards>"},
     "accuracy": {"overall": 0.93, "per_task": {...}, "n": 1000},     # its run's test split
     "pinned_at_commit": "<the vlsi-ray commit checked out when it was pinned>"}

:func:`pin_checkpoint` writes one from a finished run (``jobs/pin_teacher.py``); :func:`check_pinned`
refuses a pinned directory whose weights no longer match their manifest, and runs call it whenever
a model ``path`` holds a manifest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import torch
from omegaconf import OmegaConf

from vlsi_ray.data.fingerprint import fingerprint
from vlsi_ray.data.shards import load_manifest, shard_files
from vlsi_ray.models.hub_layout import INDEX_FILE, write_hub_checkpoint
from vlsi_ray.models.precision import dtype_name
from vlsi_ray.prepare import LoadSettings, load_model
from vlsi_ray.recipe.layout import RunLayout
from vlsi_ray.recipe.stages import pretraining

MANIFEST = "MANIFEST.json"
WEIGHTS = "model.safetensors"
#: Files of a run's model directory that are copied (the run's stage marker becomes the manifest's ``stage``).
_CHECKPOINT_FILES = ("*.json", "*.jinja", "*.safetensors", "*.txt")


class PinnedCheckpointError(ValueError):
    """A pinned checkpoint that does not match its manifest."""


def sha256_file(path: str | Path) -> str:
    """The SHA-256 hex digest of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_files(path: str | Path) -> list[str]:
    """The weight files of the checkpoint at ``path``: the shards its ``model.safetensors.index.json`` names
    (sorted), else ``model.safetensors``."""
    index = Path(path) / INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [WEIGHTS]


def weights_digest(path: str | Path) -> str | dict[str, str]:
    """The manifest's ``weights_sha256`` of the checkpoint at ``path``: the SHA-256 of ``model.safetensors``,
    or ``{shard file: SHA-256}`` for a sharded checkpoint."""
    files = weight_files(path)
    if files == [WEIGHTS]:
        return sha256_file(Path(path) / WEIGHTS)
    return {name: sha256_file(Path(path) / name) for name in files}


def _git_commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def pin_checkpoint(
    run_dir: str | Path, out: str | Path, command: str, role: str = "teacher", dtype: torch.dtype | None = None, shards: int = 3
) -> dict:
    """Copy the ``role`` model that the finished run in ``run_dir`` pretrained into ``out`` with its manifest.

    ``command`` is the command line that produced the run (recorded as ``produced_by``). The run must
    have pretrained the model (its pretraining stage in the config's ``steps``, its marker written) and
    scored it (``report.json``). ``dtype`` (e.g. ``torch.bfloat16``) writes the weights as released
    checkpoints are, cast and in about ``shards`` files in the Hub's layout, instead of copying them as
    trained. Returns the manifest. ``out`` is replaced.
    """
    layout = RunLayout(run_dir)
    name = pretraining(role).name
    source = layout.model(name)
    cfg = OmegaConf.to_container(OmegaConf.load(layout.config)) if layout.config.is_file() else None
    if cfg is None or name not in cfg.get("steps", []):
        raise PinnedCheckpointError(f"{run_dir} did not run {name}; pin a run whose steps include it.")
    marker = RunLayout.marker_in(source)
    if not marker.is_file():
        raise PinnedCheckpointError(f"{source} has no {marker.name}: {name} did not finish; re-run it to completion.")
    report = layout.report_json
    accuracy = json.loads(report.read_text()).get("accuracy", {}).get(role) if report.is_file() else None
    if accuracy is None:
        raise PinnedCheckpointError(f"{report} has no {role} accuracy; run with eval_models=[{role}] before pinning.")
    data_dir = Path(cfg["data"]["dir"])
    generated = load_manifest(data_dir)
    manifest = {
        "produced_by": command,
        "weights_sha256": None,  # below, from the files written
        "written_as": None if dtype is None else {"dtype": dtype_name(dtype), "layout": "hub", "shards": shards},
        "stage": json.loads(marker.read_text()),
        "config": {"seed": cfg["seed"], "model": cfg[role], "optim": cfg["stages"][name]},
        "data": {
            "generator": {k: generated[k] for k in ("generator_version", "seed", "sizes", "generator_kwargs")}
            if generated
            else None,
            "train_fingerprint": fingerprint(shard_files(data_dir, "train")),
        },
        "accuracy": {k: accuracy[k] for k in ("overall", "per_task", "n")},
        "pinned_at_commit": _git_commit(Path(__file__).resolve().parents[2]),
    }
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if dtype is None:
        for pattern in _CHECKPOINT_FILES:
            for f in source.glob(pattern):
                if f.name != marker.name:
                    shutil.copy2(f, out / f.name)
    else:
        write_hub_checkpoint(load_model(source, LoadSettings(role, dtype="float32"), "cpu"), out, dtype=dtype, shards=shards)
    manifest["weights_sha256"] = weights_digest(out)
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def check_pinned(path: str | Path) -> dict | None:
    """The manifest of the pinned checkpoint at ``path`` after checking its weights (None: not pinned).

    Raises :class:`PinnedCheckpointError` when a weight file the manifest names (``model.safetensors``, or
    each shard) is missing or its SHA-256 is not the manifest's (a Git LFS pointer, a truncated copy, or
    weights changed without re-pinning).
    """
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    expected = manifest["weights_sha256"]
    for name, digest in expected.items() if isinstance(expected, dict) else [(WEIGHTS, expected)]:
        weights = Path(path) / name
        if not weights.is_file():
            raise PinnedCheckpointError(f"{weights} is missing; restore it (git checkout) or re-pin with jobs/pin_teacher.py.")
        if sha256_file(weights) != digest:
            raise PinnedCheckpointError(
                f"{weights} does not match the weights_sha256 of {manifest_path}; restore it (git checkout) "
                "or re-pin the checkpoint with jobs/pin_teacher.py."
            )
    return manifest


def describe(manifest: dict) -> str:
    """One line about a pinned checkpoint: how long it trained and how it scored."""
    acc = manifest["accuracy"]
    tasks = ", ".join(f"{t} {100 * a:.0f}" for t, a in sorted(acc["per_task"].items()))
    return f"pretrained {manifest['stage']['steps']:,} steps; {100 * acc['overall']:.1f}% on {acc['n']} test questions ({tasks})"
