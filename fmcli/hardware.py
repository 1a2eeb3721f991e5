"""What this machine does well: device, precision and compile choice from a measured probe, cached per machine.

`train.precision` / `train.compile` (once per run, before any step) and `sample.precision` / `sample.compile`
(once per sampling command, on the machine that samples) are resolved here, by the same rules; `autocast` is
the one autocast context of training, sampling and the probe.

- Precision on CUDA: bf16 when the card supports it, else fp32. On a CPU: a short measured probe (a GEMM
  of the model's width in fp32 and bf16, plus one forward/backward of the model in each when it is cheap)
  picks bf16 only where it is measurably faster. CPUs differ by orders of magnitude here: with AMX or
  AVX512-BF16 a bf16 GEMM is 2-20x faster than fp32, without them it can be 500x *slower* (emulated).
- The probe's result is cached per machine (CPU model, bf16-relevant flags, cores + torch version + device +
  threads) in `$XDG_CACHE_HOME/fm/probe.json` (default `~/.cache/fm`), so it costs its few seconds once
  (processes started together take turns: one measures, the others read its result). A
  cached entry is used only when it is well-formed, consistent with its own numbers, plausible for the CPU's
  flags, and not a bf16 verdict on a CPU without native bf16; anything else is measured again.
- `FM_PROBE_FORCE=bf16-slow|bf16-fast` (for tests only) replaces the measurement with a made-up one.
- Compile "auto": on where inductor works (a CUDA device with triton, or a CPU with a working C++
  compiler); a compile that fails anyway falls back to eager with one warning (`compile_with_fallback`).
- `environment_report()` is everything `fm env` prints.

`resolve_hardware` (training) and `resolve_model_precision` (training and sampling) take a config and build
the model-shaped probe step (`precision_probe_step`); the probe itself takes the step to time as a callable.
No imports from above the parts layer (config is read by attribute, never imported).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from .errors import UsageError
from .fsutil import folder_lock, write_text_atomic

FORCE_ENV = "FM_PROBE_FORCE"  # tests only: "bf16-slow" | "bf16-fast" replaces the measurement
FORCED = ("bf16-slow", "bf16-fast")
PRECISION_SETTINGS = ("auto", "bf16", "fp16", "fp32")
PrecisionSetting = Literal[PRECISION_SETTINGS]  # type: ignore[valid-type]  (train.precision, sample.precision)
COMPILE_SETTINGS = (True, False, "auto")
CompileSetting = bool | Literal["auto"]  # train.compile, sample.compile (resolve_compile)
DEVICE_SETTINGS = ("auto", "cpu", "cuda")
DeviceSetting = Literal[DEVICE_SETTINGS]  # type: ignore[valid-type]  (train.device, every --device)
PROBE_VERSION = 2  # bump when the probe's method changes: old cached results are then ignored

# bf16 must beat fp32 by this factor to be chosen: it costs precision, so a tie goes to fp32.
MIN_STEP_SPEEDUP = 1.1  # measured on a forward/backward of the model
MIN_GEMM_SPEEDUP = 2.0  # from the GEMM alone (no model step measured): GEMMs overstate the step's gain
STEP_PROBE_MAX_S = 2.0  # a model whose fp32 forward/backward takes longer is judged on the GEMM alone
SLOW_BF16_FACTOR = 3.0  # a bf16 model step whose warm-up is this many times fp32's (and slow) is not timed again
GEMM_ONCE_S = 1.0  # a probe GEMM whose first call takes longer is timed by that call alone (warm-up included)
OPTIONAL_EXTRAS = {"plot": "matplotlib", "wandb": "wandb", "tensorboard": "tensorboard", "demo": "gradio", "test": "pytest"}


# ------------------------------------------------------------------------------------------- facts


@dataclass
class CpuInfo:
    model: str
    flags: dict  # avx2, avx512f, avx512_bf16, amx_tile, amx_bf16 -> bool
    cores: int  # usable by this process (affinity)
    threads: int  # torch intra-op threads

    @property
    def native_bf16(self) -> bool:
        return self.flags["avx512_bf16"] or self.flags["amx_bf16"]


def cpu_info() -> CpuInfo:
    """CPU model and the instruction-set flags that decide bf16 speed (from /proc/cpuinfo on Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    wanted = {
        "avx2": "avx2" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags or bool(torch.cpu._is_avx512_bf16_supported()),
        "amx_tile": "amx_tile" in flags or bool(torch.cpu._is_amx_tile_supported()),
        "amx_bf16": "amx_bf16" in flags,
    }
    wanted["amx_bf16"] = wanted["amx_bf16"] or wanted["amx_tile"]
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return CpuInfo(model=model, flags=wanted, cores=cores, threads=torch.get_num_threads())


def machine_key(device: torch.device, cpu: CpuInfo | None = None) -> str:
    """What the probe's result depends on: CPU (or GPU) model, torch version, device, threads; on a CPU also
    its bf16-relevant flags and core count, since a model name alone ("AMD EPYC" on some VMs) covers
    generations with and without native bf16, and a shared home directory or CI cache must not carry a
    verdict from one to the other."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}|cuda"
    cpu = cpu or cpu_info()
    flags = "+".join(k for k, v in cpu.flags.items() if v) or "no avx2/avx512/amx"
    return f"{cpu.model}|{flags}|{cpu.cores} cores|torch {torch.__version__}|cpu|{cpu.threads} threads"


def resolve_device(name: str, key: str = "--device") -> torch.device:
    """auto|cpu|cuda -> a torch.device: THE "auto" device rule (CUDA when there is one), for every command and
    rank; `key` names the setting in errors (`--device`, `train.device`)."""
    said = f"{key} {name}" if key.startswith("-") else f"{key}={name}"
    if name not in DEVICE_SETTINGS:
        raise UsageError(f"{key} must be auto, cpu or cuda, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{said} but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/fm, else ~/.cache/fm (tests point XDG_CACHE_HOME at a temporary directory)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fm"


# ------------------------------------------------------------------------------------------ the probe


@dataclass
class Probe:
    """fp32 vs bf16 on this device: measured (or cached, or forced for tests) and the choice made from it."""

    device: str
    width: int
    gemm_gflops: dict  # {"fp32": GFLOP/s, "bf16": GFLOP/s} of a [1024, width] x [width, 4*width] GEMM
    gemm_speedup: float  # bf16 GFLOP/s / fp32 GFLOP/s
    step_ms: dict | None = None  # {"fp32": ms, "bf16": ms} of one forward/backward of the model, when measured
    step_speedup: float | None = None  # fp32 ms / bf16 ms
    precision: str = "fp32"  # what train.precision="auto" becomes
    matmul_dtype: str = "fp32"  # the faster dtype for plain matmuls (Muon's orthogonalisation)
    source: str = "measured"  # measured | cache | forced
    seconds: float = 0.0  # time the measurement took
    key: str = ""

    def summary(self) -> str:
        parts = [f"GEMM bf16/fp32 {self.gemm_speedup:.2f}x ({self.gemm_gflops['bf16']:.1f} vs {self.gemm_gflops['fp32']:.1f} GFLOP/s)"]
        if self.step_speedup is not None:
            parts.insert(0, f"model fwd/bwd bf16 {self.step_speedup:.2f}x fp32 ({self.step_ms['bf16']:.0f} vs {self.step_ms['fp32']:.0f} ms)")
        where = {"measured": f"measured in {self.seconds:.1f} s", "cache": "cached", "forced": f"forced by {FORCE_ENV}"}[self.source]
        return "; ".join(parts) + f"; {where}"


def probe_cpu(width: int, model_step: Callable[[str], None] | None = None, step_key: str | None = None, *, use_cache: bool = True) -> Probe:
    """Measure (or read from the cache) how bf16 compares with fp32 on this CPU for a model of `width`.

    `model_step(precision)` runs one forward/backward of the model at "fp32" or "bf16"; `step_key` names
    that workload in the cache (model config + batch). Without them only the GEMM is measured.
    """
    forced = os.environ.get(FORCE_ENV)
    if forced:
        return _forced_probe(forced, width)
    device = torch.device("cpu")
    workload = f"w{width}" + (f"|{step_key}" if model_step is not None and step_key else "")
    cpu = cpu_info()
    key = machine_key(device, cpu)
    if not use_cache:
        return _measure(width, model_step, key)
    with folder_lock(cache_dir()):  # runs started together: one measures (undisturbed by the other), the rest read it
        if (hit := _cached_probe(key, workload, width, cpu)) is not None:
            return hit
        probe = _measure(width, model_step, key)
        _write_cache(key, workload, probe)
    return probe


def _measure(width: int, model_step: Callable[[str], None] | None, key: str) -> Probe:
    """The probe, measured now: the GEMM at `width` in fp32 and bf16, and `model_step` in each where given."""
    start = time.perf_counter()
    gemm = _gemm_gflops(width)
    gemm_speedup = gemm["bf16"] / gemm["fp32"]
    step_ms = _step_ms(model_step) if model_step is not None else None
    step_speedup = step_ms["fp32"] / step_ms["bf16"] if step_ms else None
    return Probe(
        device="cpu",
        width=width,
        gemm_gflops=gemm,
        gemm_speedup=gemm_speedup,
        step_ms=step_ms,
        step_speedup=step_speedup,
        precision=_choose(gemm_speedup, step_speedup),
        matmul_dtype=_matmul_choice(gemm_speedup),
        source="measured",
        seconds=time.perf_counter() - start,
        key=key,
    )


def _choose(gemm_speedup: float, step_speedup: float | None) -> str:
    if step_speedup is not None:
        return "bf16" if step_speedup >= MIN_STEP_SPEEDUP else "fp32"
    return "bf16" if gemm_speedup >= MIN_GEMM_SPEEDUP else "fp32"


def _matmul_choice(gemm_speedup: float) -> str:
    return "bf16" if gemm_speedup >= 1.2 else "fp32"


def _forced_probe(forced: str, width: int) -> Probe:
    if forced not in FORCED:
        raise UsageError(f"{FORCE_ENV}={forced!r}: expected one of {', '.join(FORCED)} (a test-only setting; unset it to measure)")
    # Made-up numbers in the shape of real ones: an AVX2-only Zen 3 (bf16 emulated) vs an AMX Xeon.
    fast = forced == "bf16-fast"
    gemm = {"fp32": 150.0, "bf16": 1500.0 if fast else 0.3}
    step = {"fp32": 100.0, "bf16": 60.0 if fast else 2000.0}
    return Probe(
        device="cpu", width=width, gemm_gflops=gemm, gemm_speedup=gemm["bf16"] / gemm["fp32"], step_ms=step,
        step_speedup=step["fp32"] / step["bf16"], precision="bf16" if fast else "fp32", matmul_dtype="bf16" if fast else "fp32",
        source="forced", key=machine_key(torch.device("cpu")),
    )


def _gemm_gflops(width: int, rounds: int = 3, round_s: float = 0.05) -> dict:
    """Best GFLOP/s of a [1024, width] x [width, 4*width] GEMM (a DiT MLP's shape), fp32 and bf16 interleaved.

    Each dtype's first call (allocation, kernel selection, JIT: up to a few times a call) is a warm-up, never
    its timing, unless it took over GEMM_ONCE_S (bf16 emulated at a large width). A dtype whose timed call
    already takes longer than a round is timed once: it is slow, and how slow matters little.
    """
    m, k, n = 1024, width, 4 * width
    flops = 2 * m * k * n
    gen = torch.Generator().manual_seed(0)
    mats = {p: (torch.randn(m, k, generator=gen).to(dt), torch.randn(k, n, generator=gen).to(dt)) for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    best = {}
    for p, (a, b) in mats.items():  # warmup (first-call allocation and kernel selection), untimed unless slow itself
        for _ in range(2):
            start = time.perf_counter()
            a @ b
            best[p] = time.perf_counter() - start
            if best[p] > GEMM_ONCE_S:  # so slow that its one-off costs are a small share, and a second call costs much
                break
    for _ in range(rounds):
        for p, (a, b) in mats.items():
            if best[p] > round_s:
                continue
            reps = max(1, int(round_s / max(best[p], 1e-6)))
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            best[p] = min(best[p], (time.perf_counter() - start) / reps)
    return {p: flops / s / 1e9 for p, s in best.items()}


def _step_ms(model_step: Callable[[str], None], rounds: int = 2) -> dict | None:
    """Best milliseconds of the model's forward/backward per precision, interleaved; None when too slow.

    A bf16 warm-up over STEP_PROBE_MAX_S and SLOW_BF16_FACTOR x fp32's (bf16 emulated: up to ~10x a step) ends the
    probe there, both first calls as the times: bf16 loses whatever its one-off costs, and its rounds would cost a
    minute of a budgeted run."""
    start = time.perf_counter()
    model_step("fp32")  # warmup, and the cost check
    fp32_first = time.perf_counter() - start
    if fp32_first > STEP_PROBE_MAX_S:
        return None
    start = time.perf_counter()
    model_step("bf16")
    bf16_first = time.perf_counter() - start
    if bf16_first > max(STEP_PROBE_MAX_S, SLOW_BF16_FACTOR * fp32_first):
        return {"fp32": 1000 * fp32_first, "bf16": 1000 * bf16_first}
    best = {"fp32": float("inf"), "bf16": float("inf")}
    for _ in range(rounds):
        for p in best:
            start = time.perf_counter()
            model_step(p)
            best[p] = min(best[p], time.perf_counter() - start)
    return {p: 1000 * s for p, s in best.items()}


def forward_backward_fn(model: torch.nn.Module, inputs: tuple, kwargs: dict | None = None) -> Callable[[str], None]:
    """model_step for probe_cpu: one forward/backward of `model(*inputs, **kwargs)` under fp32 or bf16 autocast."""
    kwargs = kwargs or {}

    def step(precision: str) -> None:
        with autocast(precision, torch.device("cpu")):
            out = model(*inputs, **kwargs)
        out.float().square().mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def autocast(precision: str, device: torch.device):
    """THE autocast of fm, for training and sampling: bf16/fp16 autocast over fp32 weights, nothing for fp32.

    fp16 runs on CUDA only: `resolve_precision` refuses it on other devices before anything runs."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# -------------------------------------------------------------------------------------- the decisions


@dataclass
class PrecisionChoice:
    setting: str  # what the config said: auto | bf16 | fp16 | fp32
    precision: str  # what runs
    reason: str
    warning: str | None = None  # an explicit choice that this machine does badly
    probe: Probe | None = None

    def record(self) -> dict:
        return {"setting": self.setting, "precision": self.precision, "reason": self.reason, "probe": asdict(self.probe) if self.probe else None}


def check_precision(setting: str, device: torch.device, key: str = "precision") -> None:
    """A precision setting this device can run: one of PRECISION_SETTINGS, and fp16 only on CUDA (fp16 training
    needs loss scaling, and CPU fp16 kernels are slow or missing), for training and sampling alike."""
    if setting not in PRECISION_SETTINGS:
        raise UsageError(f"{key} must be one of {', '.join(PRECISION_SETTINGS)}, not {setting!r}")
    if setting == "fp16" and device.type != "cuda":
        raise UsageError(f"{key}=fp16 needs a CUDA device; use bf16, fp32 or auto on {device.type.upper()}")


def resolve_precision(setting: str, device: torch.device, width: int, model_step=None, step_key=None) -> PrecisionChoice:
    """train.precision or sample.precision -> the precision that runs. An explicit setting is obeyed (with a
    warning where it is slow)."""
    check_precision(setting, device)
    if setting != "auto":
        warning = None
        if setting == "bf16" and device.type == "cpu" and not cpu_info().native_bf16:
            warning = "warning: this CPU has no native bf16 (AVX512-BF16 / AMX), so bf16 autocast may be slower than fp32 here; use precision fp32 (or auto)"
        return PrecisionChoice(setting, setting, "set explicitly", warning=warning)
    if device.type == "cuda":
        if cuda_native_bf16():
            return PrecisionChoice(setting, "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return PrecisionChoice(setting, "fp32", f"auto: {torch.cuda.get_device_name(device)} has no native bf16 (fp16 would need loss scaling: set it explicitly)")
    probe = probe_cpu(width, model_step, step_key)
    return PrecisionChoice(setting, probe.precision, f"auto: {probe.summary()}", probe=probe)


def cuda_native_bf16() -> bool:
    """bf16 in hardware on the current CUDA device (compute capability 8.0+, or ROCm). torch.cuda.is_bf16_supported()
    also says yes where bf16 is only emulated (V100, T4: no bf16 tensor cores, far slower than fp32 there)."""
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def matmul_dtype(device: torch.device, width: int, probe: Probe | None = None) -> str:
    """The faster dtype for plain matmuls of this width (Muon's Newton-Schulz): bf16 on CUDA, probed on a CPU."""
    if device.type == "cuda":
        return "bf16" if cuda_native_bf16() else "fp32"
    return (probe or probe_cpu(width)).matmul_dtype


def resolve_hardware(cfg, device: torch.device, shape: tuple[int, int, int]):
    """(PrecisionChoice, CompileChoice, Muon's Newton-Schulz dtype or None) for training `cfg` (a config.Config,
    read by attribute) on this device: `fm train`, its launcher and `fm bench` decide through here."""
    precision = resolve_model_precision(cfg, cfg.train.precision, device, shape)
    compile_choice = resolve_compile(cfg.train.compile, device)
    ns_dtype = matmul_dtype(device, cfg.model.hidden_size, precision.probe) if cfg.optim.name == "muon" else None
    return precision, compile_choice, ns_dtype


def resolve_model_precision(cfg, setting: str, device: torch.device, shape: tuple[int, int, int]) -> PrecisionChoice:
    """`setting` (train.precision or sample.precision) for this config's model on this device.

    On a CPU, "auto" runs the probe on a forward/backward of a fresh copy of the model (not for text models,
    whose inputs need the text encoder: those are judged on the GEMM alone); training and sampling share its
    cached answer, as they share the model."""
    step, key = model_probe_step(cfg, shape) if setting == "auto" and device.type == "cpu" else (None, None)
    return resolve_precision(setting, device, cfg.model.hidden_size, step, key)


def model_probe_step(cfg, shape: tuple[int, int, int]) -> tuple[Callable[[str], None] | None, str | None]:
    """`precision_probe_step`, or (None, None) for a text model, whose inputs need the text encoder: the CPU probe
    then judges it on the GEMM alone (`fm train`, `fm sample` and `fm bench` alike)."""
    return (None, None) if cfg.model.cross_attention else precision_probe_step(cfg, shape)


def precision_probe_step(cfg, shape: tuple[int, int, int]) -> tuple[Callable[[str], None], str]:
    """The probe's model step (`forward_backward_fn` on a fresh copy of the model, batch min(global, 32)) and its
    cache key. Its draws come from a private generator, never from the run's random streams."""
    from .models import build_model

    batch = min(cfg.train.global_batch_size, 32)
    state = torch.get_rng_state()
    model = build_model(cfg.model)  # initialised from the global stream, which is put back below
    torch.set_rng_state(state)
    c, h, w = shape
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(batch, c, h, w, generator=gen), torch.rand(batch, generator=gen)
    kwargs = {"y": torch.arange(batch) % cfg.model.num_classes} if cfg.model.num_classes else {}
    return forward_backward_fn(model, (x, t), kwargs), model_key(json.loads(cfg.model.model_dump_json()), batch)


@dataclass
class CompileChoice:
    setting: object  # "auto" | True | False
    compile: bool
    reason: str
    fell_back: bool = False  # compiling failed at the first call: the run is eager

    def record(self) -> dict:
        return asdict(self)


def resolve_compile(setting, device: torch.device) -> CompileChoice:
    """train.compile / sample.compile true/false is obeyed; "auto" compiles where inductor can work (CUDA + triton, CPU + C++)."""
    if setting is True or setting is False:
        return CompileChoice(setting, setting, "set explicitly")
    if device.type == "cuda":
        if _has_triton():
            return CompileChoice(setting, True, "auto: CUDA device with triton")
        return CompileChoice(setting, False, "auto: CUDA without triton, inductor cannot generate kernels")
    compiler = cxx_compiler()
    if compiler["works"]:
        return CompileChoice(setting, True, f"auto: C++ compiler {compiler['path']} works")
    return CompileChoice(setting, False, f"auto: no working C++ compiler for inductor ({compiler['error']})")


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch.utils.cpp_extension's "No CUDA runtime is found, using CUDA_HOME=..." (logged when inductor first
    compiles on a machine with a CUDA toolkit but no GPU: a CPU compile needs no CUDA); its other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


def quiet_no_cuda_notice() -> None:
    """Install `_NoCudaRuntimeNotice` (once) before a torch.compile: training's and sampling's."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    if not any(isinstance(f, _NoCudaRuntimeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaRuntimeNotice())


def compile_with_fallback(model, first_call: Callable[[Callable], None], log: Callable[[str], None], choice: CompileChoice, hint: str = "train.compile=false"):
    """torch.compile(model), proven on `first_call(compiled)`; if compiling fails, the eager model and one warning.

    torch.compile is lazy: a missing compiler or an unsupported op surfaces at the first forward (or its
    backward), so `first_call` runs one (a forward/backward on example inputs, without an optimizer step).
    """
    if not choice.compile:
        return model
    quiet_no_cuda_notice()
    try:
        compiled = torch.compile(model)
        first_call(compiled)
        return compiled
    except (torch.OutOfMemoryError, KeyboardInterrupt):
        raise
    except Exception as err:  # any compiler failure: the run goes on without it
        compile_failed(err, log, choice, hint)
        return model


def compile_failed(err: Exception, log: Callable[[str], None], choice: CompileChoice, hint: str) -> None:
    """The one warning line of a failed torch.compile (`hint` names the setting that hides it); `choice` records the fallback."""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    log(f"warning: torch.compile failed ({type(err).__name__}: {first_line}); continuing without compile ({hint} hides this)")
    choice.compile, choice.fell_back = False, True
    _reset_dynamo()


def choice_lines(precision: PrecisionChoice, compile_choice: CompileChoice, what: str = "") -> list[str]:
    """The log lines of a precision and compile decision, for training and sampling alike: each "auto" choice with
    its reason (an explicit setting is the user's own and needs no line), and any warning."""
    prefix = f"{what} " if what else ""
    lines = []
    if precision.setting == "auto":
        lines.append(f"{prefix}precision: {precision.precision} ({precision.reason})")
    if precision.warning:
        lines.append(precision.warning)
    if compile_choice.setting == "auto":
        lines.append(f"{prefix}compile: {'on' if compile_choice.compile else 'off'} ({compile_choice.reason})")
    return lines


def _reset_dynamo() -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # resetting is a courtesy (frees the failed graph); it must not fail the run
        pass


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton

        return bool(has_triton())
    except Exception:
        return False


def cxx_compiler(use_cache: bool = True) -> dict:
    """The C++ compiler inductor would use ($CXX, else g++ / clang++ / c++ on PATH) and whether it builds a shared object."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "clang++", "c++"]
    path = next((p for p in (shutil.which(c) for c in candidates) if p), None)
    if path is None:
        return {"path": None, "works": False, "error": f"none of {', '.join(candidates)} on PATH"}
    key = f"cxx|{path}|{os.path.getmtime(path):.0f}"
    cache = _read_cache().get(key) if use_cache else None
    if _valid_compiler_entry(cache, path):
        return cache
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.cpp"
        src.write_text('extern "C" int fm_probe(int x) { return x + 1; }\n')
        try:
            proc = subprocess.run([path, "-shared", "-fPIC", "-O1", str(src), "-o", str(Path(tmp) / "probe.so")], capture_output=True, text=True, timeout=60)
            works, error = proc.returncode == 0, (proc.stderr.strip().splitlines() or [""])[-1][:200] or None
        except (OSError, subprocess.SubprocessError) as err:
            works, error = False, str(err)[:200]
    result = {"path": path, "works": works, "error": None if works else error}
    if use_cache:
        _update_cache(lambda c: c.__setitem__(key, result))
    return result


def _valid_compiler_entry(entry, path: str) -> bool:
    """A cached compiler check of the right shape (else the compiler is checked again)."""
    return (
        isinstance(entry, dict) and set(entry) == {"path", "works", "error"} and entry["path"] == path
        and isinstance(entry["works"], bool) and (entry["error"] is None or isinstance(entry["error"], str))
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- fm env


def environment_report(device: torch.device, width: int = 384, remeasure: bool = False) -> dict:
    """Everything `fm env` prints: device, CPU, GPU, versions, the probe, auto's choices, compiler, extras.
    `remeasure` first forgets this machine's cached probes (one measured under load is otherwise kept)."""
    if remeasure:
        forget_probes()
    cpu = cpu_info()
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 2), "bf16": props.major >= 8 or bool(torch.version.hip)})
    precision = resolve_precision("auto", device, width)
    compile_choice = resolve_compile("auto", device)
    probe = precision.probe or probe_cpu(width)  # the CPU's numbers, even when the device is a GPU
    compiler = cxx_compiler()
    return {
        "device": device.type if device.type == "cpu" else f"cuda:{device.index or 0}",
        "cpu": {"model": cpu.model, "flags": cpu.flags, "cores": cpu.cores, "threads": cpu.threads},
        "gpus": gpus,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "fm": _fm_version()},
        "probe": {"width": width, **{k: v for k, v in asdict(probe).items() if k not in ("width", "key", "device")}},
        "auto": {
            "precision": precision.precision,
            "precision_reason": precision.reason,
            "compile": compile_choice.compile,
            "compile_reason": compile_choice.reason,
            "muon_matmul_dtype": matmul_dtype(device, width, precision.probe),
        },
        "cxx_compiler": compiler,
        "extras": {extra: importlib.util.find_spec(module) is not None for extra, module in OPTIONAL_EXTRAS.items()},
        "cache": str(cache_dir() / "probe.json"),
    }


