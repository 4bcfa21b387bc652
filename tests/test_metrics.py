"""Stage summaries: the marker a watcher acts on is never seen half-written."""

from __future__ import annotations

import json
import threading

from vlsi_ray.metrics import write_stage_summary


def test_a_stage_marker_is_whole_from_the_moment_it_exists(tmp_path):
    """A reader that polls for each marker and parses it as soon as it exists (the driver's stage watcher)
    never reads an empty or partial file, over 300 markers written while it polls; no temporary file stays."""
    paths = [tmp_path / f"stage{i}" / "stage.json" for i in range(300)]
    history = [{"loss": float(i)} for i in range(50)]
    seen: list[int] = []
    errors: list[str] = []

    def watch() -> None:
        for path in paths:
            while not path.is_file():
                pass
            try:
                seen.append(json.loads(path.read_text())["steps"])
            except ValueError as err:
                errors.append(f"{path}: {err}")

    reader = threading.Thread(target=watch)
    reader.start()
    for path in paths:
        write_stage_summary(path, "sft", history, 1.0)
    reader.join(60)
    assert not errors and seen == [50] * len(paths)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["stage.json"] * len(paths)
