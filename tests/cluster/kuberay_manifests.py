"""The KubeRay manifests under ``cluster/`` as data: documents, pod templates, Ray resources per worker group.

Shared by the schema, consistency and rehearsal tests. Resource arithmetic mirrors what KubeRay and
the runner do: a worker pod offers Ray the CPUs/GPUs of ``rayStartParams`` (``num-cpus``/``num-gpus``)
or else of its container limits, plus the custom resources of ``rayStartParams.resources``; a teacher
replica asks for ``teacher_pool.resources`` (``TeacherPool``), a Train worker for
``train.resources_per_worker`` with one GPU when ``use_gpu`` (``RayRun.fit``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import yaml

from vlsi_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
PAPER_CONFIG = ROOT / "conf" / "qwen2vl_72b_to_7b.yaml"
CRD_ENV = "VLSI_KUBERAY_CRDS"
KINDS = ("RayCluster", "RayJob", "RayService")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML: the C loader reads them in ~1 s


def load_documents(path: Path) -> list[dict]:
    """Every non-empty YAML document of ``path``."""
    with open(path) as fh:
        return [doc for doc in yaml.load_all(fh, Loader=_Loader) if doc is not None]


def manifests() -> list[tuple[Path, dict]]:
    """(file, document) for every document of every ``cluster/*.yaml``."""
    return [(path, doc) for path in sorted(CLUSTER.glob("*.yaml")) for doc in load_documents(path)]


def manifest(kind: str) -> dict:
    """The one document of ``kind`` under ``cluster/``."""
    docs = [doc for _, doc in manifests() if doc.get("kind") == kind]
    assert len(docs) == 1, f"expected exactly one {kind} under cluster/, found {len(docs)}"
    return docs[0]


def cluster_specs() -> dict[str, dict]:
    """The RayCluster spec of each manifest: the RayCluster's own, the RayJob's and the RayService's."""
    return {
        "RayCluster": manifest("RayCluster")["spec"],
        "RayJob": manifest("RayJob")["spec"]["rayClusterSpec"],
        "RayService": manifest("RayService")["spec"]["rayClusterConfig"],
    }


def pod_specs() -> dict[str, dict]:
    """Every pod spec of every manifest, named ``<kind>/<group>`` (head, worker groups, RayJob submitter)."""
    pods = {}
    for kind, spec in cluster_specs().items():
        pods[f"{kind}/head"] = spec["headGroupSpec"]["template"]["spec"]
        for group in spec.get("workerGroupSpecs", []):
            pods[f"{kind}/{group['groupName']}"] = group["template"]["spec"]
    pods["RayJob/submitter"] = manifest("RayJob")["spec"]["submitterPodTemplate"]["spec"]
    return pods


def runtime_env_file() -> dict:
    """``cluster/runtime-env.yaml``: the runtime env of ``ray job submit`` on the stock image."""
    return load_documents(CLUSTER / "runtime-env.yaml")[0]


def rayjob_runtime_env() -> dict:
    """The RayJob's ``runtimeEnvYAML``, parsed."""
    return yaml.safe_load(manifest("RayJob")["spec"]["runtimeEnvYAML"])


def serve_config() -> dict:
    """The RayService's ``serveConfigV2``, parsed."""
    return yaml.safe_load(manifest("RayService")["spec"]["serveConfigV2"])


# -- CRD schemas ---------------------------------------------------------------------------------
def crd_directory() -> Path:
    """``$VLSI_KUBERAY_CRDS``, else ``../shared/kuberay-crds`` next to the repository."""
    return Path(os.environ.get(CRD_ENV) or ROOT.parent / "shared" / "kuberay-crds")


def load_crd_schemas(directory: Path) -> dict[str, dict]:
    """The strict v1 OpenAPI schema of each ray.io CRD found in ``directory`` (any ``*.yaml``: the CRD files,
    ``helm show crds`` or ``kubectl get crd -o yaml`` output), by kind.

    Fails the calling test, naming ``VLSI_KUBERAY_CRDS``, when the directory or a kind is missing:
    skipping would let CI pass without validating anything.
    """
    if not directory.is_dir():
        pytest.fail(
            f"KubeRay CRD directory {directory} does not exist; set {CRD_ENV} to a directory holding "
            f"the ray.io CRDs (ray.io_rayclusters.yaml, ...), e.g. ../shared/kuberay-crds.",
            pytrace=False,
        )
    schemas = {}
    for path in sorted(directory.glob("*.yaml")):
        docs = load_documents(path)
        docs += [item for doc in docs if doc.get("kind") == "List" for item in doc["items"]]  # `kubectl get crd -o yaml`
        for doc in docs:
            if doc.get("kind") == "CustomResourceDefinition" and doc["spec"]["group"] == "ray.io":
                for version in doc["spec"]["versions"]:
                    if version["name"] == "v1":
                        schemas[doc["spec"]["names"]["kind"]] = strict(version["schema"]["openAPIV3Schema"])
    missing = [kind for kind in KINDS if kind not in schemas]
    if missing:
        pytest.fail(
            f"{directory} ({CRD_ENV}) has no ray.io/v1 CRD for {', '.join(missing)}; "
            "copy ray-operator/config/crd/bases/ of the KubeRay release in use there.",
            pytrace=False,
        )
    return schemas


def strict(schema):
    """A copy of a structural schema that rejects unknown fields, as `kubectl apply` (strict field
    validation) does; ``x-kubernetes-*`` keywords are dropped (CEL rules need a real API server)."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


# -- Ray resources -------------------------------------------------------------------------------
def quantity(value) -> float:
    """A Kubernetes CPU/GPU quantity ("44", 4, "500m") as a number."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def custom_resources(ray_start_params: dict) -> dict[str, float]:
    """The custom resources of ``rayStartParams.resources`` (KubeRay's quoted JSON: '"{\\"x\\": 1}"')."""
    text = ray_start_params.get("resources")
    if text is None:
        return {}
    value = json.loads(text)
    return json.loads(value) if isinstance(value, str) else value


def group_capacity(group: dict) -> dict[str, float]:
    """What one pod of a worker group offers Ray: CPU, GPU and its custom resources."""
    params = group.get("rayStartParams", {})
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return {
        "CPU": quantity(params.get("num-cpus", limits.get("cpu", 0))),
        "GPU": quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
        **custom_resources(params),
    }


def paper_config():
    """conf/qwen2vl_72b_to_7b.yaml, loaded and validated (checkpoint paths dropped: they live on the PVC)."""
    return load_config(PAPER_CONFIG, ["teacher.path=null", "student.path=null"])


def role_demands(cfg) -> dict[str, tuple[dict[str, float], int]]:
    """Per role, (what one actor asks Ray for, how many): teacher replicas and student Train workers."""
    t, w = cfg.teacher_pool.resources, cfg.train.resources_per_worker
    teacher = {"CPU": t.num_cpus, "GPU": t.num_gpus, **t.resources}
    student = {"CPU": w.num_cpus, "GPU": (w.num_gpus or 1) if cfg.train.use_gpu else 0.0, **w.resources}
    return {"teacher": (teacher, cfg.teacher_pool.replicas), "student": (student, cfg.train.num_workers)}


def group_for(spec: dict, demand: dict[str, float]) -> dict:
    """The one worker group whose pods offer every custom resource ``demand`` names."""
    custom = {k for k in demand if k not in ("CPU", "GPU")}
    assert custom, f"{demand} names no custom resource, so nothing pins it to a worker group"
    groups = [g for g in spec["workerGroupSpecs"] if custom <= set(custom_resources(g.get("rayStartParams", {})))]
    names = [g["groupName"] for g in groups]
    assert len(groups) == 1, f"{sorted(custom)} must be offered by exactly one worker group, not {names}"
    return groups[0]


def actors_per_pod(capacity: dict[str, float], demand: dict[str, float]) -> int:
    """How many actors of ``demand`` one pod of ``capacity`` holds."""
    return min(math.floor(capacity.get(k, 0) / v + 1e-9) for k, v in demand.items() if v > 0)


def fit_problems(group: dict, demand: dict[str, float], count: int) -> list[str]:
    """Why ``count`` actors of ``demand`` do not fit in ``group`` at its maxReplicas (empty: they fit)."""
    capacity, name = group_capacity(group), group["groupName"]
    per_pod = actors_per_pod(capacity, demand)
    if per_pod < 1:
        return [f"one actor asks for {demand} but a '{name}' pod offers only {capacity}"]
    pods = math.ceil(count / per_pod)
    if pods > group["maxReplicas"]:
        return [f"{count} actors need {pods} '{name}' pods ({per_pod} per pod) but maxReplicas is {group['maxReplicas']}"]
    return []
