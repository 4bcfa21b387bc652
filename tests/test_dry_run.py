"""``jobs/distill.py --dry-run`` on a released-layout pair: models, pair, data lengths, stage plan and placement,
printed in seconds without loading a weight or writing anything; a bad pair stops it with one sentence."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

from vlsi_ray.config import load_config
from vlsi_ray.dry_run import dry_run, histogram
from vlsi_ray.method.loop import total_optimizer_steps

ROOT = Path(__file__).resolve().parents[1]


def _distill_main():
    spec = importlib.util.spec_from_file_location("distill_job", ROOT / "jobs" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_histogram_bins_lengths_up_to_max_length_and_one_beyond():
    lines = histogram([1, 5, 8, 9, 16, 17, 40], max_length=16, bins=2, width=4)
    assert [line.split("|")[0].strip() for line in lines] == ["1-8", "9-16", ">16"]
    assert [int(line.split()[-1]) for line in lines] == [3, 2, 2]
    assert lines[0].split("|")[1].strip().startswith("####")


def test_dry_run_reports_models_lengths_plan_and_placement(hub_worlds, capsys):
    world = hub_worlds("qwen2_vl")
    root = world.data.parent
    before = sorted(p for p in root.rglob("*"))
    cfg = load_config(
        None,
        world.overrides(
            "dry",
            "runner=ray",
            "data.max_length=71",
            "train.num_workers=2",
            "teacher_pool.resources.num_gpus=2",
            "train.resources_per_worker.num_gpus=1",
            "train.use_gpu=true",
            "teacher.gradient_checkpointing=false",
            "student.gradient_checkpointing=true",
        ),
    )
    plan = dry_run(cfg)
    out = capsys.readouterr().out
    assert sorted(p for p in root.rglob("*")) == before and not cfg.run_dir.exists()  # nothing written
    student = plan["student"]
    assert (student["family"], student["num_layers"], student["checkpoint_dtype"], student["gradient_checkpointing"]) == (
        "qwen2_vl",
        3,
        "bfloat16",
        True,
    )
    assert student["parameters"] > 0 and student["targets"] == [1, 2]
    assert plan["shared_vocab"] > 0 and "pair OK" in out
    lengths = plan["data"]["lengths"]
    assert plan["data"]["rows"] == {"train": 64, "val": 8, "test": 16} and lengths["measured"] == 64
    over = lengths["over_max_length"]
    assert lengths["min"] <= 71 < lengths["max"] and over > 0 and lengths["estimated_over_max_length"] == over
    assert ">71" in out and f"{over} of 64" in out and "are over max_length: bad rows, skipped and counted" in out
    stages = {s["stage"]: s for s in plan["stages"]}
    assert list(stages) == [
        "baseline_sft",
        "verbalize/teacher",
        "verbalize/student",
        "interact",
        "sft",
    ]  # the stage table's order
    sft = stages["sft"]
    assert sft["workers"] == 2 and sft["optimizer_steps"] == total_optimizer_steps(cfg.stages.sft, 64, 2) == 3
    assert stages["verbalize/teacher"]["workers"] == 1
    placement = plan["placement"]
    assert placement["gpus_at_once"] == 2 + 2 * 1 and placement["worker_bundle"]["GPU"] == 1
    # with step 3 on the teacher's GPUs too: its own Train run of 4 workers, twice the rows of a step
    sft_plan = dry_run(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sft_workers=4)))
    sft4 = {s["stage"]: s for s in sft_plan["stages"]}["sft"]
    assert (sft4["workers"], sft4["global_batch"]) == (4, 2 * sft["global_batch"])
    assert sft_plan["placement"]["gpus_at_once"] == 4 and "a Train run of their own: 4 x" in capsys.readouterr().out
    cost = plan["cost"]  # the cost model on the checkpoints' own shapes, for the planned samples
    assert set(cost) == {"A100", "H100"} and set(cost["A100"]["steps"]) == {"verbalize", "interact", "sft"}
    assert all(step["fits"] and step["samples_per_s"] > 0 for step in cost["A100"]["steps"].values())
    assert 0 < cost["H100"]["days"] < cost["A100"]["days"] and "cost model (bench/scale.py)" in out


def test_dry_run_job_refuses_a_mismatched_pair_and_writes_nothing(hub_worlds, tmp_path, capsys):
    world = hub_worlds("qwen2_vl")
    student = tmp_path / "student"
    shutil.copytree(world.student, student)
    config = json.loads((student / "preprocessor_config.json").read_text())
    (student / "preprocessor_config.json").write_text(json.dumps({**config, "max_pixels": 3136}))
    overrides = world.overrides("dry-bad", f"student.path={student}", f"output_dir={tmp_path / 'runs'}")
    code = _distill_main()(["--dry-run", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dry run: ") and "different size" in err and "images.max_pixels" in err
    assert not (tmp_path / "runs").exists()
    assert _distill_main()(["--dry-run", *overrides, "images.max_pixels=12544"]) == 0
    assert "pair OK" in capsys.readouterr().out
