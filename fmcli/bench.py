"""The report behind `fm bench`: training and sampling throughput, memory, analytic FLOPs and MFU, and the
comparison with diffusers' DiT. The training step is timed by measure.py (in an isolated trial on CPU), the
batch size searched by autotune.py; the sampling throughput (`sample_throughput`, on `fm sample`'s own path)
is timed here, in the same trial (`measure_bench`)."""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from .autotune import autotune_training, read_autotune_cache, save_autotune_cache
from .config import Config, config_to_dict, resolve_without_data
from .errors import RuntimeFailure, UsageError
from .hardware import PRECISION_SETTINGS
from .measure import BenchSpec, device_name, measure, measure_any, seconds_per_call, sync, synthetic_text, timed_block, timing_spread

# Peak dense (no sparsity) bf16 tensor FLOP/s of known accelerators, matched against the device name in
# order (most specific first). Vendor datasheet numbers; MFU is always reported against these.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], float]] = [
    (("gh200",), 989e12), (("h200",), 989e12), (("h100", "pcie"), 756e12), (("h100", "nvl"), 835e12),
    (("h100",), 989e12), (("h800",), 989e12), (("b200",), 2250e12), (("a100",), 312e12), (("a800",), 312e12),
    (("a10g",), 70e12), (("a10",), 125e12), (("l40s",), 362e12), (("l40",), 181e12), (("l4",), 121e12),
    (("4090",), 165e12), (("3090",), 71e12), (("a6000", "ada"), 182e12), (("a6000",), 155e12),
]  # fmt: skip

MODES = ("train", "sample", "both")
# Timings whose rounds range wider than this fraction of their median are flagged on stderr (`timing_warnings`);
# fewer rounds than MIN_ROUNDS show no spread worth the name, fewer steps than MIN_STEPS a round are too few to time.
NOISY_SPREAD, MIN_ROUNDS, MIN_STEPS = 0.2, 3, 5


# ------------------------------------------------------------------------------------------ FLOPs


