"""Typed settings: pydantic models (unknown keys are errors), preset loading and `--set a.b=value` overrides.

The pydantic models are the single source of truth for every setting and its default (DESIGN.md section 5).
"""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .data.prepare import SOURCES
from .errors import UsageError
from .flow import COUPLINGS, TIME_SAMPLERS
from .optim import OPTIMIZERS
from .tracking import TRACKERS

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    arch: Literal["dit", "unet"] = "dit"
    hidden_size: int = Field(384, gt=0)
    depth: int = Field(12, gt=0)
    heads: int = Field(6, gt=0)
    patch_size: int = Field(2, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    cross_attention: bool = False  # text conditioning: cross-attention to the text encoder's token states
    text_dim: int | None = Field(None, gt=0)  # width of the text states; filled from the text encoder when unset
    # U-Net (arch = "unet"): base channels = hidden_size, one level per multiplier.
    channel_mult: tuple[int, ...] = (1, 2, 2)
    layers_per_block: int = Field(2, gt=0)
    # Filled from the prepared dataset's manifest when left unset (None).
    image_size: int | None = Field(None, gt=0)
    in_channels: int | None = Field(None, gt=0)
    num_classes: int | None = Field(None, ge=0)  # 0 = unconditional

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by heads {self.heads}")
        return self


class FlowConfig(Strict):
    sigma_min: float = Field(1e-5, ge=0.0, lt=1.0)
    time_sampler: Literal[TIME_SAMPLERS] = "uniform"  # zero: one-step distillation on reflow pairs
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    shift: float = Field(1.0, gt=0)  # SD3-style time shift; 1 = none
    coupling: Literal[COUPLINGS] = "independent"  # pairs: x0 stored with x1 in an `fm reflow` dataset
    sinkhorn_reg: float = Field(0.05, gt=0)
    sinkhorn_iters: int = Field(100, gt=0)
    cond_dropout: float = Field(0.1, ge=0.0, le=1.0)


class DataConfig(Strict):
    source: Literal[SOURCES] = "shapes"
    path: str | None = None  # prepared dataset directory; for `shapes` it is made on first use
    image_size: int = Field(32, gt=0)  # used when `fm train` prepares shapes data itself
    count: int = Field(20000, gt=0)
    flip: bool = False
    num_workers: int = Field(0, ge=0)


class OptimConfig(Strict):
    name: Literal[OPTIMIZERS] = "adamw"
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = off
    warmup_frac: float = Field(0.05, ge=0, lt=1)
    warmup_start_factor: float = Field(0.1, gt=0, le=1)
    min_lr_factor: float = Field(0.1, ge=0, le=1)


class TrainConfig(Strict):
    steps: int = Field(1000, gt=0)
    global_batch_size: int = Field(64, gt=0)
    micro_batch_size: int | Literal["auto"] | None = None  # None = global / world size (no accumulation)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    ema_decay: float = Field(0.9999, ge=0, le=1)
    ema_warmup: bool = False
    seed: int = 0
    log_every: int = Field(50, gt=0)
    sample_every: int = Field(0, ge=0)  # 0 = only at the end
    checkpoint_every: int = Field(0, ge=0)  # 0 = only at the end
    keep_last: int = Field(2, ge=1)
    keep_every: int = Field(0, ge=0)  # also keep every k-th step's checkpoint; 0 = off
    compile: bool = False
    max_nan_skips: int = Field(0, ge=0)  # non-finite losses tolerated (step skipped) before stopping
    tracker: Literal[TRACKERS] = "none"  # also log metrics.jsonl records and sample grids there (rank 0)
    init_from: str | None = None  # start from these weights (a checkpoint, run or export directory: its EMA), e.g. reflow's teacher


class SampleConfig(Strict):
    solver: Literal["euler", "midpoint", "heun", "rk4", "dopri5"] = "euler"
    steps: int = Field(50, gt=0)
    cfg: float = Field(1.0, ge=0)
    rtol: float = Field(1e-5, gt=0)
    atol: float = Field(1e-5, gt=0)
    guidance_interval: tuple[float, float] | None = None  # [t_lo, t_hi]: CFG only for t in it
    shift: float | None = Field(None, gt=0)  # time-grid shift; None = the training flow.shift (filled by resolve)
    grid_size: int = Field(16, gt=0)  # images in the periodic training sample grid

    @model_validator(mode="after")
    def _interval_in_unit_range(self):
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance_interval must satisfy 0 <= t_lo <= t_hi <= 1, got {list(self.guidance_interval)}")
        return self


class EvalConfig(Strict):
    every: int = Field(0, ge=0)  # FID of the EMA model every k steps (0 = off), logged to metrics.jsonl
    num_samples: int = Field(5000, gt=0)
    ref: str | None = None  # prepared dataset, image folder or stats .npz (`fm fid --save-stats`)
    features: str = "inception"  # inception | tiny | module:factory (only inception is comparable to papers)
    inception: str | None = None  # inception-2015-12-05.pt; None = $FM_INCEPTION


class EncodersConfig(Strict):
    vae: str | None = None  # local diffusers AutoencoderKL directory (or env FM_VAE)
    text_encoder: str | None = None  # local transformers encoder directory (or env FM_TEXT_ENCODER), or "builtin:tiny-t5"
    max_tokens: int = Field(128, gt=0)
    vae_precision: Literal["fp32", "bf16"] = "fp32"  # decoding precision (bf16 only on CUDA)


class Config(Strict):
    name: str = "run"
    model: ModelConfig = ModelConfig()
    flow: FlowConfig = FlowConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    eval: EvalConfig = EvalConfig()
    encoders: EncodersConfig = EncodersConfig()

    @model_validator(mode="after")
    def _no_ot_for_text(self):
        # Re-pairing noise across a text batch would detach images from their captions (DESIGN.md section 2).
        if self.model.cross_attention and self.flow.coupling not in ("independent", "pairs"):
            raise ValueError("flow.coupling must be 'independent' (or 'pairs') for text models (model.cross_attention = true)")
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
    "data.num_workers",
    "eval.every",
    "eval.num_samples",
    "eval.ref",
    "eval.features",
    "eval.inception",
    "encoders.vae",  # the frozen encoders' local paths may move between sessions
    "encoders.text_encoder",
}


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
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update=update)}) if update else cfg
    return with_sampling_shift(cfg)


