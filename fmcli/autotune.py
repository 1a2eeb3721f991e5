"""Batch-size autotune: the search and the `autotune.json` cache.

A trial is one measurement of the real training step (measure.py: synthetic tensors shaped like the preset's
data, on CPU in its own forked process). The autotuner doubles the batch from a small start (halved first
if it does not fit) until a trial fails (out of memory, or over the `--max-memory` budget) or the throughput
stops improving, then bisects between the last two sizes and returns the fastest batch, or after a failure
the largest safe one kept a margin below the failing size. DDP runs never autotune: they use a result cached in the run directory
(`autotune.json`, keyed by device, preset, and everything that changes the answer: model, precision, compile,
optimizer and Muon's Newton-Schulz dtype, objective, REPA, world size, the machine and its torch).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .config import Config, config_to_dict, resolve_without_data
from .errors import RuntimeFailure, UsageError
from .fsutil import write_text_atomic
from .hardware import cpu_info
from .measure import BenchSpec, device_name, measure_any, peak_of


# -------------------------------------------------------------------------------------- the search


@dataclass
class Trial:
    """One autotune measurement: `ok` False when the batch failed (out of memory or over budget)."""

    batch: int
    ok: bool
    throughput: float | None = None  # training images per second
    memory_mib: float | None = None  # peak memory of the trial
    reason: str | None = None


@dataclass
class AutotuneResult:
    batch: int
    stop: str  # why doubling stopped: "plateau", "oom", "memory budget" or "max batch"
    trials: list[Trial] = field(default_factory=list)


def autotune(
    measure: Callable[[int], Trial],
    *,
    start: int = 1,
    max_batch: int = 4096,
    min_gain: float = 0.03,
    max_memory_mib: float | None = None,
    margin: float = 0.1,
    patience: int = 1,
) -> AutotuneResult:
    """Find the training batch size: double, then bisect between the last two sizes.

    A `start` that already fails is halved until a batch fits (down to 1: only then does nothing fit).
    Doubling stops at the first failing batch (`measure` raised torch.OutOfMemoryError / MemoryError,
    returned ok=False, or its peak memory crossed `max_memory_mib`), when `patience + 1` doublings in a
    row fail to beat the best throughput so far by `min_gain` (plateau; the patience absorbs one noisy
    trial on a shared machine), or at `max_batch`. After a failure the bisection narrows
    [largest ok, smallest failing] to 1/8 and the result stays `margin` below the smallest failing size;
    after a plateau it narrows [best, 2 x best] and returns the fastest measured batch.
    """
    trials: dict[int, Trial] = {}

    def run(b: int) -> Trial:
        if b in trials:  # measured already (a start that failed, doubled back up to)
            return trials[b]
        try:
            trial = measure(b)
        except (torch.OutOfMemoryError, MemoryError):
            trial = Trial(b, ok=False, reason="oom")
        if trial.ok and max_memory_mib is not None and trial.memory_mib is not None and trial.memory_mib > max_memory_mib:
            trial = replace(trial, ok=False, reason="memory budget")
        trials[b] = trial
        return trial

    b, best, last_ok, stalls, stop = max(1, min(start, max_batch)), None, None, 0, "max batch"
    while True:
        trial = run(b)
        if not trial.ok:
            if last_ok is None and b > 1:  # the start does not fit: a smaller batch may
                b //= 2
                continue
            if last_ok is None:
                raise RuntimeFailure(f"batch size {b} already fails ({trial.reason}); nothing fits")
            stop, lo, hi = trial.reason, last_ok.batch, b
            break
        if best is not None and trial.throughput < best.throughput * (1 + min_gain):
            stalls += 1  # one noisy trial is not a plateau: stop after `patience + 1` in a row
            if stalls > patience:
                stop, lo, hi = "plateau", best.batch, 2 * best.batch
                break
        else:
            best, stalls = trial, 0
        last_ok = trial
        if b >= max_batch:
            lo = hi = b
            break
        b = min(2 * b, max_batch)
    if stop == "plateau":
        while hi - lo > max(1, lo // 4):
            mid = (lo + hi) // 2
            trial = run(mid)
            if trial.ok and trial.throughput >= trials[lo].throughput * (1 + min_gain):
                lo = mid
            else:
                hi = mid
    if stop in ("plateau", "max batch"):  # the fastest measured batch
        chosen = max((t for t in trials.values() if t.ok), key=lambda t: (t.throughput, t.batch)).batch
    else:
        while hi - lo > max(1, lo // 8):
            mid = (lo + hi) // 2
            if run(mid).ok:
                lo = mid
            else:
                hi = mid
        chosen = max(1, min(lo, math.floor((1 - margin) * hi)))
        if stalls:  # throughput had already stopped improving before memory ran out
            chosen = min(chosen, best.batch)
        if chosen >= 64:
            chosen -= chosen % 8  # tensor-core friendly, and a little more headroom
    return AutotuneResult(batch=chosen, stop=stop, trials=sorted(trials.values(), key=lambda t: t.batch))


# ------------------------------------------------------------------------------ autotuning training


def autotune_training(cfg: Config, base: BenchSpec, *, max_memory_gib: float | None = None, max_batch: int = 4096, log=lambda s: None) -> AutotuneResult:
    """Autotune the training batch of `cfg` with trials of `base` (train mode only)."""
    if max_memory_gib is None and base.device == "cpu":
        max_memory_gib = _physical_memory_gib() / 2  # a shared CPU machine: never take more than half of it
    budget = None if max_memory_gib is None else max_memory_gib * 1024

    # Trials only need to rank batch sizes: a few timed steps each (the final report times --steps).
    quick = replace(base, mode="train", impl="fm", steps=min(base.steps, 3), warmup=min(base.warmup, 1), rounds=1)

    def trial(b: int) -> Trial:
        result = measure_any(replace(quick, batch=b))
        if result.get("oom"):
            log(f"  batch {b}: out of memory")
            return Trial(b, ok=False, reason="oom")
        t = Trial(b, ok=True, throughput=result["train"]["img_per_s_median"], memory_mib=peak_of(result))
        log(f"  batch {b}: {t.throughput:.1f} img/s, {t.memory_mib:.0f} MiB")
        return t

    return autotune(trial, start=min(4, max_batch), max_batch=max_batch, max_memory_mib=budget)


def _physical_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


# ------------------------------------------------------------------------- the autotune cache


def autotune_key(cfg: Config, device: torch.device, precision: str, compile: bool, *, ns_dtype: str | None, world_size: int) -> str:
    """Cache key: the device name plus a hash of everything that changes the tuned batch: a training step's memory
    and speed (model, precision, compile, optimizer, Muon's Newton-Schulz dtype, the objective (a mean-flow step
    adds a JVP on a fraction of its rows) and REPA's encoder and projector), the world size (the search stops
    at the per-rank batch, global / world size) and the machine (`_machine_facts`: a run directory resumed on
    another machine or torch tunes again)."""
    mean_flow, repa = cfg.flow.objective == "meanflow", cfg.repa
    aligned = repa.encoder != "none"  # resolved by the caller ("auto" is "domain" or "none" here)
    facts = {"model": config_to_dict(cfg)["model"], "precision": precision, "compile": compile, "optim": cfg.optim.name,
             "ns_dtype": ns_dtype if cfg.optim.name == "muon" else None, "world_size": world_size,
             "objective": [cfg.flow.objective, cfg.flow.meanflow_ratio if mean_flow else None],
             "repa": [repa.encoder, repa.depth, repa.projector, repa.feature_stride] if aligned else None,
             "machine": _machine_facts(device)}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    return f"{device_name(device)}|{cfg.name}|{digest}"


def _machine_facts(device: torch.device) -> list:
    """What a tuned batch depends on beyond the device name (every CPU's is "cpu"): the torch version and, on a
    CPU, its model, bf16-relevant flags, core count and RAM (the CPU search's memory budget is half of it). Not
    the process's thread count or affinity, which a DDP rank's may differ from the launcher's that tuned."""
    if device.type == "cuda":
        return [torch.__version__]
    cpu = cpu_info()
    return [torch.__version__, cpu.model, cpu.flags, os.cpu_count(), round(_physical_memory_gib())]


def read_autotune_cache(path: Path) -> dict:
    """run_dir/autotune.json as {key: entry}, {} when absent; a file that is not that, or an entry without a
    positive integer batch, is a one-line error naming the file (the cache is never trusted unchecked)."""
    if not path.exists():
        return {}
    fix = f"delete {path} to autotune again, or set train.micro_batch_size to a number"
    try:
        cache = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RuntimeFailure(f"cannot read the autotune cache {path} ({err}); {fix}") from None
    if not isinstance(cache, dict):
        raise RuntimeFailure(f"the autotune cache {path} is not a JSON object; {fix}")
    for key, entry in cache.items():
        batch = entry.get("batch") if isinstance(entry, dict) else None
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise RuntimeFailure(f"the autotune cache {path} has no positive integer batch for {key!r} (got {batch!r}); {fix}")
    return cache


def save_autotune_cache(run_dir: Path, cfg: Config, device: torch.device, precision: str, compile: bool, tuned: AutotuneResult, *,
                        ns_dtype: str | None, world_size: int) -> Path:
    """Add this result to run_dir/autotune.json (atomically: temp file + rename)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "autotune.json"
    cache = read_autotune_cache(path)
    best = next(t for t in tuned.trials if t.batch == tuned.batch) if any(t.batch == tuned.batch for t in tuned.trials) else None
    cache[autotune_key(cfg, device, precision, compile, ns_dtype=ns_dtype, world_size=world_size)] = {
        "batch": tuned.batch,
        "stop": tuned.stop,
        "img_per_s": best.throughput if best else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_text_atomic(path, json.dumps(cache, indent=2) + "\n")


def auto_micro_batch(cfg: Config, run_dir: Path, device: torch.device, world_size: int, compile_on: bool, log=lambda s: None,
                     ns_dtype: str | None = None) -> int:
    """train.micro_batch_size="auto": the cached autotune result for this device + preset, else a fresh one.

    The micro batch is the largest divisor of global_batch_size / world_size not above the tuned batch.
    A DDP rank never autotunes: without a cached result it stops with a message. `compile_on` and `ns_dtype`
    are the run's decisions (rank 0's, for every rank), never resolved again here: a rank that resolved its own
    would look up another key.
    """
    cfg = resolve_without_data(cfg)
    precision = cfg.train.precision  # resolved by the caller (train.resolve_hardware): never "auto" here
    key = autotune_key(cfg, device, precision, compile_on, ns_dtype=ns_dtype, world_size=world_size)
    path = Path(run_dir) / "autotune.json"
    cache = read_autotune_cache(path)
    if key in cache:
        tuned_batch = cache[key]["batch"]
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # inside a DDP rank: never tune (the launcher does)
        raise UsageError(
            f"train.micro_batch_size='auto' in a DDP run needs a cached autotune result in {path}: set a number, "
            f"or start the run single-process (it autotunes and caches), then continue with `fm resume {run_dir} --nproc/--gpus N`"
        )
    else:
        log(f"train.micro_batch_size=auto: autotuning on {device_name(device)} (cached in {path})")
        per_rank = cfg.train.global_batch_size // world_size
        base = BenchSpec(config=config_to_dict(cfg), batch=1, steps=3, warmup=1, precision=precision, compile=compile_on, device=device.type, muon_ns_dtype=ns_dtype)
        tuned = autotune_training(cfg, base, max_batch=per_rank, log=log)
        save_autotune_cache(run_dir, cfg, device, precision, compile_on, tuned, ns_dtype=ns_dtype, world_size=world_size)
        tuned_batch = tuned.batch
    per_rank = cfg.train.global_batch_size // world_size
    return max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= max(1, tuned_batch))

