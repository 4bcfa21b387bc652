"""Export: a stock transformers checkpoint whose greedy output equals the project's model, for the students a
real run trained."""

from __future__ import annotations

import json

import pytest

from vlsi_ray.data.shards import read_rows
from vlsi_ray.export import ExportError, export_student
from vlsi_ray.generation import ChatGenerator, SamplingParams

from plain_transformers import assert_same_top_logits, plain_generate, project_top_logits


def test_export_layout(exported, tiny_run):
    manifest = json.loads((exported / "vlsi_export.json").read_text())
    assert manifest["stage"] == "sft" and manifest["family"] == "qwen2_vl"
    assert (exported / "vlsi_verbalizers" / "verbalizers.safetensors").is_file()
    assert not (exported / "vlsi_backbone.json").exists()
    assert (
        json.loads((exported / "generation_config.json").read_text())["eos_token_id"]
        == json.loads((tiny_run.run / "sft" / "student" / "generation_config.json").read_text())["eos_token_id"]
    )


@pytest.mark.parametrize("stage", ["sft", "interact"])
def test_trained_student_exported_generates_the_projects_tokens(e2e_run, stage, tmp_path):
    """The students a real run produced (step 3's, fully fine-tuned; step 2's, its LoRA merged into the
    weights), exported and loaded by stock transformers: the same greedy token ids as the project's
    generation (batched, as the server decodes) on 8 test rows, and the same top-5 logits at every step (1e-4)."""
    run = e2e_run.cfg.run_dir
    exported = export_student(run, tmp_path / "model", stage=stage)
    rows = read_rows(e2e_run.cfg.data.dir, split="test")[0][:8]
    n = 8
    generator = ChatGenerator.from_pretrained(run / stage / "student")
    ours = generator.generate(rows, SamplingParams(max_tokens=n, min_tokens=n))
    plain = plain_generate(exported, rows, n, tmp_path / "plain")
    assert plain["vlsi_loaded"] is False and plain["model"] == "Qwen2VLForConditionalGeneration"
    assert plain["token_ids"] == [c.token_ids for c in ours]
    # The tiny trained students answer almost the same letters to every question; the logits say more.
    assert_same_top_logits(plain["top"], project_top_logits(generator, rows, n), rel=1e-4)
    assert all(c.completion_tokens == n for c in ours) and ours[0].batch_size == 8


def test_export_refuses_an_unfinished_run(tmp_path):
    (tmp_path / "run" / "interact").mkdir(parents=True)
    with pytest.raises(ExportError, match="no finished sft or interact stage"):
        export_student(tmp_path / "run", tmp_path / "out")
    with pytest.raises(ExportError, match="has no distilled student"):
        export_student(tmp_path / "run", tmp_path / "out", stage="verbalize")
