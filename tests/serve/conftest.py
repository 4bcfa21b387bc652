"""A finished tiny run and its export, shared by the export and serving tests."""

from __future__ import annotations

import pytest

from tiny_run import make_tiny_run


@pytest.fixture(scope="package")
def tiny_run(tmp_path_factory):
    """Run directory with tiny untrained teacher/student (see tests/tiny_run.py)."""
    return make_tiny_run(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="package")
def exported(tiny_run, tmp_path_factory):
    """``jobs/export.py``'s output for :func:`tiny_run`."""
    from vlsi_ray.export import export_student

    return export_student(tiny_run, tmp_path_factory.mktemp("export") / "model")
