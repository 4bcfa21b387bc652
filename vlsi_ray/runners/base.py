"""What both runners share: the run's config, data, metrics and layout, and its teacher and student base.

:class:`Run` prepares the data (and the tiny tokenizer), writes ``config.yaml``, and finds or makes
the two models a run starts from: a checkpoint ``path``, a tiny model pretrained before (in this run
or the model cache), or a tiny model pretrained now (:func:`pretrain_tiny`, in this process or in a
Ray task). The in-process runner (:mod:`vlsi_ray.runners.local`) and the Ray driver
(:mod:`vlsi_ray.runners.ray.driver`) subclass it.
"""

from __future__ import annotations

import shutil
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import torch

from vlsi_ray.config import RunConfig, to_yaml
from vlsi_ray.data.index import SplitIndex
from vlsi_ray.eval.heldout import option_letters
from vlsi_ray.method.loop import train_stage
from vlsi_ray.metrics import MetricsWriter, write_stage_summary
from vlsi_ray.models.backbone import Backbone
from vlsi_ray.models.pinned import check_pinned, describe
from vlsi_ray.prepare import build_model, index_splits, make_collator, model_key, prepare_data, read_split_rows, tiny_tokenizer
from vlsi_ray.recipe.layout import RunLayout
from vlsi_ray.recipe.stages import build_objective, pretraining, stage

_INIT_LOCK = threading.Lock()