def with_sampling_shift(cfg: Config) -> Config:
    """sample.shift defaults to the shift the model was trained with (flow.shift)."""
    if cfg.sample.shift is not None:
        return cfg
    return cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"shift": cfg.flow.shift})})


def sample_settings(base: SampleConfig, **overrides) -> SampleConfig:
    """`base` (a checkpoint's sample.* settings) with the given overrides (None = keep), validated once for
    every command and the demo; a bad value is a UsageError naming the option."""
    update = {k: v for k, v in overrides.items() if v is not None}
    try:
        return SampleConfig.model_validate({**base.model_dump(), **update})
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or next(iter(update), "sample")
        message = first["msg"].removeprefix("Value error, ")
        raise UsageError(f"invalid {where} (--{where.replace('_', '-')}): {message}") from None


def resolve_without_data(cfg: Config) -> Config:
    """`resolve` for tools that use synthetic tensors (bench, autotune): the manifest at data.path when there
    is one, else the source's known shape (shapes = 3 x data.image_size, 10 classes; cifar10; mnist).
    Other sources need model.image_size, in_channels and num_classes set."""
    m = cfg.model
    if None not in (m.image_size, m.in_channels, m.num_classes):
        return cfg
    manifest_path = Path(cfg.data.path) / "manifest.json" if cfg.data.path else None
    if manifest_path is not None and manifest_path.exists():
        return resolve(cfg, json.loads(manifest_path.read_text()))
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


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_config(preset: str | None, overrides: list[str] | None = None) -> Config:
    """Load a preset (a name in presets/ or a .toml path), apply `a.b=value` overrides, validate."""
    raw = _read_preset(preset) if preset else {}
    for item in overrides or []:
        key, value = parse_override(item)
        _set_key(raw, key, value)
    return validate_config(raw, source=preset or "defaults")


def validate_config(raw: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        msg = first["msg"]
        if first["type"] == "extra_forbidden":
            msg = "unknown setting"
        raise UsageError(f"invalid config ({source}): {where}: {msg}") from None


def config_to_dict(cfg: Config) -> dict:
    return json.loads(cfg.model_dump_json())


def apply_overrides(cfg: Config, overrides: list[str], allowed: set[str] | None = None) -> Config:
    """Apply overrides to an existing config; with `allowed`, refuse keys outside it (resume safety)."""
    raw = config_to_dict(cfg)
    for item in overrides:
        key, value = parse_override(item)
        if allowed is not None and key not in allowed:
            raise UsageError(
                f"--set {key} cannot change when resuming (it would change the run's math); "
                f"allowed: {', '.join(sorted(allowed))}"
            )
        _set_key(raw, key, value)
    return validate_config(raw, source="--set")


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


def _check_key_exists(parts: list[str], key: str) -> None:
    model: Any = Config
    for part in parts:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            raise UsageError(f"invalid config key {key!r}: unknown setting {part!r}")
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _read_preset(preset: str) -> dict:
    path = Path(preset)
    if path.suffix != ".toml" and not path.exists():
        path = PRESETS_DIR / f"{preset}.toml"
        if not path.exists():
            raise UsageError(f"unknown preset {preset!r}; available: {', '.join(preset_names())} (or a .toml path)")
    if not path.is_file():
        raise UsageError(f"preset file not found: {path}")
    try:
        return copy.deepcopy(tomllib.loads(path.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"preset {path} is not valid TOML: {err}") from None
