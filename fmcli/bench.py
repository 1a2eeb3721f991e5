"""Batch-size autotune and the throughput / memory / FLOPs report behind `fm bench`.

One measurement builds a fresh model and optimizer, feeds synthetic tensors shaped like the preset's data
(no dataset is read), and times training steps (forward + backward + optimizer step) and one full solve
of the preset's sampler, after warmup and with synchronised clocks. On CPU every measurement runs in a
fresh child process (forked from a trial server that imported torch once), so that a trial that runs out
of memory cannot poison the next one and the peak RSS belongs to that trial alone; on CUDA it runs
in-process with a fresh model and `empty_cache` between.

The autotuner doubles the batch from a small start until a trial fails (out of memory, or over the
`--max-memory` budget) or the throughput stops improving, then bisects between the last two sizes and
returns the fastest batch, or after a failure the largest safe one kept a margin below the failing size. DDP runs never autotune:
they use a result cached in the run directory (`autotune.json`, keyed by device and preset).
"""

from __future__ import annotations

import atexit
import contextlib
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
from typing import Callable

import torch
import torch.nn as nn

from .config import Config, config_to_dict, validate_config
from .errors import RuntimeFailure, UsageError

# Peak dense (no sparsity) bf16 tensor FLOP/s of known accelerators, matched against the device name in
# order (most specific first). Vendor datasheet numbers; MFU is always reported against these.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], float]] = [
    (("gh200",), 989e12),
    (("h200",), 989e12),
    (("h100", "pcie"), 756e12),
    (("h100", "nvl"), 835e12),
    (("h100",), 989e12),
    (("h800",), 989e12),
    (("b200",), 2250e12),
    (("a100",), 312e12),
    (("a800",), 312e12),
    (("a10g",), 70e12),
    (("a10",), 125e12),
    (("l40s",), 362e12),
    (("l40",), 181e12),
    (("l4",), 121e12),
    (("4090",), 165e12),
    (("3090",), 71e12),
    (("a6000", "ada"), 182e12),
    (("a6000",), 155e12),
]

# Data shapes (channels, image size, classes) of the sources whose shape is known without the data.
KNOWN_SOURCE_SHAPES = {"cifar10": (3, 32, 10), "mnist": (1, 28, 10)}

MODES = ("train", "sample", "both")
PRECISIONS = ("bf16", "fp16", "fp32")


# ------------------------------------------------------------------------------------ configuration


def resolve_bench_config(cfg: Config) -> Config:
    """Fill model.image_size / in_channels / num_classes without a dataset (bench uses synthetic tensors).

    Unset fields come from a prepared dataset at data.path when there is one, else from the source:
    shapes = 3 channels at data.image_size with 10 classes, cifar10 = 3x32x32 / 10, mnist = 1x28x28 / 10.
    Other sources need the three fields set in the preset (or with --set).
    """
    m = cfg.model
    if None not in (m.image_size, m.in_channels, m.num_classes):
        return cfg
    manifest_path = Path(cfg.data.path) / "manifest.json" if cfg.data.path else None
    if manifest_path is not None and manifest_path.exists():
        from .train import resolve_data_fields

        return resolve_data_fields(cfg, json.loads(manifest_path.read_text()))
    if cfg.data.source == "shapes":
        facts = (3, cfg.data.image_size, 10)
    elif cfg.data.source in KNOWN_SOURCE_SHAPES:
        facts = KNOWN_SOURCE_SHAPES[cfg.data.source]
    else:
        raise UsageError(
            f"data.source={cfg.data.source!r}: set model.image_size, model.in_channels and model.num_classes "
            "(e.g. --set model.image_size=32) so bench knows the input shape without the dataset"
        )
    update = {k: v for k, v in zip(("in_channels", "image_size", "num_classes"), facts) if getattr(m, k) is None}
    return cfg.model_copy(update={"model": m.model_copy(update=update)})


# ------------------------------------------------------------------------------------------ FLOPs


