"""What happens before a run: data, run directory and checkpoint resolution, auto-prepared shapes data, the
micro-batch autotune (once, in the launcher), the torchrun relaunch, and each rank's context.

fmcli.cli parses and calls these; they raise fmcli.errors for anything a user can fix.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from . import distributed as D
from .config import Config, config_to_dict
from .console import stderr_console
from .errors import UsageError
from .fsutil import folder_lock, refuse_unwritable, write_text_atomic
from .runlog import RUN_LOCK, refuse_run_being_trained

STARTED_AT_ENV = "FM_STARTED_AT"  # set for relaunched ranks: when `fm train` began (the budget's start)

# ------------------------------------------------------------------------------------------ launching


def launch_options(gpus: int, nproc: int, nnodes: int = 1, node_rank: int = 0, rdzv_endpoint=None, rdzv_id=None) -> dict:
    if gpus and nproc:
        raise UsageError("use either --gpus N or --nproc N, not both")
    # Checked here, before any directory or file is made (relaunch checks it again, too late for that).
    if node_rank >= nnodes:  # a node of a multi-node run given without --nnodes would train a run of its own
        raise UsageError(f"--node-rank {node_rank} needs --nnodes above it (the number of nodes, the same on every node; node ranks run 0 to N-1)")
    D.check_rendezvous(nnodes, rdzv_endpoint)
    if max(gpus, nproc) > 1 or nnodes > 1:
        D.shutdown_timeout()
        D.collective_timeout()
    return dict(gpus=gpus, nproc=nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id)


def resume_config(ckpt: Path, overrides: list[str], data: Optional[Path] = None, stop_at_step: Optional[int] = None) -> Config:
    """The one way a resumed run's config is built (`fm resume` and `fm train --resume` alike): the
    checkpoint's config plus resume-safe overrides only (anything else would change the math of a run
    whose optimizer and EMA state are restored); a --stop-at-step the checkpoint has passed is refused."""
    from .checkpoint import load_checkpoint
    from .config import RESUME_SAFE_KEYS, apply_overrides, refuse_checkpoint_trust, validate_config
    from .train import check_stop_at_step

    state = load_checkpoint(ckpt)
    if isinstance(state.get("step"), int):  # a damaged one is reported when the trainer restores it
        check_stop_at_step(state["step"], stop_at_step, ckpt)
    cfg = validate_config(state["config"], source=str(ckpt))
    refuse_checkpoint_trust(cfg, overrides, str(ckpt))  # a checkpoint's config never decides to run code
    if data is not None and Path(cfg.data.path or "").resolve() != data.resolve():
        raise UsageError(f"--data {data} differs from the resumed run's data.path {cfg.data.path}: a run cannot change its dataset on resume")
    if cfg.data.path and not Path(cfg.data.path).exists():  # said here, where the checkpoint tells what the data was
        raise UsageError(missing_resume_data(cfg.data, state.get("data_info")))
    cfg = apply_overrides(cfg, overrides, allowed=RESUME_SAFE_KEYS)
    check_set_steps(cfg, overrides, state.get("step"), ckpt)
    return cfg


def check_set_steps(cfg: Config, overrides: list[str], step, ckpt: Path) -> None:
    """A resume's --set train.steps at or before the checkpoint's step would train nothing (the run would only say it
    is already there): refused, as a --stop-at-step the checkpoint has passed is. Without the --set, a finished run
    resumes to no work (exit 0), as before."""
    from .config import parse_override

    if isinstance(step, int) and cfg.train.steps <= step and any(parse_override(item)[0] == "train.steps" for item in overrides):
        raise UsageError(f"--set train.steps={cfg.train.steps} is not after step {step}, where {ckpt} resumes: nothing would train; "
                         "to extend the run give a larger N, or leave it out")


def training_config(preset: str, overrides: list[str], *, data: Optional[Path], run_dir: Optional[Path], resume: Optional[str],
                    stop_at_step: Optional[int] = None) -> tuple[Config, Path, Optional[Path]]:
    """What `fm train` trains, where, and from which checkpoint: a fresh run's preset plus overrides (and
    --data), or with --resume ('latest' in the run directory, or a path) the checkpoint's config plus
    resume-safe overrides, exactly as `fm resume`."""
    from .checkpoint import resolve_checkpoint
    from .config import load_config, parse_override
    from .seeding import seed_problem

    if resume is not None:
        ckpt = resolve_checkpoint((run_dir or default_run_dir(load_config(preset).name)) if resume == "latest" else resume)
        # A resume continues the checkpoint's own run: its config.json, metrics and checkpoints live there, so
        # another --run-dir would mix two runs (or lack a run's files). New runs start from weights instead.
        if run_dir is not None and run_dir.resolve() != run_dir_of(ckpt).resolve():
            raise UsageError(f"--resume {resume} continues its own run {run_dir_of(ckpt)}, not --run-dir {run_dir}; drop --run-dir, "
                             f"or start a new run from its weights: --set train.init_from={resume} (without --resume)")
        return resume_config(ckpt, overrides, data=data, stop_at_step=stop_at_step), run_dir or run_dir_of(ckpt), ckpt
    if data is not None and (given := next((item for item in overrides if "=" in item and parse_override(item)[0] == "data.path"), None)):
        raise UsageError(f"--data {data} and --set {given.strip()} both set data.path: give one")  # not one silently dropped
    # --data goes in with the preset: a data.image_size / count / seed given beside it is never read (refused there)
    cfg = load_config(preset, overrides, note=lambda line: print(line, file=sys.stderr), data_path=None if data is None else str(data))
    if problem := seed_problem(cfg.train.seed):
        raise UsageError(f"invalid config ({preset}): train.seed: {problem}")
    return cfg, run_dir or default_run_dir(cfg.name), None


def default_run_dir(name: str) -> Path:
    """runs/NAME, where NAME must be one folder name: an empty name, `.`/`..` or one with a `/` would make the run
    directory runs/ itself or put it outside runs/ (--run-dir is how a run goes elsewhere). Checked here, where
    the name becomes a path, not in the config: a checkpoint of an older run keeps loading whatever its name."""
    if name.strip() in ("", ".", "..") or "/" in name:
        raise UsageError(f"name {name!r} is not a run name: the run directory is runs/NAME, so it must be one folder name "
                         "(not empty, '.' or '..', no '/'); to put a run elsewhere use --run-dir DIR")
    return Path("runs") / name


def resume_training(target: Path, overrides: list[str], stop_at_step, launch: dict) -> Optional[Path]:
    """`fm resume`: the run of a checkpoint (or a run directory's latest one), continued."""
    from .checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(target)
    return run_training(resume_config(ckpt, overrides, stop_at_step=stop_at_step), run_dir_of(ckpt), ckpt, stop_at_step, launch)


def train_resolved(config_file: Path, run_dir: Path, resume: Optional[str], stop_at_step) -> Optional[Path]:
    """One relaunched rank (`fm _train-resolved`): the config the launcher resolved, trained as is."""
    from .config import validate_config
    from .train import train

    cfg = validate_config(json.loads(config_file.read_text()), source=str(config_file))
    started_at = float(os.environ[STARTED_AT_ENV]) if os.environ.get(STARTED_AT_ENV) else None  # the budget counts from `fm train`'s start
    return train(cfg, run_dir, resume_from=Path(resume) if resume else None, stop_at_step=stop_at_step, started_at=started_at).checkpoint


def run_dir_of(ckpt: Path) -> Path:
    """RUN of RUN/checkpoints/X.pt, and of a set-aside RUN/checkpoints/abandoned-from-step-*/X.pt too (the run
    continues in RUN, never inside the abandoned folder); else the checkpoint's folder."""
    folder = ckpt.parent
    if folder.name.startswith("abandoned-from-step-") and folder.parent.name == "checkpoints":
        folder = folder.parent
    return folder.parent if folder.name == "checkpoints" else folder


def run_training(cfg: Config, run_dir: Path, ckpt: Optional[Path], stop_at_step, launch: dict) -> Optional[Path]:
    """Resolve what all ranks must agree on (data, run directory, autotuned micro batch) for a fresh run or
    one resumed from `ckpt`, then train here or relaunch as N ranks. Returns the last checkpoint (rank 0 of
    a local run), else None."""
    from .config import check_training_config
    from .optim import ema_warning

    check_training_config(cfg)  # before any data is prepared or any directory made
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file, not a run directory; pick another --run-dir")
    refuse_unwritable(run_dir)
    procs = launch["gpus"] or launch["nproc"]
    if procs <= 1 and launch["nnodes"] <= 1:
        D.adopt_slurm()  # one srun task per GPU: this task is a rank (local rank 0 alone prepares the data, rank 0 checks the run)
    if int(os.environ.get("RANK", "0")) == 0:  # before any setup (data, probe, autotune, the ranks): refused at once, nothing written
        refuse_run_being_trained(run_dir)
        if ckpt is None and not os.environ.get("FM_RUN_RESOLVED") and holds_a_run(run_dir):  # before the default data is prepared
            refuse_used_run_dir(run_dir)
    if ckpt is None and cfg.train.init_from:  # a missing one is said before data preparation, not after it
        from .checkpoint import resolve_checkpoint

        resolve_checkpoint(cfg.train.init_from)
    if cfg.eval.every and cfg.eval.ref is not None and cfg.eval.features == "inception":  # FID during training: its weights, too
        from .evaluate import resolve_inception_path

        resolve_inception_path(cfg.eval.inception)
    child = D.launched_externally()
    # When the command began (train.budget_minutes counts from here); our relaunched ranks inherit it.
    started_at = float(os.environ.get(STARTED_AT_ENV) or time.time())
    if launch["gpus"]:
        refuse_device_beside_gpus(cfg.train.device, resumed=ckpt is not None)
        D.check_gpus(launch["gpus"])
        cfg = cfg.with_section("train", device="cuda")
    elif not child:
        D.check_nproc_device(launch["nproc"], cfg.train.device, "train.device", cpu="--set train.device=cpu")
    if cfg.data.path:
        if not Path(cfg.data.path).exists():
            raise UsageError(f"data.path {cfg.data.path} does not exist; {prepare_hint(cfg.data)}")
        from .data.dataset import validate_prepared

        validate_prepared(cfg.data.path)  # before anything is created: a damaged dataset is exit 2 now, not a crash later
    else:
        # Under an external launcher (torchrun/SLURM, not our own relaunch) local rank 0 prepares the default
        # data and the other ranks wait for its manifest; our own relaunch prepared it in the parent already.
        cfg = default_data(cfg, prepare=not child or int(os.environ.get("LOCAL_RANK", "0")) == 0)
    if int(os.environ.get("RANK", "0")) == 0:  # once per run: the launching process, or rank 0 under torchrun/SLURM
        if warning := ema_warning(cfg.train):
            print(warning, file=sys.stderr)
    if (procs > 1 or launch["nnodes"] > 1) and not child:
        _relaunch_training(cfg, run_dir, ckpt, stop_at_step, launch, procs, started_at)
        return None
    from .train import train

    return train(cfg, run_dir, resume_from=ckpt, stop_at_step=stop_at_step, started_at=started_at).checkpoint


def refuse_device_beside_gpus(device: str, resumed: bool) -> None:
    """--gpus N trains on CUDA: a train.device of cpu (or mps) beside it would be replaced, silently, so it is
    refused, as `on_ranks` refuses --device cpu beside --gpus for sampling (before any CUDA is touched)."""
    if device in ("auto", "cuda"):
        return
    if resumed:  # the run's own train.device, which a resume may change (RESUME_SAFE_KEYS) but never silently
        raise UsageError(f"--gpus N trains on CUDA GPUs, but this run's config has train.device={device}: move it with "
                         "--set train.device=cuda beside --gpus, or resume with --nproc N (CPU processes) or without --gpus")
    raise UsageError(f"--gpus N trains on CUDA GPUs, so train.device={device} would be ignored: drop --set train.device={device} "
                     "(or use --nproc N for CPU processes)")


# What a launch writes before the run's own files: a launch that failed before them left no run behind.
LAUNCH_FILES = (".launch-config.json", "autotune.json", RUN_LOCK)  # RUN_LOCK: the lock of a run being trained
# What a run writes from its start (train.Trainer.run): a folder with none of them is not a run that stopped early.
RUN_FILES = ("config.json", "env.json", "metrics.jsonl", "checkpoints", "samples")


def holds_a_run(run_dir: Path) -> bool:
    return run_dir.exists() and any(p.name not in LAUNCH_FILES for p in run_dir.iterdir())


def refuse_used_run_dir(run_dir: Path) -> None:
    """A fresh run's directory that `holds_a_run`: why it cannot be used, and what to do instead (exit 2)."""
    if not any((run_dir / name).exists() for name in RUN_FILES):  # a folder of the user's, not a run that stopped
        example = next(p.name for p in sorted(run_dir.iterdir()) if p.name not in LAUNCH_FILES)
        raise UsageError(f"run directory {run_dir} already exists and holds files that are not an fm run (e.g. {example}): "
                         "pick another --run-dir (fm does not write a run among other files)")
    if not (run_dir / "checkpoints" / "latest").is_file():  # `fm resume` has nothing to continue there
        raise UsageError(f"run directory {run_dir} already exists and holds no checkpoint (its run stopped before the first): "
                         "pick another --run-dir, or delete it to start that run over")
    raise UsageError(f"run directory {run_dir} already exists; continue it with `fm resume {run_dir}` or `--resume latest`, or pick --run-dir")


def _relaunch_training(cfg: Config, run_dir: Path, ckpt: Optional[Path], stop_at_step, launch: dict, procs: int, started_at: float) -> None:
    import typer

    if cfg.train.precision == "auto" or cfg.train.micro_batch_size == "auto":
        cfg, resolved, device = _resolve_in_launcher(cfg)
        if cfg.train.micro_batch_size == "auto":  # tune once here, single-process; the ranks read the cache
            from .autotune import auto_micro_batch
            from .hardware import matmul_dtype, resolve_compile

            # The trials run the ranks' step: Muon's Newton-Schulz in the dtype each rank's build_step picks
            # (its precision is explicit by then, so the dtype comes from the probe's GEMM of this width).
            ns_dtype = matmul_dtype(device, resolved.model.hidden_size) if resolved.optim.name == "muon" else None
            compile_on = resolve_compile(resolved.train.compile, device).compile  # as the ranks' rank 0 resolves it
            run_dir.mkdir(parents=True, exist_ok=True)
            auto_micro_batch(resolved, run_dir, device, procs * launch["nnodes"], compile_on, log=lambda m: print(m, file=sys.stderr), ns_dtype=ns_dtype)
    code = D.relaunch(
        max(procs, 1),
        _child_argv(cfg, run_dir, ckpt, stop_at_step),
        nnodes=launch["nnodes"],
        node_rank=launch["node_rank"],
        rdzv_endpoint=launch["rdzv_endpoint"],
        rdzv_id=launch["rdzv_id"],
        extra_env={"FM_RUN_RESOLVED": "1", STARTED_AT_ENV: repr(started_at)},
        stops_cleanly=True,
    )
    if code:
        raise typer.Exit(code)


def _resolve_in_launcher(cfg: Config):
    """(cfg, that config resolved as a rank will resolve it: dataset fields, text encoder width; the device).
    Precision "auto" is decided once here, before the ranks start, so that every rank (and the autotune) trains
    the same precision; the ranks then see it as an explicit setting."""
    from .config import resolve_for_training, with_setting
    from .data.dataset import PreparedDataset
    from .hardware import resolve_device, resolve_hardware

    device = resolve_device(cfg.train.device, "train.device")
    dataset = PreparedDataset(cfg.data.path, text=cfg.model.cross_attention)
    _, resolved = resolve_for_training(cfg, dataset, device)  # as train.build_step resolves it
    if cfg.train.precision == "auto":
        choice, _, _ = resolve_hardware(resolved, device, tuple(dataset.manifest["shape"]))
        cfg = with_setting(cfg, "train.precision", choice.precision)  # validated before the ranks see it
        resolved = with_setting(resolved, "train.precision", choice.precision)
        print(f"precision: {choice.precision} ({choice.reason})", file=sys.stderr)
    return cfg, resolved, device


def _child_argv(cfg: Config, run_dir: Path, ckpt: Optional[Path], stop_at_step) -> list[str]:
    """The children get the fully resolved config as a file, so every rank trains the same thing."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / ".launch-config.json"
    write_text_atomic(resolved, json.dumps(config_to_dict(cfg)))
    argv = ["_train-resolved", str(resolved), "--run-dir", str(run_dir)]
    if ckpt is not None:
        argv += ["--resume", str(ckpt)]
    if stop_at_step:
        argv += ["--stop-at-step", str(stop_at_step)]
    return argv


# ----------------------------------------------------------------------------------------------- data


def prepare_hint(data) -> str:
    """How to make data.path again. fm's own shapes data (named by default_data from data.image_size, count and
    seed) gets those options: prepare-data's defaults would make another dataset."""
    if data.source == "shapes" and Path(data.path).name == shapes_name(data):
        return f"create it with `fm prepare-data shapes --out {data.path} --size {data.image_size} --count {data.count} --seed {data.seed}`"
    root = "" if data.source == "shapes" else " --root ..."
    return f"create it with `fm prepare-data {data.source}{root} --out {data.path}` and the options it was first prepared with"


