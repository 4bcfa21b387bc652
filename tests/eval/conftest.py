"""Shared by the evaluation and trace tests (the tiny run and the benchmark fixtures are in tests/conftest.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def job():
    """``job(name)`` loads ``jobs/<name>.py`` as a module (jobs/ is not a package)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[2] / "jobs" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_job", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