class Run(ABC):
    """State shared by both runners: config, data, metrics writer, the run directory and its tiny models.

    Subclasses say how a tiny model is pretrained (:meth:`pretrain`): in this process or in a Ray task.
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.layout = RunLayout(cfg.run_dir)
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self.layout.config.write_text(to_yaml(cfg))
        self.writer = MetricsWriter(self.layout.metrics)
        self.data_dir = prepare_data(cfg)
        self.tokenizer = self._tiny_tokenizer()
        self.index: dict[str, SplitIndex] = {}  # each split's row metadata, once the student is known (index_data)

    def _tiny_tokenizer(self):
        """The tokenizer tiny models are built with: none when both roles load checkpoints; the teacher
        checkpoint's own when only the student is tiny (the pair must share one vocabulary, as released
        pairs do); else the one trained offline on the train split (:func:`tiny_tokenizer`)."""
        teacher, student = self.cfg.teacher.path, self.cfg.student.path
        if teacher is not None and student is not None:
            return None
        if teacher is not None:
            from transformers import AutoTokenizer  # noqa: PLC0415 - transformers loads on use, after the offline defaults

            return AutoTokenizer.from_pretrained(str(teacher))
        return tiny_tokenizer(self.cfg)

    def runs(self, name: str) -> bool:
        """Whether ``cfg`` runs stage ``name`` (the SFT-only baseline needs ``baseline_sft`` too)."""
        return stage(name).step in self.cfg.steps and (name != "baseline_sft" or self.cfg.baseline_sft)

    def finish(self, name: str, history: list[dict], started: float) -> None:
        write_stage_summary(self.layout.marker(name), name, history, time.perf_counter() - started)

    def index_data(self, student_dir: Path) -> None:
        """Index the splits for the student at ``student_dir`` (:func:`index_splits`): the rows' metadata,
        measured by :meth:`measure` unless the shards carry this processor's token counts."""
        self.index = index_splits(self.cfg, student_dir, self.measure)

    @abstractmethod
    def measure(self, files: Sequence[str]) -> pa.Table:
        """Validate and measure the rows of shard ``files`` (:func:`vlsi_ray.data.index.measure_rows`)."""

    def train_ids(self, settings: str) -> list[str]:
        """Ids of the train rows a stage with optimizer settings ``stages.<settings>`` trains on (its ``tasks``)."""
        return self.index["train"].ids(getattr(self.cfg.stages, settings).tasks)

    def grouping(self, settings: str, workers: int = 1) -> dict:
        """``train_stage``'s / ``train_dataset``'s length-grouping arguments for a stage with optimizer settings
        ``stages.<settings>`` (``data.group_by_length``): the rows' ``lengths`` and ``group_rows``."""
        if not self.cfg.data.group_by_length:
            return {}
        opt = getattr(self.cfg.stages, settings)
        group_rows = self.cfg.data.length_group_batches * opt.batch_size * workers
        return {"lengths": self.index["train"].lengths(opt.tasks), "group_rows": group_rows}

    def pretraining_rows(self, name: str) -> list[dict]:
        """A tiny model's pretraining rows (read whole: pretraining comes before the index, on tiny data)."""
        return read_split_rows(self.cfg, "train", tasks=getattr(self.cfg.stages, name).tasks)

    def eval_ids(self) -> list[tuple[str, list[str]]]:
        """``(split, ids)`` of the held-out rows every evaluated model is scored on: all test rows (the loss
        per source; accuracy on rows with an option-letter answer), then the val rows with ``eval_val_loss``."""
        splits = ["test"] + (["val"] if self.cfg.eval_val_loss else [])
        return [(split, self.index[split].ids()) for split in splits]

    def option_letters(self) -> str:
        """The options scorable test rows are answered among (:func:`vlsi_ray.eval.heldout.option_letters`)."""
        return option_letters(self.index["test"].column("answer"))

    def skipped_rows(self) -> dict[str, int]:
        """Bad and over-long rows left out of each split (the report's count)."""
        return {split: index.stats.skipped for split, index in self.index.items()}

    # -- the teacher and the student base --------------------------------------------------------
    def pretrained(self, role: str) -> Path:
        """The directory of the teacher or student base: :meth:`reuse`'s, else a tiny model pretrained now."""
        found = self.reuse(role)
        return found if found is not None else self.pretrain(role)

    def reuse(self, role: str) -> Path | None:
        """The teacher's or student base's directory when nothing needs training, else None.

        A local checkpoint (``path``), a tiny model pretrained before (in this run or the model
        cache), or, when its pretraining is not in ``steps``, a tiny model saved at random init (the run says so).
        """
        model_cfg, name = getattr(self.cfg, role), pretraining(role).name
        if model_cfg.path is not None:
            pinned = check_pinned(model_cfg.path)
            about = f" (pinned: {describe(pinned)})" if pinned else ""
            print(f"[{role}] using the checkpoint in {model_cfg.path}{about}", flush=True)
            return Path(model_cfg.path)
        target, cache = self.layout.model(name), self.model_cache(role)
        for source in (target, cache):
            if source is not None and RunLayout.marker_in(source).is_file():
                print(f"[{role}] reusing the tiny {role} in {source}", flush=True)
                if source != target:  # a copy (a few MB), so the run directory holds every model it used
                    shutil.copytree(source, target, dirs_exist_ok=True)
                return target
        if name in self.cfg.steps:
            return None
        print(f"[{role}] {name} is not in steps: the tiny {role} stays at random init", flush=True)
        self.init_model(role).save_pretrained(target)
        write_stage_summary(RunLayout.marker_in(target), name, [], 0.0)
        if cache is not None:
            shutil.copytree(target, cache, dirs_exist_ok=True)
        return target

    def model_cache(self, role: str) -> Path | None:
        """Where a tiny ``role`` model with these settings is kept across runs (``model_cache_dir``), or None."""
        if not self.cfg.model_cache_dir:
            return None
        name = pretraining(role).name
        model_cfg, opt = getattr(self.cfg, role), getattr(self.cfg.stages, name)
        # A tiny student built on a teacher checkpoint's tokenizer depends on that vocabulary too (by content:
        # the same checkpoint may sit at another path, and a re-pinned one at the same path).
        on_teacher = role == "student" and self.cfg.teacher.path is not None and self.tokenizer is not None
        vocabulary = sorted(self.tokenizer.get_vocab().items()) if on_teacher else None
        key = model_key(
            model_cfg,
            opt if name in self.cfg.steps else None,
            self.cfg.data.synthetic,
            self.cfg.seed,
            *([vocabulary] if vocabulary else []),
        )
        return Path(self.cfg.model_cache_dir) / f"{role}-{key}"

    def init_model(self, role: str) -> Backbone:
        """A tiny ``role`` model at its seeded random init, on the CPU."""
        with _INIT_LOCK:  # initialisation seeds torch's global RNG: one model at a time (Ray runs two threads)
            return build_model(self.cfg, role, self.tokenizer, torch.device("cpu"))

    @abstractmethod
    def pretrain(self, role: str) -> Path:
        """Pretrain a tiny ``role`` model from scratch by SFT (:func:`pretrain_tiny`); return its directory."""


def pretrain_tiny(
    cfg: RunConfig,
    role: str,
    backbone: Backbone,
    rows: list[dict],
    device: torch.device,
    writer: MetricsWriter | None,
    target: Path,
    cache: Path | None = None,
) -> Path:
    """Pretrain a tiny ``role`` model from scratch by SFT on ``rows`` in this process; return ``target``.

    The in-process runner's pretraining, and the Ray runner's (in a Ray task per model). Saves the
    model and its marker to ``target``, and a copy to ``cache`` when given.
    """
    started = time.perf_counter()
    spec = pretraining(role)
    backbone.model.to(device)
    objective = build_objective(spec, cfg, backbone)
    history = train_stage(
        spec.name,
        objective,
        objective.parameters(),
        rows,
        make_collator(backbone, cfg),
        getattr(cfg.stages, spec.settings),
        spec.seed(cfg.seed),
        device,
        writer,
        [backbone.model],
        dtype=backbone.compute_dtype,
    )
    backbone.save_pretrained(target)
    write_stage_summary(RunLayout.marker_in(target), spec.name, history, time.perf_counter() - started)
    if cache is not None:
        shutil.copytree(target, cache, dirs_exist_ok=True)
    return Path(target)