def dit_forward_flops(model_cfg, text_tokens: int | None = None) -> int:
    """Analytic forward FLOPs per image of fmcli's DiT (2 FLOPs per multiply-add, matmuls only).

    N = (image/patch)^2 tokens of width D; per block: qkv 3*N*D*D, attention scores N*N*D and values
    N*N*D, projection N*D*D, MLP 2*N*D*H, adaLN modulation D*6D; plus the patch embedding N*(C*p*p)*D,
    the timestep MLP (256*D + D*D), and the final layer (D*2D modulation + N*D*p*p*C). Norms, softmax and
    activations are elementwise and not counted (as in the usual 6*N*params estimates).
    A text DiT (model.cross_attention) with L = `text_tokens` states of width E (padding included: masked keys
    are computed too) adds the caption projection L*(E*D + D*D) and per block the cross-attention: queries
    N*D*D, keys and values 2*L*D*D, scores and values 2*N*L*D, projection N*D*D. A mean-flow DiT
    (model.end_time) adds its interval embedding's MLP, 256*D + D*D.
    """
    m = model_cfg
    d, p, c = m.hidden_size, m.patch_size, m.in_channels
    n = (m.image_size // p) ** 2
    hidden = int(d * m.mlp_ratio)
    per_block = 3 * n * d * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden + d * 6 * d
    time_mlp = 256 * d + d * d  # a timestep embedder's MLP (frequencies -> D -> D)
    extra = time_mlp if m.end_time else 0  # a mean-flow DiT's interval embedding is a second one
    if m.cross_attention:
        if m.text_dim is None:
            raise UsageError("fm bench of a text model needs model.text_dim, the text encoder's width (e.g. --set model.text_dim=512)")
        if text_tokens is None:
            raise ValueError("a text DiT's FLOPs need the number of text tokens")
        per_block += 2 * n * d * d + 2 * text_tokens * d * d + 2 * n * text_tokens * d
        extra += text_tokens * (m.text_dim * d + d * d)
    macs = n * c * p * p * d + time_mlp + m.depth * per_block + d * 2 * d + n * d * p * p * c + extra
    return 2 * macs


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s for a known GPU name, else None (CPU or unknown card: MFU is null)."""
    name = device_name.lower()
    for keys, flops in PEAK_BF16_FLOPS:
        if all(k in name for k in keys):
            return flops
    return None


# ----------------------------------------------------------------------------------- the command


@dataclass
class BenchOptions:
    batch_size: int | None = None  # None = autotune
    mode: str = "both"
    steps: int = 20  # consecutive training steps timed as one block, a round (the training loop's statistic)
    warmup: int = 2
    rounds: int = 5  # timed rounds: figures are their median, with their spread (min-max); ratios interleave them
    precision: str | None = None  # None = the preset's train.precision ("auto" is resolved by fmcli.hardware)
    compile: bool | str | None = None  # None = the preset's train.compile ("auto" resolved by fmcli.hardware)
    max_memory_gib: float | None = None
    max_batch: int | None = None  # None = train.global_batch_size (a micro batch never exceeds it)
    compare: str | None = None
    device: str = "auto"
    run_dir: Path | None = None


def run_bench(cfg: Config, opts: BenchOptions, log: Callable[[str], None] = lambda s: None) -> dict:
    """The whole `fm bench`: resolve, autotune (unless a batch is given), measure ours (and diffusers')."""
    precision_setting = _checked_options(cfg, opts)
    cfg = resolve_without_data(cfg)
    if opts.compare and cfg.optim.name != "adamw":
        # Muon picks fm's matrices by module name, which diffusers' model does not share: compare at equal optimizer.
        log(f"--compare: both models train with AdamW (the preset's optim.name is {cfg.optim.name!r})")
        cfg = cfg.with_section("optim", name="adamw")
    from .hardware import resolve_device

    device = resolve_device(opts.device)
    name = device_name(device)
    hw = resolve_bench_hardware(cfg, device, precision_setting, cfg.train.compile if opts.compile is None else opts.compile, log)
    precision, compile_on = hw["precision"]["precision"], hw["compile"]["compile"]
    sample_precision, sample_compile = "fp32", False
    if opts.mode in ("sample", "both"):
        hw["sample"] = resolve_bench_sampling(cfg, device, opts, log)
        sample_precision, sample_compile = hw["sample"]["precision"]["precision"], hw["sample"]["compile"]["compile"]
    flops_fwd = dit_forward_flops(cfg.model, cfg.encoders.max_tokens)
    peak = peak_flops(name) if device.type == "cuda" else None
    base = BenchSpec(
        config=config_to_dict(cfg), batch=1, steps=opts.steps, warmup=opts.warmup, rounds=opts.rounds, precision=precision, compile=compile_on, device=device.type,
        muon_ns_dtype=hw["muon_ns_dtype"], sample_precision=sample_precision, sample_compile=sample_compile,
    )  # fmt: skip

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
            save_autotune_cache(opts.run_dir, cfg, device, precision, compile_on, tuned, ns_dtype=hw["muon_ns_dtype"], world_size=1)

    impls = ["fm"] + (["diffusers"] if opts.compare else [])
    results = {}
    for impl in impls:
        log(f"measuring {impl} at batch {batch} ({opts.mode}, {precision})")
        results[impl] = measure_any(replace(base, batch=batch, mode=opts.mode, impl=impl), measure_bench)
        if results[impl].get("oom"):
            raise RuntimeFailure(f"{impl} at batch {batch} ran out of memory; pass a smaller --batch-size")

    _record_fallbacks(results["fm"], hw, log)
    report = {
        "preset": cfg.name,
        "device": name,
        "precision": precision,
        "compile": hw["compile"]["compile"],
        "hardware": hw,
        "mode": opts.mode,
        "batch_size": batch,
        "model": {k: getattr(cfg.model, k) for k in ("arch", "hidden_size", "depth", "heads", "patch_size", "mlp_ratio", "image_size", "in_channels", "num_classes")},
        "flops_per_image": {"forward": flops_fwd, "train": 3 * flops_fwd},
        "peak_flops": peak,
        "autotune": None if tuned is None else {"stop": tuned.stop, "chosen": tuned.batch, "trials": [asdict(t) for t in tuned.trials]},
    }
    report.update(_summarise(results["fm"], flops_fwd, peak, cfg))
    if opts.compare:
        report["compare"] = compare_diffusers(report, _summarise(results["diffusers"], flops_fwd, peak, cfg), replace(base, batch=batch, mode=opts.mode), log)
    if cfg.flow.objective == "meanflow" and "train" in report:
        report["meanflow"] = mean_flow_cost(cfg, replace(base, batch=batch), report["train"]["step_ms"], log)
    if cfg.repa.encoder == "domain" and "train" in report:
        report["repa"] = repa_cost(cfg, replace(base, batch=batch), report["train"]["step_ms"], log)
    report["warnings"] = timing_warnings(report, opts)
    for line in report["warnings"]:
        log(line)
    return report


def compare_diffusers(ours: dict, theirs: dict, spec: BenchSpec, log) -> dict:
    """`--compare diffusers`: their figures, and ours / theirs per part from both models timed in interleaved
    rounds in one trial (`measure_interleaved`). Where both do not fit in memory together the ratio is of the
    two separate trials' medians, said on stderr and `interleaved: false`."""
    log(f"timing fm and diffusers in {spec.rounds} interleaved rounds (the ratio)")
    pair = measure_any(replace(spec, impl="fm", other_impl="diffusers"), measure_interleaved)
    spread = {}
    if pair.get("oom"):
        log(f"warning: fm and diffusers do not fit in memory together at batch {spec.batch}: the ratio is of their separate trials, not interleaved")
        for part in ("train", "sample"):
            if part in ours and part in theirs:
                spread[part] = {"ratio": ours[part]["img_per_s"] / theirs[part]["img_per_s"], "min": None, "max": None, "rounds": spec.rounds, "interleaved": False}
    else:
        spread = {part: interleaved_ratio(times["a"], times["b"]) for part, times in pair.items()}
    return {"diffusers": theirs, "ratio": {part: r["ratio"] for part, r in spread.items()}, "ratio_spread": spread}


def _checked_options(cfg: Config, opts: BenchOptions) -> str:
    """`fm bench`'s options checked before any work; returns the precision setting. --run-dir, where the autotune
    result is cached, must be a folder fm can write (exit 2) whose autotune.json, if any, is readable (exit 1)."""
    if opts.mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, not {opts.mode!r}")
    precision_setting = opts.precision or cfg.train.precision
    if precision_setting not in PRECISION_SETTINGS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISION_SETTINGS)}, not {precision_setting!r}")
    if opts.compare not in (None, "diffusers"):
        raise UsageError(f"--compare supports 'diffusers' only, not {opts.compare!r}")
    if opts.steps < 1 or opts.warmup < 0 or opts.rounds < 1:
        raise UsageError("--steps and --rounds must be >= 1 and --warmup >= 0")
    if cfg.model.arch != "dit":
        raise UsageError(f"fm bench supports model.arch='dit' only (got {cfg.model.arch!r})")
    if opts.mode in ("sample", "both") and cfg.sample.guidance == "auto":  # before the autotune, not at the trial after it
        raise UsageError("fm bench samples without a guide model, and sample.guidance = 'auto' (autoguidance) needs one: bench "
                         "--set sample.guidance=cfg (autoguidance adds the guide's forward to each guided step), or --mode train")
    if opts.compare:  # before the autotune and fm's own trial, not in diffusers' trial after them
        from .models.diffusers_dit import check_comparable

        check_comparable(cfg.model)
    autotune_only = [flag for flag, value in (("--max-memory", opts.max_memory_gib), ("--max-batch", opts.max_batch), ("--run-dir", opts.run_dir)) if value is not None]
    if opts.batch_size is not None and autotune_only:  # they set (or keep) the autotune, which a given batch skips
        raise UsageError(f"{', '.join(autotune_only)} go with --batch-size auto (the autotune), not --batch-size {opts.batch_size}: drop them")
    if opts.run_dir is not None and opts.batch_size is None:  # only autotuning writes there
        from .fsutil import refuse_unwritable

        refuse_unwritable(opts.run_dir)
        read_autotune_cache(Path(opts.run_dir) / "autotune.json")
    return precision_setting