def environment_text(r: dict) -> str:
    """`fm env`'s human-readable form of environment_report()."""
    cpu, probe, auto = r["cpu"], r["probe"], r["auto"]
    flags = ", ".join(k for k, v in cpu["flags"].items() if v) or "none of avx2/avx512f/avx512_bf16/amx"
    gemm = probe["gemm_gflops"]
    compiler = r["cxx_compiler"]
    lines = [
        f"device:       {r['device']}",
        f"cpu:          {cpu['model']} ({cpu['cores']} cores, {cpu['threads']} torch threads; {flags})",
        *[f"gpu {g['index']}:        {g['name']}, {g['memory_gib']:.1f} GiB, bf16 {'yes' if g['bf16'] else 'no'}" for g in r["gpus"]],
        f"versions:     python {r['versions']['python']}, torch {r['versions']['torch']}, cuda {r['versions']['cuda'] or '-'}, fm {r['versions']['fm']}",
        f"probe (cpu):  GEMM width {probe['width']}: fp32 {gemm['fp32']:.1f} GFLOP/s, bf16 {gemm['bf16']:.1f} GFLOP/s ({probe['gemm_speedup']:.2f}x; {probe['source']})",
        f"auto:         precision {auto['precision']} ({auto['precision_reason']})",
        f"              compile {'on' if auto['compile'] else 'off'} ({auto['compile_reason']})",
        f"              Muon orthogonalisation in {auto['muon_matmul_dtype']}",
        f"c++ compiler: {compiler['path'] or '-'} ({'works' if compiler['works'] else 'not working: ' + str(compiler['error'])})",
        "extras:       " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["extras"].items()),
        f"probe cache:  {r['cache']} (`fm env --remeasure` measures this machine again, e.g. after a probe under heavy load)",
    ]
    return "\n".join(lines)


