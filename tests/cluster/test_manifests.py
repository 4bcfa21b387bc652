"""cluster/*.yaml parse, and every RayCluster, RayJob and RayService validates against KubeRay's CRD schema.

The schemas come from ``$VLSI_KUBERAY_CRDS`` (default ``../shared/kuberay-crds``); a missing directory
fails these tests. Unknown fields are rejected, as ``kubectl apply`` does with strict field validation;
CEL rules (``x-kubernetes-validations``) and admission webhooks need a real API server.
"""

from __future__ import annotations

import copy

import pytest
from jsonschema import Draft7Validator

from kuberay_manifests import KINDS, load_crd_schemas, manifest, manifests


def schema_errors(schema: dict, doc: dict) -> list[str]:
    """Each violation as '<path>: <message>' (empty when ``doc`` is valid)."""
    errors = sorted(Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}" for e in errors]


def test_every_document_parses_and_names_its_kind():
    docs = manifests()
    files = {path.name for path, _ in docs}
    assert {"raycluster.yaml", "rayjob-distill.yaml", "rayservice.yaml", "runtime-env.yaml"} <= files, files
    for path, doc in docs:
        if path.name == "runtime-env.yaml":
            assert set(doc) <= {"pip", "excludes", "env_vars", "working_dir"}, f"{path.name}: unexpected keys {set(doc)}"
            continue
        assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), f"{path.name}: no apiVersion/kind"
        assert doc.get("metadata", {}).get("name"), f"{path.name}: a {doc['kind']} has no metadata.name"
    kinds = sorted(doc["kind"] for _, doc in docs if "kind" in doc)
    assert [k for k in kinds if k in KINDS] == sorted(KINDS), f"expected one RayCluster, RayJob and RayService, got {kinds}"


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_validates_against_its_crd(kind, crd_schemas):
    doc = manifest(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    errors = schema_errors(crd_schemas[kind], doc)
    assert not errors, f"{kind} {doc['metadata']['name']} violates the CRD schema:\n" + "\n".join(errors)


def _set(doc: dict, path: str, value) -> dict:
    """A copy of ``doc`` with the dotted ``path`` (list indices as numbers) set to ``value``."""
    doc = copy.deepcopy(doc)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = doc
    for part in parents:
        node = node[part]
    node[last] = value
    return doc


@pytest.mark.parametrize(
    "kind, path, value, where",
    [
        ("RayCluster", "spec.workerGroupSpecs.0.maxReplicas", "two", "spec.workerGroupSpecs.0.maxReplicas"),
        ("RayCluster", "spec.headGroupSpec.rayStartParams.num-cpus", 0, "spec.headGroupSpec.rayStartParams.num-cpus"),
        ("RayCluster", "spec.enableInTreeAutoscalling", True, "spec"),  # a typo: unknown field
        ("RayCluster", "spec.autoscalerOptions.version", "v3", "spec.autoscalerOptions.version"),
        (
            "RayCluster",
            "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.cpu",
            "lots",
            "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.cpu",
        ),
        (
            "RayJob",
            "spec.rayClusterSpec.workerGroupSpecs.1.minReplicas",
            "1",  # the embedded RayCluster spec is checked too
            "spec.rayClusterSpec.workerGroupSpecs.1.minReplicas",
        ),
        ("RayJob", "spec.shutdownAfterJobFinishes", "yes", "spec.shutdownAfterJobFinishes"),
        ("RayService", "spec.serveConfigV2", {"applications": []}, "spec.serveConfigV2"),  # must be a YAML string
    ],
)
def test_validation_rejects_a_broken_manifest(kind, path, value, where, crd_schemas):
    """The check can fail: one wrong type, typo or enum value makes the schema reject the manifest."""
    broken = _set(manifest(kind), path, value)
    errors = schema_errors(crd_schemas[kind], broken)
    assert any(e.startswith(where + ":") for e in errors), f"setting {path}={value!r} was not reported at {where}: {errors}"


def test_missing_crd_directory_fails_with_the_variable_name(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="VLSI_KUBERAY_CRDS"):
        load_crd_schemas(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(pytest.fail.Exception, match="no ray.io/v1 CRD for RayCluster, RayJob, RayService"):
        load_crd_schemas(tmp_path / "empty")