def twin_cost(cfg: Config, twin: Config, spec: BenchSpec, step_ms: float, names: tuple[str, str], log) -> dict:
    """A run's training step against its twin's (the same run with one thing switched off: `flow_twin`,
    `repa_twin`), both timed in interleaved rounds in one trial (`measure_interleaved`): {"twin_ms", "step_ms",
    "ratio", "spread"}, the medians, their ratio and the per-round ratios' spread. Where both do not fit in memory
    together the twin is timed alone and priced against the run's own trial's `step_ms` (said on stderr,
    `interleaved: false`). `names`: (the run's step, the twin's step) in the log lines."""
    ours, theirs = names
    log(f"timing {theirs} and {ours} of the same model at batch {spec.batch} in {spec.rounds} interleaved rounds")
    twin_cfg = config_to_dict(twin)
    pair = measure_any(replace(spec, mode="train", config=twin_cfg, other_config=config_to_dict(cfg)), measure_interleaved)
    if pair.get("oom"):
        log(f"warning: both models do not fit in memory together at batch {spec.batch}: {theirs} is timed in a trial of its own, not interleaved")
        alone = measure_any(replace(spec, mode="train", config=twin_cfg))
        if alone.get("oom"):
            raise RuntimeFailure(f"{theirs} (the twin) at batch {spec.batch} ran out of memory; pass a smaller --batch-size")
        twin_ms = alone["train"]["step_ms"]
        spread = {"ratio": step_ms / twin_ms, "min": None, "max": None, "rounds": spec.rounds, "interleaved": False}
    else:
        times = pair["train"]
        spread = interleaved_ratio(times["a"], times["b"])
        twin_ms, step_ms = 1000 * statistics.median(times["a"]), 1000 * statistics.median(times["b"])
    return {"twin_ms": twin_ms, "step_ms": step_ms, "ratio": step_ms / twin_ms, "spread": spread}