def _fm_version() -> str:
    from . import __version__

    return __version__


def model_key(model_cfg: dict, batch: int) -> str:
    """A short stable name for (model config, batch): the cache key of a model-step probe."""
    return hashlib.sha256(json.dumps({"model": model_cfg, "batch": batch}, sort_keys=True).encode()).hexdigest()[:12]


# -------------------------------------------------------------------------------------------- cache


def _cache_path() -> Path:
    return cache_dir() / "probe.json"


def _cached_probe(key: str, workload: str, width: int, cpu: CpuInfo) -> Probe | None:
    """The cached probe of this machine and workload, or None when there is none or it is not to be trusted
    (then it is measured again and the entry rewritten). The cache is a plain file anyone can edit or copy:
    every field is checked, and the decision is re-derived from the numbers rather than read."""
    entries = _read_cache().get(key)
    entry = entries.get(workload) if isinstance(entries, dict) else None
    if not isinstance(entry, dict) or entry.get("version") != PROBE_VERSION:
        return None
    try:
        probe = Probe(**{k: v for k, v in entry.items() if k not in ("version", "source")}, source="cache")
    except TypeError:  # missing or unknown fields
        return None
    return probe if _trustworthy(probe, key, width, cpu) else None


def _trustworthy(probe: Probe, key: str, width: int, cpu: CpuInfo) -> bool:
    """A cached probe is used only if it is well-formed, consistent, measured here, and plausible for the CPU."""
    pair = lambda d: isinstance(d, dict) and set(d) == {"fp32", "bf16"} and all(_positive(v) for v in d.values())  # noqa: E731
    if (probe.device, probe.width, probe.key) != ("cpu", width, key) or not pair(probe.gemm_gflops):
        return False
    if (probe.step_ms is None) != (probe.step_speedup is None) or (probe.step_ms is not None and not pair(probe.step_ms)):
        return False
    gemm, step = probe.gemm_gflops, probe.step_ms
    if not _close(probe.gemm_speedup, gemm["bf16"] / gemm["fp32"]) or (step and not _close(probe.step_speedup, step["fp32"] / step["bf16"])):
        return False
    if probe.precision != _choose(probe.gemm_speedup, probe.step_speedup) or probe.matmul_dtype != _matmul_choice(probe.gemm_speedup):
        return False
    if not isinstance(probe.seconds, (int, float)) or not 0 <= probe.seconds < math.inf:
        return False
    if not cpu.native_bf16 and "bf16" in (probe.precision, probe.matmul_dtype):
        return False  # a bf16 verdict for a CPU that emulates bf16 (~500x slower GEMMs) came from another machine
    return gemm["fp32"] >= _plausible_fp32_gflops(cpu, width)


