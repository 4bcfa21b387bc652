"""Converters from LLaVA, ShareGPT and Hugging Face Parquet/Arrow records to the row schema, the mixture file and the
split plan: every case of the sample sources (written at test time) converts or is refused with its reason."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from vlsi_ray.data.formats import BadRecord, Source, get_format, image_bytes, text_parts
from vlsi_ray.data.mixture import Mixture, MixtureError, input_files, load_mixture, make_plan
from vlsi_ray.data.samples import BAD, picture, write_samples
from vlsi_ray.data.shards import validate_row


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Mixture:
    return load_mixture(write_samples(tmp_path_factory.mktemp("samples"), rows=4))


def convert_all(mixture: Mixture, name: str) -> dict[str, dict | str]:
    """Every record of source ``name`` by its own id (else its number): the row, or the BadRecord reason."""
    source = next(s for s in mixture.sources if s.name == name)
    fmt = get_format(source.format)
    out, number = {}, 0
    for path in fmt.files(source):
        for record in fmt.records(source, path):
            key = str(record.get("id", record.get("question_id", number)))
            try:
                out[key] = fmt.convert(source, record, number)
            except BadRecord as err:
                out[key] = str(err)
            number += 1
    return out


def turns(row: dict) -> list[tuple[str, list[str]]]:
    """(role, part types) of each turn of a converted row."""
    return [(m["role"], [p["type"] for p in m["content"]]) for m in json.loads(row["messages"])]


def test_text_parts_put_each_image_where_its_placeholder_stands():
    assert text_parts("<image>\nWhat is it?") == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert text_parts("Compare <image> and <image>.") == [
        {"type": "text", "text": "Compare "},
        {"type": "image"},
        {"type": "text", "text": " and "},
        {"type": "image"},
        {"type": "text", "text": "."},
    ]
    assert text_parts("No image here.") == [{"type": "text", "text": "No image here."}]


def test_llava_records(samples):
    rows = convert_all(samples, "llava_sample")
    assert turns(rows["single"]) == [("user", ["image", "text"]), ("assistant", ["text"])]
    assert len(rows["single"]["images"]) == 1 and rows["single"]["answer"] == "A"
    assert turns(rows["two-images"])[0] == ("user", ["image", "image", "text"])
    assert len(rows["two-images"]["images"]) == 2 and rows["two-images"]["answer"] == "B"
    roles = [role for role, _ in turns(rows["three-turn"])]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert rows["three-turn"]["answer"] is None  # free text: not scorable
    assert rows["text-only"]["images"] == [] and turns(rows["text-only"]) == [("user", ["text"]), ("assistant", ["text"])]
    assert turns(rows["no-placeholder"])[0] == ("user", ["image", "text"])  # LLaVA's convention: images first
    for record_id, reason in BAD["llava_sample"].items():
        if record_id != "over-long":  # long only against a student's max_length
            assert isinstance(rows[record_id], str) and reason in rows[record_id], (record_id, rows[record_id])
    good = [row for row in rows.values() if isinstance(row, dict)]
    assert all(validate_row(row) is None for row in good)
    assert {row["source"] for row in good} == {"llava_sample"} and {row["task"] for row in good} == {"llava_sample"}
    assert len({row["id"] for row in good}) == len(good)


def test_sharegpt_records(samples):
    rows = convert_all(samples, "sharegpt_sample")
    assert len(rows["inline-image"]["images"]) == 1 and rows["inline-image"]["answer"] == "B"
    assert turns(rows["listed-images"]) == [("system", ["text"]), ("user", ["image", "image", "text"]), ("assistant", ["text"])]
    assert "role 'bot'" in rows["unknown-role"]
    assert "line 3 is not valid JSON" in rows["2"]  # the truncated line has no id: its number names it
    maths = [row for key, row in rows.items() if key.startswith("math-")]
    assert len(maths) == 4 and all(row["images"] == [] and validate_row(row) is None for row in maths)


def test_hf_parquet_and_arrow_records(samples):
    vqa = convert_all(samples, "vqa_sample")
    assert [turns(vqa[f"q{i}"]) for i in range(4)] == [[("user", ["image", "text"]), ("assistant", ["text"])]] * 4
    assert [vqa[f"q{i}"]["answer"] for i in range(4)] == ["A", "B", "C", "D"]  # a list of answers gives its first
    assert "not a readable image" in vqa["corrupt-bytes"]
    charts = convert_all(samples, "chart_sample")
    assert len(charts) == 4 and all(len(row["images"]) == 2 and validate_row(row) is None for row in charts.values())
    assert turns(charts["chart-0"])[0] == ("user", ["image", "image", "text"])


def test_arrow_file_format_and_image_paths(tmp_path):
    """An Arrow IPC *file* (not stream) with images given by path, relative to the source's image_root."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(picture("red"))
    schema = pa.schema(
        [
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            ("question", pa.string()),
            ("answer", pa.string()),
        ]
    )
    table = pa.Table.from_pylist(
        [{"image": {"bytes": None, "path": "a.png"}, "question": "Colour?", "answer": "Red."}], schema=schema
    )
    (tmp_path / "set").mkdir()
    with pa.OSFile(str(tmp_path / "set" / "part.arrow"), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(table)
    source = Source(name="paths", format="hf_parquet", path=str(tmp_path / "set"), image_root=str(tmp_path / "img"))
    fmt = get_format("hf_parquet")
    (path,) = fmt.files(source)
    assert fmt.count_records(source, path) == 1
    row = fmt.convert(source, next(fmt.records(source, path)), 0)
    assert row["id"] == "paths/0" and row["images"] == [picture("red")] and validate_row(row) is None


def test_images_are_kept_or_reencoded():
    jpeg = picture("blue", fmt="JPEG")
    assert image_bytes(jpeg, "x") == jpeg  # kept as shipped
    rgba = io.BytesIO()
    Image.new("RGBA", (8, 8), (1, 2, 3, 128)).save(rgba, "PNG")
    out = image_bytes(rgba.getvalue(), "x")
    assert out != rgba.getvalue() and Image.open(io.BytesIO(out)).mode == "RGB"
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, "GIF")
    assert Image.open(io.BytesIO(image_bytes(gif.getvalue(), "x"))).format == "PNG"
    with pytest.raises(BadRecord, match="x is not a readable image"):
        image_bytes(b"nope", "x")


