"""Config loading: defaults, YAML + overrides, and one-sentence errors naming the key."""

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vlsi_ray.config import (
    STEPS,
    ConfigError,
    RunConfig,
    TargetLayersConfig,
    config_from_yaml,
    load_config,
    to_yaml,
    with_absolute_model_paths,
)
from vlsi_ray.serve.config import serve_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_follow_the_paper():
    cfg = load_config()
    assert cfg.matching.strategy == "multinomial" and cfg.matching.temperature == "adaptive"
    assert cfg.matching.temperature_scale == 2.0 and cfg.matching.eps == 1e-6
    assert cfg.matching.search_range and cfg.matching.order_preservation
    assert cfg.loss.direction == "forward" and cfg.loss.kd_temperature == 1.0 and cfg.loss.last_layer == "kl"
    assert (cfg.lora.rank, cfg.lora.alpha) == (64, 64)
    assert (cfg.stages.sft.lr, cfg.stages.sft.min_lr) == (1e-4, 1e-6)
    assert cfg.signal.topk == 64


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "conf").glob("*.yaml")):
        if path.name.startswith("qwen2vl_72b"):
            continue  # needs local checkpoints; checked below with the paths removed

        if "applications" in OmegaConf.load(path):  # a Ray Serve config
            app = OmegaConf.to_container(OmegaConf.load(path).applications[0])
            if app["import_path"] == "vlsi_ray.serve.app:build_app":  # the project's app: its args are a ServeConfig
                serve_config(app["args"], check_model=False)
            else:  # Ray Serve LLM (vLLM) on the exported checkpoint
                assert app["import_path"] == "ray.serve.llm:build_openai_app", path
                assert all(c["model_loading_config"]["model_source"] for c in app["args"]["llm_configs"])
            continue
        load_config(path)


def test_paper_config_targets():
    cfg = load_config(
        ROOT / "conf" / "qwen2vl_72b_to_7b.yaml",
        [
            "teacher.path=null",
            "student.path=null",
            "teacher.tiny.num_layers=80",
            "student.tiny.num_layers=28",
            "teacher.tiny.num_heads=1",
            "student.tiny.num_heads=1",
        ],
    )
    assert cfg.student.targets.resolve(28) == [2, 6, 10, 14, 18, 22, 26]
    assert cfg.teacher.targets.resolve(80) == list(range(2, 80, 4)) and len(cfg.teacher.targets.resolve(80)) == 20


def test_overrides_apply():
    cfg = load_config(None, ["seed=3", "matching.strategy=uniform", "steps=[verbalize,interact]", "signal.topk=null"])
    assert cfg.seed == 3 and cfg.matching.strategy == "uniform"
    assert cfg.steps == ["verbalize", "interact"] and cfg.signal.topk is None


@pytest.mark.parametrize(
    "override, words",
    [
        (["sede=3"], ["unknown config key", "sede"]),
        (["loss.kl=1"], ["unknown config key", "loss.kl"]),
        (["seed=abc"], ["seed", "bad value"]),
        (["matching.strategy=greedy"], ["matching.strategy", "multinomial"]),
        (["student.targets.layers=[1,4]"], ["student.targets", "layer 4"]),
        (["student.targets.layers=[1,1]"], ["student.targets.layers", "repeats"]),
        (["teacher.targets.layers=[1,2]"], ["t_s > t_l"]),
        (["matching.search_range=false"], ["matching.order_preservation"]),
        (["loss.intermediate=l2"], ["loss.intermediate", "kl"]),
        (["loss.intermediate=none", "loss.last_layer=none"], ["without a loss"]),
        (["loss.direction=sideways"], ["loss.direction", "forward, reverse"]),
        (["teacher_cache_dir=/tmp/models"], ["'teacher_cache_dir'", "is now 'model_cache_dir'", "rename it"]),
        (["student.dtype=int8"], ["student.dtype", "bfloat16"]),
        (["eval_priority=low"], ["eval_priority", "idle"]),
        (["steps=[verbalise]"], ["steps", "verbalise"]),
        (["student.family=llava_onevision"], ["same family"]),
        (["stages.sft.min_lr=1.0"], ["stages.sft"]),
        (["teacher.path=/nonexistent/model"], ["teacher.path", "local checkpoint"]),
        (["seed"], ["key=value"]),
        (["data.synthetic.max_objects=20"], ["data.synthetic", "max_objects"]),
        (["data.synthetic.tasks=[colour,size]"], ["data.synthetic.tasks", "size"]),
    ],
)
def test_bad_config_is_one_sentence_naming_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    message = str(err.value)
    for word in words:
        assert word in message
    assert message.count(". ") == 0 and "\n" not in message


def test_missing_config_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("conf/nope.yaml")


def test_target_rule():
    assert TargetLayersConfig(start=2, every=4).resolve(28) == [2, 6, 10, 14, 18, 22, 26]
    assert TargetLayersConfig(layers=[3, 1]).resolve(8) == [1, 3]
    assert TargetLayersConfig().resolve(4) == [1, 2, 3]


def _config_keys(cls, prefix: str = "") -> tuple[set[str], set[str]]:
    """(leaf keys, group keys) of a config dataclass, dotted."""
    leaves, groups = set(), set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            groups.add(key)
            sub_leaves, sub_groups = _config_keys(hints[f.name], key + ".")
            leaves |= sub_leaves
            groups |= sub_groups
        else:
            leaves.add(key)
    return leaves, groups


