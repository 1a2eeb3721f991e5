"""Optional experiment tracking (`train.tracker`): Weights & Biases or TensorBoard, next to metrics.jsonl.

metrics.jsonl stays the record of truth and is always written; a tracker receives the same records and
the sample-grid paths, on rank 0 only. Both backends are optional extras, imported only when chosen.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

from .errors import UsageError
from .fsutil import write_text_atomic

TRACKERS = ("none", "wandb", "tensorboard")


class Tracker(Protocol):
    def log(self, metrics: dict, step: int) -> None: ...

    def log_image(self, path: str | Path, step: int) -> None: ...

    def close(self, failed: bool = False) -> None: ...  # failed: the run ended in an error


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def log_image(self, path: str | Path, step: int) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


def _numeric(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}


class WandbTracker:
    """One W&B run per training run; its files live under RUN_DIR/wandb. WANDB_MODE=offline needs no network
    (upload later with `wandb sync RUN_DIR/wandb/offline-run-*`)."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, resume_id: str | None = None):
        try:
            import wandb
        except ImportError:
            raise UsageError("train.tracker=wandb needs wandb: pip install wandb (or, in the fm checkout: pip install -e '.[wandb]')") from None
        self._wandb = wandb
        kwargs = dict(project=project, name=name, dir=str(run_dir), config=config, mode=os.environ.get("WANDB_MODE") or None)
        if resume_id:
            kwargs.update(id=resume_id, resume="allow")
        folder = Path(run_dir) / "wandb"
        fresh = not folder.exists()
        try:
            self.run = self._start(wandb, kwargs)
        except BaseException:  # W&B's folder of a start that failed (or was stopped with Ctrl-C while W&B waited for its
            if fresh:  # server) goes: a retry in this run directory would find it and be refused (launch.holds_a_run)
                shutil.rmtree(folder, ignore_errors=True)
            raise

    @staticmethod
    def _start(wandb, kwargs: dict):
        from pydantic import ValidationError

        try:
            return wandb.init(**kwargs)
        except ValidationError as err:  # a WANDB_* variable W&B cannot read (WANDB_MODE=ofline): pydantic's multi-line report
            bad = err.errors()[0]
            setting = ".".join(map(str, bad["loc"])) or "?"
            raise UsageError(f"train.tracker=wandb: W&B refused its setting {setting}={bad.get('input')!r} ({bad['msg']}): fix or unset "
                             f"WANDB_{setting.upper()} in the environment (WANDB_MODE=offline runs without network)") from None
        except wandb.errors.Error as err:  # not logged in (no API key), a refused key, no network: the machine's setup
            detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise UsageError(f"train.tracker=wandb: W&B did not start ({detail}): log in with `wandb login`, or run offline with "
                             "WANDB_MODE=offline (upload later with `wandb sync`), or --set train.tracker=none") from None

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_numeric(metrics), step=step)

    def log_image(self, path: str | Path, step: int) -> None:
        self.run.log({"samples": self._wandb.Image(str(path))}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B shows a run that ended in an error as failed, not finished


class TensorBoardTracker:
    """Event files under RUN_DIR/tb (`tensorboard --logdir RUN_DIR/tb`). A run resumed at step s purges what the
    earlier event files hold after s (`purge_step`: logged past the checkpoint before a crash, or a rolled-back
    branch), so TensorBoard shows each step once, as metrics.jsonl's reader (plot.read_metrics) does."""

    def __init__(self, run_dir: Path, resumed_at: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("train.tracker=tensorboard needs tensorboard: pip install tensorboard (or, in the fm checkout: pip install -e '.[tensorboard]')") from None
        purge = None if resumed_at is None else resumed_at + 1
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=purge)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in _numeric(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_image(self, path: str | Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        arr = np.asarray(Image.open(path).convert("RGB"))
        self.writer.add_image("samples", arr, step, dataformats="HWC")
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


def wandb_rewind_warning(run_dir: Path, resumed_at: int, id_file: Path) -> str | None:
    """A W&B run continued from a step before the last one it logged (a rollback, or a resume after a run killed
    between checkpoints): W&B keeps a run's steps increasing and ignores a record of an earlier step (offline, when the
    run is synced), so this run's records up to that step never reach it. Said once, before training; W&B's rewind
    (`resume_from`) is a private preview that fm does not rely on."""
    from .runlog import last_logged_step

    last = last_logged_step(run_dir)
    if last is None or last <= resumed_at:
        return None
    return (f"warning: the W&B run of {id_file} already has steps up to {last}, and W&B ignores records of earlier steps than "
            f"its last: this run's records of steps {resumed_at + 1}..{last} will not reach W&B (metrics.jsonl and fm plot have "
            f"them); to log this branch whole to a new W&B run, stop and move {id_file} away before resuming")


def make_tracker(kind: str, run_dir: str | Path, *, config: dict | None = None, name: str | None = None, resumed_at: int | None = None,
                 log=None) -> Tracker:
    """The tracker for `train.tracker` (rank 0 only; other ranks use NullTracker); `resumed_at`: the step a
    resumed run continues from; `log` gets a warning line where a backend will drop some of this run's records."""
    run_dir = Path(run_dir)
    if kind == "none":
        return NullTracker()
    if kind == "wandb":
        project = os.environ.get("WANDB_PROJECT") or "fm"
        id_file = run_dir / "wandb_id.txt"  # `fm resume` continues the same W&B run
        resume_id = id_file.read_text().strip() if id_file.is_file() else None
        if resume_id and resumed_at is not None and log is not None and (warning := wandb_rewind_warning(run_dir, resumed_at, id_file)):
            log(warning)
        tracker = WandbTracker(run_dir, project, name or run_dir.name, config or {}, resume_id)
        if resume_id is None:
            write_text_atomic(id_file, tracker.run.id + "\n")
        return tracker
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, resumed_at)
    raise UsageError(f"train.tracker must be one of {', '.join(TRACKERS)}, not {kind!r}")
