"""Placement across nodes: teacher actors on one node, the student's Train worker on another."""

from __future__ import annotations

import json

import pytest

from vlsi_ray.config import load_config
from vlsi_ray.metrics import read_metrics

from tiny_config import make_tiny_overrides

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes():
    """A two-node Ray cluster on this machine: a 'teacher_node' head and a 'student_node' worker."""
    import ray
    from ray.cluster_utils import Cluster

    from vlsi_ray.ray_runner import ray_env

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"teacher_node": 1}})
    cluster.add_node(num_cpus=2, resources={"student_node": 1})
    ray.init(address=cluster.address, runtime_env={"env_vars": ray_env()})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_teacher_and_student_run_on_different_nodes(two_nodes, tmp_path):
    from vlsi_ray.ray_runner import run_ray

    overrides = make_tiny_overrides(tmp_path, "two-nodes", {"interact": 4}) + [
        "steps=[interact]", "baseline_sft=false", "train.use_gpu=false",
        "teacher_pool.resources.resources={teacher_node: 1}", "train.resources_per_worker.resources={student_node: 1}",
    ]
    cfg = load_config(None, overrides)
    run_ray(cfg)
    teacher = json.loads((cfg.run_dir / "interact" / "teacher_placement.json").read_text())
    student = json.loads((cfg.run_dir / "interact" / "placement.interact.rank0.json").read_text())
    import ray

    nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
    assert teacher[0]["node_id"] != student["node_id"]
    assert "teacher_node" in nodes[teacher[0]["node_id"]] and "student_node" in nodes[student["node_id"]]
    assert [r["step"] for r in read_metrics(cfg.run_dir / "metrics.jsonl", "interact")] == [1, 2, 3, 4]
