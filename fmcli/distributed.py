"""Process-group setup/teardown, rank helpers, and the in-process torchrun relaunch (docs/architecture.md section 8).

`fm train --gpus N` / `--nproc N` makes the parent call `torch.distributed.run` with the same command line;
the children see WORLD_SIZE in their environment and join the group instead of relaunching.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .console import RANK_ERRORS_ENV, reported_peer_errors, reported_rank_exits
from .errors import RuntimeFailure, Stopped, UsageError
from .hardware import resolve_device


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")


def launched_externally() -> bool:
    """True inside a process started by torchrun (ours or the user's) or a SLURM multi-task step."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def adopt_slurm() -> None:
    """srun started one task per GPU and torchrun was not used: SLURM's variables become torch's (WORLD_SIZE,
    RANK, LOCAL_RANK), so that this task is seen as the rank it is. Called wherever a process that will not
    relaunch itself asks what it is (`launch`: before the data, the run directory and sampling shards), and by
    `setup`; a process that launches ranks with --gpus/--nproc/--nnodes does not call it."""
    if "WORLD_SIZE" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) >= 2:
        if "MASTER_ADDR" not in os.environ:
            raise UsageError("SLURM multi-task run: set MASTER_ADDR to the first node's hostname (see README)")
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_PORT", "29500")


def setup(device_pref: str = "auto") -> DistContext:
    """Join the process group if this process was launched as one rank of several; pick its device."""
    adopt_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, "train.device")
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None, timeout=collective_timeout())
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def all_reduce_mean(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= ctx.world_size
    return value


def all_reduce_sum(array, ctx: DistContext):
    """The float64 sum over the ranks of a numpy array (on the ranks' device: NCCL reduces CUDA tensors only)."""
    if ctx.world_size == 1:
        return array
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy()


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank if the flag is set on any rank (e.g. a stop signal seen by one process)."""
    if ctx.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_gather_objects(obj, ctx: DistContext) -> list:
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def shard_indices(n: int, ctx: DistContext) -> range:
    """This rank's share of sample indices 0..n-1 (strided, so every rank gets the same count +-1); a range, not a
    list: `fm sample -n 1000000000` streams its samples to a folder in batches, and a list of n ints alone is 36 GB."""
    return range(ctx.rank, n, ctx.world_size)


def block_of(n: int, ctx: DistContext) -> slice:
    """This rank's contiguous block of items 0..n-1: the ranks' blocks in rank order are 0..n-1 (sizes differ by <= 1)."""
    return slice(n * ctx.rank // ctx.world_size, n * (ctx.rank + 1) // ctx.world_size)


def gather_in_index_order(indices: list[int], rows, ctx: DistContext) -> list:
    """All ranks' (index, row) pairs, returned to every rank as rows sorted by global index."""
    pairs = list(zip(indices, rows))
    if ctx.world_size > 1:
        pairs = [p for part in all_gather_objects(pairs, ctx) for p in part]
    return [row for _, row in sorted(pairs, key=lambda p: p[0])]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_gpus(requested: int) -> None:
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested > found:
        raise UsageError(f"--gpus {requested} requested but this machine has {found} CUDA GPU(s); use --nproc N for CPU processes")


def check_nproc_device(nproc: int, device: str, key: str, cpu: str) -> None:
    """--nproc N runs where the device setting (`key`: train.device or --device) resolves: on CUDA (cuda, or auto on a
    machine with CUDA) each local rank takes one GPU (`setup`). More ranks than GPUs would share one, which NCCL
    refuses at its first collective ("Duplicate GPU detected", a failure every rank shares, so none could say it):
    refused here, in the launcher, before anything is written. `cpu` is how to ask for CPU processes instead."""
    if nproc <= 1 or resolve_device(device, key).type != "cuda":
        return
    found = torch.cuda.device_count()
    if nproc > found:
        said = f"{key} {device}" if key.startswith("-") else f"{key}={device}"
        raise UsageError(f"--nproc {nproc} runs on CUDA here ({said}), one process per GPU, but this machine has {found} CUDA GPU(s): "
                         f"use at most {found} (--nproc {found} or --gpus {found}), or {cpu} for {nproc} CPU processes")


def check_rendezvous(nnodes: int, rdzv_endpoint: str | None) -> None:
    if nnodes > 1 and rdzv_endpoint is None:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")


def relaunch(
    nproc: int,
    argv: list[str],
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    extra_env: dict[str, str] | None = None,
    stops_cleanly: bool = False,
) -> int:
    """Run `python -m fmcli.cli ARGV` as `nproc` local ranks through torch.distributed.run, in-process.

    Returns the exit code: 0 if every rank succeeded, else the run's as one process's (`failed_launch_code`: 1 for a
    runtime error on any rank, else 2 for a usage error; torchrun stops the remaining ranks as soon as one fails, so a
    crashed rank cannot leave the others hanging). On Ctrl-C or
    SIGTERM torchrun forwards the signal and raises once the ranks are gone: with `stops_cleanly` (training,
    whose ranks save a stop checkpoint and then report a clean exit through STOP_MARKER_ENV) that is 0 when they did, as a
    single process exits; otherwise `Stopped` (exit code 128 + the signal's number, one line, like any interrupted command).
    """
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import get_args_parser, run

    for key, value in (extra_env or {}).items():
        os.environ[key] = value
    args = ["--nproc-per-node", str(nproc), "--nnodes", str(nnodes)]
    if nnodes == 1 and rdzv_endpoint is None:
        args += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", rdzv_id or "fm"]
    else:
        check_rendezvous(nnodes, rdzv_endpoint)
        args += ["--node-rank", str(node_rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint]
        args += ["--rdzv-id", rdzv_id or "fm"]
    # After forwarding Ctrl-C/SIGTERM the agent waits this long for the ranks to write their stop checkpoint
    # before it SIGKILLs them (torchrun's default, 30 s, is too short for a large model).
    args += ["--shutdown-timeout", str(shutdown_timeout())]
    args += ["--max-restarts", "0", "--module", "fmcli.cli", *argv]
    parsed = get_args_parser().parse_args(args)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, nproc))))
    # torchrun's own warnings repeat what the failing rank already printed; keep stderr to one error.
    # Each of its modules' loggers has its own level (torch sets WARNING on them), so the parent's would not do.
    for name in [n for n in logging.root.manager.loggerDict if n.split(".")[:3] == ["torch", "distributed", "elastic"]]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    marker = Path(tempfile.mkdtemp(prefix="fm-stop-")) / "stopped" if stops_cleanly else None  # training only
    if marker is not None:
        os.environ[STOP_MARKER_ENV] = str(marker)
    errors = tempfile.mkdtemp(prefix="fm-errors-")  # an error every rank hits is printed once (console.print_error)
    os.environ[RANK_ERRORS_ENV] = errors
    try:
        run(parsed)
    except SignalException as err:
        if marker is not None and marker.exists():
            return 0  # the ranks logged their stop checkpoint and how to resume
        name = signal.Signals(err.sigval).name  # the one line of the whole run: the ranks stay quiet (cli/app.py)
        raise Stopped(f"stopped by {name}" + (" before the ranks saved a stop checkpoint" if stops_cleanly else ""), int(err.sigval)) from None
    except Exception as err:  # ChildFailedError: the failing rank already printed its one-line error
        return failed_launch_code(err, reported_rank_exits(errors), reported_peer_errors(errors))
    finally:
        os.environ.pop(RANK_ERRORS_ENV, None)
        shutil.rmtree(errors, ignore_errors=True)
        if marker is not None:
            os.environ.pop(STOP_MARKER_ENV, None)
            shutil.rmtree(marker.parent, ignore_errors=True)
    return 0