def dit_forward_flops(model_cfg) -> int:
    """Analytic forward FLOPs per image of fmcli's DiT (2 FLOPs per multiply-add, matmuls only).

    N = (image/patch)^2 tokens of width D; per block: qkv 3*N*D*D, attention scores N*N*D and values
    N*N*D, projection N*D*D, MLP 2*N*D*H, adaLN modulation D*6D; plus the patch embedding N*(C*p*p)*D,
    the timestep MLP (256*D + D*D), and the final layer (D*2D modulation + N*D*p*p*C). Norms, softmax and
    activations are elementwise and not counted (as in the usual 6*N*params estimates).
    """
    m = model_cfg
    if m.cross_attention:
        raise UsageError("analytic FLOPs are not modelled for cross-attention DiTs yet")
    d, p, c = m.hidden_size, m.patch_size, m.in_channels
    n = (m.image_size // p) ** 2
    hidden = int(d * m.mlp_ratio)
    per_block = 3 * n * d * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden + d * 6 * d
    macs = n * c * p * p * d + (256 * d + d * d) + m.depth * per_block + d * 2 * d + n * d * p * p * c
    return 2 * macs


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a known GPU name, else None (CPU or unknown card: MFU is null)."""
    name = device_name.lower()
    for keys, flops in PEAK_BF16_FLOPS:
        if all(k in name for k in keys):
            return flops
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# -------------------------------------------------------------------------------------- autotune


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
    """The parent's handle on `python -m fmcli.bench`: one JSON spec per line in, one result per line out."""

    def __init__(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
        for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            env.pop(key, None)
        self.proc = subprocess.Popen([sys.executable, "-m", "fmcli.bench"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
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


def build_bench_model(model_cfg, impl: str = "fm") -> nn.Module:
    """Our DiT, or diffusers' DiTTransformer2DModel configured to the same size behind the same contract."""
    if impl == "fm":
        from .models import build_model

        return build_model(model_cfg)
    if impl == "diffusers":
        from .models.diffusers_dit import DiffusersDiT

        return DiffusersDiT(model_cfg)
    raise UsageError(f"unknown model implementation {impl!r}")


def _autocast(precision: str, device: torch.device):
    if precision == "fp32" or (precision == "fp16" and device.type == "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, count: int, device: torch.device) -> float:
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


def _measure_train(model: nn.Module, cfg: Config, spec: BenchSpec, device: torch.device) -> dict:
    step = train_step_fn(model, cfg, spec, device)
    for _ in range(spec.warmup):
        step()
    _sync(device)
    seconds = _timed(step, spec.steps, device)
    return {"img_per_s": spec.batch / seconds, "step_ms": 1000 * seconds}


def train_step_fn(model: nn.Module, cfg: Config, spec: BenchSpec, device: torch.device) -> Callable[[], None]:
    """One training step on synthetic data, as train.py takes it: path, loss, backward, clip, optimizer."""
    from .flow import flow_matching_loss, interpolate, sample_times
    from .train import build_optimizer

    model.train()
    optimizer = build_optimizer(model, cfg.optim)
    forward = torch.compile(model) if spec.compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=spec.precision == "fp16" and device.type == "cuda")
    m, b = cfg.model, spec.batch
    x1 = torch.randn(b, m.in_channels, m.image_size, m.image_size, device=device)
    y = torch.randint(0, max(1, m.num_classes), (b,), device=device) if m.num_classes else None
    cond = {"y": y} if y is not None else {}
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    autocast = _autocast(spec.precision, device)

    def step():
        t = sample_times(b, cfg.flow.time_sampler, logit_mean=cfg.flow.logit_mean, logit_std=cfg.flow.logit_std, shift=cfg.flow.shift, device=device)
        xt, ut = interpolate(torch.randn_like(x1), x1, t, cfg.flow.sigma_min)
        with autocast:
            loss = flow_matching_loss(forward(xt, t, **cond), ut)
        scaler.scale(loss).backward()
        for o in optimizer.optimizers:
            scaler.unscale_(o)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        for o in optimizer.optimizers:
            scaler.step(o)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def _measure_sample(model: nn.Module, cfg: Config, spec: BenchSpec, device: torch.device) -> dict:
    """Sampling throughput at the preset's solver, steps and CFG.

    A fixed-step solve costs `steps` identical solver steps, so the clock runs over min(steps, spec.steps)
    of them (after a one-step warmup) and the full solve's time is scaled from it; `timed_steps` says how
    many ran. An adaptive dopri5 solve is timed whole.
    """
    from .generate import sample_batch

    model.eval()
    m, b, s = cfg.model, spec.batch, cfg.sample
    x0 = torch.randn(b, m.in_channels, m.image_size, m.image_size, device=device)
    labels = torch.arange(b, device=device) % m.num_classes if m.num_classes else None
    autocast = _autocast(spec.precision, device)
    nfe = {}

    def solve(sample_cfg):
        with autocast:
            nfe["n"] = sample_batch(model, x0, labels, sample_cfg, shift=cfg.flow.shift).nfe

    timed = s.steps if s.solver == "dopri5" else min(s.steps, spec.steps)
    if spec.warmup and s.solver != "dopri5":
        solve(s.model_copy(update={"steps": 1}))
    _sync(device)
    seconds = _timed(lambda: solve(s.model_copy(update={"steps": timed})), 1, device) * s.steps / timed
    full_nfe = nfe["n"] * s.steps // timed
    guided = bool(m.num_classes) and s.cfg != 1.0
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
    }


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20,
            "peak_rss_mib": None,
        }
    return {"peak_allocated_mib": None, "peak_reserved_mib": None, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _peak_of(result: dict) -> float | None:
    mem = result.get("memory") or {}
    return mem.get("peak_reserved_mib") if mem.get("peak_reserved_mib") is not None else mem.get("peak_rss_mib")


# ----------------------------------------------------------------------------------- the command


@dataclass
class BenchOptions:
    batch_size: int | None = None  # None = autotune
    mode: str = "both"
    steps: int = 5
    warmup: int = 2
    precision: str | None = None  # None = the preset's train.precision
    compile: bool = False
    max_memory_gib: float | None = None
    max_batch: int | None = None  # None = train.global_batch_size (a micro batch never exceeds it)
    compare: str | None = None
    device: str = "auto"
    run_dir: Path | None = None


def run_bench(cfg: Config, opts: BenchOptions, log: Callable[[str], None] = lambda s: None) -> dict:
    """The whole `fm bench`: resolve, autotune (unless a batch is given), measure ours (and diffusers')."""
    if opts.mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {opts.mode!r}")
    precision = opts.precision or cfg.train.precision
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if opts.compare not in (None, "diffusers"):
        raise UsageError(f"--compare supports 'diffusers' only, not {opts.compare!r}")
    if opts.steps < 1 or opts.warmup < 0:
        raise UsageError("--steps must be >= 1 and --warmup >= 0")
    if cfg.model.arch != "dit":
        raise UsageError(f"fm bench supports model.arch='dit' only (got {cfg.model.arch!r})")
    cfg = resolve_bench_config(cfg)
    if opts.compare and cfg.optim.name != "adamw":
        # Muon picks fm's matrices by module name, which diffusers' model does not share: compare at equal optimizer.
        log(f"--compare: both models train with AdamW (the preset's optim.name is {cfg.optim.name!r})")
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"name": "adamw"})})
    from .distributed import resolve_device

    device = resolve_device(opts.device)
    name = device_name(device)
    flops_fwd = dit_forward_flops(cfg.model)
    peak = peak_flops(name) if device.type == "cuda" else None
    base = BenchSpec(config=config_to_dict(cfg), batch=1, steps=opts.steps, warmup=opts.warmup, precision=precision, compile=opts.compile, device=device.type)

    tuned = None
    batch = opts.batch_size
    if batch is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UsageError("batch-size autotune never runs inside a DDP run (WORLD_SIZE > 1); pass --batch-size N")
        log(f"autotuning the training batch size on {name}")
        max_batch = opts.max_batch or cfg.train.global_batch_size
        tuned = autotune_training(cfg, base, max_memory_gib=opts.max_memory_gib, max_batch=max_batch, log=log)
        batch = tuned.batch
        if opts.run_dir is not None:
            save_autotune_cache(opts.run_dir, cfg, device, precision, opts.compile, tuned)

    impls = ["fm"] + (["diffusers"] if opts.compare else [])
    results = {}
    for impl in impls:
        log(f"measuring {impl} at batch {batch} ({opts.mode}, {precision})")
        results[impl] = _measure_any(replace(base, batch=batch, mode=opts.mode, impl=impl))
        if results[impl].get("oom"):
            raise RuntimeFailure(f"{impl} at batch {batch} ran out of memory; pass a smaller --batch-size")

    report = {
        "preset": cfg.name,
        "device": name,
        "precision": precision,
        "compile": opts.compile,
        "mode": opts.mode,
        "batch_size": batch,
        "model": {k: getattr(cfg.model, k) for k in ("arch", "hidden_size", "depth", "heads", "patch_size", "mlp_ratio", "image_size", "in_channels", "num_classes")},
        "flops_per_image": {"forward": flops_fwd, "train": 3 * flops_fwd},
        "peak_flops": peak,
        "autotune": None if tuned is None else {"stop": tuned.stop, "chosen": tuned.batch, "trials": [asdict(t) for t in tuned.trials]},
    }
    report.update(_summarise(results["fm"], flops_fwd, peak, cfg))
    if opts.compare:
        theirs = _summarise(results["diffusers"], flops_fwd, peak, cfg)
        ratio = {}
        for part in ("train", "sample"):
            if part in theirs and part in report:
                ratio[part] = report[part]["img_per_s"] / theirs[part]["img_per_s"]
        report["compare"] = {"diffusers": theirs, "ratio": ratio}
    return report


