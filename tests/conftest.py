"""Shared test set-up: the offline environment (no hub, no wandb upload) before anything imports transformers."""

from __future__ import annotations

from vlsi_ray.env import set_offline_defaults

set_offline_defaults()
