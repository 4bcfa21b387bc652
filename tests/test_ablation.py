"""jobs/ablate.py: the variants' configs, the statistics and tables, and a micro ablation that resumes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vlsi_ray import ablation
from vlsi_ray.config import ConfigError, load_config
from vlsi_ray.data.shards import load_manifest
from vlsi_ray.data.synthetic import SCORED_TASKS

ROOT = Path(__file__).resolve().parents[1]


def _acc(overall: float) -> dict:
    return {"overall": overall, "per_task": {t: overall for t in SCORED_TASKS}, "n": 100}


def test_variants_set_the_paper_options(tmp_path):
    """Each variant's overrides load on conf/tiny.yaml and give the option its Table 4 row names."""
    cfgs = {}
    for variant in ablation.VARIANTS:
        overrides = ablation.variant_overrides(tmp_path, variant, seed=1, with_bases=False)
        cfgs[variant.name] = load_config(ROOT / "conf" / "tiny.yaml", overrides)
    default = cfgs["vlsi"]
    with_bases = ablation.variant_overrides(tmp_path, ablation.VARIANTS[0], seed=1)
    assert f"teacher.path={tmp_path / 'bases' / 'pretrain_teacher'}" in with_bases  # every run starts from the shared bases
    assert f"student.path={tmp_path / 'bases' / 'pretrain_student'}" in with_bases
    pinned = ablation.variant_overrides(tmp_path, ablation.VARIANTS[0], seed=1, teacher_path="conf/models/tiny-teacher")
    assert "teacher.path=conf/models/tiny-teacher" in pinned  # a config's own teacher checkpoint is every run's teacher
    assert default.seed == 1 and default.runner == "local" and default.run_dir == tmp_path / "s1" / "vlsi"
    assert (default.matching.strategy, default.matching.temperature) == ("multinomial", "adaptive")
    assert default.matching.search_range and default.matching.order_preservation
    assert (default.loss.intermediate, default.loss.last_layer) == ("kl", "kl") and default.baseline_sft
    assert cfgs["random"].matching.strategy == "random" and not cfgs["random"].matching.search_range
    assert (cfgs["bottom3"].matching.strategy, cfgs["bottom3"].matching.bottom_k) == ("bottom_k", 3)
    fixed = [cfgs[n].matching for n in ("multinomial", "search_range", "order")]
    assert all(m.strategy == "multinomial" and m.temperature == "fixed" for m in fixed)
    assert [(m.search_range, m.order_preservation) for m in fixed] == [(False, False), (True, False), (True, True)]
    assert cfgs["final_kd"].loss.intermediate == "none" and cfgs["inter_ce"].loss.intermediate == "ce"
    assert cfgs["last_none"].loss.last_layer == "none" and cfgs["last_ce"].loss.last_layer == "ce"
    assert not any(cfgs[n].baseline_sft for n in ablation.VARIANT_NAMES if n != "vlsi")
    assert ablation.variants(["random"])[0].name == "vlsi"  # the others reuse its step 1
    with pytest.raises(ValueError, match="unknown ablation variant 'rnd'"):
        ablation.variants(["rnd"])


def test_mean_std_and_ordering():
    mean, std = ablation.mean_std([30.0, 32.0, 37.0])
    assert mean == pytest.approx(33.0) and std == pytest.approx(math.sqrt((9 + 1 + 16) / 2))
    assert ablation.mean_std([40.0]) == (40.0, 0.0)
    results = {"bases": {"teacher": _acc(0.5), "student_base": _acc(0.3)}}
    for seed, (sft, vlsi, rand) in enumerate([(0.34, 0.40, 0.30), (0.36, 0.42, 0.38), (0.35, 0.41, 0.34)]):
        results[f"s{seed}/vlsi"] = {"student_sft_only": _acc(sft), "vlsi_without_sft": _acc(0.33), "vlsi": _acc(vlsi)}
        results[f"s{seed}/random"] = {"vlsi": _acc(rand)}
    tables = ablation.summarize(results, [0, 1, 2])
    steps = {r["label"]: r for r in tables["Table 4(b)/(c): what each step adds"]}
    assert steps["teacher"]["n"] == 1 and steps["teacher"]["overall"] == (50.0, 0.0)
    assert steps["VLsI"]["overall"][0] == pytest.approx(41.0) and steps["VLsI"]["overall"][1] == pytest.approx(1.0)
    assert steps["VLsI"]["per_task"]["colour"][0] == pytest.approx(41.0)
    assert "final-layer KD + SFT" not in steps  # not run: no row
    checks = ablation.ordering(tables["Table 4(b)/(c): what each step adds"])
    # SFT only 35.0 ± 1.0 → w/o step 3 33.0 ± 0: paper +0.3, here -2.0 > noise: disagrees; → VLsI +8.0: agrees.
    assert checks[0].endswith("disagrees") and "here -2.0" in checks[0]
    assert checks[1].endswith("agrees") and "here +8.0" in checks[1]
    matching = ablation.ordering(tables["Table 4(e): layer matching (VLsI with step 3)"])
    assert matching == ["random → + adaptive temperature (VLsI): paper +9.3, here +7.0 (noise ±4.0): agrees"]
    text = ablation.render_tables(tables, [0, 1, 2], "python jobs/ablate.py")
    assert "| VLsI | 41.0 ± 1.0 |" in text and "| teacher | 50.0 |" in text


