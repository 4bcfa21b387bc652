"""The export of the session's tiny run, shared by the export and serving tests."""

from __future__ import annotations

import pytest

from vlsi_ray.export import export_student


@pytest.fixture(scope="package")
def exported(tiny_run, tmp_path_factory):
    """``jobs/export.py``'s output for the tiny run."""
    return export_student(tiny_run.run, tmp_path_factory.mktemp("export") / "model")
