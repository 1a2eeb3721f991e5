"""Checkpoints: the full training state (`training_state`: the trained state, data position, every rank's RNG,
config, hardware record) and its restore; atomic save (temp file, fsync, rename), safe load (weights_only),
rotation, `latest`."""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import random
import re
import warnings
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from . import __version__
from . import distributed as D
from .errors import RuntimeFailure, UsageError
from .fsutil import atomic_write, commit, fsync_dir, fsync_file, temp_path, write_text_atomic
from .runlog import step_name

STEP_FILE = re.compile(r"^step-(\d{7,})\.pt$")
ASIDE_DIR = re.compile(r"^abandoned-from-step-(\d{7,})(?:-\d+)?$")  # _new_aside_dir's folders
STALE_TEMP = re.compile(r"^\.(step-\d{7,}\.pt|latest)\.tmp-[0-9a-f]{8}$")  # fsutil.temp_path's, of a save killed mid-write
EXPORT_MANIFEST = "fm_export.json"  # marks an `fm export` directory (weights only; export.py reads it)


def training_state(trained: dict, *, step: int, batches: int, position: tuple[int, int], ctx: D.DistContext, config: dict,
                   data_info: dict, hardware: dict, micro: int) -> dict:
    """What a checkpoint holds: `trained` (TrainingStep.state_dict: model, EMA, optimizer, schedulers, scaler),
    the optimizer steps taken, the data position (epoch, index in it, global batches drawn), every rank's RNG,
    the per-rank micro batch it trained (`micro`), the config, what sampling needs to know of the data, and how
    the hardware and budget were chosen.
    Collective (the RNG gather): every rank calls it."""
    epoch, index = position
    _, key, pos, has_gauss, cached = np.random.get_state()
    # This process's RNG states as weights_only-loadable values; numpy's whole legacy state (key, position, cached Gaussian).
    rng = {
        "python": list(random.getstate()[1]),
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None,
    }
    return {
        "format": 1,
        **trained,
        "step": step,
        "data_position": {"epoch": epoch, "index": index, "batches": batches},
        "rng": D.all_gather_objects(rng, ctx),
        "world_size": ctx.world_size,
        "micro_batch_size": micro,
        "config": config,
        "data_info": data_info,
        "fm_version": __version__,
        "hardware": hardware,
    }


TRAINING_KEYS = ("model", "ema", "optimizer", "schedulers", "scaler", "step", "data_position")  # what a resume reads


def restore_training(step_fn, state: dict, path: str | Path) -> None:
    """`step_fn.load_state_dict(state)` (step.TrainingStep) for a resume, after checking that the checkpoint
    holds what a resume reads; a damaged one (keys missing, weights that do not fit its own config) is a
    one-line error naming `path`, not a KeyError or torch's many-line size-mismatch report."""
    position = state.get("data_position")
    missing = [k for k in TRAINING_KEYS if k not in state]
    if isinstance(position, dict):
        missing += [f"data_position.{k}" for k in ("epoch", "index", "batches") if not isinstance(position.get(k), int)]
    elif "data_position" not in missing:
        missing.append("data_position")
    if "step" in state and not isinstance(state["step"], int):
        missing.append("step")
    if missing:
        raise UsageError(f"{path} is damaged: {', '.join(missing)} missing or invalid; resume from another checkpoint "
                         f"(its weights can start a new run: --set train.init_from={path})")
    try:
        step_fn.load_state_dict(state)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        raise UsageError(f"{path} is damaged: its training state does not fit its own config ({_state_dict_error(err)}); "
                         "resume from another checkpoint") from None


def _state_dict_error(err: Exception) -> str:
    """The first specific line of a load_state_dict error (torch's first line only says which module)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    text = lines[0] if lines else type(err).__name__
    if isinstance(err, KeyError):
        text = f"missing {text}"
    return text if len(text) <= 200 else text[:197] + "..."


def restore_rng(state: dict, ctx: D.DistContext) -> None:
    """This rank's RNG from training_state() (saved at the same world size; else the streams start fresh)."""
    rngs = state.get("rng") or []
    if len(rngs) != ctx.world_size:
        return
    rng = rngs[ctx.rank]
    random.setstate((3, tuple(rng["python"]), None))
    numpy = rng["numpy"]
    if isinstance(numpy, dict):
        np.random.set_state(("MT19937", numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]))
    else:  # a bare key tensor (checkpoints before the full state was kept) restores the key only
        np.random.set_state(("MT19937", numpy.numpy().astype(np.uint32), *np.random.get_state()[2:]))
    torch.set_rng_state(rng["torch"].cpu())
    if rng.get("cuda") is not None and ctx.device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"].cpu(), ctx.device)


def save_atomic(state: dict, path: str | Path) -> Path:
    """Write `state` so that a crash at any moment leaves either the old file or the complete new one."""
    return atomic_write(path, lambda tmp: torch.save(state, tmp))