def mean_flow_cost(cfg: Config, spec: BenchSpec, meanflow_step_ms: float, log) -> dict:
    """A mean-flow training step's time against the flow-matching step of the same run (`flow_twin`, `twin_cost`)."""
    cost = twin_cost(cfg, flow_twin(cfg), spec, meanflow_step_ms, ("the mean-flow step", "the flow-matching step"), log)
    return {
        "flow_step_ms": cost["twin_ms"],
        "meanflow_step_ms": cost["step_ms"],
        "step_cost_vs_flow": cost["ratio"],
        "step_cost_spread": cost["spread"],  # the per-round ratios' min and max, over `rounds` interleaved rounds
        "jvp_fraction": cfg.flow.meanflow_ratio,  # rows with t_end > t: the only ones that need the JVP
    }


def repa_cost(cfg: Config, spec: BenchSpec, repa_step_ms: float, log) -> dict:
    """A REPA training step's time (the encoder's forward, the projector, the loss) against the same run's
    step without REPA (`repa_twin`, `twin_cost`)."""
    cost = twin_cost(cfg, repa_twin(cfg), spec, repa_step_ms, ("the REPA step", "the step without REPA"), log)
    return {
        "plain_step_ms": cost["twin_ms"],
        "repa_step_ms": cost["step_ms"],
        "step_cost_vs_plain": cost["ratio"],
        "step_cost_spread": cost["spread"],  # the per-round ratios' min and max, over `rounds` interleaved rounds
        "depth": cfg.repa.depth,  # the tokens after this many blocks are aligned
        "weight": cfg.repa.weight,
    }


def repa_twin(cfg: Config) -> Config:
    """The same run without REPA (`repa.encoder = "none"`): the baseline that `fm bench` prices a REPA step against."""
    return cfg.with_section("repa", encoder="none")


def flow_twin(cfg: Config) -> Config:
    """The same run with the flow-matching objective (no end-time input, Euler sampling): the baseline that
    `fm bench` prices a mean-flow step against."""
    raw = config_to_dict(cfg)
    raw["flow"]["objective"], raw["sample"]["solver"] = "flow", "euler"
    raw["model"]["end_time"] = False
    return Config.model_validate(raw)


def _record_fallbacks(result: dict, hw: dict, log) -> None:
    """A trial whose torch.compile failed ran eager: say so once, and report compile false."""
    if (result.get("train") or {}).get("compile_warning"):
        log(result["train"]["compile_warning"])
        hw["compile"].update(compile=False, fell_back=True)
    if "sample" in hw and hw["sample"]["compile"]["compile"] and not (result.get("sample") or {}).get("compiled", True):
        log("warning: torch.compile failed while sampling; the sampling figure is eager")
        hw["sample"]["compile"].update(compile=False, fell_back=True)


def resolve_bench_sampling(cfg: Config, device: torch.device, opts: BenchOptions, log) -> dict:
    """Sampling's precision and compile as `fm sample` resolves them here (generate.resolve_sampling_hardware):
    sample.precision / sample.compile, or --precision / --compile when given."""
    from .generate import resolve_sampling_hardware
    from .hardware import choice_lines

    update = {k: v for k, v in (("precision", opts.precision), ("compile", opts.compile)) if v is not None}
    precision, compile_choice = resolve_sampling_hardware(cfg, cfg.sample.model_copy(update=update), device)
    for line in choice_lines(precision, compile_choice, "sampling"):
        log(line)
    return {"precision": precision.record(), "compile": compile_choice.record()}


