"""Pinned checkpoints: the manifest records what reproduces the weights, and changed weights are refused."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from vlsi_ray.config import load_config
from vlsi_ray.data.fingerprint import fingerprint
from vlsi_ray.data.shards import shard_files
from vlsi_ray.data.synthetic import generate_rows
from vlsi_ray.eval.heldout import score_rows
from vlsi_ray.method.steps import model_inputs, response_positions
from vlsi_ray.models.pinned import MANIFEST, PinnedCheckpointError, check_pinned, describe, pin_checkpoint
from vlsi_ray.prepare import LoadSettings, load_model, make_collator, new_verbalizers, tiny_tokenizer
from vlsi_ray.recipe.layout import RunLayout
from vlsi_ray.runners.local import LocalRun
from vlsi_ray.signals.produce import teacher_signal

from tiny_config import make_tiny_overrides
from tiny_run import make_tiny_run

ROOT = Path(__file__).resolve().parents[2]
ACCURACY = {"overall": 0.875, "per_task": {"colour": 1.0, "position": 0.75}, "n": 40, "loss": {"test": {"all": 0.3}}}
COMMAND = "python jobs/distill.py name=served steps=[pretrain_teacher]"


def _finished_run(tmp_path):
    run_dir = make_tiny_run(tmp_path)
    RunLayout(run_dir).report_json.write_text(json.dumps({"accuracy": {"teacher": ACCURACY}}))
    return run_dir


def test_pin_records_provenance_and_refuses_changed_weights(tmp_path):
    run_dir = _finished_run(tmp_path)
    out = tmp_path / "pinned"
    manifest = pin_checkpoint(run_dir, out, COMMAND)

    weights = out / "model.safetensors"
    assert manifest["produced_by"] == COMMAND
    assert manifest["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert manifest["data"]["train_fingerprint"] == fingerprint(shard_files(tmp_path / "data", "train"))
    assert manifest["data"]["generator"]["sizes"]["train"] == 200
    assert manifest["config"]["model"]["tiny"]["hidden_size"] == 64 and manifest["config"]["seed"] == 0
    assert manifest["accuracy"] == {k: ACCURACY[k] for k in ("overall", "per_task", "n")}
    assert manifest["stage"]["stage"] == "pretrain_teacher"
    # The Hub's layout, and no run marker: the directory is a checkpoint, not a stage output.
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "chat_template.jinja",
        "preprocessor_config.json",
        MANIFEST,
    } <= names
    assert RunLayout.marker_in(out).name not in names
    assert check_pinned(out) == manifest
    assert describe(manifest) == "pretrained 0 steps; 87.5% on 40 test questions (colour 100, position 75)"

    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(PinnedCheckpointError, match=r"does not match the weights_sha256 .*re-pin"):
        check_pinned(out)
    weights.unlink()
    with pytest.raises(PinnedCheckpointError, match=r"model.safetensors is missing"):
        check_pinned(out)
    assert check_pinned(run_dir / "pretrain_teacher") is None  # no manifest: not pinned


def test_pin_refuses_an_unscored_or_unfinished_teacher(tmp_path):
    run_dir = make_tiny_run(tmp_path)
    with pytest.raises(PinnedCheckpointError, match=r"no teacher accuracy; run with eval_models=\[teacher\]"):
        pin_checkpoint(run_dir, tmp_path / "pinned", COMMAND)
    RunLayout(run_dir).report_json.write_text(json.dumps({"accuracy": {"teacher": ACCURACY}}))
    RunLayout(run_dir).marker("pretrain_teacher").unlink()
    with pytest.raises(PinnedCheckpointError, match=r"pretrain_teacher did not finish"):
        pin_checkpoint(run_dir, tmp_path / "pinned", COMMAND)
    assert not (tmp_path / "pinned").exists()


def test_tiny_student_is_built_on_the_teacher_checkpoints_tokenizer(tmp_path):
    """A tokenizer trained on other data would give other ids; with a teacher path the tiny student takes
    the teacher's vocabulary, as a released pair shares one."""
    run_dir = _finished_run(tmp_path)
    pinned = tmp_path / "pinned"
    pin_checkpoint(run_dir, pinned, COMMAND)
    other = tmp_path / "other"
    overrides = make_tiny_overrides(other, "student-only") + [
        f"teacher.path={pinned}",
        "data.synthetic.generate=true",
        "data.synthetic.train=40",
        "data.synthetic.tasks=[count]",  # a different corpus: its own tokenizer would differ
    ]
    cfg = load_config(None, overrides)
    run = LocalRun(cfg)
    teacher_vocab = AutoTokenizer.from_pretrained(str(pinned)).get_vocab()
    assert tiny_tokenizer(cfg).get_vocab() != teacher_vocab  # what the student would have had before
    assert run.tokenizer.get_vocab() == teacher_vocab
    assert run.init_model("student").tokenizer.get_vocab() == teacher_vocab
    # Cached tiny students are keyed by that vocabulary: not the one a run without the teacher caches.
    cached = [o for o in overrides if not o.startswith("model_cache_dir")] + [f"model_cache_dir={tmp_path / 'cache'}"]
    on_teacher = LocalRun(load_config(None, cached)).model_cache("student")
    alone = LocalRun(load_config(None, [*cached, "teacher.path=null"])).model_cache("student")
    assert on_teacher is not None and alone is not None and on_teacher != alone


