"""jobs/prepare_data.py's conversion on Ray Data: the sample sources of every format (one image, two images, three turns
with a system turn, text only, and bad rows of each kind) become shards whose rows are read, collated in mixed batches
and trained on in steps 1-3, with each skipped row counted and named in the manifest."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
from data.test_shards import corrupt

from vlsi_ray.config import load_config
from vlsi_ray.data.collate import ChatCollator
from vlsi_ray.data.fingerprint import processor_fingerprint
from vlsi_ray.data.index import measure_on_ray_or_here
from vlsi_ray.data.mixture import MixtureError, load_mixture, prepare
from vlsi_ray.data.samples import BAD, write_samples
from vlsi_ray.data.shards import SPLITS, read_rows, write_shards
from vlsi_ray.data.synthetic import generate_rows
from vlsi_ray.eval.heldout import is_letter
from vlsi_ray.export import export_student
from vlsi_ray.generation import ChatGenerator, SamplingParams
from vlsi_ray.metrics import read_metrics
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.prepare import LoadSettings, model_info
from vlsi_ray.recipe.layout import RunLayout
from vlsi_ray.runners.local import run_local
from vlsi_ray.runners.ray.driver import run_ray

from plain_transformers import assert_same_top_logits, plain_generate, project_top_logits

ROOT = Path(__file__).resolve().parents[2]
#: Rows per source besides the named cases; the over-long sample row is far above this max_length, the rest far below.
ROWS = 12
MAX_LENGTH = 512
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mixture_file(tmp_path_factory) -> Path:
    return write_samples(tmp_path_factory.mktemp("samples"), rows=ROWS)


@pytest.fixture(scope="module")
def prepared(local_ray, hub_worlds, mixture_file, tmp_path_factory):
    """``prepared(family)``: the samples converted with that family's bf16 student measuring tokens (cached)."""
    done: dict = {}

    def get(family: str) -> SimpleNamespace:
        if family not in done:
            world = hub_worlds(family)
            info = model_info(world.student, LoadSettings())
            collator = ChatCollator(info.tokenizer, info.image_processor, info.family)
            out = tmp_path_factory.mktemp(f"shards-{family}")
            measured_with = processor_fingerprint(world.student, None, None)
            manifest = prepare(load_mixture(mixture_file), out, collator=collator, max_length=MAX_LENGTH,
                               student=str(world.student), measured_with=measured_with, command="test")  # fmt: skip
            done[family] = SimpleNamespace(out=out, manifest=manifest, collator=collator, world=world)
        return done[family]

    return get


def test_every_source_is_converted_and_every_bad_row_named(prepared):
    run = prepared("qwen2_vl")
    sources = run.manifest["sources"]
    assert list(sources) == ["llava_sample", "sharegpt_sample", "vqa_sample", "chart_sample", "shapes"]
    for name, entry in sources.items():
        assert sum(entry["kept"].values()) + entry["skipped"] == entry["taken"] == entry["records"], name
        named = {row.get("record_id", row["id"]): row["reason"] for row in entry["skipped_rows"]}
        expected = dict(BAD.get(name, {}))
        if name == "sharegpt_sample":  # the truncated line has no id of its own: its number names it
            expected["sharegpt_sample/2"] = expected.pop("not-json")
        assert set(named) == set(expected), name
        assert all(word in named[record] for record, word in expected.items()), named
    assert sources["shapes"]["kept"] == {"train": 24, "val": 4, "test": 8}  # the synthetic task's own splits
    for name in ("llava_sample", "sharegpt_sample", "vqa_sample", "chart_sample"):  # 2 val + 2 test drawn, bad ones skipped
        for split in ("val", "test"):
            bad = sum(1 for row in sources[name]["skipped_rows"] if row["split"] == split)
            assert sources[name]["kept"][split] + bad == 2, (name, split)
    assert "over-long: " in next(
        r["reason"] for r in sources["llava_sample"]["skipped_rows"] if r.get("record_id") == "over-long"
    )
    assert run.manifest["tokens_measured"] and run.manifest["command"] == "test"