def resolve_bench_hardware(cfg: Config, device: torch.device, precision_setting: str, compile_setting, log) -> dict:
    """Precision, compile and Muon dtype as `fm train` resolves them here, plus the CPU probe's numbers."""
    from . import hardware

    if compile_setting not in hardware.COMPILE_SETTINGS:
        raise UsageError(f"--compile must be true, false or auto, not {compile_setting!r}")
    cfg = cfg.with_section("train", precision=precision_setting, compile=compile_setting)
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    choice, compile_choice, ns_dtype = hardware.resolve_hardware(cfg, device, shape)
    probe = choice.probe
    if probe is None and device.type == "cpu":  # an explicit precision: still report what the CPU does
        probe = hardware.probe_cpu(cfg.model.hidden_size, *hardware.model_probe_step(cfg, shape))
    log(f"precision: {choice.precision} ({choice.reason}); compile: {'on' if compile_choice.compile else 'off'} ({compile_choice.reason})")
    if choice.warning:
        log(choice.warning)
    if probe is not None and choice.probe is None:
        log(f"probe: {probe.summary()}")
    record = choice.record()
    record["probe"] = asdict(probe) if probe is not None else None
    return {"precision": record, "compile": compile_choice.record(), "muon_ns_dtype": ns_dtype}


# ----------------------------------------------------------------------------- interleaved rounds


def measure_interleaved(spec: BenchSpec) -> dict:
    """Two models timed in alternating rounds in one trial, so that both see the same load (a ratio of two
    trials run one after the other also measures how the machine's load changed between them): A is
    spec.config / spec.impl, B spec.other_config / spec.other_impl (None: A's). Training first (each model
    after its own warmup; a round is a block of spec.steps steps, seconds per step), then sampling (a round is
    one solve, `SampleTimer`), as `measure` orders them; rounds alternate A B, B A, A B, ... so that a steady
    drift does not favour either. Returns {part: {"a": [seconds per round], "b": [...]}}."""
    from .config import validate_config
    from .measure import train_step_fn
    from .models import build_bench_model

    device = torch.device(spec.device)
    models = []
    for config, impl in ((spec.config, spec.impl), (spec.other_config or spec.config, spec.other_impl or spec.impl)):
        cfg = validate_config(config, source="bench")
        torch.manual_seed(0)
        models.append((build_bench_model(cfg.model, impl).to(device), cfg))
    out = {}
    if spec.mode in ("train", "both"):
        steps = [train_step_fn(model, cfg, spec, device) for model, cfg in models]
        for step in steps:
            for _ in range(spec.warmup):
                step()

        def block(step) -> float:
            marks = timed_block(step, spec.steps, device)
            return (marks[-1] - marks[0]) / spec.steps

        out["train"] = _alternate([lambda step=step: block(step) for step in steps], spec.rounds)
    if spec.mode in ("sample", "both"):
        timers = [SampleTimer(model, cfg, spec, device) for model, cfg in models]
        out["sample"] = _alternate([timer.round for timer in timers], spec.rounds)
    return out


def _alternate(rounds: list[Callable[[], float]], count: int) -> dict:
    """`count` rounds of each of two timers, in the order A B, B A, A B, ...: {"a": [...], "b": [...]}."""
    times = ([], [])
    for r in range(max(1, count)):
        for i in (0, 1) if r % 2 == 0 else (1, 0):
            times[i].append(rounds[i]())
    return {"a": times[0], "b": times[1]}


def interleaved_ratio(a: list[float], b: list[float]) -> dict:
    """How many times faster A is than B from times measured in interleaved rounds: the ratio of the median
    times, median(b) / median(a), and the spread of the per-round ratios b_i / a_i (min, max)."""
    if len(a) != len(b) or not a:
        raise ValueError("interleaved_ratio needs as many rounds of A as of B, at least one")
    per_round = [tb / ta for ta, tb in zip(a, b)]
    return {"ratio": statistics.median(b) / statistics.median(a), "min": min(per_round), "max": max(per_round), "rounds": len(a), "interleaved": True}


# ------------------------------------------------------------------------------------ sampling


def measure_bench(spec: BenchSpec) -> dict:
    """One `fm bench` trial: measure.measure (training, memory) with the sampling throughput when spec.mode asks."""
    return measure(spec, sample=sample_throughput)