def test_a_teacher_pinned_as_released_bf16_shards_is_checked_shard_by_shard_and_lends_its_tokenizer(tmp_path):
    """``dtype=bfloat16``: the pinned copy is a released-style checkpoint (cast, sharded, the Hub's files); the
    manifest holds each shard's SHA-256, it loads back as the run's weights in bfloat16, a tiny student run
    on it takes its tokenizer, and a changed or missing shard is refused by name."""
    run_dir = _finished_run(tmp_path)
    pinned = tmp_path / "pinned-bf16"
    manifest = pin_checkpoint(run_dir, pinned, COMMAND, dtype=torch.bfloat16, shards=3)

    shards = sorted(pinned.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (pinned / "model.safetensors.index.json").is_file()
    assert not (pinned / "model.safetensors").exists() and not (pinned / "vlsi_backbone.json").exists()
    assert {"tokenizer.json", "vocab.json", "merges.txt", "chat_template.json", "preprocessor_config.json"} <= {
        p.name for p in pinned.iterdir()
    }
    assert manifest["weights_sha256"] == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in shards}
    assert manifest["written_as"] == {"dtype": "bfloat16", "layout": "hub", "shards": 3}
    assert json.loads((pinned / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert check_pinned(pinned) == manifest

    trained = load_model(run_dir / "pretrain_teacher", LoadSettings("teacher"), "cpu")
    released = load_model(pinned, LoadSettings("teacher"), "cpu")
    assert released.lm_head.weight.dtype == torch.bfloat16
    for name, weight in trained.base_model.state_dict().items():
        assert torch.equal(released.base_model.state_dict()[name], weight.to(torch.bfloat16)), name

    overrides = make_tiny_overrides(tmp_path / "other", "student-only") + [
        f"teacher.path={pinned}",
        "data.synthetic.generate=true",
        "data.synthetic.train=40",
        "data.synthetic.tasks=[count]",
    ]
    run = LocalRun(load_config(None, overrides))
    assert run.tokenizer.get_vocab() == trained.tokenizer.get_vocab() == released.tokenizer.get_vocab()
    assert run.reuse("teacher") == pinned

    data = bytearray(shards[1].read_bytes())
    data[-1] ^= 1
    shards[1].write_bytes(bytes(data))
    with pytest.raises(PinnedCheckpointError, match=rf"{shards[1].name} does not match the weights_sha256"):
        run.reuse("teacher")
    shards[0].unlink()
    with pytest.raises(PinnedCheckpointError, match=rf"{shards[0].name} is missing"):
        check_pinned(pinned)


#: The pinned teachers and the conf/tiny.yaml overrides that select each one's setting.
PINNED = {
    "tiny-teacher": [],
    "tiny-teacher-explain": ["teacher.path=conf/models/tiny-teacher-explain", "data.synthetic.explain=true"],
}


def _setting(name: str):
    """The pinned teacher ``name``'s config (conf/tiny.yaml + its overrides) and the generator's difficulty."""
    cfg = load_config(ROOT / "conf" / "tiny.yaml", PINNED[name])
    assert Path(cfg.teacher.path) == Path("conf/models") / name
    synthetic = cfg.data.synthetic
    keys = ("min_objects", "max_objects", "distractors", "dot_prob", "explain")
    return cfg, {k: getattr(synthetic, k) for k in keys}


@pytest.mark.parametrize("name", PINNED)
def test_the_pinned_tiny_teachers_are_intact_reproducible_and_strong(one_thread, name):
    """Each committed teacher: its weights match the manifest, the manifest's settings are the ones
    tiny.yaml (+ its setting's overrides) pretrains with at teacher.path=null, and it answers fresh
    questions of its task."""
    cfg, difficulty = _setting(name)
    manifest = check_pinned(cfg.teacher.path)
    assert manifest is not None
    assert manifest["config"]["model"]["tiny"] == asdict(cfg.teacher.tiny)
    assert manifest["config"]["optim"] == asdict(cfg.stages.pretrain_teacher)
    synthetic = cfg.data.synthetic
    assert manifest["data"]["generator"]["generator_kwargs"] == {
        k: v for k, v in synthetic.generator_kwargs().items() if k != "rows_per_shard"
    }
    assert manifest["data"]["generator"]["seed"] == synthetic.seed and "teacher.path=null" in manifest["produced_by"]
    assert manifest["accuracy"]["overall"] >= 0.85 and min(manifest["accuracy"]["per_task"].values()) >= 0.70

    rows = generate_rows("test", 100, seed=7, **difficulty)  # questions its test split never asked
    teacher = load_model(cfg.teacher.path, LoadSettings("teacher"), "cpu")
    records = score_rows(teacher, rows, make_collator(teacher, cfg), 50, torch.device("cpu"), "ABCD")
    correct = sum(r["prediction"] == r["answer"] for r in records)
    assert correct >= 80, f"the pinned teacher {name} answered {correct}/100 fresh questions"


@pytest.mark.parametrize("name", PINNED)
def test_the_pinned_teachers_signal_is_its_final_layers_prediction_of_the_response(one_thread, name):
    """Step 2's teacher signal at the response positions, final layer: its top token is what the teacher's
    own forward predicts there (the same position, not one off) and, for a strong teacher, the response —
    the letter and the end token, or (explained answers) every token of the image's description too."""
    cfg, difficulty = _setting(name)
    teacher = load_model(cfg.teacher.path, LoadSettings("teacher"), "cpu")
    batch = make_collator(teacher, cfg)(generate_rows("test", 40, seed=11, **difficulty))
    signal = teacher_signal(teacher, new_verbalizers(cfg, "teacher", teacher, seed=0), batch, topk=16)
    final = signal.layer(-1)  # [1, N, k]
    top = final.topk_ids.gather(-1, final.topk_logprobs.argmax(-1, keepdim=True)).reshape(-1)  # [N]
    mask, targets = response_positions(batch["labels"])
    with torch.no_grad():
        logits = teacher.forward(model_inputs(batch)).logits  # [B, T, V]
    assert torch.equal(top, logits[mask].argmax(-1))
    if difficulty["explain"]:
        assert len(targets) >= 40 * 10  # the letter, the description (>= 1 object) and the end token
    else:
        assert len(targets) == 80  # a letter and the end token per row
    assert (top == targets).float().mean().item() >= 0.9
