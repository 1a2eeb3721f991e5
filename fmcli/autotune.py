"""Batch-size autotune: the search, the measurement of one trial (isolated in its own process), the cache.

A trial builds the real training step (step.TrainingStep: model, fp32 EMA, optimizer, coupling, text
conditioning) on synthetic tensors shaped like the preset's data (no dataset is read) and times it after
warmup with synchronised clocks; `fm bench` also times one full solve of the preset's sampler. On CPU
every trial runs in a fresh child process (forked from a trial server that imported torch once), so that a
trial that runs out of memory cannot poison the next one and the peak RSS belongs to that trial alone; on
CUDA it runs in-process with a fresh model and `empty_cache` between.

The autotuner doubles the batch from a small start until a trial fails (out of memory, or over the
`--max-memory` budget) or the throughput stops improving, then bisects between the last two sizes and
returns the fastest batch, or after a failure the largest safe one kept a margin below the failing size.
DDP runs never autotune: they use a result cached in the run directory (`autotune.json`, keyed by device
and preset).
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import distributed as D
from .config import Config, config_to_dict, resolve_without_data, validate_config
from .errors import RuntimeFailure, UsageError
from .fsutil import write_text_atomic
from .models import build_bench_model
from .step import TrainingStep


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


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

    Doubling stops at the first failing batch (`measure` raised torch.OutOfMemoryError / MemoryError,
    returned ok=False, or its peak memory crossed `max_memory_mib`), when `patience + 1` doublings in a
    row fail to beat the best throughput so far by `min_gain` (plateau; the patience absorbs one noisy
    trial on a shared machine), or at `max_batch`. After a failure the bisection narrows
    [largest ok, smallest failing] to 1/8 and the result stays `margin` below the smallest failing size;
    after a plateau it narrows [best, 2 x best] and returns the fastest measured batch.
    """
    trials: dict[int, Trial] = {}

    def run(b: int) -> Trial:
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
        ok = [t for t in trials.values() if t.ok]
        chosen = max(ok, key=lambda t: (t.throughput, t.batch)).batch
    elif stop == "max batch":
        ok = [t for t in trials.values() if t.ok]
        chosen = max(ok, key=lambda t: (t.throughput, t.batch)).batch
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


# ------------------------------------------------------------------------------------ measurement


@dataclass
class BenchSpec:
    """Everything one measurement needs; JSON-able so a subprocess can run it."""

    config: dict  # a resolved Config as a dict
    batch: int
    mode: str = "both"  # train | sample | both
    steps: int = 5
    warmup: int = 2
    precision: str = "fp32"
    compile: bool = False
    device: str = "cpu"
    impl: str = "fm"  # "fm" (our DiT) or "diffusers" (DiTTransformer2DModel)
    threads: int | None = None
    muon_ns_dtype: str | None = None  # Muon's Newton-Schulz dtype (fmcli.hardware.matmul_dtype); None = bf16
    sample_precision: str = "fp32"  # sampling's network precision and compile (sample.*, resolved by the parent
    sample_compile: bool = False  # as `fm sample` resolves them: generate.resolve_sampling_hardware)


def measure(spec: BenchSpec) -> dict:
    """Train and/or sampling throughput and peak memory of one (model, batch) in this process."""
    if spec.threads:
        torch.set_num_threads(spec.threads)
    cfg = validate_config(spec.config, source="bench")
    device = torch.device(spec.device)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_bench_model(cfg.model, spec.impl).to(device)
    out = {"impl": spec.impl, "batch": spec.batch, "params": sum(p.numel() for p in model.parameters())}
    try:
        if spec.mode in ("train", "both"):
            out["train"] = _measure_train(model, cfg, spec, device)
        if spec.mode in ("sample", "both"):
            out["sample"] = _measure_sample(model, cfg, spec, device)
        out["memory"] = _peak_memory(device)
    finally:
        del model
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    return out


def measure_isolated(spec: BenchSpec) -> dict:
    """`measure` in a fresh child process (CPU); {"oom": True, ...} if the child ran out of memory.

    A trial server (one subprocess per fm process) imports torch and fmcli once and forks a child per
    trial: each child starts clean (no allocator state, threads or memory of an earlier trial, its
    ru_maxrss is its own peak), without paying the import again as a plain subprocess would.
    """
    result = _trial_server().run(spec)
    if "error" in result:
        raise RuntimeFailure(f"bench trial at batch {spec.batch} failed: {result['error']}")
    return result