def sample_throughput(model, cfg: Config, spec: BenchSpec, device: torch.device) -> dict:
    """Sampling throughput at the preset's solver, steps and CFG, on `fm sample`'s own path, over `spec.rounds`
    timed solves (`SampleTimer`): `seconds` / `img_per_s` are the median round's, `seconds_rounds` and
    `seconds_spread` every round and their spread."""
    timer = SampleTimer(model, cfg, spec, device)
    return timer.facts([timer.round() for _ in range(max(1, spec.rounds))])


class SampleTimer:
    """One sampling round: a solve of the batch on `fm sample`'s own path, its seconds scaled to the full solve.

    The network is prepared by generate.prepare_for_sampling (at spec.sample_precision, compiled per
    spec.sample_compile: the parent resolved sample.precision / sample.compile with the function `fm sample`
    uses) and driven by generate.iterate_samples (per-index noise, labels cycling through the classes, guidance,
    the solver), so what is timed is what `fm sample` runs, less decoding and writing PNGs (and, for text
    models, the text encoder: synthetic states stand in for prompts).
    A fixed-step solve is timed over min(steps, spec.steps) of its steps (after a one-step warmup, which also
    compiles, an Euler step for dopri5; `timed_steps` says how many ran) and scaled to the full solve by the network rows each evaluates:
    the full solve's NFE and rows are counted on the same path with a stand-in network (which evaluations a
    fixed-step solve makes depends only on its grid: guidance intervals, zero-init steps and a solver's start-up
    evaluation included). An adaptive dopri5 solve is timed and counted whole.
    """

    def __init__(self, model, cfg: Config, spec: BenchSpec, device: torch.device):
        from .generate import LoadedModel, prepare_for_sampling

        m, self.b, self.device = cfg.model, spec.batch, device
        self.s = s = cfg.sample.model_copy(update={"precision": spec.sample_precision, "compile": spec.sample_compile})
        text = _SyntheticPrompts(synthetic_text(cfg)) if m.cross_attention else None
        loaded = prepare_for_sampling(LoadedModel(model=model, config=cfg, info={}, step=0, text=text), s, device)
        self.counted = _CountingNet(loaded.model)
        self.loaded = replace(loaded, model=self.counted)
        self.prompts = [""] * self.b if text is not None else None
        self.guided = bool(m.num_classes or m.cross_attention) and s.cfg != 1.0
        self.nfe, self.full_rows, self.timed_rows = 0, 0, 0
        # CFG-Zero*'s zero-init steps evaluate nothing and must be fewer than a solve's steps: a short solve takes one more.
        first = 1 + (s.zero_init_steps if s.guidance == "cfg-zero" else 0)
        self.timed = s.steps if s.solver == "dopri5" else min(s.steps, max(spec.steps, first))
        if spec.warmup:  # the network's first calls (compiling, kernel selection) in no round; dopri5 warms up on Euler's grid
            self.solve(first, "euler" if s.solver == "dopri5" else None)
        if self.timed != s.steps:  # the full solve's and the timed solve's evaluations, counted without running the network
            self.counted.dry = True
            self.full_rows, self.timed_rows = self.rows_of(s.steps), self.rows_of(self.timed)
            self.counted.dry = False

    def solve(self, steps: int, solver: str | None = None) -> None:
        from .generate import iterate_samples

        settings = self.s.model_copy(update={"steps": steps, "solver": solver or self.s.solver})
        for _, _, result in iterate_samples(self.loaded, list(range(self.b)), seed=0, sample_cfg=settings, batch_size=self.b, device=self.device, prompts=self.prompts):
            self.nfe = result.nfe if steps == self.s.steps else self.nfe

    def rows_of(self, steps: int) -> int:
        self.counted.rows = 0
        self.solve(steps)
        return self.counted.rows

    def round(self) -> float:
        """Seconds of one full solve of the batch (a timed solve of `timed` steps, scaled by the rows evaluated)."""
        sync(self.device)
        self.counted.rows = 0
        seconds = seconds_per_call(lambda: self.solve(self.timed), 1, self.device)
        if self.timed == self.s.steps:  # timed whole: its own evaluations are the full solve's
            self.full_rows = self.timed_rows = self.counted.rows
        return seconds * self.full_rows / max(1, self.timed_rows)

    def facts(self, rounds: list[float]) -> dict:
        from .generate import settings_record
        from .solvers import ADAPTIVE_SOLVERS

        seconds, b = statistics.median(rounds), self.b
        return {
            # steps as every --json row records them (null for dopri5, which chooses its own and is timed whole)
            "solver": self.s.solver, "steps": settings_record(self.s)["steps"], "timed_steps": self.timed if self.s.solver not in ADAPTIVE_SOLVERS else None,
            "cfg": self.s.cfg, "nfe": self.nfe,
            "forward_batch": 2 * b if self.guided else b,
            "forward_rows": self.full_rows,  # network rows the full solve of the batch evaluates (a guided NFE: 2 per image)
            "img_per_s": b / seconds, "img_nfe_per_s": b * self.nfe / seconds, "seconds": seconds,
            "seconds_rounds": rounds, "seconds_spread": timing_spread(rounds),
            "precision": self.loaded.model.precision,
            "compiled": self.loaded.model.compiled,  # false after a compile that failed and fell back to eager
        }  # fmt: skip