def failed_launch_code(err: Exception, reported: list[int | None], peer_errors: list[str] = ()) -> int:
    """The exit code of a launch whose ranks failed, as one process's: 1 if any rank reported a runtime error of its
    own, else 2 if one reported a usage error (a rank that failed only because another did, a dead peer, reports
    nothing that counts; torchrun's first failure is often that rank 0, by a tie of its whole-second timestamps).
    Those ranks printed their one line. Without a report (a rank killed by a signal, or one that died before it could
    report), torchrun's first failure decides, and the launcher says what it knows of it: the signal, else the first
    error that a rank reporting a broken collective saw (`peer_errors`: where every rank's collective failed alike,
    e.g. NCCL refused them all, no rank printed it)."""
    if 1 in reported or 2 in reported:
        return 1 if 1 in reported else 2
    first = err.get_first_failure() if hasattr(err, "get_first_failure") else None
    if first is None:
        print(f"error: distributed launch failed: {err}", file=sys.stderr)
        return 1
    rank, failure = first
    if failure.exitcode is not None and failure.exitcode < 0:
        print(f"error: rank {rank} was killed by signal {-failure.exitcode}", file=sys.stderr)
        return 1
    code = failure.exitcode or 1
    if code in (130, 143):  # a rank stopped by a signal of its own: it stays quiet (cli/app.py), so say it here
        print(f"error: rank {rank} was {'interrupted' if code == 130 else 'terminated'}", file=sys.stderr)
        return code
    if peer_errors:
        print(f"error: {peer_errors[0]}", file=sys.stderr)
        return code
    print(f"error: distributed run stopped with exit code {code} (the failing rank's message is above)", file=sys.stderr)
    return code


# Set by `relaunch` for its ranks: a file that local rank 0 creates once training has returned, its last
# (stop) checkpoint saved.
STOP_MARKER_ENV = "FM_STOP_MARKER"


def report_clean_exit(ctx: DistContext) -> None:
    """Tell the launcher (if any) that training returned normally, a requested stop's checkpoint saved."""
    path = os.environ.get(STOP_MARKER_ENV)
    if path and ctx.local_rank == 0:
        Path(path).touch()


def shutdown_timeout() -> int:
    """Seconds the launcher gives ranks to finish after a stop signal: FM_SHUTDOWN_TIMEOUT, default 600."""
    value = os.environ.get("FM_SHUTDOWN_TIMEOUT", "600")
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"FM_SHUTDOWN_TIMEOUT must be a positive number of seconds, got {value!r}")
    return int(value)


DIST_TIMEOUT_ENV = "FM_DIST_TIMEOUT_S"


def collective_timeout() -> datetime.timedelta:
    """How long a rank waits at a collective for the others (FM_DIST_TIMEOUT_S seconds, default 1800) before the
    run is aborted: one explicit timeout for gloo and NCCL alike (NCCL's own default, 10 minutes, aborted runs whose
    rank 0 was still writing a large checkpoint or a sample grid while the others waited at their next collective)."""
    value = os.environ.get(DIST_TIMEOUT_ENV, "1800")
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"{DIST_TIMEOUT_ENV} must be a positive whole number of seconds (how long a rank waits for the others), got {value!r}")
    return datetime.timedelta(seconds=int(value))


def wait_until(ready, timeout: float, what: str, poll: float = 0.5) -> None:
    """Block until `ready()` is true (another rank is preparing something), or fail with a clear message."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeFailure(f"timed out after {timeout:.0f} s waiting for {what}; did local rank 0 fail?")
        time.sleep(poll)


def is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because another rank died: that rank reports the cause, not this one."""
    if not launched_externally() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    text = str(err)
    markers = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted", "ProcessGroup")
    return isinstance(err, getattr(dist, "DistError", ())) or any(m in text for m in markers)