def missing_resume_data(data, info) -> str:
    """Why a resumed run's data.path is missing and how to give it back: the run cannot change its dataset, and its
    data.source may be a preset's default that says nothing of what --data held (the checkpoint's data_info does)."""
    where = "" if Path(data.path).is_absolute() else f" (relative to this working directory, {Path.cwd()})"
    what = f" ({info.get('source')}, {info.get('count')} images)" if isinstance(info, dict) else ""
    own_shapes = data.source == "shapes" and Path(data.path).name == shapes_name(data) and (not what or info.get("source") == "shapes")
    fix = prepare_hint(data) if own_shapes else "put it back there (or a link to it), or run fm from the directory the run was started in"
    return f"data.path {data.path}{where} of the resumed run does not exist; a run resumes on its own dataset{what}: {fix}"


def shapes_name(data) -> str:
    return f"shapes-{data.image_size}-n{data.count}-s{data.seed}"


def default_data(cfg: Config, prepare: bool) -> Config:
    """A run without data.path: the shapes source's default dataset under data/, prepared once (with
    `prepare`; else waited for, as another rank prepares it); any other source needs --data."""
    if cfg.data.source != "shapes":
        raise UsageError(f"no dataset given: pass --data DIR, prepared with `fm prepare-data {cfg.data.source} --root ... --out DIR`")
    from .data.dataset import read_manifest
    from .data.shapes import GENERATOR_VERSION

    path = Path("data") / shapes_name(cfg.data)

    def current() -> dict | None:
        existing = read_manifest(path) if (path / "manifest.json").is_file() else None
        return existing if existing is not None and existing.get("generator_version") == GENERATOR_VERSION else None

    if current() is None:
        if prepare:
            with folder_lock(path.parent):  # two runs started at once in one directory: one prepares, the other waits
                if current() is None:
                    _prepare_shapes(cfg, path)
        else:
            timeout = float(os.environ.get("FM_DATA_WAIT", "1800"))
            D.wait_until(lambda: current() is not None, timeout, f"local rank 0 to prepare the shapes data in {path}")
    return cfg.with_section("data", path=str(path))