def test_write_results_keeps_the_prose(tmp_path):
    path = tmp_path / "RESULTS.md"
    ablation.write_results(path, ablation.BEGIN + "\nfirst\n" + ablation.END)
    path.write_text("intro\n" + path.read_text() + "findings\n")
    ablation.write_results(path, ablation.BEGIN + "\nsecond\n" + ablation.END)
    text = path.read_text()
    assert text.startswith("intro\n") and text.endswith("findings\n") and "second" in text and "first" not in text
    path.write_text("no markers\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        ablation.write_results(path, "x")


def test_a_named_section_has_its_own_markers_beside_the_main_tables(tmp_path):
    path = tmp_path / "RESULTS.md"
    begin, end = ablation.markers("data-limited")
    assert (
        begin == "<!-- ablate[data-limited]:begin (written by jobs/ablate.py) -->" and end == "<!-- ablate[data-limited]:end -->"
    )
    path.write_text(f"{ablation.BEGIN}\nmain\n{ablation.END}\nprose\n{begin}\nold\n{end}\ntail\n")
    ablation.write_results(path, f"{begin}\nnew\n{end}", "data-limited")
    assert path.read_text() == f"{ablation.BEGIN}\nmain\n{ablation.END}\nprose\n{begin}\nnew\n{end}\ntail\n"
    with pytest.raises(ValueError, match=r"lacks the markers '<!-- ablate\[other\]:begin"):
        ablation.write_results(path, "x", "other")
    with pytest.raises(ValueError, match="section='a b' must be a non-empty name"):
        ablation.markers("a b")
    # A table with one finished row (a run of a few variants: only VLsI in 4(e)) is left out.
    results = {f"s{s}/vlsi": {m: _acc(0.4) for m in ("student_sft_only", "vlsi_without_sft", "vlsi")} for s in (0, 1)}
    block = ablation.render_tables(ablation.summarize(results, [0, 1]), [0, 1], "cmd", "data-limited")
    assert block.startswith(begin) and block.endswith(end)
    assert "Table 4(b)/(c)" in block and "Table 4(e)" not in block and "Table 4(d)" not in block


def test_the_data_limited_regime_is_checked_before_any_run(tmp_path):
    """Steps 1–3 on a prefix of the train split: the overrides load, and an impossible size or a data.dir
    with shards of its own is refused before anything runs."""
    root = tmp_path / "ablate"
    cfg = load_config(ROOT / "conf" / "tiny.yaml", ablation.limited_overrides(root, 3000))
    assert cfg.data.synthetic.train == 3000 and Path(cfg.data.dir) == root / "data"
    assert cfg.data.synthetic.test == 1000  # the same test questions as the full regime
    with pytest.raises(ConfigError, match=r"train_rows=40000 must be between 1 and data.synthetic.train=30000"):
        ablation.run_ablation(str(ROOT / "conf" / "tiny.yaml"), [], root, [0], train_rows=40000)
    own = tmp_path / "own"
    own.mkdir()
    (own / "train-00000.parquet").write_bytes(b"")  # shards of its own (no synthetic manifest)
    with pytest.raises(ConfigError, match=r"limits the synthetic task's train split, but data.dir=.*own holds shards"):
        ablation.run_ablation(str(ROOT / "conf" / "tiny.yaml"), [f"data.dir={own}"], root, [0], train_rows=300)
    assert not root.exists()


@pytest.mark.integration
def test_micro_ablation_runs_and_resumes(tmp_path, tiny_overrides):
    """Two variants × two seeds at a few steps per stage, data-limited; a second call runs nothing and reads the
    same numbers."""
    steps = dict(pretrain_teacher=10, pretrain_student=10, verbalize=3, interact=3, sft=3)
    extra = [o for o in tiny_overrides(tmp_path, "unused", steps) if not o.startswith(("name=", "output_dir="))]
    said: list[str] = []
    root = tmp_path / "ablate"
    # The data-limited regime: the bases pretrain on the 300 train rows, steps 1–3 see the first 120.
    first = ablation.run_ablation(None, extra, root, [0, 1], ["random"], jobs=2, threads=1, say=said.append, train_rows=120)
    assert set(first) == {"bases", "s0/vlsi", "s1/vlsi", "s0/random", "s1/random"}
    assert "[data] train: 300 rows" in (root / "bases" / "ablate.log").read_text()
    for key in ("s0/vlsi", "s1/random"):
        assert "[data] train: 120 rows" in (root / key / "ablate.log").read_text()
    assert load_manifest(root / "data")["sizes"]["train"] == 120
    assert set(first["s0/vlsi"]) == {"student_sft_only", "vlsi_without_sft", "vlsi"} and set(first["s1/random"]) == {"vlsi"}
    assert all(a["n"] == 100 for run in first.values() for a in run.values())
    # Step 1 is the default run's, copied; the seeds differ, so their step-1 verbalizers differ.
    for seed in (0, 1):
        v = (root / f"s{seed}" / "vlsi" / "verbalize" / "student_verbalizers").iterdir()
        r = root / f"s{seed}" / "random" / "verbalize" / "student_verbalizers"
        assert all((r / f.name).read_bytes() == f.read_bytes() for f in v)
    weights = sorted((root / "s0/vlsi/verbalize/student_verbalizers").glob("*.safetensors"))
    assert weights and weights[0].read_bytes() != (root / "s1/vlsi/verbalize/student_verbalizers" / weights[0].name).read_bytes()
    said.clear()
    again = ablation.run_ablation(None, extra, root, [0, 1], ["random"], jobs=2, threads=1, say=said.append, train_rows=120)
    runs = [line for line in said if "data-limited regime: steps 1-3 on the first 120 of 300 train rows" not in line]
    assert again == first and len(runs) == len(said) - 1 and all("done before" in line for line in runs)
    assert ablation.collect_finished(root, [0, 1], ablation.variants(["random"])) == first