_SERVER = {}


def _trial_server() -> "_TrialServer":
    if "server" not in _SERVER:
        _SERVER["server"] = _TrialServer()
    return _SERVER["server"]


class _TrialServer:
    """The parent's handle on `python -m fmcli.autotune`: one JSON spec per line in, one result per line out."""

    def __init__(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(key, None)
        self.proc = subprocess.Popen([sys.executable, "-m", "fmcli.autotune"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        atexit.register(self.close)

    def run(self, spec: BenchSpec) -> dict:
        self.proc.stdin.write(json.dumps(asdict(spec)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeFailure(f"the bench trial server stopped (exit code {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _serve_trials() -> None:
    """Trial server loop: fork a fresh child per spec, report its result, or an OOM if the kernel killed it.

    The server itself never runs a tensor operation, so forking it is safe (no thread pools yet).
    """
    for line in sys.stdin:
        spec = json.loads(line)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, write one JSON document, leave without cleanup handlers
            os.close(read_fd)
            code = 0
            try:
                result = measure(BenchSpec(**spec))
            except (MemoryError, torch.OutOfMemoryError):
                result = {"oom": True, "batch": spec["batch"]}
            except BaseException as err:  # reported by the parent as a failure, never taken for an OOM
                result, code = {"error": f"{type(err).__name__}: {err}"}, 1
            with os.fdopen(write_fd, "w") as out:
                out.write(json.dumps(result))
            os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd) as inp:
            data = inp.read()
        _, status = os.waitpid(pid, 0)
        if data:
            result = json.loads(data)
        elif os.WIFSIGNALED(status):  # e.g. SIGKILL from the kernel's out-of-memory killer
            result = {"oom": True, "batch": spec["batch"], "signal": os.WTERMSIG(status)}
        else:
            result = {"error": f"trial exited with status {os.waitstatus_to_exitcode(status)} and no result"}
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, count: int, device: torch.device) -> float:
    """Seconds per call: median of per-call times on CPU (robust to a shared machine), mean on CUDA."""
    if count <= 0:
        return float("nan")
    if device.type == "cuda":
        _sync(device)
        start = time.perf_counter()
        for _ in range(count):
            fn()
        _sync(device)
        return (time.perf_counter() - start) / count
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure_train(model, cfg: Config, spec: BenchSpec, device: torch.device) -> dict:
    """Training throughput of `spec.steps` consecutive steps after `spec.warmup`: `img_per_s` is the loop's own
    statistic (images over the wall time of the whole block, as `fm train` logs it; a median of a few steps
    cannot stand for a run on a machine whose speed drifts), `img_per_s_median` the per-step median that
    ranks autotune trials (robust to one slow step)."""
    step = train_step_fn(model, cfg, spec, device)
    for _ in range(spec.warmup):
        step()
    _sync(device)
    marks = [time.perf_counter()]
    for _ in range(spec.steps):
        step()
        marks.append(time.perf_counter())
    _sync(device)
    marks[-1] = time.perf_counter()
    seconds = (marks[-1] - marks[0]) / spec.steps
    median = statistics.median(b - a for a, b in zip(marks, marks[1:])) if device.type == "cpu" else seconds
    return {
        "img_per_s": spec.batch / seconds, "step_ms": 1000 * seconds, "img_per_s_median": spec.batch / median,
        "compiled": step.compiled, "compile_warning": step.compile_warning,
    }  # fmt: skip


def train_step_fn(model, cfg: Config, spec: BenchSpec, device: torch.device) -> Callable[[], None]:
    """The real training step (step.TrainingStep, with EMA, coupling and conditioning) at batch
    `spec.batch` on synthetic data: one call = one optimizer step."""
    cfg = cfg.with_section("train", global_batch_size=spec.batch, micro_batch_size=None, precision=spec.precision)
    ctx = D.DistContext(device=device)
    m = cfg.model
    shape = (m.in_channels, m.image_size, m.image_size)
    text = _synthetic_text(cfg) if m.cross_attention else None
    step = TrainingStep(cfg, ctx, micro=spec.batch, accum=1, shape=shape, text=text, model=model, ns_dtype=spec.muon_ns_dtype)
    batches = synthetic_batches(cfg, spec.batch, device)
    compiled = step.wrap(spec.compile, next(batches))  # a failed compile runs eager; the parent reports it once
    count = {"n": 0}

    def one():
        step(batches, count["n"], count["n"])
        count["n"] += 1

    one.compiled, one.compile_warning = compiled, step.compile_warning
    return one


def synthetic_batches(cfg: Config, batch: int, device: torch.device) -> Iterator[dict]:
    """Micro-batches shaped like the preset's data: x (and x0 for reflow pairs), labels, and cached text
    states for text models."""
    m = cfg.model
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, m.in_channels, m.image_size, m.image_size, generator=gen)
    item = {"x": x}
    if cfg.flow.coupling == "pairs":  # reflow pairs carry their noise
        item["x0"] = torch.randn(batch, m.in_channels, m.image_size, m.image_size, generator=gen)
    if m.num_classes:
        item["y"] = torch.randint(0, m.num_classes, (batch,), generator=gen)
    if m.cross_attention:
        tokens = cfg.encoders.max_tokens
        item["text"] = torch.randn(batch, tokens, m.text_dim, generator=gen)
        item["text_mask"] = torch.ones(batch, tokens, dtype=torch.bool)
    while True:
        yield item


def _synthetic_text(cfg: Config):
    """TextConditioning without an encoder (the trial's batches carry cached states, as prepared data may)."""
    from .encoders import TextConditioning

    if cfg.model.text_dim is None:
        raise UsageError("autotune of a text model needs model.text_dim (resolved from the text encoder before tuning)")
    tokens, dim = cfg.encoders.max_tokens, cfg.model.text_dim
    mask = torch.zeros(1, tokens, dtype=torch.bool)
    mask[:, 0] = True
    return TextConditioning(None, torch.zeros(1, tokens, dim), mask)


def _measure_sample(model, cfg: Config, spec: BenchSpec, device: torch.device) -> dict:
    """Sampling throughput at the preset's solver, steps and CFG, on `fm sample`'s own path.

    The network is prepared by generate.prepare_for_sampling (at spec.sample_precision, compiled per
    spec.sample_compile: the parent resolved sample.precision / sample.compile with the function `fm sample`
    uses) and driven by generate.iterate_samples (per-index noise, labels cycling through the classes, guidance,
    the solver), so what is timed is what `fm sample` runs, less decoding and writing PNGs (and, for text
    models, the text encoder: synthetic states stand in for prompts).
    A fixed-step solve costs `steps` identical solver steps, so the clock runs over min(steps, spec.steps)
    of them (after a one-step warmup, which also compiles) and the full solve's time is scaled from it;
    `timed_steps` says how many ran. An adaptive dopri5 solve is timed whole.
    """
    from .generate import LoadedModel, iterate_samples, prepare_for_sampling

    m, b = cfg.model, spec.batch
    s = cfg.sample.model_copy(update={"precision": spec.sample_precision, "compile": spec.sample_compile})
    text = _SyntheticPrompts(_synthetic_text(cfg)) if m.cross_attention else None
    loaded = prepare_for_sampling(LoadedModel(model=model, config=cfg, info={}, step=0, text=text), s, device)
    prompts = [""] * b if text is not None else None
    nfe = {}

    def solve(steps: int) -> None:
        settings = s.model_copy(update={"steps": steps})
        for _, _, result in iterate_samples(loaded, list(range(b)), seed=0, sample_cfg=settings, batch_size=b, device=device, prompts=prompts):
            nfe["n"] = result.nfe

    timed = s.steps if s.solver == "dopri5" else min(s.steps, spec.steps)
    if spec.warmup and s.solver != "dopri5":
        solve(1)
    _sync(device)
    seconds = seconds_per_call(lambda: solve(timed), 1, device) * s.steps / timed
    full_nfe = nfe["n"] * s.steps // timed
    guided = bool(m.num_classes or m.cross_attention) and s.cfg != 1.0
    return {
        "solver": s.solver,
        "steps": s.steps,
        "timed_steps": timed,
        "cfg": s.cfg,
        "nfe": full_nfe,
        "forward_batch": 2 * b if guided else b,
        "img_per_s": b / seconds,
        "img_nfe_per_s": b * full_nfe / seconds,
        "seconds": seconds,
        "precision": loaded.model.precision,
        "compiled": loaded.model.compiled,  # false after a compile that failed and fell back to eager
    }


class _SyntheticPrompts:
    """Stands in for a text encoder in `fm bench`: every prompt becomes the same synthetic token states."""

    def __init__(self, text):
        self.text = text

    def conditions(self, prompts: list[str], device) -> tuple[dict, dict]:
        uncond = self.text.uncond(len(prompts), device)
        return {k: v.clone() for k, v in uncond.items()}, uncond


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
            "peak_rss_mib": None,
        }
    return {"peak_allocated_mib": None, "peak_reserved_mib": None, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def peak_of(result: dict) -> float | None:
    mem = result.get("memory") or {}
    return mem.get("peak_reserved_mib") if mem.get("peak_reserved_mib") is not None else mem.get("peak_rss_mib")


def autotune_training(cfg: Config, base: BenchSpec, *, max_memory_gib: float | None = None, max_batch: int = 4096, log=lambda s: None) -> AutotuneResult:
    """Autotune the training batch of `cfg` with trials of `base` (train mode only)."""
    if max_memory_gib is None and base.device == "cpu":
        max_memory_gib = _physical_memory_gib() / 2  # a shared CPU machine: never take more than half of it
    budget = None if max_memory_gib is None else max_memory_gib * 1024

    # Trials only need to rank batch sizes: a few timed steps each (the final report times --steps).
    quick = replace(base, mode="train", impl="fm", steps=min(base.steps, 3), warmup=min(base.warmup, 1))

    def trial(b: int) -> Trial:
        result = measure_any(replace(quick, batch=b))
        if result.get("oom"):
            log(f"  batch {b}: out of memory")
            return Trial(b, ok=False, reason="oom")
        t = Trial(b, ok=True, throughput=result["train"]["img_per_s_median"], memory_mib=peak_of(result))
        log(f"  batch {b}: {t.throughput:.1f} img/s, {t.memory_mib:.0f} MiB")
        return t

    return autotune(trial, start=min(4, max_batch), max_batch=max_batch, max_memory_mib=budget)


def measure_any(spec: BenchSpec) -> dict:
    """CPU: a fresh subprocess per measurement; CUDA: in-process, out-of-memory turned into {"oom": True}."""
    if spec.device == "cpu":
        return measure_isolated(spec)
    try:
        return measure(spec)
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return {"oom": True, "batch": spec.batch}


def _physical_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


# ------------------------------------------------------------------------- the autotune cache


def autotune_key(cfg: Config, device: torch.device, precision: str, compile: bool) -> str:
    """Cache key: the device name plus a hash of everything that changes a training step's memory and speed."""
    facts = {"model": config_to_dict(cfg)["model"], "precision": precision, "compile": compile, "optim": cfg.optim.name}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:12]
    return f"{device_name(device)}|{cfg.name}|{digest}"


def save_autotune_cache(run_dir: Path, cfg: Config, device: torch.device, precision: str, compile: bool, tuned: AutotuneResult) -> Path:
    """Add this result to run_dir/autotune.json (atomically: temp file + rename)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "autotune.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    best = next(t for t in tuned.trials if t.batch == tuned.batch) if any(t.batch == tuned.batch for t in tuned.trials) else None
    cache[autotune_key(cfg, device, precision, compile)] = {
        "batch": tuned.batch,
        "stop": tuned.stop,
        "img_per_s": best.throughput if best else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_text_atomic(path, json.dumps(cache, indent=2) + "\n")


def auto_micro_batch(cfg: Config, run_dir: Path, device: torch.device, world_size: int, log=lambda s: None, ns_dtype: str | None = None) -> int:
    """train.micro_batch_size="auto": the cached autotune result for this device + preset, else a fresh one.

    The micro batch is the largest divisor of global_batch_size / world_size not above the tuned batch.
    A DDP rank never autotunes: without a cached result it stops with a message.
    """
    from .hardware import resolve_compile

    cfg = resolve_without_data(cfg)
    precision = cfg.train.precision  # resolved by the caller (train.resolve_hardware): never "auto" here
    compile_on = resolve_compile(cfg.train.compile, device).compile
    key = autotune_key(cfg, device, precision, compile_on)
    path = Path(run_dir) / "autotune.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    if key in cache:
        tuned_batch = int(cache[key]["batch"])
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
        save_autotune_cache(run_dir, cfg, device, precision, compile_on, tuned)
        tuned_batch = tuned.batch
    per_rank = cfg.train.global_batch_size // world_size
    return max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= max(1, tuned_batch))


if __name__ == "__main__":
    _serve_trials()