def _prepare_shapes(cfg: Config, path: Path) -> None:
    """Prepare the default shapes dataset at `path`, replacing one made by an older generator."""
    stale = (path / "manifest.json").is_file()
    why = " (the existing one came from an older shapes generator)" if stale else ""
    stderr_console().print(f"preparing shapes data in {path}{why}", highlight=False)
    from .data.prepare import prepare_with_progress

    prepare_with_progress("shapes", path, size=cfg.data.image_size, count=cfg.data.count, seed=cfg.data.seed, force=stale)


# ------------------------------------------------------------------------------ ranks for sample / fid


def relaunched(gpus: int, nproc: int, extra: list[str] | None = None) -> bool:
    """With --gpus/--nproc N > 1 in the launching process, rerun this same command as N ranks."""
    import typer

    if gpus and nproc:
        raise UsageError("use either --gpus N or --nproc N, not both")
    if gpus:
        D.check_gpus(gpus)
    procs = gpus or nproc
    if procs <= 1:
        D.adopt_slurm()  # one srun task per GPU: this task is one rank of the command, its shard only
    if procs <= 1 or D.launched_externally():
        return False
    D.collective_timeout()  # a bad FM_DIST_TIMEOUT_S: one line here, not one per rank
    argv = _without_launch_flags(sys.argv[1:]) + (["--device", "cuda"] if gpus else [])
    if extra is not None:  # stdin was consumed here: hand the ranks its prompts as arguments instead
        argv = _without_stdin_prompts(argv) + extra
    code = D.relaunch(procs, argv)
    if code:
        raise typer.Exit(code)
    return True


