"""Measurement: the clocks, the real training step timed on synthetic data, peak memory, isolated trials.

A measurement builds the real training step (step.TrainingStep: model, fp32 EMA, optimizer, coupling, text
conditioning) on synthetic tensors shaped like the preset's data (no dataset is read) and times it after
warmup with synchronised clocks (`seconds_per_call` is also `fm train`'s clock for its budget). The
batch-size search (autotune.py) and `fm bench` (bench.py, which adds sampling throughput and the diffusers
comparison) both measure through here.

On CPU every measurement runs in a fresh child process (forked from a trial server that imported torch
once, `python -m fmcli.measure`), so that a trial that runs out of memory cannot poison the next one and
the peak RSS belongs to that trial alone; on CUDA it runs in-process with a fresh model and `empty_cache`
between. The caller names the function a trial runs (`measure`, or bench's `measure_bench`): the server
imports it by name, so this module never imports its callers.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from . import distributed as D
from .config import Config, validate_config
from .errors import RuntimeFailure, UsageError
from .models import build_bench_model
from .repa import untrained_encoder
from .step import TrainingStep


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@dataclass
class BenchSpec:
    """Everything one measurement needs; JSON-able so a subprocess can run it."""

    config: dict  # a resolved Config as a dict
    batch: int
    mode: str = "both"  # train | sample | both (sample: bench.measure_bench)
    steps: int = 5  # consecutive steps timed as one block (a round)
    warmup: int = 2
    rounds: int = 1  # timed rounds of `steps` each: their median and spread are reported (`timing_spread`)
    precision: str = "fp32"
    compile: bool = False
    device: str = "cpu"
    impl: str = "fm"  # "fm" (our DiT) or "diffusers" (DiTTransformer2DModel)
    threads: int | None = None
    muon_ns_dtype: str | None = None  # Muon's Newton-Schulz dtype (fmcli.hardware.matmul_dtype); None = bf16
    sample_precision: str = "fp32"  # sampling's network precision and compile (sample.*, resolved by the parent
    sample_compile: bool = False  # as `fm sample` resolves them: generate.resolve_sampling_hardware)
    other_config: dict | None = None  # bench.measure_interleaved: the second model, timed in rounds alternating
    other_impl: str | None = None  # with this one (None: the same config / impl)


# A part of a measurement beyond training: (model, cfg, spec, device) -> its figures (bench.sample_throughput).
Part = Callable[[torch.nn.Module, Config, BenchSpec, torch.device], dict]


def measure(spec: BenchSpec, sample: Part | None = None) -> dict:
    """Training throughput and peak memory of one (model, batch) in this process; with spec.mode "sample" or
    "both", `sample` (fm bench's sampling throughput) times the same model too."""
    if spec.mode in ("sample", "both") and sample is None:
        raise UsageError(f"mode {spec.mode!r} times sampling, which fm bench measures (bench.measure_bench)")
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
            out["train"] = train_throughput(model, cfg, spec, device)
        if spec.mode in ("sample", "both"):
            out["sample"] = sample(model, cfg, spec, device)
        out["memory"] = _peak_memory(device)
    finally:
        del model
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
    return out


def measure_any(spec: BenchSpec, fn: Callable[[BenchSpec], dict] = measure) -> dict:
    """`fn(spec)` (a module-level function: `measure` or bench.measure_bench). CPU: in a fresh child process
    (`measure_isolated`); CUDA: in-process, out-of-memory turned into {"oom": True}."""
    if spec.device == "cpu":
        return measure_isolated(spec, fn)
    try:
        return fn(spec)
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        gc.collect()
        torch.cuda.empty_cache()
        return {"oom": True, "batch": spec.batch}


def out_of_memory(err: BaseException) -> bool:
    """Whether a trial failed for want of memory (the batch does not fit): torch's OutOfMemoryError (CUDA), Python's
    MemoryError, or torch's CPU allocator refusing an allocation (a RuntimeError "DefaultCPUAllocator: can't
    allocate memory", where malloc fails: strict overcommit, `ulimit -v`, an allocation beyond the address space)."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err))


# ------------------------------------------------------------------------------ the trial server


def measure_isolated(spec: BenchSpec, fn: Callable[[BenchSpec], dict] = measure) -> dict:
    """`fn(spec)` in a fresh child process (CPU); {"oom": True, ...} if the child ran out of memory.

    A trial server (one subprocess per fm process) imports torch and fmcli once and forks a child per
    trial: each child starts clean (no allocator state, threads or memory of an earlier trial, its
    ru_maxrss is its own peak), without paying the import again as a plain subprocess would.
    """
    result = _trial_server().run(spec, f"{fn.__module__}:{fn.__qualname__}")
    if "error" in result:
        raise RuntimeFailure(f"bench trial at batch {spec.batch} failed: {result['error']}")
    return result


_SERVER = {}


def _trial_server() -> "_TrialServer":
    if "server" not in _SERVER:
        _SERVER["server"] = _TrialServer()
    return _SERVER["server"]


class _TrialServer:
    """The parent's handle on `python -m fmcli.measure`: one JSON request per line in, one result per line out."""

    def __init__(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(key, None)
        self.proc = subprocess.Popen([sys.executable, "-m", "fmcli.measure"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        atexit.register(self.close)

    def run(self, spec: BenchSpec, fn: str) -> dict:
        self.proc.stdin.write(json.dumps({"fn": fn, "spec": asdict(spec)}) + "\n")
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


def _trial_function(name: str) -> Callable[[BenchSpec], dict]:
    """`module:function` of fmcli, imported in the server before it forks (importing runs no tensor operation)."""
    module, _, function = name.partition(":")
    if module.partition(".")[0] != "fmcli" or not function.isidentifier():
        raise ValueError(f"a trial runs a function of fmcli, not {name!r}")
    return getattr(importlib.import_module(module), function)


def _serve_trials() -> None:
    """Trial server loop: fork a fresh child per request, report its result, or an OOM if the kernel killed it.

    The server itself never runs a tensor operation, so forking it is safe (no thread pools yet).
    """
    for line in sys.stdin:
        request = json.loads(line)
        spec, fn = request["spec"], _trial_function(request["fn"])
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: measure, write one JSON document, leave without cleanup handlers
            os.close(read_fd)
            code = 0
            try:
                result = fn(BenchSpec(**spec))
            except BaseException as err:  # an OOM is a result (the batch does not fit); anything else a failure
                if out_of_memory(err):
                    result = {"oom": True, "batch": spec["batch"]}
                else:  # reported by the parent as a failure, never taken for an OOM
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


# ------------------------------------------------------------------------------------------ clocks


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it times that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, count: int, device: torch.device) -> float:
    """Seconds per call: median of per-call times on CPU (robust to a shared machine), mean on CUDA."""
    if count <= 0:
        return float("nan")
    if device.type == "cuda":
        sync(device)
        start = time.perf_counter()
        for _ in range(count):
            fn()
        sync(device)
        return (time.perf_counter() - start) / count
    times = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ------------------------------------------------------------------------------- the training step


def timing_spread(values: list[float]) -> dict:
    """Median and spread of a measurement repeated in rounds: min, max and the relative range
    (max - min) / median (0 for one round: a single round has no spread to show, `n` says so)."""
    if not values:
        raise ValueError("timing_spread needs at least one value")
    med, lo, hi = statistics.median(values), min(values), max(values)
    return {"n": len(values), "median": med, "min": lo, "max": hi, "rel_spread": (hi - lo) / med if med > 0 else float("inf")}


def timed_block(fn: Callable[[], None], count: int, device: torch.device) -> list[float]:
    """Clock marks around `count` consecutive calls of fn (synchronised before the first and after the last):
    count + 1 marks, so the block's wall time is marks[-1] - marks[0] and the per-call times their differences."""
    sync(device)
    marks = [time.perf_counter()]
    for _ in range(count):
        fn()
        marks.append(time.perf_counter())
    sync(device)
    marks[-1] = time.perf_counter()
    return marks


def train_throughput(model, cfg: Config, spec: BenchSpec, device: torch.device) -> dict:
    """Training throughput over `spec.rounds` rounds of `spec.steps` consecutive steps after `spec.warmup`.
    A round's time is the loop's own statistic (the wall time of the whole block, as `fm train` logs it; a
    median of single steps cannot stand for a run on a machine whose speed drifts); `step_ms` / `img_per_s`
    are the median round's, `step_ms_rounds` and `step_ms_spread` every round and their spread;
    `img_per_s_median` is the per-step median that ranks autotune trials (robust to one slow step)."""
    step = train_step_fn(model, cfg, spec, device)
    for _ in range(spec.warmup):
        step()
    rounds, per_step = [], []
    for _ in range(max(1, spec.rounds)):
        marks = timed_block(step, spec.steps, device)
        rounds.append((marks[-1] - marks[0]) / spec.steps)
        per_step += [b - a for a, b in zip(marks, marks[1:])]
    seconds = statistics.median(rounds)
    median = statistics.median(per_step) if device.type == "cpu" else seconds
    return {
        "img_per_s": spec.batch / seconds, "step_ms": 1000 * seconds, "img_per_s_median": spec.batch / median,
        "step_ms_rounds": [1000 * r for r in rounds], "step_ms_spread": timing_spread([1000 * r for r in rounds]),
        "steps_per_round": spec.steps, "compiled": step.compiled, "compile_warning": step.compile_warning,
    }  # fmt: skip


def train_step_fn(model, cfg: Config, spec: BenchSpec, device: torch.device) -> Callable[[], None]:
    """The real training step (step.TrainingStep, with EMA, coupling and conditioning) at batch
    `spec.batch` on synthetic data: one call = one optimizer step."""
    if spec.precision not in ("fp32", "bf16", "fp16"):  # an unresolved "auto" would reach autocast as fp16
        raise UsageError(f"a measurement needs a resolved precision (fp32, bf16 or fp16), not {spec.precision!r} (fmcli.hardware.resolve_hardware)")
    cfg = cfg.with_section("train", global_batch_size=spec.batch, micro_batch_size=None, precision=spec.precision)
    ctx = D.DistContext(device=device)
    m = cfg.model
    shape = (m.in_channels, m.image_size, m.image_size)
    text = synthetic_text(cfg) if m.cross_attention else None
    encoder = None if cfg.repa.encoder != "domain" else untrained_encoder(cfg)  # REPA's cost does not depend on its weights
    step = TrainingStep(cfg, ctx, micro=spec.batch, accum=1, shape=shape, text=text, model=model, ns_dtype=spec.muon_ns_dtype, encoder=encoder)
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


def synthetic_text(cfg: Config):
    """TextConditioning without an encoder (the trial's batches carry cached states, as prepared data may)."""
    from .encoders import TextConditioning

    if cfg.model.text_dim is None:
        raise UsageError("autotune of a text model needs model.text_dim (resolved from the text encoder before tuning)")
    tokens, dim = cfg.encoders.max_tokens, cfg.model.text_dim
    mask = torch.zeros(1, tokens, dtype=torch.bool)
    mask[:, 0] = True
    return TextConditioning(None, torch.zeros(1, tokens, dim), mask)


# ------------------------------------------------------------------------------------------- memory


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


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group: the fm process reports it (one line, exit 130); the server and its
    # trial children just end, without a KeyboardInterrupt traceback each (or a BrokenPipeError from a child
    # whose server already left). SIGTERM already ends them so.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _serve_trials()