class _CountingNet:
    """The sampling network, counting the rows it evaluates; `dry`: returns a zero velocity without running it."""

    def __init__(self, net):
        self.net, self.rows, self.dry = net, 0, False

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        self.rows += x.shape[0]
        return torch.zeros_like(x, dtype=torch.float32) if self.dry else self.net(x, t, **cond)


class _SyntheticPrompts:
    """Stands in for a text encoder in `fm bench`: every prompt becomes the same synthetic token states."""

    def __init__(self, text):
        self.text = text

    def conditions(self, prompts: list[str], device) -> tuple[dict, dict]:
        uncond = self.text.uncond(len(prompts), device)
        return {k: v.clone() for k, v in uncond.items()}, uncond


def _summarise(result: dict, flops_fwd: int, peak: float | None, cfg: Config) -> dict:
    out = {"params": result["params"], "memory": result["memory"]}
    if "train" in result:
        tr = dict(result["train"])
        tr["mfu"] = None if peak is None else tr["img_per_s"] * 3 * flops_fwd / peak
        out["train"] = tr
    if "sample" in result:
        sa = dict(result["sample"])
        sa["compile"] = sa.pop("compiled")  # what ran: false after a compile that fell back to eager
        # The network rows the full solve evaluates per image (2 per guided NFE: outside a guidance interval, 1).
        per_image = flops_fwd * sa["forward_rows"] / result["batch"]
        sa["flops_per_image"] = per_image
        sa["mfu"] = None if peak is None else sa["img_per_s"] * per_image / peak
        out["sample"] = sa
    return out


def _timed_figures(report: dict) -> list[tuple[str, dict, dict]]:
    """(name, spread, what a round is) of every timed figure in a report: fm's (and diffusers') training (a
    round's seconds per step) and sampling (a round's seconds per solve of the batch), with img/s per round."""
    rows = [("fm", report)] + ([("diffusers", report["compare"]["diffusers"])] if report.get("compare") else [])
    out = []
    for name, r in rows:
        for part, key, unit in (("train", "step_ms_spread", 1000), ("sample", "seconds_spread", 1)):
            sp = (r.get(part) or {}).get(key)
            if sp:
                what = f"{r[part]['steps_per_round']} steps" if part == "train" else "one solve"
                out.append((f"{name} {part}", sp, {"what": what, "img_per_s": lambda v, u=unit: report["batch_size"] * u / v}))
    return out


def _ratio_spreads(report: dict) -> list[tuple[str, dict]]:
    """(name, spread) of every ratio in a report: ours / diffusers per part, the mean-flow and the REPA step's cost."""
    out = [(f"ours / diffusers ({part})", r) for part, r in ((report.get("compare") or {}).get("ratio_spread") or {}).items()]
    for key, name in (("meanflow", "the mean-flow step's cost"), ("repa", "the REPA step's cost")):
        if (report.get(key) or {}).get("step_cost_spread"):
            out.append((name, report[key]["step_cost_spread"]))
    return out


