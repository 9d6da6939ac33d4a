"""Checkpoints that survive a kill: atomic writes, and the training state an interrupted stage resumes from.

MONAI's ``CheckpointSaver`` writes in place (``atomic=False``) and, for a fixed file name such as ``model.pt``,
deletes the old file before writing the new one, so a kill at the wrong moment leaves no model or half of one.
:class:`AtomicCheckpointSaver` is the same handler writing to a temporary file renamed over the old one.

:class:`TrainState` is the resumable part of a training: model, optimizer, learning-rate scheduler, the trainer's
epoch and iteration (ignite state), the best-model saver's record of the best metric so far and (given the
evaluator) the evaluator's best metric and its epoch, saved after every
epoch (``train_state_checkpoint_epoch=N.pt``, the previous one removed once the new one is in place) and, with
``resume=True``, loaded back when the trainer starts (as MONAI's ``CheckpointLoader`` does), so the run continues
with the epoch after the saved one. A saved state that does not fit (the network's widths or the optimizer changed
since, or an epoch past this run's last) stops the run with an :class:`InputError` naming its folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointSaver

from flare_c2f_extensions.errors import InputError

__all__ = ["AtomicCheckpointSaver", "TrainState", "latest_state"]

STATE_PREFIX = "train_state"
_STATE_FILE = re.compile(rf"{STATE_PREFIX}_\w*?epoch=(\d+)\.pt$")


class _AtomicDiskSaver(DiskSaver):
    """ignite's ``DiskSaver`` with ``atomic=True``. ignite removes the old checkpoint before it writes the new one;
    here the removal waits until the new file is in place, so a kill in between leaves the old one. With a fixed
    ``filename`` every save replaces that one file and there is nothing to remove."""

    def __init__(self, dirname: str, filename: str | None = None):
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename
        self._pending: list[str] = []

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        filename = self.filename or filename
        super().__call__(checkpoint=checkpoint, filename=filename, metadata=metadata)
        for old in self._pending:
            if old != filename and os.path.exists(os.path.join(self.dirname, old)):
                super().remove(old)
        self._pending = []

    def remove(self, filename: str) -> None:
        if self.filename is None:
            self._pending.append(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose files are written to a temporary name and renamed into
    place: a checkpoint on disk is always a whole one."""

    def __init__(self, save_dir: str, save_dict: dict, **kwargs):
        super().__init__(save_dir, save_dict, **kwargs)
        fixed = {
            "_final_checkpoint": kwargs.get("final_filename"),
            "_key_metric_checkpoint": kwargs.get("key_metric_filename"),
            "_interval_checkpoint": None,
        }
        for attribute, filename in fixed.items():
            checkpoint = getattr(self, attribute)
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename)

    def state_dict(self) -> dict:
        """The best-metric record (which scores were saved), for :class:`TrainState`."""
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self._key_metric_checkpoint is not None and state_dict:
            self._key_metric_checkpoint.load_state_dict(state_dict)


def latest_state(state_dir: str | os.PathLike) -> Path | None:
    """The training-state file of the highest epoch in ``state_dir`` (``None`` if there is none)."""
    found = [(int(_STATE_FILE.match(p.name).group(1)), p) for p in _state_files(state_dir)]
    return max(found)[1] if found else None


def _state_files(state_dir) -> list[Path]:
    folder = Path(state_dir)
    return [p for p in folder.iterdir() if _STATE_FILE.match(p.name)] if folder.is_dir() else []


BEST_METRIC_KEY = "evaluator_best"


class _BestMetric:
    """The evaluator's ``best_metric`` and ``best_metric_epoch`` (MONAI's ``Workflow`` state) as a checkpointable
    object."""

    def __init__(self, evaluator):
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        state = self.evaluator.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])


class TrainState:
    """Save the training state after every epoch into ``state_dir``; with ``resume`` load the latest one when the
    trainer starts.

    ``objects``: what to save besides the trainer itself, e.g. ``{"model": network, "optimizer": ...,
    "lr_scheduler": ..., "best_model": <an AtomicCheckpointSaver>}``; ``evaluator``: the validation's evaluator,
    whose best metric and its epoch are saved too (a state saved without them still loads). Attach it after the
    learning-rate and validation handlers, so that a saved epoch has had its scheduler step and its validation. Under
    ``torch.distributed`` only rank 0 writes; every rank loads (``state_dir`` must be shared between machines).
    """

    def __init__(self, state_dir: str, objects: dict, resume: bool = False, map_location=None, save_interval: int = 1,
                 evaluator=None):
        self.state_dir = str(state_dir)
        self.objects = dict(objects)
        if evaluator is not None:  # its best metric and epoch: a resumed run compares against the same best
            self.objects[BEST_METRIC_KEY] = _BestMetric(evaluator)
        self.resume = bool(resume)
        self.map_location = map_location
        self.save_interval = int(save_interval)

    def attach(self, engine: Engine) -> None:
        everything = {**self.objects, "trainer": engine}
        state = latest_state(self.state_dir) if self.resume else None
        if state is not None:
            engine.add_event_handler(Events.STARTED, self._load, state, everything)
        if self.save_interval > 0:
            saver = AtomicCheckpointSaver(
                self.state_dir, everything, file_prefix=STATE_PREFIX, save_interval=self.save_interval, n_saved=1
            )
            # earlier runs' state files go once this run has saved its first one
            saver._interval_checkpoint.save_handler._pending = [p.name for p in _state_files(self.state_dir)]
            saver.attach(engine)

    def _load(self, engine: Engine, state: Path, everything: dict) -> None:
        """MONAI's ``CheckpointLoader``, with a state that does not fit this run reported as an :class:`InputError`
        that says what to do."""
        checkpoint = torch.load(state, map_location=self.map_location, weights_only=True)
        if BEST_METRIC_KEY not in checkpoint:  # saved before the evaluator's record was: the rest still fits
            everything = {k: v for k, v in everything.items() if k != BEST_METRIC_KEY}
        max_epochs = engine.state.max_epochs  # this run's; loading the trainer's state replaces it
        try:
            Checkpoint.load_objects(to_load=everything, checkpoint=checkpoint, strict=True)
        except (RuntimeError, KeyError, ValueError) as error:
            raise InputError(
                f"{self.state_dir}: the saved training state ({state.name}) does not fit this stage's network or "
                f"optimizer ({_first_reason(error)}); delete {self.state_dir} to train the stage afresh, or resume "
                "with the settings it was saved with"
            ) from error
        if max_epochs is not None and engine.state.epoch > max_epochs:
            raise InputError(
                f"{self.state_dir}: the saved training state is at epoch {engine.state.epoch}, past this run's "
                f"max_epochs {max_epochs}; train for more epochs, or delete {self.state_dir} to train the stage afresh"
            )
        engine.state.max_epochs = max_epochs


def _first_reason(error: BaseException) -> str:
    """The first line of a load error that says what differs (torch lists every mismatched tensor, one a line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    more = len(lines) - 2
    if len(lines) > 1 and lines[0].endswith(":"):
        return lines[1].rstrip(".") + (f", and {more} more" if more > 0 else "")
    return lines[0]