def _documented_keys(markdown: str, stages: list[str]) -> set[str]:
    """The keys named in the first column of ``markdown``'s ``| key | default | meaning |`` tables.

    Notation: ```a.b` / `.c` `` (a sibling of the previous key), ```a.b/c/d` `` (siblings), ``<stage>``
    (every stage).
    """
    keys: set[str] = set()
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("| key | default | meaning |"):
            in_table = True
            continue
        if not line.startswith("|"):
            in_table = False
        if not in_table or line.startswith("|---"):
            continue
        previous = ""
        for token in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if token.startswith("."):
                token = previous.rsplit(".", 1)[0] + token
            head, *siblings = token.split("/")
            parent = head.rsplit(".", 1)[0] + "." if "." in head else ""
            for key in [head, *(parent + s for s in siblings)]:
                keys |= {key.replace("<stage>", s) for s in stages} if "<stage>" in key else {key}
            previous = head
    return keys


def test_readme_documents_every_config_key():
    """Every key of :class:`RunConfig` is in one of the README's key tables (or under a documented
    group such as ``teacher_pool.resources``), and every key the tables name exists."""
    leaves, groups = _config_keys(RunConfig)
    documented = _documented_keys((ROOT / "README.md").read_text(), list(STEPS))
    assert documented, "found no | key | default | meaning | table in README.md"
    unknown = documented - leaves - groups
    assert not unknown, f"README.md documents keys the config does not have: {sorted(unknown)}"
    missing = {k for k in leaves if k not in documented and not any(k.startswith(g + ".") for g in documented & groups)}
    assert not missing, f"README.md's key tables lack: {sorted(missing)}"


def test_documented_keys_notation():
    table = "\n".join(
        [
            "| key | default | meaning |",
            "|---|---|---|",
            "| `a.b` / `.c` | 1 | x `not.a.key` |",
            "| `d.e/f/g` | 1 | y |",
            "| `s.<stage>.lr` | 1 | z |",
            "",
            "| `outside.a.table` | 1 | w |",
        ]
    )
    assert _documented_keys(table, ["p", "q"]) == {"a.b", "a.c", "d.e", "d.f", "d.g", "s.p.lr", "s.q.lr"}


def test_a_ray_job_with_a_working_dir_refuses_relative_output_paths(monkeypatch, tmp_path):
    """In `ray job submit --working-dir` the cwd is Ray's temporary copy: relative outputs would be lost there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    with pytest.raises(ConfigError) as err:
        load_config(None, ["output_dir=runs", f"data.dir={tmp_path / 'data'}"])
    message = str(err.value)
    assert "output_dir=runs" in message and "data.dir" not in message and str(tmp_path) in message
    assert "e.g. output_dir=$PWD/runs" in message and message.count(".") >= 1
    assert load_config(None, [f"output_dir={tmp_path / 'runs'}", f"data.dir={tmp_path / 'data'}"]).output_dir == str(
        tmp_path / "runs"
    )
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {}}))  # a job without a working dir
    assert load_config(None, ["output_dir=runs"]).output_dir == "runs"


def test_model_paths_travel_absolute_to_ray_workers(monkeypatch):
    """Train workers run in their own directories: the config they receive names checkpoints absolutely,
    and the driver's own config keeps what the user wrote."""
    conf = Path(__file__).resolve().parents[1] / "conf"
    monkeypatch.chdir(conf)
    cfg = load_config(None, ["teacher.path=models/tiny-teacher", "student.path=null"])
    remote = with_absolute_model_paths(cfg)
    assert remote.teacher.path == str(conf / "models" / "tiny-teacher") and remote.student.path is None
    assert cfg.teacher.path == "models/tiny-teacher"
    monkeypatch.chdir("/")
    assert config_from_yaml(to_yaml(remote)).teacher.path == remote.teacher.path  # loads anywhere
    with pytest.raises(ConfigError, match=r"teacher.path=models/tiny-teacher is not a directory"):
        config_from_yaml(to_yaml(cfg))


def test_the_synthetic_task_is_generated_only_for_a_tiny_student():
    """A run that trains a real checkpoint never trains it on coloured shapes unless asked to."""
    pinned = Path(__file__).resolve().parents[1] / "conf" / "models" / "tiny-teacher"
    assert load_config(None, []).generates_synthetic
    assert load_config(None, [f"teacher.path={pinned}"]).generates_synthetic  # a tiny student on a pinned teacher
    assert not load_config(None, [f"student.path={pinned}"]).generates_synthetic
    assert load_config(None, [f"student.path={pinned}", "data.synthetic.generate=true"]).generates_synthetic
    assert not load_config(None, ["data.synthetic.generate=false"]).generates_synthetic


def test_explained_responses_are_a_generator_argument_only_when_asked_for():
    """``data.synthetic.explain`` reaches the generator; left false it is not in the manifest's arguments, so
    shards (and the pinned teacher's data record) generated before the option existed still match."""
    assert "explain" not in load_config(None, []).data.synthetic.generator_kwargs()
    assert load_config(None, ["data.synthetic.explain=true"]).data.synthetic.generator_kwargs()["explain"] is True