def autotune_training(cfg: Config, base: BenchSpec, *, max_memory_gib: float | None = None, max_batch: int = 4096, log=lambda s: None) -> AutotuneResult:
    """Autotune the training batch of `cfg` with trials of `base` (train mode only)."""
    if max_memory_gib is None and base.device == "cpu":
        max_memory_gib = _physical_memory_gib() / 2  # a shared CPU machine: never take more than half of it
    budget = None if max_memory_gib is None else max_memory_gib * 1024

    # Trials only need to rank batch sizes: a few timed steps each (the final report times --steps).
    quick = replace(base, mode="train", impl="fm", steps=min(base.steps, 3), warmup=min(base.warmup, 1))

    def trial(b: int) -> Trial:
        result = _measure_any(replace(quick, batch=b))
        if result.get("oom"):
            log(f"  batch {b}: out of memory")
            return Trial(b, ok=False, reason="oom")
        t = Trial(b, ok=True, throughput=result["train"]["img_per_s"], memory_mib=_peak_of(result))
        log(f"  batch {b}: {t.throughput:.1f} img/s, {t.memory_mib:.0f} MiB")
        return t

    return autotune(trial, start=min(4, max_batch), max_batch=max_batch, max_memory_mib=budget)


def _measure_any(spec: BenchSpec) -> dict:
    """CPU: a fresh subprocess per measurement; CUDA: in-process, out-of-memory turned into {"oom": True}."""
    if spec.device == "cpu":
        return measure_isolated(spec)
    try:
        return measure(spec)
    except torch.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        return {"oom": True, "batch": spec.batch}