def write_latest(ckpt_dir: Path, name: str) -> None:
    """`checkpoints/latest` is a one-line text file naming the newest checkpoint, replaced atomically."""
    write_text_atomic(ckpt_dir / "latest", name + "\n")


def save_checkpoint(state: dict, ckpt_dir: str | Path, step: int, keep_last: int, keep_every: int = 0, log=None,
                    resumed_from: tuple[int, Path] | None = None, on_set_aside=None) -> Path:
    """Save step's checkpoint, setting aside an abandoned branch, point `latest` at it, then rotate.

    A run resumed from an older checkpoint (a rollback; `resumed_from` = (its step, its file), given at the
    run's first save only) continues on a new branch: every checkpoint here after the resumed step, and one
    at that step that is not the resumed file, belongs to the abandoned future. At that first save they are
    moved (never deleted, never overwritten) into a folder of their own,
    `checkpoints/abandoned-from-step-<resumed step>[-N]/`, so rotation only ever counts the current branch;
    `on_set_aside(folder)` then moves the rest of that branch there (train.Trainer: sample grids, metrics records).
    The new checkpoint is written to a temp file before anything moves (a failed write, e.g. a full disk,
    moves nothing), and `latest` names the resumed checkpoint while the moves happen, so it never names a
    moved file.
    """
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / step_name(step, ".pt")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        try:
            torch.save(state, tmp)
            fsync_file(tmp)
        except (OSError, RuntimeError) as err:  # torch reports a short write as a RuntimeError
            raise RuntimeFailure(f"could not write checkpoint {path} ({_first_line(err)}): is the disk full? "
                                 f"Nothing in {ckpt_dir} was changed; free space and resume") from None
        if resumed_from is not None:
            moved = set_aside_branch(ckpt_dir, *resumed_from)
        else:  # never overwrite: a checkpoint at or after `step` here is not this branch's
            moved = set_aside_from(ckpt_dir, step)
        if moved and log is not None:
            log(f"rollback: moved {len(moved)} checkpoint(s) of the abandoned branch to {moved[0].parent}")
        if moved and resumed_from is not None and on_set_aside is not None:
            on_set_aside(moved[0].parent)
        commit(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    write_latest(ckpt_dir, path.name)
    rotate(ckpt_dir, keep_last, keep_every, current=step)
    remove_stale_temps(ckpt_dir)
    return path


def remove_stale_temps(ckpt_dir: Path) -> list[Path]:
    """Delete the temp files of earlier saves that a kill (SIGKILL, OOM, power loss) interrupted before their
    clean-up: a checkpoint's size each, hidden, never rotated. Only rank 0 of the run writes here."""
    stale = [p for p in ckpt_dir.iterdir() if STALE_TEMP.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def fork_step(ckpt_dir: Path, step: int, resumed: Path) -> int:
    """The last step the run resumed from `resumed` (at `step`) shares with the branch in `ckpt_dir`: `step`,
    except for a checkpoint set aside in ckpt_dir/abandoned-from-step-K[-N]/, whose branch left the run's
    current one at K (the current branch's checkpoints, grids and records after K are another branch's)."""
    resumed = Path(resumed).resolve()
    m = ASIDE_DIR.match(resumed.parent.name)
    return min(step, int(m.group(1))) if m and resumed.parent.parent == Path(ckpt_dir).resolve() else step


def set_aside_branch(ckpt_dir: Path, step: int, resumed: Path) -> list[Path]:
    """The first save of a run resumed from `resumed` (at `step`): move the abandoned branch's checkpoints
    (after the fork, `fork_step`, or at `step` but not `resumed` itself) into abandoned-from-step-<fork>[-N]/.
    `latest` is pointed at `resumed` first when it lives under `ckpt_dir`, so it never names a moved file."""
    fork, resumed = fork_step(ckpt_dir, step, resumed), Path(resumed).resolve()
    abandoned = sorted(s for s, p in list_checkpoints(ckpt_dir).items() if s > fork or (s == step and p.resolve() != resumed))
    if not abandoned:
        return []
    with contextlib.suppress(ValueError):  # a checkpoint of another run directory: latest cannot name it
        write_latest(ckpt_dir, resumed.relative_to(ckpt_dir.resolve()).as_posix())
    return _move_aside(ckpt_dir, fork, abandoned)


def set_aside_from(ckpt_dir: Path, step: int) -> list[Path]:
    """Move checkpoints with a step at or above `step` into a new abandoned-from-step-<step>[-N]/ (kept, out
    of rotation); a second rollback to the same step gets its own folder."""
    return _move_aside(ckpt_dir, step, sorted(s for s in list_checkpoints(ckpt_dir) if s >= step))


def _move_aside(ckpt_dir: Path, step: int, steps: list[int]) -> list[Path]:
    if not steps:
        return []
    aside = _new_aside_dir(ckpt_dir, step)
    moved = []
    for s in steps:
        target = aside / step_name(s, ".pt")
        os.replace(ckpt_dir / step_name(s, ".pt"), target)
        moved.append(target)
    fsync_dir(aside)
    fsync_dir(ckpt_dir)
    return moved


def _new_aside_dir(ckpt_dir: Path, step: int) -> Path:
    """abandoned-from-step-<step>, or -2, -3, ... after it: created here (mkdir without exist_ok claims it)."""
    base = f"abandoned-from-step-{step:07d}"
    for n in itertools.count(1):
        aside = ckpt_dir / (base if n == 1 else f"{base}-{n}")
        try:
            aside.mkdir()
            return aside
        except FileExistsError:
            continue


def rotate(ckpt_dir: Path, keep_last: int, keep_every: int = 0, current: int | None = None) -> list[Path]:
    """Delete checkpoints beyond the newest `keep_last` (plus every `keep_every`-th); never `current`."""
    steps = sorted(list_checkpoints(ckpt_dir))
    keep = set(steps[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    if current is not None:
        keep.add(current)
    removed = []
    for s in steps:
        if s not in keep:
            p = ckpt_dir / step_name(s, ".pt")
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def list_checkpoints(ckpt_dir: Path) -> dict[int, Path]:
    if not ckpt_dir.is_dir():
        return {}
    return {int(m.group(1)): p for p in ckpt_dir.iterdir() if (m := STEP_FILE.match(p.name))}


def resolve_checkpoint(target: str | Path) -> Path:
    """A checkpoint file, a run directory, or a checkpoints directory -> the checkpoint file to load (an
    `fm export` directory is returned as it is); a `checkpoints/latest` file given itself is followed, as its folder's."""
    target = Path(target)
    if target.name == "latest" and target.is_file():  # the pointer (a tab completion), not a damaged checkpoint
        return _read_latest(target)
    if target.is_file() or (target / EXPORT_MANIFEST).is_file():
        return target
    for ckpt_dir in (target / "checkpoints", target):
        latest = ckpt_dir / "latest"
        if latest.is_file():
            return _read_latest(latest)
    if target.exists():
        stopped = " (a run that stopped before its first checkpoint: train it again with another --run-dir)" if (target / "config.json").is_file() else ""
        raise UsageError(f"no checkpoint found in {target} (expected checkpoints/latest){stopped}")
    raise UsageError(f"checkpoint not found: {target}")


def _read_latest(latest: Path) -> Path:
    """The checkpoint `latest` names, which must be a step-XXXXXXX.pt inside its own checkpoints folder (or a
    set-aside folder in it): a hand-edited or damaged pointer is refused, never followed to another run's
    files (a resume there would train, and roll back, that run) and never guessed from the folder (after an
    interrupted rollback the newest step there can be the abandoned branch)."""
    text = latest.read_text(errors="replace").strip()
    name = PurePosixPath(text)
    fix = f"resume a checkpoint file of {latest.parent} by its path, or rewrite {latest} with its file name"
    if not text or name.is_absolute() or ".." in name.parts or "\n" in text or not STEP_FILE.match(name.name):
        raise UsageError(f"{latest} does not name a checkpoint in its folder (it holds {text[:80]!r}): {fix}")
    path = latest.parent / name
    if not path.is_file():
        raise UsageError(f"{latest} names {text}, which does not exist: {fix}")
    return path


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with weights_only=True (no code execution); a corrupt or truncated file is a one-line error,
    and so is a pickle that asks for code (an object of some class): that one is not an fm checkpoint."""
    path = Path(path)
    if (path / EXPORT_MANIFEST).is_file():
        raise UsageError(f"{path} is an exported model (weights only): sample from it, or use the training checkpoint here")
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of damaged files: one line is enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # weights_only names a global it will not import ("Unsupported global: GLOBAL builtins.print"):
        # the file asks for code, which no fm checkpoint does. Other unpickling errors are damage.
        if "Unsupported global" in str(err):
            raise UsageError(f"{path} is not an fm checkpoint (refused to unpickle code)") from None
        raise UsageError(f"cannot load checkpoint {path}: corrupt or truncated, or not an fm checkpoint ({_first_line(err)})") from None
    except Exception as err:  # torch raises many types for damaged files
        raise UsageError(f"cannot load checkpoint {path}: corrupt or truncated, or not an fm checkpoint ({_first_line(err)})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UsageError(f"{path} is not an fm checkpoint (missing model/config)")
    return state


def _first_line(err: Exception) -> str:
    """The cause in one short line. torch's weights-only refusal of a file that is no pickle (a JSON or text file
    given as --ckpt) opens with advice to load it with weights_only=False, arbitrary code: its cause comes after
    "WeightsUnpickler error:" ("Unsupported operand 123"), and only that is shown."""
    text = str(err).strip()
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].strip() or type(err).__name__
    return (text.splitlines()[0] if text else type(err).__name__)[:160]
