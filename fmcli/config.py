"""Typed settings: pydantic models (unknown keys are errors), preset loading (with `base = "NAME"` inheritance),
the DiT model-size registry and `--set a.b=value` overrides.

The pydantic models are the single source of truth for every setting and its default (docs/architecture.md section 6).
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import typing
import tomllib
import types
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data.prepare import SOURCES
from .errors import RuntimeFailure, UsageError
from .flow import COUPLINGS, OBJECTIVES, TIME_SAMPLERS
from .encoders import VaePrecision
from .hardware import CompileSetting, DeviceSetting, PrecisionSetting
from .solvers import GuidanceName, SolverName
from .optim import OPTIMIZERS
from .tracking import TRACKERS

M = TypeVar("M", bound=BaseModel)

# The DiT paper's model sizes (Peebles & Xie 2023, table 1): width, depth, heads; "/P" is the patch size.
_DIT_FAMILIES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
MODEL_SIZES: dict[str, dict[str, int]] = {
    f"DiT-{family}/{patch}": {"hidden_size": width, "depth": depth, "heads": heads, "patch_size": patch}
    for family, (width, depth, heads) in _DIT_FAMILIES.items()
    for patch in (2, 4, 8)
}
SIZE_FIELDS = ("hidden_size", "depth", "heads", "patch_size")  # what a size name sets


class Strict(BaseModel):
    # allow_inf_nan=False: every float setting refuses nan and inf ("Input should be a finite number"); an
    # infinite budget or guidance weight otherwise turns into nan arithmetic or black images further on.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_a_number(cls, value: Any, info) -> Any:
        # pydantic's lax mode reads true as 1 and false as 0: `steps = true` would train one step, `lr = true` at 1.0.
        if problem := bool_for_number(cls.model_fields[info.field_name].annotation, value):
            raise ValueError(problem)
        return value


def _union_members(annotation: Any) -> list:
    """The types a field's annotation accepts: Annotated[X, ...] is X, a union its members (flattened)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _union_members(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [member for arg in typing.get_args(annotation) for member in _union_members(arg)]
    return [annotation]


def bool_for_number(annotation: Any, value: Any) -> str | None:
    """Why `value` is a boolean where `annotation` wants a number (also as an item of a tuple or list setting), or None."""
    members = _union_members(annotation)
    if isinstance(value, bool):
        numeric_choices = any(typing.get_origin(m) is Literal and all(type(a) in (int, float) for a in typing.get_args(m)) for m in members)
        if bool not in members and (int in members or float in members or numeric_choices):
            return f"Input should be a number, not the boolean {str(value).lower()}"
        return None
    if not isinstance(value, (list, tuple)):
        return None
    for member in members:
        if typing.get_origin(member) not in (tuple, list):
            continue
        args = typing.get_args(member)
        items = [args[0]] * len(value) if len(args) == 1 or args[-1] is Ellipsis else list(args)
        for index, (item_type, item) in enumerate(zip(items, value)):
            if problem := bool_for_number(item_type, item):
                return f"item {index}: {problem}"
    return None