def _without_stdin_prompts(argv: list[str]) -> list[str]:
    """Drop `--prompts -` (or `--prompts=-`): the ranks get stdin's prompts as arguments. Only that pair: a prompt
    that is "-" is a prompt, and `--prompts=-` left in made every rank read an empty stdin."""
    out, k = [], 0
    while k < len(argv):
        if argv[k] == "--prompts" and k + 1 < len(argv) and argv[k + 1] == "-":
            k += 2
            continue
        if argv[k] != "--prompts=-":
            out.append(argv[k])
        k += 1
    return out


def _without_launch_flags(argv: list[str]) -> list[str]:
    """Drop --gpus/--nproc (and their values): the ranks know they are ranks from their environment."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--gpus", "--nproc"):
            skip = True
        elif not arg.startswith(("--gpus=", "--nproc=")):
            out.append(arg)
    return out


def on_ranks(work, *, device: str, gpus: int, nproc: int, extra: list[str] | None = None):
    """`work(ctx)` on this process's rank, inside a process group when distributed; None in a launcher that
    relaunched this command as --gpus/--nproc N ranks (`extra`: see `relaunched`). --gpus runs on CUDA: another
    --device beside it would be accepted and ignored, so it is refused."""
    if gpus and device not in ("auto", "cuda"):
        raise UsageError(f"--gpus N runs on CUDA GPUs, so --device {device} would be ignored: drop --device {device} (or use --nproc N for CPU processes)")
    if not gpus and not D.launched_externally():
        D.check_nproc_device(nproc, device, "--device", cpu="--device cpu")
    if relaunched(gpus, nproc, extra=extra):
        return None
    ctx = rank_context(device, gpus)
    return with_process_group(lambda: work(ctx))


def rank_context(device: str, gpus: int) -> D.DistContext:
    """This process's rank and device (rank 0 of 1 when not distributed)."""
    if not D.launched_externally():
        from .hardware import resolve_device

        return D.DistContext(device=resolve_device("cuda" if gpus else device))
    return D.setup("cuda" if gpus else device)


def with_process_group(fn):
    """Run a rank's work; all ranks meet at a barrier before the group is destroyed (a rank that tears
    down gloo while another still talks to it dies with "terminate called without an active exception")."""
    import torch.distributed as dist

    try:
        result = fn()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return result
    finally:
        D.cleanup()
