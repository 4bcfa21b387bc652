"""The manifests agree with the repository: entrypoint and config, resources, images, deps, storage, Serve app.

Each test names what a mismatch would break on a real cluster; none needs one.
"""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from pydantic import BaseModel
from ray.serve.schema import ServeDeploySchema

from vlsi_ray import env as vlsi_env
from vlsi_ray.config import load_config
from vlsi_ray.runners.ray.driver import ray_env

from kuberay_manifests import (
    CLUSTER,
    PAPER_CONFIG,
    ROOT,
    actors_per_pod,
    cluster_specs,
    custom_resources,
    fit_problems,
    group_capacity,
    group_for,
    manifest,
    manifests,
    paper_config,
    pod_specs,
    rayjob_runtime_env,
    role_demands,
    runtime_env_file,
    serve_config,
)

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEPENDENCIES = PYPROJECT["project"]["dependencies"]
RAY_VERSION = next(re.fullmatch(r"ray(\[[^]]*\])?==(\S+)", d).group(2) for d in DEPENDENCIES if d.startswith("ray"))
PYTHON_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"  # the project's venv runs these tests
SERVE_ARGS = {"model_dir", "model_name", "device", "max_batch_size", "batch_wait_timeout_s", "api_key_env"}


def containers():
    """(pod name, container) for every container of every pod template."""
    return [(name, c) for name, pod in pod_specs().items() for c in pod.get("containers", [])]


def test_rayjob_entrypoint_runs_a_repo_script_with_a_loadable_config():
    argv = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/distill.py"], f"entrypoint {argv} is not `python jobs/distill.py ...`"
    assert (ROOT / argv[1]).is_file(), f"the entrypoint's script {argv[1]} is not in the repository"
    assert "--config" in argv, "the entrypoint passes no --config"
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), f"the entrypoint's config {config} is not in the repository"
    assert ROOT / config == PAPER_CONFIG, f"the RayJob runs {config}; the resource checks here read {PAPER_CONFIG.name}"
    overrides = [a for a in argv[2:] if "=" in a]

    load_config(ROOT / config, overrides + ["teacher.path=null", "student.path=null"])  # raises ConfigError on a bad key