class ModelConfig(Strict):
    arch: Literal["dit", "unet"] = "dit"
    # A name from MODEL_SIZES (e.g. "DiT-B/2") sets SIZE_FIELDS; fields given next to it override the name.
    size: str | None = None
    hidden_size: int = Field(384, gt=0)
    depth: int = Field(12, gt=0)
    heads: int = Field(6, gt=0)
    patch_size: int = Field(2, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    cross_attention: bool = False  # text conditioning: cross-attention to the text encoder's token states
    # A second time input, the end of the interval the output averages over (mean-flow models). Follows
    # flow.objective = "meanflow" when not given (Config._end_time_follows_the_objective).
    end_time: bool = False
    # What the network outputs: the velocity, or the data x1 from which the velocity follows (flow.py, "Data
    # prediction"); every consumer sees the velocity either way.
    prediction: Literal["velocity", "data"] = "velocity"
    text_dim: int | None = Field(None, gt=0)  # width of the text states; filled from the text encoder when unset
    # U-Net (arch = "unet"): base channels = hidden_size, one level per multiplier.
    channel_mult: tuple[Annotated[int, Field(gt=0)], ...] = Field((1, 2, 2), min_length=1)
    layers_per_block: int = Field(2, gt=0)
    # Filled from the prepared dataset's manifest when left unset (None).
    image_size: int | None = Field(None, gt=0)
    in_channels: int | None = Field(None, gt=0)
    num_classes: int | None = Field(None, ge=0)  # 0 = unconditional

    @model_validator(mode="before")
    @classmethod
    def _fill_from_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("size") in MODEL_SIZES:
            return {**MODEL_SIZES[data["size"]], **data}
        return data  # an unknown name is reported by _known_size with the field's own location

    @field_validator("size")
    @classmethod
    def _known_size(cls, size: str | None) -> str | None:
        if size is not None and size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {size!r}; known sizes: {', '.join(MODEL_SIZES)}")
        return size

    @model_validator(mode="after")
    def _size_is_for_dit(self):
        if self.size is not None and self.arch != "dit":
            raise ValueError(f"model.size {self.size!r} names a DiT size; it needs arch = 'dit' (drop size for the U-Net)")
        return self

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        return self

    @model_validator(mode="after")
    def _builds_for_its_image(self):
        if self.arch == "dit" and self.hidden_size % 4:  # half the channels for rows, half for columns, each sin + cos
            raise ValueError(f"hidden_size {self.hidden_size} must be divisible by 4 for the DiT's 2D sin-cos positions")
        if self.arch == "dit" and int(self.hidden_size * self.mlp_ratio) < 1:  # models/dit.py: int(width * mlp_ratio) units
            raise ValueError(f"model.mlp_ratio {self.mlp_ratio} gives the DiT's MLP no hidden unit at hidden_size {self.hidden_size}: raise it")
        if self.image_size is not None and (problem := image_misfit(self, self.image_size)):
            raise ValueError(problem)
        return self


def image_misfit(model: "ModelConfig", image_size: int) -> str | None:
    """Why `model` cannot take images (or latents) of `image_size`, or None: a DiT cuts them into whole patches,
    a U-Net halves them once per level but the last (models/dit.py, models/unet.py)."""
    if model.arch == "dit" and image_size % model.patch_size:
        return f"image size {image_size} is not divisible by model.patch_size {model.patch_size}"
    levels = len(model.channel_mult)
    if model.arch == "unet" and image_size % 2 ** (levels - 1):
        return f"image size {image_size} is not divisible by 2^{levels - 1} (model.channel_mult has {levels} levels)"
    return None


class FlowConfig(Strict):
    # "meanflow": the network predicts the average velocity over [t, t_end] (flow.py, "Mean flows")
    objective: Literal[OBJECTIVES] = "flow"
    meanflow_ratio: float = Field(0.25, ge=0.0, le=1.0)  # fraction of training pairs with t_end > t (the rest: t_end = t)
    meanflow_power: float = Field(1.0, ge=0.0)  # adaptive loss weight 1 / (mse + 1e-3)^p per sample; 0 = plain MSE
    sigma_min: float = Field(1e-5, ge=0.0, lt=1.0)
    time_sampler: Literal[TIME_SAMPLERS] = "uniform"  # zero: one-step distillation on reflow pairs
    logit_mean: float = 0.0  # on t (t = 1 data): SD3's sigma-based mean m is logit_mean = -m here
    logit_std: float = Field(1.0, gt=0)
    # SD3-style time shift (flow.shift_time; 1 = none), also the sampling grid's unless sample.shift is set;
    # "auto": resolution_shift of the data's dimension, resolved to a number from the data (resolve)
    shift: float | Literal["auto"] = 1.0
    coupling: Literal[COUPLINGS] = "independent"  # pairs: x0 stored with x1 in an `fm reflow` dataset
    sinkhorn_reg: float = Field(0.05, gt=0)
    sinkhorn_iters: int = Field(100, gt=0)
    cond_dropout: float = Field(0.1, ge=0.0, le=1.0)

    @field_validator("shift", mode="before")
    @classmethod
    def _positive_shift(cls, shift):
        if shift == "auto":
            return shift
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not 0 < shift < float("inf"):
            raise ValueError(f"must be a finite number > 0 or \"auto\", got {shift!r}")
        return float(shift)


class DataConfig(Strict):
    source: Literal[SOURCES] = "shapes"
    path: str | None = None  # prepared dataset directory; for `shapes` it is made on first use
    image_size: int = Field(32, gt=0)  # used when `fm train` prepares shapes data itself
    count: int = Field(20000, gt=0)
    seed: int = Field(0, ge=0)  # seeds and names the auto-prepared shapes data, so a train.seed sweep keeps the same data
    flip: bool = False
    num_workers: int = Field(0, ge=0)


# Adam's betas: torch refuses any outside [0, 1) only when the optimizer is built, deep into a run.
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class OptimConfig(Strict):
    name: Literal[OPTIMIZERS] = "adamw"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = off
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    warmup_start_factor: float = Field(0.1, gt=0, le=1)
    min_lr_factor: float = Field(0.1, ge=0, le=1)


# What train.budget_fallback may change: the recipe's size and optimisation, never the data or the hardware choice.
FALLBACK_KEY_PREFIXES = ("model.", "optim.", "flow.", "sample.", "train.global_batch_size", "train.micro_batch_size", "train.steps", "train.ema_decay")


class BudgetFallback(Strict):
    """train.budget_fallback: a smaller recipe for a machine slower than the preset was tuned on. Where the
    budget fits fewer than `min_steps` of the preset's own steps, a fresh run trains `overrides` instead."""

    min_steps: int = Field(gt=0)
    # min_steps where REPA is on (repa.encoder resolved to "domain"): its gain per step moves the point where a
    # smaller model's extra steps pay (docs/benchmarks.md, "Representation alignment"); None = min_steps.
    min_steps_with_repa: int | None = Field(None, gt=0)
    overrides: list[str] = Field(min_length=1)  # `--set`-style items, e.g. "model.hidden_size=64"

    def threshold(self, cfg: "Config") -> int:
        """The min_steps that applies to the run of `cfg` (REPA resolved)."""
        return self.min_steps_with_repa if cfg.repa.encoder == "domain" and self.min_steps_with_repa is not None else self.min_steps

    @field_validator("overrides")
    @classmethod
    def _sizes_and_optimisation_only(cls, items):
        for item in items:
            if "=" not in item or not (key := parse_override(item)[0]).startswith(FALLBACK_KEY_PREFIXES):
                raise ValueError(f"{item!r}: a fallback sets model.*, optim.*, flow.*, sample.* or train.global_batch_size/micro_batch_size/steps/ema_decay as KEY=VALUE")
        try:  # here, not only when the fallback's config is built: a dropped fallback is checked too (keys exist)
            _overrides_layer(items, label="", once=False)  # each key once: load_config (a stored config still loads)
        except UsageError as err:
            raise ValueError(str(err)) from None
        return items


class TrainConfig(Strict):
    steps: int = Field(1000, gt=0)
    global_batch_size: int = Field(64, gt=0)
    micro_batch_size: int | Literal["auto"] | None = None  # None = global / world size (no accumulation)
    # "auto": bf16 on CUDA when supported; on a CPU bf16 only where a measured probe finds it faster (fmcli.hardware)
    precision: PrecisionSetting = "auto"
    device: DeviceSetting = "auto"  # hardware.resolve_device
    ema_decay: float = Field(0.9999, ge=0, le=1)
    ema_warmup: bool = False
    # 32-bit (fmcli.seeding.seed_problem), checked where a new run starts (launch.training_config), not here: a
    # checkpoint of an older run with another seed keeps loading.
    seed: int = 0
    log_every: int = Field(50, gt=0)
    sample_every: int = Field(0, ge=0)  # 0 = only at the end
    checkpoint_every: int = Field(0, ge=0)  # 0 = only at the end
    keep_last: int = Field(2, ge=1)
    keep_every: int = Field(0, ge=0)  # also keep every k-th step's checkpoint; 0 = off
    # Fresh runs lower `steps` so that they fit this many minutes at the step time measured at start (fmcli.train)
    budget_minutes: float | None = Field(None, gt=0)
    budget_fallback: BudgetFallback | None = None  # a smaller recipe where the budget fits too few steps
    compile: CompileSetting = False  # "auto": where inductor works (CUDA, or a CPU with a C++ compiler)
    max_nan_skips: int = Field(0, ge=0)  # non-finite losses or gradients tolerated (step skipped) in the run, resumes included, before stopping
    tracker: Literal[TRACKERS] = "none"  # also log metrics.jsonl records and sample grids there (rank 0)
    init_from: str | None = None  # start from these weights (a checkpoint, run or export directory: its EMA), e.g. reflow's teacher


    @field_validator("micro_batch_size")
    @classmethod
    def _positive_micro_batch(cls, micro):
        # 0 would otherwise read as None (the whole global batch per rank), a negative fail only when training starts.
        if isinstance(micro, int) and micro <= 0:
            raise ValueError(f"must be a number of images > 0, \"auto\" or none (= global batch / processes), got {micro}")
        return micro


class SampleConfig(Strict):
    solver: SolverName = "euler"  # the names live in solvers.SOLVERS
    steps: int = Field(50, gt=0, le=100_000)  # more is a typo, not a finer grid: it would only exhaust memory
    cfg: float = Field(1.0, ge=0)  # guidance weight w (1 = off), for every guidance method
    guidance: GuidanceName = "cfg"  # solvers.GUIDANCES; "auto" needs a guide checkpoint (--guide-ckpt)
    zero_init_steps: int = Field(1, ge=0)  # cfg-zero: the first K steps have zero velocity (CFG-Zero*)
    sde_noise: float = Field(1.0, ge=0)  # euler-sde: g(t)^2 = 2 * sde_noise * (1 - t) (SiT's norm); 0 = the ODE (Euler)
    rtol: float = Field(1e-5, gt=0)
    atol: float = Field(1e-5, gt=0)
    guidance_interval: tuple[float, float] | None = None  # [t_lo, t_hi]: CFG only for t in it
    shift: float | None = Field(None, gt=0)  # time-grid shift; None = the training flow.shift (filled by resolve)
    grid_size: int = Field(16, gt=0)  # images in the periodic training sample grid
    # How the network runs while sampling (`fm sample`, class-grid, fid, reflow, demo, bench): resolved on the
    # sampling machine like train.precision / train.compile (fmcli.hardware), never taken from the training run.
    # The solver's state and arithmetic stay fp32; only the network runs under autocast.
    precision: PrecisionSetting = "auto"
    compile: CompileSetting = "auto"

    # Field validators (not a model validator) so that an error names its own setting and option.
    @field_validator("guidance_interval")
    @classmethod
    def _interval_in_unit_range(cls, interval):
        if interval is not None and not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1, got {list(interval)}")
        return interval

    @field_validator("zero_init_steps")
    @classmethod
    def _zero_init_below_steps(cls, zero_init_steps, info):
        # One rule for every solver: cfg-zero's zero-init spans the first K steps of the `steps`-step time grid
        # (dopri5 then integrates from that grid time on), so K must leave some of the grid to integrate.
        steps, guidance = info.data.get("steps"), info.data.get("guidance")
        if guidance == "cfg-zero" and steps is not None and zero_init_steps >= steps:
            raise ValueError(
                f"zero_init_steps ({zero_init_steps}) must be below steps ({steps}) with cfg-zero, for every solver "
                "(dopri5 too: the zero-init spans that many of `steps` grid steps); cfg-zero would never move the noise"
            )
        return zero_init_steps


EVAL_FEATURES = ("inception", "tiny", "domain", "dinov2")  # eval.features' named spaces (else module:factory)


def refuse_unknown_eval_features(cfg: "Config", source: str) -> None:
    """eval.features must name a space or a module:factory. Checked where a config is written (load_config, a resume's
    --set), not only where an evaluator is built: with eval.every = 0 or no eval.ref a typo would sit in config.json
    and the checkpoints and fail at a later resume that gives the reference. Not in the model's validator: a stored
    checkpoint's config with another value must still load to be sampled, exported or resumed with a --set."""
    features = cfg.eval.features
    module, _, factory = features.partition(":")
    if features not in EVAL_FEATURES and not (module.strip() and factory.strip()):
        raise UsageError(f"invalid config ({source}): eval.features: must be {', '.join(EVAL_FEATURES)} or module:factory, got {features!r}")


class EvalConfig(Strict):
    every: int = Field(0, ge=0)  # evaluate the EMA model every k steps (0 = off), logged to metrics.jsonl
    num_samples: int = Field(5000, gt=0)
    # inception | tiny | module:factory: FID against eval.ref (only inception is comparable to papers);
    # domain | dinov2: FD, precision, recall, density, coverage (and accuracy) beside their real-vs-real floor
    # (fmcli.fidelity), against eval.ref or, unset, the training data
    features: str = "inception"
    ref: str | None = None  # prepared dataset, image folder or stats .npz (`fm fid --save-stats`); domain/dinov2: a prepared dataset
    classifier: str | None = None  # domain: the classifier's cache file (None = beside the dataset)
    dinov2: str | None = None  # dinov2: a local transformers Dinov2Model directory (None = $FM_DINOV2)
    inception: str | None = None  # inception-2015-12-05.pt; None = $FM_INCEPTION
    inception_unverified: bool = False  # accept an Inception file whose sha256 is not the reference one


class RepaConfig(Strict):
    # Representation alignment (fmcli/repa.py): "domain" pulls the DiT's tokens after block `depth` toward the
    # features of fm's in-domain classifier of the training data (labelled pixel data); "none" = off; "auto" =
    # "domain" where the run can have it (a flow-matching DiT on labelled pixel data), else "none" (`resolve`).
    encoder: Literal["none", "auto", "domain"] = "none"
    depth: int = Field(2, gt=0)  # align the tokens after this many blocks (at most model.depth)
    weight: float = Field(0.5, gt=0)  # the loss is flow matching + weight * (1 - mean cosine similarity)
    seed: int = Field(1, ge=0)  # the classifier's seed: not fm eval's 0, so a run is not scored in the features it was pulled toward
    classifier: str | None = None  # the classifier's cache file; None = beside the dataset (fm-classifier-s{seed}.pt)
    # iREPA (Singh et al. 2025): what transfers is the target's spatial structure. "conv" projects the token grid
    # with one 3x3 convolution (neighbours inform each token) instead of the paper's per-token MLP, and
    # spatial_norm standardises each target channel over the image's tokens (its image-wide mean, which every
    # token shares, removed).
    projector: Literal["mlp", "conv"] = "mlp"
    # The classifier's map the target is read from, by its stride: 8 = its last (128 channels at 1/8 of the image),
    # 4 = its third layer (64 channels at 1/4: a patch-4 DiT's own token grid, one cell per token).
    feature_stride: Literal[4, 8] = 8
    spatial_norm: bool = False


class EncodersConfig(Strict):
    vae: str | None = None  # local diffusers AutoencoderKL directory (or env FM_VAE)
    text_encoder: str | None = None  # local transformers encoder directory (or env FM_TEXT_ENCODER), or "builtin:tiny-t5"
    max_tokens: int = Field(128, gt=0)
    vae_precision: VaePrecision = "fp32"  # decoding precision (bf16 only on CUDA)


class Config(Strict):
    name: str = "run"
    model: ModelConfig = ModelConfig()
    flow: FlowConfig = FlowConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    repa: RepaConfig = RepaConfig()
    encoders: EncodersConfig = EncodersConfig()

    def with_section(self, section: str, **changes) -> "Config":
        """This config with fields of one section replaced, e.g. `cfg.with_section("train", steps=100)`. Not
        validated (`model_copy`): for values fm derived itself; a user's value goes through `with_setting`."""
        return self.model_copy(update={section: getattr(self, section).model_copy(update=changes)})

    @model_validator(mode="before")
    @classmethod
    def _end_time_follows_the_objective(cls, data: Any) -> Any:
        """A mean-flow objective needs the network's second time input: model.end_time defaults to it."""
        if not isinstance(data, dict):
            return data
        flow, model = data.get("flow"), data.get("model")
        objective = flow.get("objective") if isinstance(flow, dict) else getattr(flow, "objective", None)
        if objective != "meanflow":
            return data
        if model is None:
            return {**data, "model": {"end_time": True}}
        if isinstance(model, dict) and "end_time" not in model:
            return {**data, "model": {**model, "end_time": True}}
        if isinstance(model, BaseModel) and "end_time" not in model.model_fields_set:
            return {**data, "model": model.model_copy(update={"end_time": True})}
        return data

    @model_validator(mode="after")
    def _muon_has_its_matrices(self):
        # Muon updates the DiT blocks' 2-D weights (optim.build_optimizer); a U-Net has none of them, so Muon
        # would silently leave every weight to AdamW.
        if self.optim.name == "muon" and self.model.arch != "dit":
            raise ValueError(f"optim.name='muon' updates the DiT blocks' matrices; model.arch={self.model.arch!r} has none: set optim.name='adamw'")
        return self

    @model_validator(mode="after")
    def _meanflow_is_consistent(self):
        mean_flow = self.flow.objective == "meanflow"
        if self.model.end_time != mean_flow:
            raise ValueError(f"model.end_time={str(self.model.end_time).lower()} goes with flow.objective='meanflow' only (got {self.flow.objective!r}); drop model.end_time")
        if mean_flow and self.model.arch != "dit":
            raise ValueError("flow.objective='meanflow' is implemented for model.arch='dit' only")
        if mean_flow and self.flow.time_sampler == "zero":  # t = t_end = 0 on every row: no interval is ever learnt
            raise ValueError("flow.objective='meanflow' learns intervals [t, t_end] between times drawn by flow.time_sampler; 'zero' draws only t = 0: use 'uniform' or 'logit_normal'")
        if mean_flow != (self.sample.solver == "meanflow"):
            want = "sample.solver='meanflow' (its average-velocity jumps)" if mean_flow else "a flow solver, not sample.solver='meanflow' (mean-flow models only)"
            raise ValueError(f"flow.objective={self.flow.objective!r} samples with {want}")
        return self

    @model_validator(mode="after")
    def _repa_has_its_tokens(self):
        if self.repa.encoder != "domain":  # "auto" becomes "domain" only where these hold (with_resolved_repa)
            return self
        if self.model.arch != "dit":
            raise ValueError(f"repa.encoder={self.repa.encoder!r} aligns a DiT's tokens; model.arch={self.model.arch!r} has none: set repa.encoder='none'")
        if self.repa.depth > self.model.depth:
            raise ValueError(f"repa.depth {self.repa.depth} is deeper than the model (model.depth {self.model.depth}): choose 1..{self.model.depth}")
        if self.flow.objective != "flow":
            raise ValueError(f"repa.encoder={self.repa.encoder!r} is implemented for flow.objective='flow' (got {self.flow.objective!r}): set repa.encoder='none'")
        if self.model.cross_attention:
            raise ValueError("repa.encoder='domain' needs the labelled images of a class-conditional dataset; text models have none: set repa.encoder='none'")
        return self

    @model_validator(mode="after")
    def _data_prediction_ends_at_the_data(self):
        # velocity_from_data follows the straight path to x1; with a sigma_min > 0 the path ends beside it.
        if self.model.prediction == "data" and self.flow.sigma_min > 1e-4:
            raise ValueError(f"model.prediction='data' needs the path to end at the data: flow.sigma_min <= 1e-4 (got {self.flow.sigma_min}); or model.prediction='velocity'")
        return self

    @model_validator(mode="after")
    def _no_ot_for_text(self):
        # Re-pairing noise across a text batch would detach images from their captions (docs/architecture.md section 3).
        if self.model.cross_attention and self.flow.coupling not in ("independent", "pairs"):
            raise ValueError("flow.coupling must be 'independent' (or 'pairs') for text models (model.cross_attention = true)")
        return self

    @model_validator(mode="after")
    def _fallback_is_a_valid_config(self):
        if self.train.budget_fallback is None:
            return self
        if self.train.budget_minutes is None:
            raise ValueError("train.budget_fallback needs train.budget_minutes (it is chosen from the steps that fit the budget)")
        budget_fallback_config(self)  # its overrides must make a valid config too
        return self


# Settings that may change when a run is resumed: they do not alter the math of the steps already taken.
RESUME_SAFE_KEYS = {
    "train.steps",
    "train.log_every",
    "train.sample_every",
    "train.checkpoint_every",
    "train.keep_last",
    "train.keep_every",
    "train.max_nan_skips",
    "train.compile",
    "train.tracker",  # where the records also go (metrics.jsonl is always written); a tracker may start or stop mid-run
    "train.device",  # the same math on another device (a run moved to a machine without CUDA); bit for bit only on the same one
    "sample.precision",  # how `fm sample` runs the network later, resolved on the sampling machine
    "sample.compile",
    "data.num_workers",
    "eval.every",
    "eval.num_samples",
    "eval.ref",
    "eval.features",
    "eval.inception",
    "eval.classifier",  # like the encoders' paths, the evaluation's weight files may move between sessions
    "eval.dinov2",
    "eval.inception_unverified",
    "sample.guidance",  # only the sample grids use it; lets a run saved with "auto" (refused in training) resume
    "encoders.vae",  # the frozen encoders' local paths may move between sessions
    "repa.classifier",  # a moved cache; a resume checks the classifier is the one the run trained with (its key)
    "encoders.text_encoder",
}
# Keys a resume refuses for a reason other than the math, with what to do instead.
RESUME_REFUSALS = {
    "train.budget_minutes": "--set train.budget_minutes cannot change when resuming: a resumed run continues its checkpoint's "
                            "schedule and is never fitted to a budget; set its length with --set train.steps=N",
    "train.precision": "--set train.precision cannot change when resuming: the run continues at the precision its optimizer and "
                       "grad scaler trained at; to train at another (e.g. an fp16 run on a machine without CUDA), start a new run "
                       "from its weights: --set train.init_from=CHECKPOINT",
}


def check_training_config(cfg: Config) -> None:
    """What a config may hold for sampling but not for training: autoguidance needs a guide checkpoint, which
    `fm sample --guide-ckpt` gives and training's sample grids have no way to (they would fail mid-run); the
    time sampler 'zero' trains only on reflow pairs."""
    configs = [("", cfg)]
    if cfg.train.budget_fallback is not None:
        configs.append((" (in train.budget_fallback.overrides)", budget_fallback_config(cfg)))
    for where, c in configs:
        # At t = 0 alone the network sees only the noise; unless that noise is the teacher's own for the image (a
        # reflow pair), the best it can learn is the mean image minus the noise: every one-step sample is the mean.
        if c.flow.time_sampler == "zero" and c.flow.coupling != "pairs":
            raise UsageError(
                f"flow.time_sampler='zero'{where} distils reflow pairs (one step from each teacher noise) and needs "
                f"flow.coupling='pairs' on an `fm reflow` dataset, got {c.flow.coupling!r}; or use 'uniform' / 'logit_normal'"
            )
        if c.sample.guidance == "auto":
            raise UsageError(
                f"sample.guidance='auto'{where} (autoguidance) needs a guide checkpoint, which training's sample grids cannot have; "
                "train with --set sample.guidance=cfg (or cfg-zero) and use `fm sample --guide-ckpt CKPT` afterwards"
            )


def with_setting(cfg: Config, key: str, value: Any) -> Config:
    """`cfg` with one setting (`section.field`) replaced and the whole config validated, as a `--set` would be.

    For values fm resolves itself (train.precision "auto" -> what runs): `model_copy(update=...)` skips
    validation, so a bad value would reach config.json and checkpoints that later commands then refuse.
    """
    raw = config_to_dict(cfg)
    _set_key(raw, key, value)
    return validate_config(raw, source=f"{key}={value!r}")


def flip_warning(cfg: Config) -> str | None:
    """data.flip mirrors images but not their captions, which may say "left" or "right": say so."""
    if cfg.data.flip and cfg.model.cross_attention:
        return "warning: data.flip mirrors captioned images, whose captions may say left/right (now wrong half the time); --set data.flip=false unless they never do"
    return None


def refuse_checkpoint_trust(stored: Config, overrides: list[str], source: str) -> None:
    """A checkpoint's config is data from wherever the file came from: it may not decide to run code.

    `eval.features = "module:factory"` makes fm import a module and call it, and
    `eval.inception_unverified = true` makes it torch.jit.load a file of unknown origin. Both are accepted
    from the user's command line or preset only; a checkpoint that carries them needs the user to repeat
    (or replace) them with --set when resuming.
    """
    given = {parse_override(item)[0] for item in overrides}
    if ":" in stored.eval.features and "eval.features" not in given:
        raise UsageError(
            f"{source} stores eval.features={stored.eval.features!r}, which would import and run that code; fm never does so "
            f"on a checkpoint's word: pass --set eval.features={stored.eval.features} if you trust it, or --set eval.features=inception"
        )
    if stored.eval.inception_unverified and "eval.inception_unverified" not in given:
        raise UsageError(
            f"{source} stores eval.inception_unverified=true; fm does not accept that from a checkpoint: "
            "pass --set eval.inception_unverified=true if you trust the Inception file, or =false"
        )


# Data shapes (channels, image size, classes) of the sources whose shape is known without the data.
KNOWN_SOURCE_SHAPES = {"cifar10": (3, 32, 10), "mnist": (1, 28, 10)}


def resolve(cfg: Config, manifest: dict) -> Config:
    """Fill the dataset-derived fields (model.image_size / in_channels / num_classes) once, from a prepared
    dataset's manifest; a setting that contradicts the data is an error."""
    c, h, w = manifest["shape"]
    # A text model (model.cross_attention) is conditioned on captions only, whatever labels the data has.
    num_classes = 0 if cfg.model.cross_attention else int(manifest.get("num_classes") or 0)
    facts = {"image_size": h, "in_channels": c, "num_classes": num_classes}
    update = {}
    for key, value in facts.items():
        current = getattr(cfg.model, key)
        if current is None:
            update[key] = value
        elif current != value:
            raise UsageError(f"model.{key}={current} does not match the dataset ({value}); remove the setting or fix the data")
    cfg = cfg.with_section("model", **update) if update else cfg
    if problem := image_misfit(cfg.model, h):
        raise UsageError(f"the dataset's {problem}: pick a model.patch_size (DiT) or model.channel_mult (U-Net) that divides it")
    return with_resolved_repa(with_data_dimension(cfg, c * h * w), manifest.get("kind", "pixels"))


def with_resolved_repa(cfg: Config, data_kind: str) -> Config:
    """repa.encoder = "auto" -> "domain" where the run can align to the in-domain classifier (a flow-matching DiT of
    at least repa.depth blocks, no text, on pixel data of at least 2 classes: the classifier learns to tell them
    apart, and refuses a single class), else "none"."""
    if cfg.repa.encoder != "auto":
        return cfg
    m = cfg.model
    fits = data_kind == "pixels" and (m.num_classes or 0) >= 2 and m.arch == "dit" and not m.cross_attention and cfg.flow.objective == "flow" and cfg.repa.depth <= m.depth
    return cfg.with_section("repa", encoder="domain" if fits else "none")


# The data dimension (values per sample) that trains unshifted under flow.shift = "auto": an MNIST-sized image.
# Measured (docs/benchmarks.md, "A time shift by the data's dimension"): 28x28x1 digits train best unshifted,
# 32x32x3 shapes with a shift near 2 (sqrt(3072 / 784) = 1.98).
AUTO_SHIFT_REFERENCE_DIM = 28 * 28


def resolution_shift(dim: int) -> float:
    """SD3's resolution-dependent time shift (Esser et al. 2024, sec. 5.3.2): sqrt(dim / reference), the same
    signal-to-noise ratio at a shifted time for data with more values per sample, which noise destroys more
    slowly; never below 1 (smaller data keeps the unshifted times it was measured to train well with)."""
    return max(1.0, (dim / AUTO_SHIFT_REFERENCE_DIM) ** 0.5)


def with_resolved_shift(cfg: Config, dim: int) -> Config:
    """flow.shift = "auto" replaced by its number for data of `dim` values per sample (model input)."""
    if cfg.flow.shift != "auto":
        return cfg
    return cfg.with_section("flow", shift=round(resolution_shift(dim), 4))


def with_data_dimension(cfg: Config, dim: int) -> Config:
    """Every default that follows from the data's `dim` values per sample: flow.shift = "auto" resolved, and
    sample.shift following it. `resolve` and `resolve_without_data` both end here, so a tool on synthetic
    tensors (bench, autotune) samples on the same grid as the run it stands for."""
    return with_sampling_shift(with_resolved_shift(cfg, dim))


def resolve_for_training(cfg: Config, dataset, device):
    """(the run's TextConditioning or None, `cfg` as a run trains it): every field the prepared `dataset`
    (data.dataset.PreparedDataset) decides filled (`resolve`), then the encoders' paths and the text width
    (encoders.setup_training_encoders). The launcher and every rank resolve through this one function."""
    from .encoders import setup_training_encoders

    return setup_training_encoders(resolve(cfg, dataset.manifest), dataset, device)


def with_sampling_shift(cfg: Config) -> Config:
    """sample.shift defaults to the shift the model was trained with (flow.shift)."""
    if cfg.sample.shift is not None:
        return cfg
    return cfg.with_section("sample", shift=cfg.flow.shift)


def sample_settings(base: SampleConfig, **overrides) -> SampleConfig:
    """`base` (a checkpoint's sample.* settings) with the given overrides (None = keep), validated once for
    every command and the demo; a bad value is a UsageError naming the option."""
    update = {k: v for k, v in overrides.items() if v is not None}

    def message(where: str, problem: str) -> str:
        where = where or next(iter(update), "sample")
        return f"invalid {where} (--{where.replace('_', '-')}): {problem}"

    return validated(SampleConfig, {**base.model_dump(), **update}, message)


def validated(model: type[M], raw: dict, message: Callable[[str, str], str], error: type[Exception] = UsageError) -> M:
    """`model.model_validate(raw)`, its first error raised as `error(message(key, problem))`: the one place a
    pydantic ValidationError becomes fm's one-line message (`key` dotted, empty at the top level; `problem`
    without pydantic's "Value error, " prefix, an unknown key called an unknown setting)."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        problem = "unknown setting" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
        raise error(message(".".join(str(p) for p in first["loc"]), problem)) from None


def resolve_without_data(cfg: Config) -> Config:
    """`resolve` for tools that use synthetic tensors (bench, autotune): the manifest at data.path when there
    is one, else the source's known shape (shapes = 3 x data.image_size, 10 classes; cifar10; mnist).
    Other sources need model.image_size, in_channels and num_classes set."""
    from .data.dataset import read_manifest, validate_prepared  # a manifest is checked before it is believed

    m = cfg.model
    manifest_path = Path(cfg.data.path) / "manifest.json" if cfg.data.path else None
    if None not in (m.image_size, m.in_channels, m.num_classes):  # repa.encoder "auto" resolved too, as `resolve` does
        kind = "pixels" if cfg.repa.encoder != "auto" or manifest_path is None or not manifest_path.exists() else read_manifest(cfg.data.path).get("kind", "pixels")
        return with_resolved_repa(with_data_dimension(cfg, m.in_channels * m.image_size**2), kind)
    if manifest_path is not None and manifest_path.exists():
        return resolve(cfg, validate_prepared(cfg.data.path))
    if cfg.data.source == "shapes":
        channels, size, classes = 3, cfg.data.image_size, 10
    elif cfg.data.source in KNOWN_SOURCE_SHAPES:
        channels, size, classes = KNOWN_SOURCE_SHAPES[cfg.data.source]
    else:
        raise UsageError(
            f"data.source={cfg.data.source!r}: set model.image_size, model.in_channels and model.num_classes "
            "(e.g. --set model.image_size=32) so the input shape is known without the dataset"
        )
    return resolve(cfg, {"shape": [channels, size, size], "num_classes": classes})


def presets_dir():
    """The folder of named presets: this source checkout's presets/, else the installed package data fmcli.presets.

    A checkout (PYTHONPATH or `pip install -e .`) reads its own folder, so the presets that run are the ones next to
    the code that runs; a wheel or `pip install .` ships the same files as fmcli/presets/ (pyproject.toml package-dir).
    """
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "presets").is_dir():
        return checkout / "presets"
    try:
        return importlib.resources.files("fmcli.presets")
    except ModuleNotFoundError:
        raise RuntimeFailure("this fm installation has no presets (package data fmcli.presets is missing); reinstall fm") from None


def preset_names() -> list[str]:
    return sorted(entry.name.removesuffix(".toml") for entry in presets_dir().iterdir() if entry.name.endswith(".toml"))


def load_config(preset: str | None, overrides: list[str] | None = None, note=None, data_path: str | None = None) -> Config:
    """Load a preset (a name in presets/ or a .toml path, with its bases), apply `a.b=value` overrides, validate.
    `note(line)` hears of a setting the overrides switched off along with another (the budget's fallback).
    `data_path` (`fm train --data`) sets data.path over both. A setting the user gave (a --set, or a key of their own
    preset file) that the run never reads is refused (`refuse_unread_settings`)."""
    given: dict[str, str] = {}  # key -> where the user gave it
    raw = _read_preset(preset, given) if preset is not None else {}  # --preset "" (an unset $VAR) is an unknown preset, not the defaults
    read_by_file = _read_by_the_file_alone(raw, given, bool(overrides) or data_path is not None)
    layer = _overrides_layer(overrides or [])
    given.update(dict.fromkeys(_section_keys(layer), "--set"))
    raw = _apply_layer(raw, layer)
    _refuse_repeated_fallback_keys(raw, preset or "defaults")
    _drop_overridden_fallback(raw, overrides or [], note or (lambda line: None), preset or "defaults")
    cfg = validate_config(raw, source=preset or "defaults")
    refuse_unknown_eval_features(cfg, preset or "defaults")
    cfg = cfg if data_path is None else cfg.with_section("data", path=data_path)
    # A key of the user's file that only the command line made unread (an ablation: --set flow.coupling=independent
    # over a file's Sinkhorn settings, --data beside its shapes size) is the file's word, not a mistake on this line.
    refuse_unread_settings(cfg, {key: where for key, where in given.items() if where == "--set" or key not in read_by_file})
    return cfg


def _read_by_the_file_alone(raw: dict, given: dict[str, str], changed: bool) -> set[str]:
    """The keys of the user's own preset file (`given`) that the file's config alone, before --set and --data
    (`changed`: any given), reads; empty where nothing changes it or it does not validate alone."""
    if not changed or not given:
        return set()
    try:
        alone = validate_config(copy.deepcopy(raw), source="preset")
    except UsageError:
        return set()
    return set(given) - set(unread_settings(alone))


def _section_keys(layer: dict) -> set[str]:
    """The `section.field` keys a preset layer (or the --set layer) states."""
    return {f"{section}.{key}" for section, table in layer.items() if isinstance(table, dict) for key in table}


def unread_settings(cfg: Config) -> dict[str, str]:
    """The settings the run of `cfg` never reads, each with why: the U-Net's size is hidden_size, channel_mult,
    layers_per_block and heads (models/unet.py), the DiT's hidden_size, depth, heads, patch_size and mlp_ratio
    (models/dit.py); data.image_size, count and seed make the shapes data fm prepares itself, which only a run
    with data.source = "shapes" and no data.path trains on (launch.default_data)."""
    unread = {}
    if cfg.model.arch == "unet":
        for key in ("model.depth", "model.patch_size", "model.mlp_ratio"):
            unread[key] = "is a DiT setting that the U-Net (model.arch = 'unet') never reads (its size is model.hidden_size, channel_mult, layers_per_block and heads)"
    else:
        for key in ("model.channel_mult", "model.layers_per_block"):
            unread[key] = "is a U-Net setting that the DiT (model.arch = 'dit') never reads (its size is model.hidden_size, depth, heads, patch_size and mlp_ratio)"
    data = cfg.data
    if data.path is not None or data.source != "shapes":
        where = (f"this run trains on data.path {data.path} as it was prepared" if data.path is not None else
                 f"data.source = {data.source!r} comes from `fm prepare-data {data.source}`, whose options set its data")
        for key in ("data.image_size", "data.count", "data.seed"):
            unread[key] = f"only sets up the shapes data fm prepares itself (data.source = 'shapes', no data.path) and is never read here: {where}"
    return unread | _unread_beside_choices(cfg)


def _unread_beside_choices(cfg: Config) -> dict[str, str]:
    """The settings of one choice that another choice leaves unread: the Sinkhorn coupling's (flow.couple), the
    logit-normal sampler's (flow.sample_times), the mean-flow objective's (step.TrainingStep), REPA's when it is off
    (repa.encoder = "none"; "auto" is resolved from the data, so its settings may be read), and the text
    encoder's without a text model (encoders.setup_training_encoders, generate)."""
    f, unread = cfg.flow, {}
    choices = [("flow.coupling", f.coupling, "ot-sinkhorn", ("flow.sinkhorn_reg", "flow.sinkhorn_iters"), "the Sinkhorn OT coupling"),
               ("flow.time_sampler", f.time_sampler, "logit_normal", ("flow.logit_mean", "flow.logit_std"), "the logit-normal time sampler"),
               ("flow.objective", f.objective, "meanflow", ("flow.meanflow_ratio", "flow.meanflow_power"), "the mean-flow objective")]
    for switch, value, wanted, keys, what in choices:
        for key in keys if value != wanted else ():
            unread[key] = f"is read only by {what} ({switch} = {wanted!r}), and this run's {switch} is {value!r}"
    if cfg.repa.encoder == "none":
        for key in ("depth", "weight", "seed", "classifier", "projector", "feature_stride", "spatial_norm"):
            unread[f"repa.{key}"] = "is a REPA setting and REPA is off (repa.encoder = 'none'; 'domain' or 'auto' turns it on)"
    if not cfg.model.cross_attention:
        for key in ("encoders.text_encoder", "encoders.max_tokens", "model.text_dim"):
            unread[key] = "is a text-conditioning setting and this model has none (model.cross_attention = false; true makes a text model)"
    return unread


def refuse_unread_settings(cfg: Config, given: dict[str, str]) -> None:
    """A setting the user gave (`given`: key -> where, "--set" or their preset file) that the run of `cfg` never
    reads (`unread_settings`) is an error, not accepted to do nothing; so is a key of train.budget_fallback.overrides
    the fallback's config never reads, where the user gave the fallback (a key that config reads is read: the run
    may train it). Only given keys, where a config is written:
    a shipped preset's or a default value is no choice of the user's (`--set model.arch=unet` on a DiT preset keeps
    its depth, unread), and a stored config.json, which holds every field, still loads (resume, sample, export)."""
    fallback = cfg.train.budget_fallback
    unread_by_fallback = unread_settings(budget_fallback_config(cfg)) if fallback is not None else None
    for key, why in unread_settings(cfg).items():  # a setting the fallback's config reads is read: the run may train it
        if key in given and (unread_by_fallback is None or key in unread_by_fallback):
            raise UsageError(f"invalid config ({given[key]}): {key} {why}: drop it")
    if fallback is None or not any(key.startswith("train.budget_fallback") for key in given):
        return
    unread = unread_by_fallback
    for key in (parse_override(item)[0] for item in fallback.overrides):
        if key in unread:
            raise UsageError(f"invalid config (train.budget_fallback.overrides): {key} {unread[key]}: drop it")


def _refuse_repeated_fallback_keys(raw: dict, source: str) -> None:
    """A key given twice in train.budget_fallback.overrides (a preset's or a --set's) is refused naming both values.
    Here, where a config is written, not in BudgetFallback's validator: a checkpoint's config from before this rule
    (its fallback took the last value) must still load to be sampled, exported or resumed."""
    train = raw.get("train")
    fallback = train.get("budget_fallback") if isinstance(train, dict) else None
    items = fallback.get("overrides") if isinstance(fallback, dict) else None
    if isinstance(items, list) and (repeated := _repeated_key([item for item in items if isinstance(item, str)])):
        raise UsageError(f"invalid config ({source}): train.budget_fallback.overrides: {repeated}: give it once")


def overrides_with(base: list[str], extra: list[str]) -> list[str]:
    """`base` KEY=VALUE items, less those whose key `extra` sets, then `extra`: for scripts whose own settings a
    user's --set replaces (load_config refuses a key given twice)."""
    keys = {item.split("=", 1)[0].strip() for item in extra if "=" in item}
    return [item for item in base if item.split("=", 1)[0].strip() not in keys] + list(extra)


def _repeated_key(items: list[str]) -> str | None:
    """'KEY is given twice (A and B)' for the first key two KEY=VALUE items both set, else None."""
    given: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            continue  # not an item: parse_override or the fallback's validator says so
        key = item.split("=", 1)[0].strip()
        if key in given:
            return f"{key} is given twice ({' and '.join(text.split('=', 1)[1].strip() for text in (given[key], item))})"
        given[key] = item
    return None


def _drop_overridden_fallback(raw: dict, overrides: list[str], note, source: str) -> None:
    """A `--set` of a key the preset's train.budget_fallback would change (or of model.size, which sets the
    model's size fields) is the user's explicit choice: the fallback is dropped rather than overriding it.
    So is a budget switched off (train.budget_minutes=null): no budget, so nothing to fall back from."""
    if _drop_fallback_without_budget(raw, source):
        note("note: train.budget_minutes is off, so train.budget_fallback is off too (the preset's steps and model are trained as set)")
        return
    train = raw.get("train")
    fallback = train.get("budget_fallback") if isinstance(train, dict) else None
    if not isinstance(fallback, dict) or not overrides:
        return
    items = fallback.get("overrides")
    changes = {parse_override(str(item))[0] for item in (items if isinstance(items, list) else []) if "=" in str(item)}
    given, changes = (_with_size_fields({parse_override(item)[0] for item in overrides}), _with_size_fields(changes))
    if given & changes:
        _drop_fallback(raw["train"], source)


def _drop_fallback(train: dict, source: str) -> None:
    """Switch train.budget_fallback off, after checking it as written (its keys, min_steps): a typo in a preset
    is reported on every run, not only on the slow machine where the fallback would train."""
    validated(BudgetFallback, train["budget_fallback"], lambda where, problem: f"invalid config ({source}): "
              f"train.budget_fallback{'.' + where if where else ''}: {problem} (--set train.budget_fallback=null trains without it)")
    train["budget_fallback"] = None


def _with_size_fields(keys: set[str]) -> set[str]:
    """`keys` of settings, with the four fields a model.size among them sets (on either side: a --set or a fallback)."""
    return keys | {f"model.{field}" for field in SIZE_FIELDS} if "model.size" in keys else keys


def _drop_fallback_without_budget(raw: dict, source: str = "--set") -> bool:
    """A fallback is chosen from the steps that fit the budget: without a budget it goes too. True if dropped."""
    train = raw.get("train")
    # `--set train=1` leaves no section here: validation reports it as the one-line config error.
    if not isinstance(train, dict) or train.get("budget_fallback") is None or train.get("budget_minutes") is not None:
        return False
    _drop_fallback(train, source)
    return True


def validate_config(raw: dict, source: str = "config") -> Config:
    return validated(Config, raw, lambda where, problem: f"invalid config ({source}): {where or '(top level)'}: {problem}")


def config_to_dict(cfg: Config) -> dict:
    return json.loads(cfg.model_dump_json())


def budget_fallback_config(cfg: Config) -> Config:
    """The config train.budget_fallback trains: its overrides applied, the fallback itself removed."""
    raw = config_to_dict(cfg)
    raw["train"]["budget_fallback"] = None

    def message(detail: str) -> str:
        return f"train.budget_fallback.overrides do not make a valid config: {detail} (--set train.budget_fallback=null trains without it)"

    try:
        layer = _overrides_layer(cfg.train.budget_fallback.overrides, once=False)  # each once where written (load_config)
    except UsageError as err:
        raise ValueError(message(str(err))) from None
    return validated(Config, _apply_layer(raw, layer), lambda where, problem: message(f"{where}: {problem}"), error=ValueError)


def apply_overrides(cfg: Config, overrides: list[str], allowed: set[str] | None = None) -> Config:
    """Apply overrides to an existing config; with `allowed`, refuse keys outside it (resume safety)."""
    raw = _apply_layer(config_to_dict(cfg), _overrides_layer(overrides, allowed))
    _drop_fallback_without_budget(raw)  # a resume never falls back: nothing to say
    cfg = validate_config(raw, source="--set")
    if any(parse_override(item)[0] == "eval.features" for item in overrides):
        refuse_unknown_eval_features(cfg, "--set")
    return cfg


def _overrides_layer(overrides: list[str], allowed: set[str] | None = None, label: str = "--set ", once: bool = True) -> dict:
    """The `--set` items as one nested dict, applied on top of the preset like one more preset file; with `once`
    a key given twice is an error (`label` names where the items came from), else the last one wins."""
    layer: dict = {}
    given: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        if once and key in given:  # not "the last one wins": one of the two values would be silently dropped
            raise UsageError(f"{label}{_repeated_key([given[key], item])}: give it once")
        given[key] = item
        annotation = _check_key_exists(key.split("."), key)  # a typo is an unknown setting, on a resume too (not a "change")
        if value is not None and not isinstance(value, str) and _is_text_setting(annotation):
            # a text setting keeps the text: --set name=2024 names the run "2024", name=2024-06-01 (a TOML date) "2024-06-01"
            value = item.split("=", 1)[1].strip()
        if value is None and "none" in typing.get_args(annotation):  # a choice named "none" (train.tracker), not null
            value = "none"
        if allowed is not None and key not in allowed:
            raise UsageError(
                RESUME_REFUSALS.get(key) or f"--set {key} cannot change when resuming (it would change the run's math); "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        _set_key(layer, key, value)
    return layer


def _apply_layer(raw: dict, layer: dict) -> dict:
    """Deep-merge `layer` (a preset over its base, or the overrides over the preset) into a copy of `raw`.

    Tables merge key by key; anything else replaces. A layer that names a model.size takes all SIZE_FIELDS from
    that name, except the ones the same layer states: a later layer's size beats an earlier layer's explicit fields.
    """
    raw = copy.deepcopy(raw)
    model = layer.get("model")
    if isinstance(model, dict) and model.get("size") is not None and isinstance(raw.get("model"), dict):
        for field in SIZE_FIELDS:
            if field not in model:
                raw["model"].pop(field, None)
    return _deep_merge(raw, layer)


def _deep_merge(base: dict, layer: dict) -> dict:
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", typed value). Values are parsed as TOML (numbers, booleans, lists, strings)."""
    if "=" not in item:
        raise UsageError(f"--set expects KEY=VALUE, got {item!r} (e.g. --set train.steps=200)")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare words are strings: --set optim.name=muon
    if isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    return key, value


def _set_key(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UsageError(f"invalid config key {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
    # Validate the key's existence eagerly so the message names it, even if the value is fine.
    _check_key_exists(parts, key)


def _check_key_exists(parts: list[str], key: str) -> Any:
    """The key's type annotation; an unknown key is a UsageError naming the unknown part."""
    model: Any = Config
    annotation = None
    for part in parts:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            raise UsageError(f"invalid config key {key!r}: unknown setting {part!r}")
        annotation = fields[part].annotation
        # a section, or an optional one (BudgetFallback | None)
        candidates = [annotation, *typing.get_args(annotation)]
        model = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
    return annotation


def _is_text_setting(annotation: Any) -> bool:
    """A `str` or `str | None` field (name, data.path, train.init_from, ...), whose --set value is text as typed."""
    return annotation is str or annotation == (str | None)


def _read_preset(preset: str, given: dict[str, str] | None = None) -> dict:
    """A preset with its `base = "NAME"` chain resolved (base first, each file deep-merged over it); `given` hears
    the keys each of the user's own files (not a shipped preset) states, with the file."""
    return _resolve_preset(preset, relative_to=None, chain=[], given={} if given is None else given)


def _resolve_preset(preset: str, relative_to: Path | None, chain: list[str], given: dict[str, str]) -> dict:
    try:
        source, key, named = _locate_preset(preset, relative_to)
    except UsageError as err:
        if not chain:
            raise
        raise UsageError(f"preset {chain[-1]}: base {preset!r}: {err}") from None
    if key in chain:
        raise UsageError(f"preset inheritance cycle: {' -> '.join([*chain, key])}")
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"preset {key} is not valid TOML: {err}") from None
    except UnicodeDecodeError:  # a binary file (an image, a checkpoint) named as a preset: TOML is UTF-8 text
        raise UsageError(f"preset {key} is not valid TOML: not UTF-8 text (is it a preset file?)") from None
    if not raw:  # 0 bytes or only comments: a truncated or wrong file, which would train every default
        raise UsageError(f"preset {key} has no settings (empty, or only comments): is it the right file? A preset sets at least one key, e.g. base = \"quickstart\"")
    base = raw.pop("base", None)
    if base is None:
        _note_given(raw, key, named, given)
        return raw
    if not isinstance(base, str) or not base:
        raise UsageError(f"preset {key}: base must be a preset name or a .toml path, got {base!r}")
    # A relative base path is relative to the user file that names it (shipped presets name their bases).
    merged = _apply_layer(_resolve_preset(base, None if named else source.parent, [*chain, key], given), raw)
    _note_given(raw, key, named, given)  # after its base's: this file's word on a key is the later one
    return merged


def _note_given(raw: dict, key: str, named: bool, given: dict[str, str]) -> None:
    """Record the keys a user's own preset file (not a shipped one, `named`) states, as given in `key`."""
    if not named:
        given.update(dict.fromkeys(_section_keys(raw), key))


def _locate_preset(preset: str, relative_to: Path | None):
    """(readable file, name for messages and cycle checks, whether it is a shipped preset) for a name or .toml path."""
    path = Path(preset)
    if relative_to is not None and not path.is_absolute():
        path = relative_to / path
    # A name unless it is a .toml path or an existing file: a run directory `quickstart/` in the working
    # directory must not hide the preset of that name.
    if path.suffix != ".toml" and not path.is_file():
        entry = presets_dir().joinpath(f"{preset}.toml")
        if not entry.is_file():
            raise UsageError(f"unknown preset {preset!r}; available: {', '.join(preset_names())} (or a .toml path)")
        return entry, preset, True
    if not path.is_file():
        raise UsageError(f"preset file not found: {path}")
    return path, str(path.resolve()), False