# --------------------------------------------------------------------------------- mixture file
def write(tmp: Path, text: str) -> Path:
    path = tmp / "mixture.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("sources: []", "has no 'sources' list"),
        ("sources: [{name: a, format: csv, path: x}]", "format 'csv'; use one of llava, sharegpt, hf_parquet, synthetic"),
        ("sources: [{format: llava, path: x}]", "needs a 'name' and a 'format'"),
        ("sources: [{name: a, format: llava, path: /nowhere/a.json}]", "path /nowhere/a.json does not exist"),
        ("sources: [{name: a, format: synthetic}, {name: a, format: synthetic}]", "source names in"),
        ("sources: [{name: a, format: synthetic, limit: -1}]", "has limit -1"),
        ("sources: [{name: a, format: synthetic}]\nholdout: {val: 1, dev: 2}", "'holdout' is"),
        ("sources: [{name: a, format: synthetic}\n", "is not valid YAML"),
    ],
)
def test_bad_mixture_files_are_refused_with_one_sentence(tmp_path, text, message):
    with pytest.raises(MixtureError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_mixture(write(tmp_path, text))


def test_a_folder_without_files_of_the_format_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MixtureError, match="holds no llava files"):
        load_mixture(write(tmp_path, f"sources: [{{name: a, format: llava, path: {tmp_path / 'empty'}}}]"))


def test_plan_applies_limits_and_draws_a_seeded_holdout_per_source(tmp_path):
    lines = tmp_path / "a.jsonl"
    lines.write_text("\n".join(json.dumps({"messages": []}) for _ in range(50)))
    spec = f"""
sources:
  - {{name: a, format: sharegpt, path: {lines}}}
  - {{name: b, format: sharegpt, path: {lines}, limit: 20, holdout: {{val: 1, test: 0}}}}
  - {{name: shapes, format: synthetic, train: 6, val: 2, test: 2}}
holdout: {{val: 3, test: 4}}
seed: SEED
"""

    def plan(seed: int):
        mixture = load_mixture(write(tmp_path, spec.replace("SEED", str(seed))))
        units = input_files(mixture)
        counts = {
            u["unit"]: get_format(mixture.sources[u["source"]].format).count_records(
                mixture.sources[u["source"]], Path(u["file"])
            )
            for u in units
        }
        return make_plan(mixture, units, counts)

    first = plan(0)
    assert first.records == {0: 50, 1: 50, 2: 10} and first.taken == {0: 50, 1: 20, 2: 10}
    assert sorted(first.held_out[0].values()) == ["test"] * 4 + ["val"] * 3
    assert list(first.held_out[1].values()) == ["val"] and all(n < 20 for n in first.held_out[1])
    assert 2 not in first.held_out  # the synthetic task keeps its own splits
    assert first.split_of(1, 20) is None and first.split_of(2, 0, "val") == "val"
    assert plan(0).held_out == first.held_out  # seeded
    assert plan(1).held_out[0] != first.held_out[0]
    splits = [first.split_of(0, n) for n in range(50)]
    assert splits.count("train") == 43


def test_a_source_too_small_for_its_holdout_is_refused(tmp_path):
    lines = tmp_path / "a.jsonl"
    lines.write_text("\n".join(json.dumps({"messages": []}) for _ in range(5)))
    mixture = load_mixture(
        write(tmp_path, f"sources: [{{name: a, format: sharegpt, path: {lines}}}]\nholdout: {{val: 2, test: 3}}")
    )
    units = input_files(mixture)
    with pytest.raises(MixtureError, match="source 'a' has 5 records, too few to hold out 2 val \\+ 3 test rows"):
        make_plan(mixture, units, {0: 5})
