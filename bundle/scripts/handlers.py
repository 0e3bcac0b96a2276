"""Ignite handlers of the dual trainer: weight ramp-up, safe checkpoints, the validation record and resume."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver

from .losses import sigmoid_rampup

__all__ = [
    "RampUpHandler",
    "AtomicCheckpointSaver",
    "ValidationState",
    "ResumeHandler",
    "latest_checkpoint",
    "non_finite_entries",
]

logger = logging.getLogger(__name__)


class RampUpHandler:
    """Sets ``engine.state.loss_weights[k] = w_k * exp(-5 (1 - min(t / T, 1))^2)`` before every iteration.

    ``t`` is the number of completed iterations (so a resumed run continues the ramp where it stopped).

    Args:
        weights: maximal weight of each ramped term, e.g. ``{"cps": 1.0, "proto": 0.1}``.
        rampup_length: ``T`` in iterations (0: constant weights).
    """

    def __init__(self, weights: dict[str, float], rampup_length: int) -> None:
        self.weights = dict(weights)
        self.rampup_length = rampup_length

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        for name, value in self.weights.items():
            engine.state.loss_weights[name] = sigmoid_rampup(engine.state.iteration - 1, self.rampup_length, value)


def non_finite_entries(checkpoint: Mapping) -> list[str]:
    """Names of the entries of ``checkpoint`` (nested state dicts) holding a NaN or Inf floating-point value."""

    def finite(value) -> bool:
        if isinstance(value, torch.Tensor):
            return not value.is_floating_point() or bool(torch.isfinite(value).all())
        if isinstance(value, Mapping):
            return all(finite(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return all(finite(v) for v in value)
        return True

    return [name for name, value in checkpoint.items() if not finite(value)]


class _SafeDiskSaver(DiskSaver):
    """Ignite's DiskSaver, writing atomically (temporary file, fsync, rename) and never leaving a gap.

    Ignite removes a checkpoint before writing its replacement; here removals are deferred until
    the new file is complete on disk (a file replaced under the same name is never removed at all).
    A checkpoint holding non-finite values is not written and the previous files are kept.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        self._replaced: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        filename = self.filename or filename
        replaced, self._replaced = self._replaced, []
        bad = non_finite_entries(checkpoint)
        if bad:
            logger.error(f"not saved: {self.dirname / filename} would hold non-finite values in {bad}; kept the previous file(s).")
            return
        super().__call__(checkpoint, filename, metadata)
        for name in replaced:
            if name != filename:
                (self.dirname / name).unlink(missing_ok=True)

    def _save_func(self, checkpoint: Mapping, path: Path, func) -> None:
        with tempfile.NamedTemporaryFile(dir=self.dirname, prefix=f".{path.name}.", suffix=".tmp", delete=False) as tmp:
            try:
                func(checkpoint, tmp)
                tmp.flush()
                os.fsync(tmp.fileno())
            except BaseException:
                tmp.close()
                os.remove(tmp.name)
                raise
        os.replace(tmp.name, path)

    def remove(self, filename: str) -> None:
        self._replaced.append(self.filename or filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` that cannot lose or corrupt a checkpoint.

    Every file is written to a temporary file in the target folder, synced and renamed over the
    destination; a file it replaces is removed only after the new one is complete; a checkpoint
    holding NaN/Inf (a diverged run) is not written, so it never replaces a good one. With
    ``save_key_metric``, ``state_dict()`` holds the scores of the files kept (see
    :class:`ValidationState`). Arguments as in ``CheckpointSaver``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler = _SafeDiskSaver(self.save_dir, checkpoint.save_handler.filename)

    def state_dict(self) -> dict:
        """The key-metric record (scores and files kept); restore it with ``load_state_dict``."""
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}


class ValidationState:
    """The validation record as one checkpoint entry, so that a resumed run keeps its best model.

    Holds the evaluator's ``best_metric`` and ``best_metric_epoch`` and the key-metric record of
    each saver (e.g. the savers of ``model.pt`` and ``best.pt``): after a resume, a validation
    that is worse than the best before the interruption neither counts as a new best nor replaces
    those files.

    Args:
        evaluator: the validation engine (a MONAI evaluator with a key metric).
        savers: :class:`AtomicCheckpointSaver` objects with ``save_key_metric=True``.
    """

    def __init__(self, evaluator: Engine, savers: Sequence[AtomicCheckpointSaver] = ()) -> None:
        self.evaluator = evaluator
        self.savers = list(savers)

    def state_dict(self) -> dict:
        state = self.evaluator.state
        return {
            "best_metric": float(state.best_metric),
            "best_metric_epoch": int(state.best_metric_epoch),
            "savers": [saver.state_dict() for saver in self.savers],
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.evaluator.state.best_metric = state["best_metric"]
        self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]
        for saver, record in zip(self.savers, state["savers"]):
            if record:
                saver.load_state_dict(record)


def _iteration_of(path: Path) -> int:
    """The trainer iteration stored in a checkpoint; -1 without one (or if a saver just removed it)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        return -1
    return int(state.get("trainer", {}).get("iteration", -1)) if isinstance(state, dict) else -1


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The ``*.pt`` file in ``checkpoint_dir`` holding the trainer state with the highest iteration."""
    candidates = [p for p in Path(checkpoint_dir).glob("*.pt") if p.is_file()]
    scored = [(_iteration_of(p), p) for p in candidates]
    scored = [(i, p) for i, p in scored if i >= 0]
    return max(scored)[1] if scored else None


class ResumeHandler:
    """Restores the newest checkpoint of ``checkpoint_dir`` into ``load_dict`` when the engine starts.

    The checkpoint must hold a ``trainer`` entry (the engine's state: iteration and epoch) beside
    the networks, optimizers and lr schedulers; entries are loaded in the order of ``load_dict`` (put
    a :class:`~monai_dualssl.config.RunConfig` first, so a checkpoint of another run is refused before
    anything is loaded), with MONAI's :class:`~monai.handlers.CheckpointLoader`. With
    ``enabled=False`` training starts from scratch; with no checkpoint to resume from it does too,
    after a warning that names the folder searched.

    Args:
        checkpoint_dir: folder written by :class:`AtomicCheckpointSaver`.
        load_dict: objects to restore, keyed as when saved (must include ``trainer``).
        enabled: resume or not (a config switch).
        map_location: as in ``torch.load``.
    """

    def __init__(self, checkpoint_dir: str, load_dict: dict, enabled: bool = True, map_location=None) -> None:
        if "trainer" not in load_dict:
            raise ValueError(f"load_dict must include 'trainer' to resume, found keys {sorted(load_dict)}.")
        self.checkpoint_dir = checkpoint_dir
        self.load_dict = load_dict
        self.enabled = enabled
        self.map_location = map_location
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if not self.enabled:
            return
        path = latest_checkpoint(self.checkpoint_dir) if Path(self.checkpoint_dir).is_dir() else None
        if path is None:
            self.logger.warning(
                f"resume: nothing to resume from: no *.pt file holding a trainer state in {self.checkpoint_dir}; "
                "starting from scratch."
            )
            return
        CheckpointLoader(str(path), self.load_dict, map_location=self.map_location)(engine)
        self.logger.info(f"resume: continuing from {path} at iteration {engine.state.iteration}.")