def test_shards_read_back_whole_with_measured_token_counts(prepared):
    run = prepared("qwen2_vl")
    ids = set()
    for split in SPLITS:
        rows, stats = read_rows(run.out, split)
        entry = run.manifest["splits"][split]
        assert stats.skipped == 0 and len(rows) == entry["rows"] == sum(
            s["kept"][split] for s in run.manifest["sources"].values()
        )
        assert sorted(p.name for p in run.out.glob(f"{split}-*.parquet")) == entry["files"]
        assert {row["split"] for row in rows} == {split}
        for row in rows[:: max(1, len(rows) // 10)]:
            assert row["tokens"] == len(run.collator.encode(row)[0]) <= MAX_LENGTH
        ids |= {row["id"] for row in rows}
    assert len(ids) == sum(run.manifest["splits"][s]["rows"] for s in SPLITS)  # unique across splits
    for split in ("val", "test"):  # packed into shards of rows_per_shard (16) rows
        sizes = [pq.ParquetFile(run.out / name).metadata.num_rows for name in run.manifest["splits"][split]["files"]]
        assert all(n == 16 for n in sizes[:-1]) and 0 < sizes[-1] <= 16, (split, sizes)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_mixed_batch_of_text_only_one_and_two_image_rows(prepared, family):
    run = prepared(family)
    rows, _ = read_rows(run.out, "train")
    by_images = {n: next(r for r in rows if len(r["images"]) == n) for n in (0, 1, 2)}
    batch = run.collator(list(by_images.values()))
    assert batch["input_ids"].shape[0] == 3 and (batch["labels"] != -100).any(dim=1).all()
    images = batch["image_grid_thw"].shape[0] if family == "qwen2_vl" else batch["image_sizes"].shape[0]
    assert images == 3
    assert (batch["input_ids"][0] == run.collator.image_token_id).sum() == 0  # the text-only row has no image tokens


def test_ray_data_workers_measure_converted_rows_as_the_driver_does(prepared, tmp_path):
    """The converted train rows (text-only, one and two images, multi-turn) of the bfloat16 Hub student, with bad
    rows mixed in: Ray Data workers (``data.measure_in_driver_mb=0``) give the token counts and bad-row reasons
    the driver gives (the default for shards this small), and the good rows' counts are the shards' own, measured
    by the conversion."""
    run = prepared("qwen2_vl")
    rows, _ = read_rows(run.out, "train")
    assert {len(r["images"]) for r in rows} >= {0, 1, 2}
    _, bad = corrupt(generate_rows("train", 25, seed=0))
    files = [str(f) for f in write_shards(rows[:5] + list(bad.values()) + rows[5:], tmp_path, "train", rows_per_shard=16)]
    here = sorted(measure_on_ray_or_here(files, run.collator, in_driver_mb=64).to_pylist(), key=lambda r: r["id"])
    on_ray = sorted(measure_on_ray_or_here(files, run.collator, in_driver_mb=0).to_pylist(), key=lambda r: r["id"])
    assert on_ray == here and len(here) == len(rows) + len(bad)
    assert {r["id"] for r in here if r["problem"]} == set(bad)
    assert {r["id"]: r["tokens"] for r in here if not r["problem"]} == {r["id"]: r["tokens"] for r in rows}


def test_the_same_mixture_gives_the_same_shards(prepared, mixture_file, tmp_path):
    """Deterministic whatever worker runs first; without a student no token counts and no length check
    (the over-long row is then kept)."""
    run = prepared("qwen2_vl")
    manifest = prepare(load_mixture(mixture_file), tmp_path / "again", concurrency=2)
    for split in SPLITS:
        again = [r["id"] for r in read_rows(tmp_path / "again", split)[0]]
        before = [r["id"] for r in read_rows(run.out, split)[0]]
        assert [i for i in again if i != "llava_sample/9"] == before
    assert manifest["sources"]["llava_sample"]["skipped"] == len(BAD["llava_sample"]) - 1
    assert not manifest["tokens_measured"] and read_rows(tmp_path / "again", "test")[0][0]["tokens"] is None


def test_on_error_raise_stops_at_the_first_bad_row(local_ray, mixture_file, tmp_path):
    with pytest.raises(
        MixtureError, match=r"source 'llava_sample', row llava_sample/\d+: .*; fix the record or set data.on_error=skip"
    ):
        prepare(load_mixture(mixture_file), tmp_path / "strict", on_error="raise")


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_steps_1_to_3_train_on_the_mixture(prepared, tmp_path, family):
    """One short run of verbalization, interaction and SFT over the converted mixture, bf16 Hub checkpoints."""
    run = prepared(family)
    overrides = run.world.overrides(
        "mixture", f"data.dir={run.out}", f"output_dir={tmp_path / 'runs'}", f"data.max_length={MAX_LENGTH}"
    )
    cfg = load_config(None, [o for o in overrides if not o.startswith("data.synthetic.")])
    run_local(cfg)
    records = [json.loads(line) for line in (tmp_path / "runs" / "mixture" / "metrics.jsonl").read_text().splitlines()]
    for stage in ("verbalize/teacher", "verbalize/student", "interact", "sft"):
        losses = [r["loss"] for r in records if r.get("stage") == stage]
        assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses), stage
    report = json.loads((tmp_path / "runs" / "mixture" / "report.json").read_text())
    test_rows = read_rows(run.out, "test")[0]
    with_letters = {row["source"] for row in test_rows if is_letter(row["answer"])}
    assert with_letters and with_letters < {row["source"] for row in test_rows}  # some sources are scored by loss only
    tokens = {"all": 0}
    for row in test_rows:  # response tokens per source, as the collator labels them
        n = sum(1 for label in run.collator.encode(row)[1] if label != -100)
        tokens["all"] += n
        tokens[row["source"]] = tokens.get(row["source"], 0) + n
    for name, result in report["accuracy"].items():  # every evaluated model: loss on every source, accuracy where scorable
        assert result["tokens"]["test"] == tokens, name
        assert all(0 < loss < 20 for loss in result["loss"]["test"].values()), name
        assert set(result["per_source"]) == with_letters and result["n"] == sum(is_letter(r["answer"]) for r in test_rows)
    markdown = (tmp_path / "runs" / "mixture" / "report.md").read_text()
    assert "## Test accuracy per source" in markdown and "## Held-out loss on the test split" in markdown


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_ranks_with_text_only_micro_batches_do_not_hang(prepared, tmp_path, zero):
    """Two DeepSpeed workers (bfloat16 Hub checkpoints), one row each per micro-batch, over the mixture: steps
    where one rank's row is text-only and the other's has images run (every rank runs the vision tower),
    every step of the three stages is logged with a finite loss, the workers train on disjoint rows, and the
    whole student is saved (gathered under ZeRO-3) in bfloat16. Without the vision filler ZeRO-3 waits
    forever here: the collective timeout turns that into a failure."""
    run = prepared("qwen2_vl")
    name = f"zero{zero}-mixed"
    steps = {"verbalize": 4, "interact": 4, "sft": 4}  # stages.<settings key>.max_steps
    trained = {"verbalize/student": 4, "interact": 4, "sft": 4}  # the stages the two Train workers run
    overrides = run.world.overrides(
        name,
        f"data.dir={run.out}",
        f"output_dir={tmp_path / 'runs'}",
        f"data.max_length={MAX_LENGTH}",
        "baseline_sft=false",
        "eval_models=[]",
        "train.num_workers=2",
        "train.use_gpu=false",
        f"train.deepspeed_stage={zero}",
        "train.log_ids=true",
        "train.checkpoint_every=0",
        "train.collective_timeout_s=120",  # a rank left waiting in a ZeRO collective fails the run instead of hanging
        "train.max_failures=0",
        *(f"stages.{stage}.{key}" for stage, n in steps.items() for key in (f"max_steps={n}", "batch_size=1", "grad_accum=1")),
    )
    cfg = load_config(None, [o for o in overrides if not o.startswith("data.synthetic.")])
    run_ray(cfg)
    images = {row["id"]: len(row["images"]) for row in read_rows(run.out, "train")[0]}
    layout = RunLayout(cfg.run_dir)
    for stage, n in trained.items():
        records = list(read_metrics(layout.metrics, stage))
        assert [r["step"] for r in records] == list(range(1, n + 1)) and all(math.isfinite(r["loss"]) for r in records)
    consumed = [
        [json.loads(line) for line in layout.consumed_ids(stage, rank).read_text().splitlines()]
        for stage in trained
        for rank in (0, 1)
    ]
    per_step = [(a, b) for r0, r1 in zip(consumed[::2], consumed[1::2]) for a, b in zip(r0, r1)]
    assert len(per_step) == sum(trained.values())
    assert any((images[a[0]] == 0) != (images[b[0]] == 0) for a, b in per_step), "no step mixed a text-only and an image rank"
    for stage in range(len(trained)):  # each worker trains on its own shard of every global batch
        assert not {i for ids in consumed[2 * stage] for i in ids} & {i for ids in consumed[2 * stage + 1] for i in ids}

    saved = Backbone.from_pretrained(layout.model("sft"))  # whole tensors (gathered under ZeRO-3), LoRA merged
    base = Backbone.from_pretrained(run.world.student)
    assert saved.compute_dtype == torch.bfloat16  # the base checkpoint's dtype
    trained_weights = dict(saved.model.named_parameters())
    assert {n: p.shape for n, p in trained_weights.items()} == {n: p.shape for n, p in base.model.named_parameters()}
    assert any(not torch.equal(trained_weights[n], p) for n, p in base.model.named_parameters())
    if zero == 3:  # the gathered student, exported, generates in stock transformers as in the project
        rows = read_rows(run.out, "test")[0][:8]
        exported = export_student(cfg.run_dir, tmp_path / "export", stage="sft")
        generator = ChatGenerator.from_pretrained(layout.model("sft"))
        ours = generator.generate(rows, SamplingParams(max_tokens=6, min_tokens=6))
        plain = plain_generate(exported, rows, 6, tmp_path / "plain")
        assert len(rows) == 8 and {len(r["images"]) for r in rows} >= {0, 1}
        assert plain["dtype"] == "torch.bfloat16" and plain["token_ids"] == [c.token_ids for c in ours]
        assert_same_top_logits(plain["top"], project_top_logits(generator, rows, 6), rel=1e-2)  # bfloat16 logits


def test_prepare_job_errors_are_one_sentence(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_job", ROOT / "jobs" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path / "absent.yaml"), "--out", str(tmp_path / "out")]) == 2
    assert "absent.yaml does not exist; pass a YAML file listing the sources." in capsys.readouterr().err
    assert module.main(["--write-samples", str(tmp_path / "s")]) == 0
    assert load_mixture(tmp_path / "s" / "mixture.yaml").sources[0].name == "llava_sample"
    assert not (tmp_path / "out").exists()