def timing_warnings(report: dict, opts: BenchOptions) -> list[str]:
    """The stderr warnings that say a report's timings cannot be trusted: too few rounds to show a spread, too
    few training steps a round to time, or rounds that range wider than NOISY_SPREAD of their median."""
    out = []
    if opts.rounds < MIN_ROUNDS:
        out.append(f"warning: --rounds {opts.rounds} shows no spread worth the name: each figure is one or two measurements (use --rounds {MIN_ROUNDS} or more)")
    if opts.steps < MIN_STEPS and opts.mode in ("train", "both"):
        out.append(f"warning: --steps {opts.steps} is too few training steps a round to time (one slow step moves the figure; use --steps {MIN_STEPS} or more)")
    noisy = [(name, sp["rel_spread"], sp["n"]) for name, sp, _ in _timed_figures(report) if sp["n"] > 1]
    noisy += [(name, (sp["max"] - sp["min"]) / sp["ratio"], sp["rounds"]) for name, sp in _ratio_spreads(report) if sp.get("min") is not None and sp["rounds"] > 1]
    for name, rel, n in noisy:
        if not rel <= NOISY_SPREAD:  # nan or inf too
            out.append(f"warning: {name} ranges over {rel:.0%} of its median in {n} rounds: too noisy to trust (the machine's load "
                       "or clock changed while measuring); rerun on an idle machine, or with more --steps / --rounds")  # fmt: skip
    return out


def _range(sp: dict | None) -> str:
    if not sp or sp.get("min") is None:
        return "from separate trials, not interleaved" if sp else "not measured"
    return f"{sp['min']:.2f}-{sp['max']:.2f}x over {sp['rounds']} interleaved rounds"


def bench_notes(report: dict) -> list[str]:
    """The lines printed under the table: each figure's median and spread over its rounds, the diffusers
    ratio and the mean-flow and REPA steps' cost (with the spread of their per-round ratios), when measured."""
    notes = []
    for name, sp, round_ in _timed_figures(report):
        rate = round_["img_per_s"]  # the slowest round is the smallest img/s
        notes.append(f"{name}: {rate(sp['median']):.2f} img/s, median of {sp['n']} round{'s' * (sp['n'] != 1)} of {round_['what']} "
                     f"(range {rate(sp['max']):.2f}-{rate(sp['min']):.2f} img/s, {sp['rel_spread']:.0%} of the median)")  # fmt: skip
    if report.get("compare"):
        spread = report["compare"].get("ratio_spread") or {}
        notes.append(f"ours / diffusers: {', '.join(f'{k} {v:.2f}x ({_range(spread.get(k))})' for k, v in report['compare']['ratio'].items())}")
    if report.get("meanflow"):
        mf = report["meanflow"]
        notes.append(f"mean-flow step {mf['meanflow_step_ms']:.1f} ms = {mf['step_cost_vs_flow']:.2f}x the flow-matching step ({mf['flow_step_ms']:.1f} ms; JVP on {mf['jvp_fraction']:.0%} of the rows; "
                     f"per-round ratio {_range(mf.get('step_cost_spread'))})")  # fmt: skip
    if report.get("repa"):
        ra = report["repa"]
        notes.append(f"REPA step {ra['repa_step_ms']:.1f} ms = {ra['step_cost_vs_plain']:.2f}x the step without it ({ra['plain_step_ms']:.1f} ms; tokens after block {ra['depth']} aligned; "
                     f"per-round ratio {_range(ra.get('step_cost_spread'))})")  # fmt: skip
    return notes


def bench_table(report: dict):
    """The rich table `fm bench` prints on stdout (on stderr with --json) (fm, and diffusers with --compare)."""
    from rich.table import Table

    def num(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    how = lambda precision, compiled: f"{precision}, {'compiled' if compiled else 'eager'}"  # noqa: E731
    sampled = report.get("sample")
    sampling = f"; sampling {how(sampled['precision'], sampled['compile'])}" if sampled else ""
    title = f"fm bench: {report['preset']} on {report['device']} ({how(report['precision'], report['compile'])}{sampling}, batch {report['batch_size']})"
    table = Table(title=title)
    table.add_column("model")
    for col in ("train img/s", "train MFU", "sample img/s", "sample img*NFE/s", "peak MiB", "params (M)", "GFLOPs/img fwd"):
        table.add_column(col, justify="right")
    rows = [("fm", report)] + ([("diffusers", report["compare"]["diffusers"])] if report.get("compare") else [])
    for name, r in rows:
        tr, sa, mem = r.get("train") or {}, r.get("sample") or {}, r["memory"]
        peak = mem["peak_reserved_mib"] if mem["peak_reserved_mib"] is not None else mem["peak_rss_mib"]
        table.add_row(
            name, num(tr.get("img_per_s")), num(tr.get("mfu"), "{:.1%}"), num(sa.get("img_per_s"), "{:.2f}"), num(sa.get("img_nfe_per_s")),
            num(peak, "{:.0f}"), f"{r['params'] / 1e6:.2f}", f"{report['flops_per_image']['forward'] / 1e9:.3f}",
        )
    return table
