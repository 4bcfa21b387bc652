"""Shared test set-up: offline environment, small thread count, and tiny models built once per session."""

from __future__ import annotations

from vlsi_ray.env import set_offline_defaults

set_offline_defaults()
