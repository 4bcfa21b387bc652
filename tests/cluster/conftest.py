"""Fixtures of the KubeRay tests: the CRD schemas, read once per session."""

from __future__ import annotations

import pytest

from kuberay_manifests import crd_directory, load_crd_schemas


@pytest.fixture(scope="session")
def crd_schemas() -> dict[str, dict]:
    """Strict v1 schemas of RayCluster, RayJob and RayService from ``$VLSI_KUBERAY_CRDS`` (fails if absent)."""
    return load_crd_schemas(crd_directory())