def test_rayjob_creates_the_cluster_of_raycluster_yaml():
    assert cluster_specs()["RayJob"] == cluster_specs()["RayCluster"], (
        "rayjob-distill.yaml's rayClusterSpec differs from raycluster.yaml's spec; edit both the same way"
    )


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_paper_config_fits_its_worker_group(role):
    spec, demands = cluster_specs()["RayCluster"], role_demands(paper_config())
    demand, count = demands[role]
    group = group_for(spec, demand)
    assert not fit_problems(group, demand, count), fit_problems(group, demand, count)
    other = "student" if role == "teacher" else "teacher"
    assert group is not group_for(spec, demands[other][0]), "teacher and student share a worker group"
    capacity = group_capacity(group)
    per_pod = actors_per_pod(capacity, demand)
    if role == "teacher":  # TeacherPool waits placement_timeout_s for its group; a cold GPU pod may take longer
        pods = -(-count // per_pod)
        assert group["minReplicas"] >= pods, (
            f"teacher minReplicas={group['minReplicas']} < the {pods} pods the pool needs at once"
        )
    else:  # Ray Data's read tasks need CPUs next to the Train workers (conf/tiny.yaml: without, the stage deadlocks)
        spare = capacity["CPU"] - min(count, per_pod) * demand["CPU"]
        assert spare >= 1, f"a student pod keeps {spare} CPUs free for Ray Data; give it more CPUs or the workers fewer"


def test_paper_plan_fits_the_gpus_and_the_teacher_pods_host_memory():
    """The cost model's bytes per GPU of every step of the paper config's layout fit an 80 GB A100, and a
    teacher pod's memory holds step 1's offloaded optimizer slices of its GPUs with room for the rest."""
    from vlsi_ray import scale  # noqa: PLC0415 - loads torch

    cfg, teacher, student = scale.load_run(PAPER_CONFIG)
    layout, gpu = scale.layout_of(cfg), scale.GPUS["A100"]
    stages = scale.stage_costs(teacher, student, cfg, layout, gpu, scale.Workload())
    for stage in stages:
        for side in stage.sides:
            assert side.fits(gpu), f"{stage.name}'s {side.name} needs {side.peak_bytes / scale.GiB:.1f} GiB a GPU"
    group = group_for(cluster_specs()["RayCluster"], {"teacher_node": 1})
    capacity = group_capacity(group)
    assert capacity["GPU"] == cfg.teacher_pool.tensor_parallel == layout.teacher_gpus  # a pod is one replica
    memory = group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
    assert memory.endswith("Gi"), f"the teacher pod's memory limit {memory} is not in Gi"
    host = stages[0].sides[0].host_bytes * capacity["GPU"]
    assert 0 < host < 0.25 * float(memory[:-2]) * scale.GiB, (
        f"step 1's offloaded state ({host / scale.GiB:.0f} GiB) crowds the pod"
    )


def test_paper_step3_workers_fit_every_gpu_pod_once_the_teacher_is_gone():
    """train.sft_workers run after the teacher pool is shut down, on any GPU pod: at the groups' minReplicas
    the pods hold them all (a shortfall would leave step 3 waiting for an autoscaled pod), and they ask for no
    role's custom resource (which would pin them to that role's pods)."""
    cfg = paper_config()
    res = cfg.train.sft_resources_per_worker
    demand = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.resources}
    assert cfg.train.sft_workers > cfg.train.num_workers and demand["GPU"] == 1
    assert not res.resources, f"the SFT workers ask for {res.resources}, which not every GPU pod offers"
    groups = cluster_specs()["RayCluster"]["workerGroupSpecs"]
    room = sum(actors_per_pod(group_capacity(g), demand) * g["minReplicas"] for g in groups)
    gpus = sum(group_capacity(g)["GPU"] * g["minReplicas"] for g in groups)
    assert room >= cfg.train.sft_workers == gpus, f"{cfg.train.sft_workers} SFT workers, room for {room} on {gpus:g} GPUs"


