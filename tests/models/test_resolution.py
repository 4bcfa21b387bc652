"""Image resolution (``images.min_pixels`` / ``images.max_pixels``) on released-layout checkpoints: applied to
teacher and student alike, and a pair whose processors would tokenize an image differently refused by name."""

from __future__ import annotations

import json
import shutil

import pytest

from vlsi_ray.config import ConfigError, load_config
from vlsi_ray.models.backbone import IncompatibleModelsError, image_token_count
from vlsi_ray.prepare import LoadSettings, check_pair_paths, load_model, model_info


def _edit(path, file: str, **changes) -> None:
    data = json.loads((path / file).read_text())
    data.update(changes)
    (path / file).write_text(json.dumps(data))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_pixel_budget_sets_the_image_tokens_of_both_models(hub_worlds, tmp_path, family):
    world = hub_worlds(family)
    student = tmp_path / "student"
    shutil.copytree(world.student, student)
    _edit(student, "preprocessor_config.json", max_pixels=56 * 56)  # a student processor released with another budget
    with pytest.raises(IncompatibleModelsError, match=r"different size .*set images.min_pixels / images.max_pixels"):
        check_pair_paths(world.teacher, student)
    cfg = load_config(None, world.overrides("res", f"student.path={student}", "images.min_pixels=3136", "images.max_pixels=3136"))
    assert check_pair_paths(world.teacher, student, cfg) > 0
    for role, path in (("teacher", world.teacher), ("student", student)):
        info = model_info(path, LoadSettings.of(cfg, role))
        assert image_token_count(info, 112, 112) == 4  # 3136 px = 56x56 = 2x2 merged 28-px patches
        loaded = load_model(path, LoadSettings.of(cfg, role), "cpu")
        assert loaded.image_processor.size["longest_edge"] == 3136 and image_token_count(loaded, 224, 224) == 4
    assert image_token_count(model_info(world.teacher, LoadSettings()), 112, 112) == 16  # the release's own setting


def test_llava_max_pixels_drops_larger_crop_grids_and_has_no_minimum(hub_worlds, tmp_path):
    world = hub_worlds("llava_onevision")
    student = tmp_path / "student"
    shutil.copytree(world.student, student)
    _edit(student, "preprocessor_config.json", image_grid_pinpoints=[[112, 112], [112, 224], [224, 112]])
    with pytest.raises(IncompatibleModelsError, match=r"different image_grid_pinpoints"):
        check_pair_paths(world.teacher, student)
    wide = model_info(student, LoadSettings())
    assert image_token_count(wide, 112, 224) > image_token_count(wide, 112, 112)
    cfg = load_config(None, world.overrides("res", f"student.path={student}", "images.max_pixels=12544"))
    assert check_pair_paths(world.teacher, student, cfg) > 0
    capped = model_info(student, LoadSettings.of(cfg, "student"))
    assert capped.image_processor.image_grid_pinpoints == [[112, 112]]
    assert image_token_count(capped, 112, 224) == image_token_count(model_info(world.teacher, LoadSettings()), 112, 224)
    with pytest.raises(ConfigError, match="images.min_pixels has no llava_onevision equivalent"):
        load_config(None, world.overrides("res", "images.min_pixels=3136"))


def test_bad_resolution_values_are_config_errors(hub_worlds):
    world = hub_worlds("qwen2_vl")
    with pytest.raises(ConfigError, match="images.min_pixels=5000 exceeds images.max_pixels=4000"):
        load_config(None, world.overrides("res", "images.min_pixels=5000", "images.max_pixels=4000"))
    with pytest.raises(ConfigError, match="images.max_pixels=0 must be a positive number of pixels"):
        load_config(None, world.overrides("res", "images.max_pixels=0"))