def _plausible_fp32_gflops(cpu: CpuInfo, width: int) -> float:
    """A floor for the probe's fp32 GEMM on this CPU: 1/100 of a conservative peak (8 or 16 fp32 FLOP per
    cycle and thread at 2 GHz for AVX2 / AVX-512). Below it the probe was measured under heavy load (or
    elsewhere) and is measured again. Small GEMMs (width < 128) are dominated by call overhead: no floor."""
    if width < 128 or not (cpu.flags["avx2"] or cpu.flags["avx512f"]):
        return 0.0
    per_thread = 32.0 if cpu.flags["avx512f"] else 16.0
    return per_thread * max(1, min(cpu.threads, cpu.cores)) / 100


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _close(a, b) -> bool:
    return _positive(a) and math.isclose(a, b, rel_tol=1e-6)


def forget_probes() -> None:
    """Remove this machine's cached probes (`fm env --remeasure`): the next use measures again."""
    _update_cache(lambda c: c.pop(machine_key(torch.device("cpu")), None))


def _read_cache() -> dict:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or corrupt: measure again (and rewrite it)


def _write_cache(key: str, workload: str, probe: Probe) -> None:
    entry = {**asdict(probe), "version": PROBE_VERSION}
    entry.pop("source")

    def change(cache: dict) -> None:
        if not isinstance(cache.get(key), dict):  # absent, or damaged: start this machine's entries afresh
            cache[key] = {}
        cache[key][workload] = entry

    _update_cache(change)


def _update_cache(change: Callable[[dict], None]) -> None:
    """Read, change, write back atomically (temp file + rename). A read-only cache dir only costs re-measuring."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        cache = _read_cache()
        change(cache)
        write_text_atomic(path, json.dumps(cache, indent=2) + "\n")
    except OSError:
        pass