def _summarise(result: dict, flops_fwd: int, peak: float | None, cfg: Config) -> dict:
    out = {"params": result["params"], "memory": result["memory"]}
    if "train" in result:
        tr = dict(result["train"])
        tr["mfu"] = None if peak is None else tr["img_per_s"] * 3 * flops_fwd / peak
        out["train"] = tr
    if "sample" in result:
        sa = dict(result["sample"])
        # Each NFE is a forward of the (possibly CFG-doubled) batch: FLOPs per image = fwd * nfe * (2 if guided).
        per_image = flops_fwd * sa["nfe"] * sa["forward_batch"] / result["batch"]
        sa["flops_per_image"] = per_image
        sa["mfu"] = None if peak is None else sa["img_per_s"] * per_image / peak
        out["sample"] = sa
    return out


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
    tmp = path.with_name(f".autotune.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(cache, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def auto_micro_batch(cfg: Config, run_dir: Path, device: torch.device, world_size: int, log=lambda s: None) -> int:
    """train.micro_batch_size="auto": the cached autotune result for this device + preset, else a fresh one.

    The micro batch is the largest divisor of global_batch_size / world_size not above the tuned batch.
    A DDP rank never autotunes: without a cached result it stops with a message.
    """
    cfg = resolve_bench_config(cfg)
    precision = cfg.train.precision
    key = autotune_key(cfg, device, precision, cfg.train.compile)
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
        base = BenchSpec(config=config_to_dict(cfg), batch=1, steps=3, warmup=1, precision=precision, compile=cfg.train.compile, device=device.type)
        tuned = autotune_training(cfg, base, max_batch=per_rank, log=log)
        save_autotune_cache(run_dir, cfg, device, precision, cfg.train.compile, tuned)
        tuned_batch = tuned.batch
    per_rank = cfg.train.global_batch_size // world_size
    return max(d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= max(1, tuned_batch))


if __name__ == "__main__":
    _serve_trials()