def test_fit_check_rejects_what_does_not_fit():
    group = group_for(cluster_specs()["RayCluster"], {"teacher_node": 1})
    assert fit_problems(group, {"CPU": 8, "GPU": 4, "teacher_node": 1}, 1)  # 4 GPUs on a 2-GPU pod
    assert fit_problems(group, {"CPU": 8, "GPU": 2, "teacher_node": 1}, group["maxReplicas"] + 1)  # past maxReplicas
    assert not fit_problems(group, {"CPU": 8, "GPU": 2, "teacher_node": 1}, group["maxReplicas"])


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob", "RayService"])
def test_cluster_autoscales_with_v2_and_keeps_work_off_the_head(kind):
    spec = cluster_specs()[kind]
    assert spec.get("enableInTreeAutoscaling") is True, f"{kind}: enableInTreeAutoscaling is not true"
    assert spec.get("autoscalerOptions", {}).get("version") == "v2", f"{kind}: autoscalerOptions.version is not v2"
    head = spec["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0", f'{kind}: the head must start with num-cpus "0" so no actor or worker lands there'
    assert not custom_resources(head), f"{kind}: the head offers custom resources {custom_resources(head)}"
    assert spec["rayVersion"] == RAY_VERSION, f"{kind}: rayVersion {spec['rayVersion']} != pyproject.toml's ray {RAY_VERSION}"
    assert spec["authOptions"] == {"mode": "token", "secretName": "vlsi-ray-auth"}, (
        f"{kind}: want token auth, Secret vlsi-ray-auth"
    )


def test_images_pin_the_project_ray_and_python():
    stock = re.compile(rf"rayproject/ray:{re.escape(RAY_VERSION)}-{PYTHON_TAG}(-gpu|-cpu|-cu\d+)?")
    baked = re.compile(rf".+/vlsi-ray:[\w.-]*-ray{re.escape(RAY_VERSION)}-{PYTHON_TAG}-[\w.]+")  # cluster/Dockerfile's tag
    for name, container in containers():
        image = container["image"]
        pinned = stock.fullmatch(image) or baked.fullmatch(image)
        assert pinned, f"{name}: image {image} does not pin ray {RAY_VERSION} and {PYTHON_TAG}"
    base = re.search(r"^FROM\s+(\S+)", (CLUSTER / "Dockerfile").read_text(), re.MULTILINE).group(1)
    assert stock.fullmatch(base), f"cluster/Dockerfile builds FROM {base}, not rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-gpu"


def test_runtime_envs_install_exactly_the_pyproject_pins():
    expected = sorted(d for d in DEPENDENCIES if not d.startswith("ray"))  # ray comes with the image
    env = runtime_env_file()
    assert sorted(env["pip"]) == expected, f"cluster/runtime-env.yaml pip {env['pip']} != pyproject.toml {expected}"
    job = rayjob_runtime_env()
    job.pop("working_dir")
    assert job == env, "the RayJob's runtimeEnvYAML (but working_dir) differs from cluster/runtime-env.yaml"
    [app] = serve_config()["applications"]
    assert sorted(app["runtime_env"]["pip"]) == expected, "the Serve app's runtime_env pip differs from pyproject.toml"
    torch = next(d for d in DEPENDENCIES if d.startswith("torch=="))
    assert torch in (CLUSTER / "Dockerfile").read_text(), f"cluster/Dockerfile does not install {torch}"


def test_runtime_envs_set_no_variable_that_ray_init_also_sets(monkeypatch):
    """ray_runner.connect() passes ray_env() to ray.init; Ray raises if the job's runtime env sets one of those."""
    monkeypatch.setenv("WANDB_MODE", "online")
    assert "WANDB_MODE" in ray_env(), "ray_env() no longer forwards WANDB_MODE: revisit this test"
    [app] = serve_config()["applications"]
    for where, env in (
        ("cluster/runtime-env.yaml", runtime_env_file()),
        ("RayJob", rayjob_runtime_env()),
        ("RayService", app["runtime_env"]),
    ):
        for key, value in env.get("env_vars", {}).items():
            monkeypatch.setenv(key, str(value))  # a job's env_vars reach the driver's environment
        clash = set(env.get("env_vars", {})) & set(ray_env(tune_malloc=True))
        assert not clash, (
            f"{where} sets {sorted(clash)}, which ray.init also sets: the job would fail; set them on the containers"
        )


def test_driver_pods_tell_gpu_workers_to_use_cuda(monkeypatch):
    """A DS_ACCELERATOR the driver was given reaches every worker (ray_env); one it defaulted to itself does not."""
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    monkeypatch.setattr(vlsi_env, "DEFAULTED", set())
    assert ray_env().get("DS_ACCELERATOR") == "cuda", "ray_env() no longer forwards DS_ACCELERATOR: revisit this test"
    monkeypatch.setattr(vlsi_env, "DEFAULTED", {"DS_ACCELERATOR"})  # what set_offline_defaults() does on a GPU-less driver
    assert "DS_ACCELERATOR" not in ray_env()
    for kind in ("RayCluster", "RayJob"):
        [head] = cluster_specs()[kind]["headGroupSpec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in head.get("env", [])}
        assert env.get("DS_ACCELERATOR") == "cuda", f"{kind}: the head (driver) container must set DS_ACCELERATOR=cuda"


def test_every_pod_mounts_the_shared_volume_where_the_paths_point():
    claims = {}
    for name, pod in pod_specs().items():
        volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod.get("volumes", [])}
        mounts = {(volumes.get(m["name"]), m["mountPath"]) for c in pod["containers"] for m in c.get("volumeMounts", [])}
        claims[name] = {m for m in mounts if m[0]}
    assert len(set().union(*claims.values())) == 1 and all(claims.values()), f"pods mount different volumes: {claims}"
    [(claim, mount)] = set().union(*claims.values())
    [pvc] = [d for _, d in manifests() if d.get("kind") == "PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == claim, f"the PVC document is {pvc['metadata']['name']}, the pods mount {claim}"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], (
        "every Ray pod writes the shared PVC at once: it must be ReadWriteMany"
    )
    cfg = paper_config()

    raw = OmegaConf.load(PAPER_CONFIG)  # paper_config() dropped the checkpoint paths; check the file's
    paths = {
        "teacher.path": raw.teacher.path,
        "student.path": raw.student.path,
        "data.dir": cfg.data.dir,
        "output_dir": cfg.output_dir,
        "RayJob working_dir": rayjob_runtime_env()["working_dir"],
        "Serve model_dir": serve_config()["applications"][0]["args"]["model_dir"],
    }
    outside = {k: v for k, v in paths.items() if not Path(v).is_relative_to(mount)}
    assert not outside, f"these paths are not on the shared volume ({mount}) every pod mounts: {outside}"
    serve_paths = {
        e["value"]
        for name, c in containers()
        if name.startswith("RayService")
        for e in c.get("env", [])
        if e["name"] == "PYTHONPATH"
    }
    assert serve_paths == {paths["RayJob working_dir"]}, f"RayService PYTHONPATH {serve_paths} != the RayJob's checkout"


def test_serve_app_matches_the_serving_contract():
    config = serve_config()
    ServeDeploySchema.model_validate(config)  # Ray Serve's own check of serveConfigV2 (KubeRay submits it as is)
    unknown = _unknown_keys(ServeDeploySchema, config)
    assert not unknown, f"serveConfigV2 has keys Ray Serve ignores (typos?): {unknown}"
    [app] = config["applications"]
    module, _, func = app["import_path"].partition(":")
    assert module == "vlsi_ray.serve.app" and func == "build_app", f"import_path {app['import_path']}"
    app_file = ROOT / "vlsi_ray" / "serve" / "app.py"
    if app_file.is_file():  # the app may land after the manifests; its import is checked on the cluster
        assert re.search(r"^def build_app\(", app_file.read_text(), re.MULTILINE), f"{app_file} defines no build_app"
    assert app["route_prefix"] == "/", "the OpenAI routes and /health are served under route_prefix /"
    assert set(app["args"]) == SERVE_ARGS, f"args {sorted(app['args'])} != the app's {sorted(SERVE_ARGS)}"
    [deployment] = app["deployments"]
    assert deployment["name"] == "ChatModel"
    ongoing, batch = deployment["max_ongoing_requests"], app["args"]["max_batch_size"]
    assert ongoing >= batch, f"max_ongoing_requests={ongoing} < max_batch_size={batch}: batches never fill"
    assert {"min_replicas", "max_replicas", "target_ongoing_requests"} <= set(deployment["autoscaling_config"])


def test_serve_replicas_fit_the_serve_group():
    [app] = serve_config()["applications"]
    [deployment] = app["deployments"]
    options = deployment["ray_actor_options"]
    demand = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    [group] = cluster_specs()["RayService"]["workerGroupSpecs"]
    problems = fit_problems(group, demand, deployment["autoscaling_config"]["max_replicas"])
    assert not problems, problems


def _unknown_keys(model, data, where: str = "") -> list[str]:
    """Keys of ``data`` that the pydantic ``model`` (recursively) has no field for."""
    out = []
    for key, value in data.items():
        field = model.model_fields.get(key)
        if field is None:
            out.append(where + key)
            continue
        nested = [t for t in _flatten(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if nested and isinstance(item, dict):
                out += _unknown_keys(nested[0], item, f"{where}{key}{f'[{i}]' if isinstance(value, list) else ''}.")
    return out


def _flatten(annotation) -> list:
    """The types inside ``Optional[...]``, ``List[...]``, ``Union[...]``, recursively."""
    args = typing.get_args(annotation)
    return [annotation] if not args else [t for a in args for t in _flatten(a)]
