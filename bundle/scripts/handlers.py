"""Ignite handlers of the dual trainer: weight ramp-up, atomic checkpoints and resume."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from .losses import sigmoid_rampup

__all__ = ["RampUpHandler", "AtomicCheckpointSaver", "ResumeHandler", "latest_checkpoint"]


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


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver` whose files are written atomically.

    Every checkpoint is written to a temporary file in the target folder and renamed over the
    destination, so a killed process never leaves a truncated checkpoint. Arguments as in
    ``CheckpointSaver``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint = getattr(self, name, None)
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True


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
    the networks, optimizers and lr schedulers; loading reuses MONAI's
    :class:`~monai.handlers.CheckpointLoader`. With ``enabled=False`` or no checkpoint, training
    starts from scratch (and says so in the log).

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
            self.logger.info(f"resume: no checkpoint in {self.checkpoint_dir}, starting from scratch.")
            return
        CheckpointLoader(str(path), self.load_dict, map_location=self.map_location)(engine)
        self.logger.info(f"resume: continuing from {path} at iteration {engine.state.iteration}.")
