"""Training progress of each stage: a log file and per-epoch progress lines."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

__all__ = []

logger = logging.getLogger(__name__)


class _FileLog:
    """While active, everything logged (and Python warnings) goes to ``path`` only (rank 0; other ranks: nowhere)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def __enter__(self):
        root = logging.getLogger()
        self.saved = root.handlers[:], root.level
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handler = logging.FileHandler(self.path)
            self.handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
        else:
            self.handler = logging.NullHandler()
        root.handlers, root.level = [self.handler], logging.INFO
        logging.captureWarnings(True)
        self.swapped: dict[logging.Logger, list] = {}
        self.capture()
        return self

    def capture(self) -> None:
        """MONAI gives some loggers their own stdout handler (``monai.handlers.StatsHandler``...): send those to the
        file too. Call again once the workflow has built its handlers."""
        for name, item in list(logging.Logger.manager.loggerDict.items()):
            ours = name.split(".")[0] in ("monai", "ignite")
            if isinstance(item, logging.Logger) and ours and item not in self.swapped:
                if any(not isinstance(h, logging.NullHandler) for h in item.handlers):
                    self.swapped[item] = item.handlers[:]
                    item.handlers = [self.handler]

    def __exit__(self, *exc):
        for item, handlers in self.swapped.items():
            item.handlers = handlers
        root = logging.getLogger()
        root.handlers, root.level = self.saved
        logging.captureWarnings(False)
        self.handler.close()
        return False


class _EpochProgress:
    """One line per epoch (mean training loss, the validation metric when validation ran, seconds) and the history
    that goes into the stage's done marker."""

    def __init__(self, stage: str, evaluator, echo: bool):
        self.stage, self.evaluator, self.echo = stage, evaluator, echo
        self.history: list[dict] = []
        self.resumed_from = 0
        self.losses: list[float] = []

    def attach(self, trainer) -> None:
        from ignite.engine import Events

        trainer.add_event_handler(Events.STARTED, self.started)
        trainer.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def _print(self, text: str) -> None:
        if self.echo:
            print(f"{self.stage:<28} {text}", flush=True)

    def started(self, trainer) -> None:
        self.resumed_from = trainer.state.epoch  # after the TrainState loader: the saved epoch, else 0
        if self.resumed_from:
            self._print(f"resumed after epoch {self.resumed_from} of {trainer.state.max_epochs}")

    def epoch_started(self, trainer) -> None:
        self.losses, self.clock = [], time.perf_counter()

    def iteration_completed(self, trainer) -> None:
        from monai.handlers import from_engine

        loss = from_engine(["loss"], first=True)(trainer.state.output)
        self.losses.append(float(loss[0] if isinstance(loss, (list, tuple)) else loss))

    def epoch_completed(self, trainer) -> None:
        epoch = trainer.state.epoch
        record = {"epoch": epoch, "loss": round(float(np.mean(self.losses)), 5) if self.losses else None}
        if self.evaluator.state.epoch == epoch and self.evaluator.state.metrics:
            record.update({k: round(float(v), 5) for k, v in self.evaluator.state.metrics.items()})
        record["seconds"] = round(time.perf_counter() - self.clock, 2)
        self.history.append(record)
        metrics = "  ".join(f"{k} {v}" for k, v in record.items() if k not in ("epoch", "seconds"))
        self._print(f"epoch {epoch:>3}/{trainer.state.max_epochs}  {metrics}  {record['seconds']:.1f} s")
