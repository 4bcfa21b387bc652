"""A local rehearsal of the KubeRay layout: the tiny distillation on a 3-node Ray cluster built from the manifest.

The head starts with the manifest head's ``num-cpus`` (0); one node per worker group carries that
group's custom resources from ``rayStartParams``; the actors ask for the custom resources of the
paper-scale config. CPUs are scaled down to this machine and GPUs left out (``train.use_gpu=false``);
what is rehearsed is placement: the teacher pool on the teacher node, the student's Train worker on
the student node, nothing on the head.
"""

from __future__ import annotations

import json

import pytest
import ray
from ray.cluster_utils import Cluster

from vlsi_ray.config import load_config
from vlsi_ray.metrics import read_metrics
from vlsi_ray.runners.ray.driver import ray_env, run_ray

from kuberay_manifests import cluster_specs, custom_resources, group_for, paper_config, role_demands
from tiny_config import make_tiny_overrides

pytestmark = pytest.mark.integration


def _dotlist(resources: dict[str, float]) -> str:
    """``{teacher_node: 1.0}``: a custom-resource dict as an omegaconf override value."""
    return "{" + ", ".join(f"{k}: {v}" for k, v in resources.items()) + "}"


@pytest.fixture(scope="module")
def kuberay_like_cluster():
    """Head, teacher node and student node as in cluster/raycluster.yaml; yields (cluster, nodes, actor resources)."""
    if ray.is_initialized():  # a Ray left by another module would take the place of this cluster
        ray.shutdown()
    spec, demands = cluster_specs()["RayCluster"], role_demands(paper_config())
    groups = {role: group_for(spec, demand) for role, (demand, _) in demands.items()}
    head_cpus = float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
    # 2 logical CPUs per worker node: the actor or Train worker, plus room for Ray Data and eval tasks
    nodes = {
        role: cluster.add_node(num_cpus=2, resources=custom_resources(group["rayStartParams"])) for role, group in groups.items()
    }
    ray.init(address=cluster.address, runtime_env={"env_vars": ray_env()})
    asks = {role: {k: v for k, v in demand.items() if k not in ("CPU", "GPU")} for role, (demand, _) in demands.items()}
    yield cluster, nodes, asks
    ray.shutdown()
    cluster.shutdown()


def test_tiny_distillation_places_teacher_and_student_on_their_groups(kuberay_like_cluster, tmp_path):
    cluster, nodes, asks = kuberay_like_cluster
    overrides = make_tiny_overrides(tmp_path, "kuberay-rehearsal", {"interact": 4}) + [
        "steps=[interact]",
        "baseline_sft=false",
        "train.use_gpu=false",
        "eval_models=[]",
        f"teacher_pool.resources.resources={_dotlist(asks['teacher'])}",
        f"train.resources_per_worker.resources={_dotlist(asks['student'])}",
    ]
    cfg = load_config(None, overrides)
    run_ray(cfg)
    teachers = json.loads((cfg.run_dir / "interact" / "teacher_placement.json").read_text())
    student = json.loads((cfg.run_dir / "interact" / "placement.interact.rank0.json").read_text())
    assert [t["node_id"] for t in teachers] == [nodes["teacher"].node_id] * cfg.teacher_pool.replicas, (
        f"teacher replicas ran on {[t['node_id'] for t in teachers]}, not the teacher node {nodes['teacher'].node_id}"
    )
    assert student["node_id"] == nodes["student"].node_id, (
        f"the Train worker ran on {student['node_id']}, not on the student node"
    )
    head = cluster.head_node.node_id
    assert head not in {student["node_id"], *(t["node_id"] for t in teachers)}, "an actor ran on the head"
    resources = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
    assert resources[head].get("CPU", 0) == 0, f"the head offers CPUs: {resources[head]}"
    assert [r["step"] for r in read_metrics(cfg.run_dir / "metrics.jsonl", "interact")] == [1, 2, 3, 4]
