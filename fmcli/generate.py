"""Sampling from a trained model: per-index noise, conditioning, batching, checkpoint loading, and how the
network runs (precision and compile, resolved on the sampling machine).

Sample i's initial noise depends only on (seed, i), so outputs are identical (to float rounding: a GEMM of
another batch shape may round its last bits differently) whatever the batch size
or the number of processes that share the work (on the same machine, at the same precision), with every
fixed-step solver; dopri5's step size is chosen for a whole batch, so its samples vary within its tolerance.

Every sampling command (`fm sample`, class-grid, fid, reflow, demo) and `fm bench --mode sample` run the
same path: `load_for_sampling` -> `prepare_for_sampling` (sample.precision / sample.compile resolved as
training resolves its own, the network wrapped once in a `SamplingNet`) -> `iterate_samples`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .checkpoint import _state_dict_error, load_checkpoint, resolve_checkpoint
from .config import Config, validate_config, with_sampling_shift
from .errors import RuntimeFailure, UsageError
from .hardware import (CompileChoice, PrecisionChoice, autocast, check_precision, choice_lines, compile_failed, quiet_no_cuda_notice, resolve_compile,
                       resolve_model_precision)
from .models import build_model
from .solvers import SDE_SOLVERS, OnStep, check_solver_for_model, guided_velocity, solve
from .seeding import STREAMS, normal


def initial_noise(seed: int, indices, shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """[len(indices), *shape] standard normal; row k depends only on (seed, indices[k])."""
    rows = [normal(tuple(shape), STREAMS["sample_noise"], seed, int(i)) for i in indices]
    return torch.stack(rows).to(device)


def sde_noise(seed: int, indices, shape: tuple[int, ...]) -> Callable[[int], torch.Tensor]:
    """euler-sde's noise for solver step k, [len(indices), *shape]: row j depends only on (seed, indices[j], k),
    like the initial noise, so an SDE sample too is the same whatever the batch size."""
    indices = [int(i) for i in indices]

    def at(step: int) -> torch.Tensor:
        return torch.stack([normal(tuple(shape), STREAMS["sde_noise"], seed, i, int(step)) for i in indices])

    return at


def class_conditions(labels: torch.Tensor | None, null_class: int) -> tuple[dict, dict | None]:
    """(cond, uncond) keyword dicts for the model; None uncond when the model is unconditional."""
    if labels is None:
        return {}, None
    return {"y": labels}, {"y": torch.full_like(labels, null_class)}


@torch.no_grad()
def sample_batch(
    model,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    sample_cfg,
    *,
    sigma_min: float = 0.0,
    conditions=None,
    guide=None,
    seed: int | None = None,
    indices=None,
    on_step: OnStep | None = None,
):
    """Integrate one batch with the configured solver and guidance; returns a solvers.SampleResult.

    `conditions` = (cond, uncond) keyword dicts (text models) replaces the class conditions of `labels`.
    `guide` is the autoguidance model (guidance "auto"). euler-sde's noise is keyed by (seed, sample index,
    step): an SDE caller must pass both, or every batch would repeat batch 0's noise. Non-finite samples
    are an error (a RuntimeFailure), never images.
    """
    cond, uncond = conditions if conditions is not None else class_conditions(labels, getattr(model, "null_class", 0))
    check_sampler(model, sample_cfg)
    if sample_cfg.guidance == "auto" and guide is None:
        raise UsageError("--guidance auto needs a guide model: pass --guide-ckpt CKPT (a smaller or earlier checkpoint of the same data)")
    if sample_cfg.solver in SDE_SOLVERS and (seed is None or indices is None):
        raise ValueError(f"{sample_cfg.solver} draws noise per (seed, sample index, step): pass the batch's seed and sample indices")
    velocity = guided_velocity(
        model, cond, uncond, cfg=sample_cfg.cfg, interval=sample_cfg.guidance_interval, guidance=sample_cfg.guidance, guide=guide
    )
    zero_init = sample_cfg.guidance == "cfg-zero" and sample_cfg.cfg != 1.0 and uncond is not None
    noise = sde_noise(seed, indices, tuple(x0.shape[1:])) if sample_cfg.solver in SDE_SOLVERS else None
    try:
        result = solve(
            velocity, x0, sample_cfg.solver, sample_cfg.steps, shift=sample_cfg.shift or 1.0, rtol=sample_cfg.rtol, atol=sample_cfg.atol,
            sigma_min=sigma_min, sde_noise=sample_cfg.sde_noise, noise=noise,
            skip_steps=sample_cfg.zero_init_steps if zero_init else 0, on_step=on_step,
        )  # fmt: skip
    except FloatingPointError as err:  # dopri5 stalled on a non-finite velocity: the same advice as non-finite samples
        raise RuntimeFailure(f"{err}: the model or the sampling settings diverged; {DIVERGED_ADVICE}") from None
    check_finite_samples(result.x, indices)
    return result


DIVERGED_ADVICE = "try a lower --cfg or --sde-noise, another solver, or another checkpoint"


def check_sampler(model, sample_cfg) -> None:
    """A one-line UsageError where the solver or guidance does not fit the network (solvers.check_solver_for_model:
    a mean-flow model jumps with `meanflow` and cfg only, a flow model never does). Commands call it before they
    write anything (`fm sample --out DIR`'s manifest would otherwise block the corrected command)."""
    try:
        check_solver_for_model(sample_cfg.solver, sample_cfg.guidance, getattr(model, "end_time", False))
    except ValueError as err:
        raise UsageError(str(err)) from None


def check_finite_samples(x: torch.Tensor, indices=None) -> None:
    """Samples with nan or inf would be written as black images (or stored as reflow pairs): stop instead."""
    bad = (~torch.isfinite(x.flatten(1))).any(1)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        first = int(indices[rows[0]]) if indices is not None else rows[0]
        raise RuntimeFailure(
            f"{len(rows)} of {x.shape[0]} samples (first: sample {first}) are not finite (nan/inf): the model or the sampling "
            f"settings diverged; {DIVERGED_ADVICE}"
        )


@dataclass
class LoadedModel:
    model: torch.nn.Module
    config: Config
    info: dict  # data manifest facts recorded at training time: class_names, kind, shape, ...
    step: int
    text: object | None = None  # encoders.TextConditioning for text models
    vae: object | None = None  # encoders.FrozenVAE for latent models: samples are decoded to images
    guide: torch.nn.Module | None = None  # autoguidance's guide network (`with_guide`)
    guide_step: int | None = None  # the guide checkpoint's step (a run directory's latest moves as it trains)
    ema: bool = True  # whether `model` holds EMA weights (an export holds the one set it was exported with)
    # After `prepare_for_sampling`: `model` and `guide` are SamplingNets, `hardware` the PrecisionChoice and
    # CompileChoice they run with.
    hardware: dict | None = None

    @property
    def is_text(self) -> bool:
        return self.config.model.cross_attention

    @property
    def shape(self) -> tuple[int, int, int]:
        m = self.config.model
        return (m.in_channels, m.image_size, m.image_size)

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes


def load_for_sampling(
    ckpt: str, device: torch.device, use_ema: bool = True, vae: str | None = None, text_encoder: str | None = None,
    with_encoders: bool = True, with_vae: bool = True, vae_option: str | None = None,
) -> LoadedModel:
    """Build the model from the checkpoint's (or export directory's) own config and load its EMA (or raw)
    weights, with the frozen encoders it needs (paths: the arguments, FM_VAE / FM_TEXT_ENCODER, then those
    recorded in the run). `with_encoders=False` loads none (an autoguidance guide); `with_vae=False` skips
    the VAE: samples stay latents (reflow pairs). `vae_option`: the command's VAE flag, which a missing VAE's message names
    (None: the command has none, FM_VAE is named)."""
    path = resolve_checkpoint(ckpt)
    state = load_weights(path)
    cfg = with_sampling_shift(validate_config(state["config"], source=str(path)))
    model = build_model(cfg.model)
    weights = state.get("ema") if use_ema else state["model"]
    if weights is None:
        raise UsageError(f"{path} has no EMA weights; use --no-ema")
    if not use_ema and state.get("exported_ema") is True:  # an export holds one set: --no-ema would load the EMA's anyway
        raise UsageError(f"{path} is an export of the EMA weights only, so --no-ema has no raw weights to load: drop --no-ema, "
                         "or export the raw ones with `fm export --no-ema`")  # fmt: skip
    info, step = _checked_facts(state, path)
    try:
        model.load_state_dict(weights)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise UsageError(f"{path} is damaged: its {'EMA' if use_ema else 'model'} weights do not fit its own config "
                         f"({_state_dict_error(err)}); sample from another checkpoint") from None
    model.to(device).eval()
    encoders = _sampling_encoders(cfg, info, device, vae, text_encoder, with_vae, vae_option) if with_encoders else {}
    exported = state.get("exported_ema")  # an export's one set, whichever flag asked: what it is, not what was asked
    return LoadedModel(model=model, config=cfg, info=info, step=step, ema=use_ema if exported is None else bool(exported), **encoders)


def _checked_facts(state: dict, path) -> tuple[dict, int]:
    """The checkpoint's (or export's) data facts and step, checked: what sampling reads of them (class names,
    data kind, encoders) must have the types fm writes, or the file is damaged (one line, exit 2)."""
    info, step = state.get("data_info") or {}, state.get("step", 0)
    names = info.get("class_names") if isinstance(info, dict) else None
    if not isinstance(info, dict) or not (names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names))):
        raise UsageError(f"{path} is damaged: its data_info is not what fm records (a mapping with a list of class names)")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UsageError(f"{path} is damaged: its step {step!r} is not a count of training steps")
    return info, step


def with_guide(loaded: LoadedModel, guide_ckpt: str, device: torch.device, use_ema: bool = True, warn=None) -> LoadedModel:
    """`loaded` with the autoguidance guide from `guide_ckpt`, which must model the same data in the same
    space (it may be smaller or less trained): v = v_guide + w (v_main - v_guide) only makes sense when both
    velocities live in one space and read one conditioning. Refused (exit 2) on a different sample shape,
    class count, class names or order, data kind (pixels or latents), VAE latent space, text conditioning or
    text encoder; an encoder recorded at another path with otherwise equal facts is `warn`ed about (the
    weights may have moved, or be another fine-tune)."""
    import dataclasses
    import sys

    guide = load_for_sampling(guide_ckpt, device, use_ema=use_ema, with_encoders=False)
    mine, theirs = _guide_facts(loaded), _guide_facts(guide)
    for what, value in mine.items():
        if what in theirs and value is not None and theirs[what] is not None and theirs[what] != value:
            raise UsageError(f"--guide-ckpt {guide_ckpt} has {what} {theirs[what]}, the model has {value}: the guide must be a model of the same data")
    for what in ("VAE", "text encoder"):
        paths = [(m.info.get("vae" if what == "VAE" else "text_encoder") or {}).get("path") for m in (loaded, guide)]
        if None not in paths and paths[0] != paths[1]:
            (warn or (lambda m: print(m, file=sys.stderr)))(
                f"warning: --guide-ckpt's {what} was recorded at {paths[1]}, the model's at {paths[0]}; autoguidance is wrong unless they are the same weights"
            )
    return dataclasses.replace(loaded, guide=guide.model, guide_step=guide.step)


def _guide_facts(m: LoadedModel) -> dict:
    """What a model and its autoguidance guide must share (None: not recorded, e.g. an old checkpoint)."""
    info, text = m.info, m.config.model.cross_attention
    vae, encoder = info.get("vae") or {}, info.get("text_encoder") or {}
    return {
        "sample shape": list(m.shape),
        "class count": m.num_classes,
        "class names": list(info["class_names"]) if m.num_classes and info.get("class_names") else None,
        "data kind": info.get("kind"),
        "VAE latent space": {k: vae.get(k) for k in ("scaling_factor", "shift_factor", "latent_channels", "downsample")} if vae else None,
        "text conditioning": text,
        "text state width": m.config.model.text_dim if text else None,
        "text encoder": {k: encoder.get(k) for k in ("model_type", "hidden_size")} if text and encoder else None,
    }


class SamplingNet:
    """The network as sampling runs it: under autocast at `precision` (fp32 weights), compiled or eager, its
    velocity returned in fp32, so that the solver's state and arithmetic stay fp32 whatever the precision.

    The compiled module is built once (per command) and reused for every batch; torch.compile is lazy, so a
    compiler failure shows at a call: it is logged once (`hardware.compile_failed`) and that call and every
    later one run eager. A compiled call smaller than the first one (the last batch of a command) is padded
    to the first one's size by repeating its last row, and the padding dropped: one graph serves the whole
    command instead of a second compile for the remainder (rows are independent, so the real rows are the
    same bytes either way). The model contract is the wrapped module's: `net(x, t, **cond)`, `net.null_class`.
    """

    def __init__(self, module: torch.nn.Module, precision: str = "fp32", device: torch.device = torch.device("cpu"),
                 compile_choice: CompileChoice | None = None, log: Callable[[str], None] = lambda message: None):
        self.module, self.precision, self.device, self.log = module.eval(), precision, device, log
        self.compile_choice = compile_choice or CompileChoice(False, False, "not compiled")
        # Inductor's freezing folds the (fixed) weights into the graph as constants, pre-packed for the GEMM
        # library: the weights must not change while this net lives (sampling commands load them once).
        if self.compile_choice.compile:
            quiet_no_cuda_notice()
        self._compiled = torch.compile(module, options={"freezing": True}) if self.compile_choice.compile else None
        self._graph_batch = 0  # the batch size the compiled graph was first called with

    @property
    def null_class(self) -> int:
        return self.module.null_class

    @property
    def end_time(self) -> bool:
        """A mean-flow network (takes t_end): the solver check needs it through the wrapper."""
        return bool(getattr(self.module, "end_time", False))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        with autocast(self.precision, self.device):
            return self._forward(x, t, **cond).float()

    def _forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        if self._compiled is not None:
            try:
                n = x.shape[0]
                self._graph_batch = self._graph_batch or n
                if n >= self._graph_batch:
                    return self._compiled(x, t, **cond)
                pad = lambda v: torch.cat([v, v[-1:].expand(self._graph_batch - n, *v.shape[1:])])  # noqa: E731
                return self._compiled(pad(x), pad(t), **{k: pad(v) for k, v in cond.items()})[:n]
            except (torch.OutOfMemoryError, KeyboardInterrupt):
                raise
            except Exception as err:  # a compiler failure: this call and the rest run eager
                self._compiled = None
                compile_failed(err, self.log, self.compile_choice, "--no-compile or sample.compile=false")
        return self.module(x, t, **cond)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None


def resolve_sampling_hardware(cfg: Config, sample_cfg, device: torch.device) -> tuple[PrecisionChoice, CompileChoice]:
    """sample.precision and sample.compile for this model on this device, resolved as training resolves its own
    (fmcli.hardware: the same probe and cache). The training run's precision does not matter here: a model
    trained in bf16 samples in fp32 on a machine without fast bf16."""
    check_precision(sample_cfg.precision, device, "sample.precision (--precision)")
    m = cfg.model
    precision = resolve_model_precision(cfg, sample_cfg.precision, device, (m.in_channels, m.image_size, m.image_size))
    return precision, resolve_compile(sample_cfg.compile, device)


def prepare_for_sampling(loaded: LoadedModel, sample_cfg, device: torch.device, log: Callable[[str], None] = lambda message: None, ctx=None) -> LoadedModel:
    """`loaded` with its network (and autoguidance guide) wrapped in a SamplingNet at the resolved sample.precision
    and sample.compile; the choice is logged like training's. Under DDP (`ctx`) rank 0 decides for every rank,
    so all ranks run the same program."""
    import dataclasses

    from . import distributed as D

    main = ctx is None or ctx.rank == 0
    decision = resolve_sampling_hardware(loaded.config, sample_cfg, device) if main else None
    precision, compile_choice = D.all_gather_objects(decision, ctx)[0] if ctx is not None else decision
    if main:
        for line in choice_lines(precision, compile_choice, "sampling"):
            log(line)
    net = SamplingNet(loaded.model, precision.precision, device, compile_choice, log if main else lambda message: None)
    guide = None
    if loaded.guide is not None:
        guide = SamplingNet(loaded.guide, precision.precision, device, dataclasses.replace(compile_choice), lambda message: None)
    return dataclasses.replace(loaded, model=net, guide=guide, hardware={"precision": precision, "compile": compile_choice})


def sampling_record(loaded: LoadedModel) -> dict:
    """What ran: the precision and whether the network ran compiled (false after a compile that fell back)."""
    if not isinstance(loaded.model, SamplingNet):
        return {"precision": "fp32", "compile": False}
    return {"precision": loaded.model.precision, "compile": loaded.model.compiled}


def guidance_that_runs(loaded: LoadedModel, sample_cfg, log: Callable[[str], None] | None = None):
    """`sample_cfg` as it runs on `loaded`: cfg and cfg-zero guide away from the unconditional branch, which an
    unconditional model lacks, so they leave it unguided (solvers.guided_velocity); its cfg then reads 1 and its
    guidance interval none (it guides nothing), so that every summary reports what ran. Autoguidance (a guide network) works on any model.
    At cfg 1 every method is the main model alone, at every t: no guidance interval ran either."""
    if sample_cfg.cfg == 1.0:
        return sample_cfg.model_copy(update={"guidance_interval": None})
    if sample_cfg.guidance == "auto":
        return sample_cfg
    if loaded.num_classes or loaded.is_text:
        if log and loaded.config.flow.cond_dropout == 0:
            log(f"note: the model was trained without condition dropout (flow.cond_dropout=0), so its unconditional branch is untrained "
                f"and {sample_cfg.guidance} guidance (cfg {sample_cfg.cfg:g}) extrapolates from it; --cfg 1 samples as trained")  # fmt: skip
        return sample_cfg
    if log:
        log(f"note: the model is unconditional, so {sample_cfg.guidance} guidance (cfg {sample_cfg.cfg:g}) has nothing to guide: sampling unguided "
            "(cfg 1); --guide-ckpt CKPT (autoguidance) guides unconditional models")  # fmt: skip
    return sample_cfg.model_copy(update={"cfg": 1.0, "guidance_interval": None})


def load_weights(path) -> dict:
    """A training checkpoint, or an `fm export` directory read as one (its weights serve as model and EMA)."""
    from .export import is_export, load_export

    return load_export(path) if is_export(path) else load_checkpoint(path, map_location="cpu")


def _sampling_encoders(cfg: Config, info: dict, device, vae: str | None, text_encoder: str | None, with_vae: bool = True,
                       vae_option: str | None = None) -> dict:
    from .encoders import ENV_TEXT_ENCODER, ENV_VAE, FrozenVAE, TextConditioning, check_same_text_encoder, check_same_vae, load_text_encoder, resolve_path

    # An encoder given for a model that uses none would be ignored silently: refused, as --prompt on a model without text is.
    if vae is not None and info.get("kind") != "latents":
        raise UsageError(f"--vae given but this model samples pixels, not VAE latents: remove --vae {vae}")
    if text_encoder is not None and not cfg.model.cross_attention:
        raise UsageError(f"--text-encoder given but this model is not text-conditioned: remove --text-encoder {text_encoder}")
    out = {}
    # --vae / --text-encoder and the environment win over the run's record: refuse encoders of another latent
    # space or width before any work (they decoded garbage, or crashed in the first text projection).
    if info.get("kind") == "latents" and with_vae:
        # The VAE the run recorded may have moved (or been recorded relative to another directory): say how to point at it.
        remedy = (f"pass {vae_option} DIR or set {ENV_VAE}" if vae_option else f"set {ENV_VAE}=DIR") + " to the VAE the model was trained with"
        if (info.get("vae") or {}).get("path"):
            remedy += f" (its data was encoded with {info['vae']['path']})"
        path = resolve_path(vae, None, ENV_VAE, cfg.encoders.vae)
        if not path:
            raise UsageError(f"this model samples latents and needs the VAE they were encoded with: {remedy}")
        if info.get("vae"):
            check_same_vae(path, info["vae"], used_by="the model was trained on latents of", setting="--vae")
        out["vae"] = FrozenVAE(path, device, cfg.encoders.vae_precision, remedy=remedy)
    if cfg.model.cross_attention:
        path = resolve_path(text_encoder, None, ENV_TEXT_ENCODER, cfg.encoders.text_encoder)
        if cfg.model.text_dim is not None:
            check_same_text_encoder(path, info.get("text_encoder") or {}, cfg.model.text_dim, used_by="the model was trained on text states of", setting="--text-encoder")
        # As for the VAE: the encoder the model was trained with, not a download of some other one (encoders._TEXT_HINT).
        recorded = info.get("text_encoder") or {}
        remedy = (f"pass --text-encoder DIR or set {ENV_TEXT_ENCODER} to the text encoder the model was trained with "
                  f"(a {recorded.get('model_type') or 'text encoder'} of width {cfg.model.text_dim}" + (f", at {recorded['path']})" if recorded.get("path") else ")"))
        out["text"] = TextConditioning.from_encoder(load_text_encoder(path, device, cfg.encoders.max_tokens, remedy))
    return out


def decode(loaded: LoadedModel, x: torch.Tensor) -> torch.Tensor:
    """Model samples -> images in [-1, 1] (latents go through the VAE)."""
    return loaded.vae.decode(x) if loaded.vae is not None else x


def labels_for(indices, num_classes: int, class_label: int | None) -> torch.Tensor | None:
    """Fixed class per sample index: the requested one, else cycling through the classes."""
    if num_classes == 0:
        if class_label is not None:
            raise UsageError("--class-label given but this model is unconditional")
        return None
    if class_label is not None and not 0 <= class_label < num_classes:
        raise UsageError(f"--class-label {class_label} is out of range: the model has classes 0..{num_classes - 1}")
    return torch.tensor([class_label if class_label is not None else int(i) % num_classes for i in indices])


def check_conditioning(loaded: LoadedModel, class_label: int | None, prompts: list[str] | None) -> None:
    """The one-line refusals of a sampling command's conditioning (prompts for text models only, a class label
    the model has), run before the precision probe and its log lines, and again by `iterate_samples`."""
    if loaded.is_text and not prompts:
        raise UsageError("this is a text-to-image model: give --prompt TEXT (repeatable) or --prompts FILE|-")
    if loaded.is_text and class_label is not None:
        raise UsageError("--class-label given but this model is text-conditioned: use --prompt")
    if prompts and not loaded.is_text:
        raise UsageError("--prompt/--prompts given but this model is not text-conditioned")
    if not loaded.is_text:
        labels_for([], loaded.num_classes, class_label)


def iterate_samples(
    loaded: LoadedModel,
    indices: list[int],
    *,
    seed: int,
    sample_cfg,
    batch_size: int,
    device: torch.device,
    class_label: int | None = None,
    labels: torch.Tensor | None = None,
    on_step: OnStep | None = None,
    prompts: list[str] | None = None,
) -> Iterator[tuple[list[int], torch.Tensor | None, "object"]]:
    """Yield (indices, labels, SampleResult) batch by batch for the given global sample indices.

    Text models take `prompts` (one per index, in order). Latent models' samples come back decoded to
    images through the VAE (states given to `on_step` are the model's own: decode them with `decode`).
    """
    if indices:  # a rank's empty share (-n below the rank count) samples nothing: its command checked the prompts
        check_conditioning(loaded, class_label, prompts)
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        conditions, y = None, None
        if loaded.is_text:
            conditions = loaded.text.conditions(prompts[start : start + batch_size], device)
        elif labels is not None:
            y = labels[start : start + batch_size]
        else:
            y = labels_for(chunk, loaded.num_classes, class_label)
        x0 = initial_noise(seed, chunk, loaded.shape, device)
        y = y.to(device) if y is not None else None
        result = sample_batch(
            loaded.model, x0, y, sample_cfg, sigma_min=loaded.config.flow.sigma_min, conditions=conditions,
            guide=loaded.guide, seed=seed, indices=chunk, on_step=on_step,
        )  # fmt: skip
        if loaded.vae is not None:
            result.x = decode(loaded, result.x)
        yield chunk, y, result


def class_grid_samples(
    loaded: LoadedModel, per_class: int, *, seed: int, sample_cfg, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """`per_class` samples of every class, ordered class by class (sample index = class * per_class + j).

    Returns (images [K * per_class, C, H, W] on the CPU, (NFE, samples) of every batch: `nfe_record`'s input).
    """
    k = loaded.num_classes
    refuse_classless(loaded)
    labels = torch.arange(k).repeat_interleave(per_class)
    xs, nfes = [], []
    for chunk, _, result in iterate_samples(
        loaded, list(range(k * per_class)), seed=seed, sample_cfg=sample_cfg, batch_size=batch_size, device=device, labels=labels
    ):
        xs.append(result.x.cpu())
        nfes.append((result.nfe, len(chunk)))
    return torch.cat(xs), nfes


def refuse_classless(loaded: LoadedModel) -> None:
    """class-grid's one-line refusal of a model without classes (before the precision probe and its log lines)."""
    if loaded.is_text:
        raise UsageError("class-grid needs a class-conditional model, and this checkpoint is a text-conditioned one; use `fm sample --prompt TEXT`")
    if not loaded.num_classes:
        raise UsageError("class-grid needs a class-conditional model, and this checkpoint is unconditional; use `fm sample`")


def refuse_huge_grid(loaded, count: int, per_row: int, what: str, fix: str) -> None:
    """A grid of `count` samples, `per_row` a row, is one image (images.grid_image: 2-pixel padding): past twice PIL's
    MAX_IMAGE_PIXELS PIL refuses to open it (a decompression bomb), and its samples, all held for it, exhaust memory
    before it is written. Refused before any sampling (exit 2)."""
    from PIL import Image

    side = loaded.shape[-1] * (int(loaded.vae.downsample) if loaded.vae is not None else 1)  # decoded pixels
    width, height = per_row * (side + 2) + 2, -(-count // per_row) * (side + 2) + 2
    if width * height > 2 * Image.MAX_IMAGE_PIXELS:
        raise UsageError(f"{what} makes one grid image of {count} samples ({width}x{height} pixels), more than PIL opens "
                         f"({2 * Image.MAX_IMAGE_PIXELS:,} pixels): {fix}")


def class_grid_command(ckpt: str, out: Path, *, per_class: int, sample_overrides, guide_ckpt: str | None, seed: int, batch_size: int,
                       ema: bool, device: torch.device, log: Callable[[str], None] = lambda message: None) -> dict:
    """What `fm class-grid` does: `per_class` samples of every class as one labelled grid at `out`; returns its summary."""
    import time

    from .images import class_grid_image, save_image_atomic

    loaded = load_for_sampling(ckpt, device, use_ema=ema)
    refuse_classless(loaded)
    refuse_huge_grid(loaded, per_class * loaded.num_classes, per_class, f"--samples-per-class {per_class} for {loaded.num_classes} classes",
                     "give fewer samples per class")
    sample_cfg = guidance_that_runs(loaded, sample_overrides(loaded.config.sample), log)
    if guide_ckpt is not None:
        loaded = with_guide(loaded, guide_ckpt, device, use_ema=ema)
    loaded = prepare_for_sampling(loaded, sample_cfg, device, log)
    start = time.perf_counter()
    images, nfes = class_grid_samples(loaded, per_class, seed=seed, sample_cfg=sample_cfg, batch_size=batch_size, device=device)
    path = save_image_atomic(class_grid_image(images, per_class, class_names_of(loaded)), out)
    return {
        "path": str(path), "classes": loaded.num_classes, "samples_per_class": per_class, **nfe_record(nfes), "seconds": round(time.perf_counter() - start, 3),
        **sampling_record(loaded), **settings_record(sample_cfg), **guide_record(sample_cfg, guide_ckpt), "seed": seed,
    }  # fmt: skip


def interval_record(sample_cfg) -> list[float] | None:
    """The guidance interval [LO, HI] that ran (None: the whole path), as every --json row records it."""
    return list(sample_cfg.guidance_interval) if sample_cfg.guidance_interval is not None else None


def settings_record(sample_cfg) -> dict:
    """The sampling settings that ran, as every `--json` row (fm sample, class-grid, fid, eval) records them:
    solver, steps, cfg, guidance, guidance_interval, and the settings of that solver or guidance only. `steps` is
    null for dopri5, which chooses its own, unless cfg-zero's zero-init ran on its grid (dopri5 starts at grid
    step zero_init_steps); rtol/atol come with dopri5, sde_noise with euler-sde, zero_init_steps with cfg-zero at cfg != 1."""
    from .solvers import ADAPTIVE_SOLVERS, SDE_SOLVERS

    adaptive = sample_cfg.solver in ADAPTIVE_SOLVERS
    zero_init = sample_cfg.guidance == "cfg-zero" and sample_cfg.cfg != 1.0
    out = {
        "solver": sample_cfg.solver, "steps": None if adaptive and not zero_init else sample_cfg.steps, "cfg": sample_cfg.cfg,
        "guidance": sample_cfg.guidance, "guidance_interval": interval_record(sample_cfg),
    }  # fmt: skip
    if adaptive:
        out.update(rtol=sample_cfg.rtol, atol=sample_cfg.atol)
    if sample_cfg.solver in SDE_SOLVERS:
        out.update(sde_noise=sample_cfg.sde_noise)
    if zero_init:  # at cfg 1 nothing is guided, so no step is zeroed
        out.update(zero_init_steps=sample_cfg.zero_init_steps)
    return out


def guide_record(sample_cfg, guide_ckpt) -> dict:
    """`guide_ckpt`, the autoguidance guide, in every `--json` row whose guidance is auto (fm sample, class-grid,
    fid, eval); {} otherwise."""
    return {"guide_ckpt": str(guide_ckpt)} if sample_cfg.guidance == "auto" else {}


def nfe_record(batches: list[tuple[int, int]]) -> dict:
    """`nfe_fields` from (NFE, samples) of each batch."""
    return nfe_fields(sum(nfe * count for nfe, count in batches) / sum(count for _, count in batches), max(nfe for nfe, _ in batches))


def nfe_fields(nfe_per_sample: float, nfe_max: int) -> dict:
    """The NFE of every `--json` row (fm sample, class-grid, fid, eval, reflow): `nfe`, network evaluations per sample,
    the mean over all samples (a guided pair counts once; with a fixed-step solver every sample's own count),
    and `nfe_max`, the most any sample took (dopri5 chooses its steps per batch, so its batches differ)."""
    return {"nfe": int(nfe_per_sample) if nfe_per_sample == int(nfe_per_sample) else nfe_per_sample, "nfe_max": nfe_max}


def class_names_of(loaded: LoadedModel) -> list[str]:
    """Class names recorded from the dataset manifest at training time, else the class indices."""
    names = loaded.info.get("class_names") or []
    if len(names) == loaded.num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(loaded.num_classes)]


class TrajectoryRecorder:
    """An `on_step` callback keeping every solver state of the current batch (on the CPU), for GIFs."""

    def __init__(self):
        self.states: list[tuple[float, torch.Tensor]] = []

    def __call__(self, step) -> None:
        self.states.append((step.t, step.x.detach().cpu().clone()))

    def take(self, frames: int) -> list[tuple[float, torch.Tensor]]:
        """For each of `frames` evenly spaced times in [0, 1], the recorded state nearest to it (a state repeats
        when the solver took fewer steps; `merge_trajectories` drops the repeats). Then forget them."""
        states, self.states = self.states, []
        if not states or frames < 1:
            return []
        targets = [k / (frames - 1) for k in range(frames)] if frames > 1 else [1.0]
        return [states[min(range(len(states)), key=lambda j: abs(states[j][0] - tau))] for tau in targets]


def merge_trajectories(batches: list[list[tuple[float, torch.Tensor]]]) -> list[tuple[float, torch.Tensor]]:
    """Join per-batch trajectories (from `TrajectoryRecorder.take`, frame k nearest to the same time in every
    batch) into one (t, x_t of every sample) list on the CPU; a frame that repeats the previous one in every
    batch is dropped."""
    if not batches or not batches[0]:
        return []
    out = []
    for k in range(min(len(b) for b in batches)):
        if k and all(b[k][1] is b[k - 1][1] for b in batches):
            continue
        out.append((batches[0][k][0], torch.cat([b[k][1].cpu() for b in batches])))
    return out


def sample_outputs(out: Path, n: int, force: bool = False) -> list[Path]:
    """The files `fm sample --out` writes that must not exist yet: FILE.png, or DIR/grid.png, DIR/fm-sample.json and
    one DIR/NNNNNN.png per sample; none for a DIR that an earlier `fm sample` wrote (its fm-sample.json is there:
    the run continues it, once `sample_manifest` found the same settings), unless `force` starts it over."""
    from .images import SAMPLE_GRID_NAME, STILL_IMAGE_SUFFIXES, sample_file

    if out.suffix.lower() in STILL_IMAGE_SUFFIXES:
        return [out]
    if continues(out, force):
        return []
    # Of the n sample files, those already there (from the folder's listing): naming all n would grow with n (-n 10**9).
    there = sorted(i for i in sample_indices_in(out) if i < n)
    return [out / SAMPLE_GRID_NAME, manifest_path(out)] + [sample_file(out, i) for i in there]


def sample_indices_in(out: Path) -> list[int]:
    """The indices of the files in `out` named exactly as fm names samples (images.sample_file: six or more digits)."""
    from .images import sample_file

    return [i for i, name in _numbered_pngs(out) if sample_file(out, i).name == name]


def _numbered_pngs(out: Path) -> list[tuple[int, str]]:
    """(index, file name) of the files in `out` named like fm's samples, NNNNNN.png with six or more digits."""
    import re

    if not out.is_dir():
        return []
    return [(int(m.group(1)), m.group(0)) for p in out.iterdir() if (m := re.fullmatch(r"(\d{6,})\.png", p.name))]


def manifest_path(out: Path) -> Path:
    from .images import SAMPLE_MANIFEST_NAME

    return Path(out) / SAMPLE_MANIFEST_NAME


def continues(out: Path, force: bool) -> bool:
    """Whether `fm sample --out DIR` continues the samples an earlier run left in DIR (its manifest is there)."""
    return not force and manifest_path(out).is_file()


def sample_manifest(out: Path, record: dict, force: bool) -> bool:
    """Check `record` (the settings that decide the images) against DIR's manifest when continuing; False when
    there is none to continue (the caller writes it). A damaged manifest or other settings: a one-line refusal."""
    if not continues(out, force):
        return False
    path = manifest_path(out)
    try:
        before = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is damaged ({type(err).__name__}); pass --force to sample {out} over") from None
    before = before if isinstance(before, dict) else {}
    if before.get(REPLACING):
        raise UsageError(f"{out} was being sampled over with --force when it stopped, so its samples mix the earlier run's with this one's; "
                         "pass --force again to sample it over, or choose another --out")  # fmt: skip
    differ = sorted(k for k in set(record) | set(before) if before.get(k) != record.get(k))
    if differ:
        raise UsageError(
            f"{out} holds samples made with other settings ({', '.join(differ)}); rerun the same command to continue them "
            "(--precision / --compile for the network's), pass --force to sample over them, or choose another --out"
        )
    return True


# fm-sample.json's mark while `--force` samples over a folder that held samples: a continuation could not tell the earlier
# run's files from this one's, so it is refused until the run has written every sample (the mark is then dropped).
REPLACING = "replacing_earlier_samples"


def _manifest_record(loaded: LoadedModel, ckpt: str, n: int, seed: int, class_label, texts: list[str], sample_cfg, guide_ckpt) -> dict:
    """What decides sample i's image besides (seed, i): a continuation must find the same in DIR's manifest."""
    prompts = hashlib.sha256("\n".join(texts).encode()).hexdigest() if texts else None
    vae = getattr(loaded.vae, "path", None)
    encoder = getattr(getattr(loaded.text, "encoder", None), "path", None)  # another text encoder: other states, other images
    guide = guide_record(sample_cfg, guide_ckpt)
    return {
        "checkpoint": str(Path(ckpt).resolve()), "step": loaded.step, "ema": loaded.ema, "num_samples": n, "seed": seed,
        "class_label": class_label, "prompts_sha256": prompts, "vae": str(vae) if vae is not None else None,
        "text_encoder": str(Path(encoder).resolve()) if encoder is not None else None,
        **settings_record(sample_cfg), **sampling_record(loaded), **guide, **({"guide_step": loaded.guide_step} if guide else {}),
    }  # fmt: skip


def grid_count(out: Path, n: int, grid: int | None, grid_size: int) -> int:
    """How many samples (the first ones) the grid shows: `--grid`, else all of them for --out FILE.png (the
    grid is the output) and the checkpoint's sample.grid_size for --out DIR (the samples are the output)."""
    from .images import STILL_IMAGE_SUFFIXES

    if grid is not None:
        return min(n, grid)
    return n if out.suffix.lower() in STILL_IMAGE_SUFFIXES else min(n, grid_size)


def sample_command(ctx, *, ckpt: str, texts: list[str], n: int, class_label, sample_overrides, seed: int, out, gif, gif_frames: int,
                   batch_size: int, ema: bool, vae, text_encoder, force: bool = False, guide_ckpt=None, grid: int | None = None,
                   log: Callable[[str], None] = lambda message: None) -> dict | None:
    """What `fm sample` does on one rank: its share of the sample indices, written by global index; rank 0
    gathers the grid (and GIF) and returns the summary (other ranks return None).

    Memory stays flat in `n`: each batch's samples are written and dropped; only the grid's (the first
    `grid_count` samples, and their trajectories for the GIF) are kept. `--out DIR` records the settings in
    DIR/fm-sample.json first: the same command run again after an interruption makes only the missing samples
    (and the grid's again), a command with other settings is refused."""
    import time

    from . import distributed as D
    from .fsutil import refuse_existing, write_text_atomic
    from .images import SAMPLE_GRID_NAME, STILL_IMAGE_SUFFIXES, save_gif, save_grid

    refuse_existing(sample_outputs(out, n, force) + [gif], force)
    if ctx.rank == 0 and (stale := samples_beyond(out, n)):
        log(f"warning: {out} also holds {stale} sample file(s) numbered {n} or above from an earlier run, which this one does not "
            f"write; `fm fid --gen {out}` would score them too: remove them or choose another --out")
    D.barrier(ctx)  # every rank has checked before any rank writes (no rank may see another's new file)
    dev = ctx.device
    loaded = load_for_sampling(ckpt, dev, use_ema=ema, vae=vae, text_encoder=text_encoder, vae_option="--vae")
    check_conditioning(loaded, class_label, texts)  # before the precision probe and its lines
    sample_cfg = guidance_that_runs(loaded, sample_overrides(loaded.config.sample), log if ctx.rank == 0 else None)
    check_sampler(loaded.model, sample_cfg)  # before DIR/fm-sample.json is written
    shown = grid_count(out, n, grid, loaded.config.sample.grid_size)
    refuse_huge_grid(loaded, shown, math.ceil(math.sqrt(shown)), f"--grid {grid}" if grid is not None else f"--num-samples {n} with --out {out}",
                     "give a smaller --grid" if grid is not None else "sample into a folder (--out DIR: the samples stream to files, the grid shows the first --grid K)")
    if guide_ckpt is not None:
        loaded = with_guide(loaded, guide_ckpt, dev, use_ema=ema, warn=None if ctx.rank == 0 else lambda message: None)
    loaded = prepare_for_sampling(loaded, sample_cfg, dev, log, ctx)
    start = time.perf_counter()
    to_dir = out.suffix.lower() not in STILL_IMAGE_SUFFIXES
    indices = D.shard_indices(n, ctx)  # sample i depends only on (seed, i): any split gives the same images
    if to_dir:
        record = _manifest_record(loaded, ckpt, n, seed, class_label, texts, sample_cfg, guide_ckpt)
        continuing = sample_manifest(out, record, force)  # every rank reads it before rank 0 may write it
        replacing = not continuing and force and samples_beyond(out, 0) > 0  # an earlier run's files (before any rank writes)
        D.barrier(ctx)
        if not continuing and ctx.rank == 0:
            write_text_atomic(manifest_path(out), json.dumps(record | ({REPLACING: True} if replacing else {}), indent=2) + "\n")
        indices, there = _missing(out, indices, shown) if continuing else (indices, 0)
        reused = sum(D.all_gather_objects(there, ctx))
        if reused and ctx.rank == 0:
            log(f"continuing {out}: {reused} of {n} samples are there (same settings); making the other {n - reused}")
    prompts = [texts[i % len(texts)] for i in indices] if texts else None
    kept, nfes, trajectories = _write_samples(loaded, indices, out if to_dir else None, shown, ctx, seed=seed, sample_cfg=sample_cfg,
                                              batch_size=batch_size, class_label=class_label, prompts=prompts, gif_frames=gif_frames if gif else None)
    images = torch.stack(D.gather_in_index_order([i for i, _ in kept], [x for _, x in kept], ctx))
    nfes = [v for part in D.all_gather_objects(nfes, ctx) for v in part]
    if ctx.rank != 0:
        return None
    if to_dir and replacing:  # every rank has written its samples (the gathers above): the folder is this run's alone
        write_text_atomic(manifest_path(out), json.dumps(record, indent=2) + "\n")
    grid = save_grid(images, out / SAMPLE_GRID_NAME if to_dir else out)  # scoring the folder skips it (images.is_sample_grid)
    gif_path = None
    if gif is not None:  # frames are the model's states: latent models' go through the VAE here
        from .images import trajectory_frames

        frames = [(t, decode(loaded, x.to(dev)).cpu()) for t, x in merge_trajectories(trajectories)]
        gif_path = save_gif(trajectory_frames(frames), gif)
    from .images import sample_file

    return {
        "paths": [str(sample_file(out, i)) for i in range(n)] if to_dir else [],
        "grid": str(grid),
        "gif": str(gif_path) if gif_path else None,
        "num_samples": n,
        "grid_samples": shown,
        **nfe_record(nfes),  # nfe: network evaluations per sample (mean; a CFG pair counts once), nfe_max: the most
        "nfe_total": sum(nfe for nfe, _ in nfes),  # each batch's NFE once, summed (a guided pair, model and guide too, counts once)
        "seconds": round(time.perf_counter() - start, 3),  # compiling included (it happens at the first batch)
        **sampling_record(loaded),  # precision, compile: what ran
        **settings_record(sample_cfg),  # solver, steps, cfg, guidance, ...: what ran
        **guide_record(sample_cfg, guide_ckpt),
        "seed": seed,
    }


def samples_beyond(out: Path, n: int) -> int:
    """How many files in `out` are named as fm names samples (images.sample_file) with an index of `n` or more."""
    return sum(1 for i, _ in _numbered_pngs(out) if i >= n)


def _missing(out: Path, indices: list[int], shown: int) -> tuple[list[int], int]:
    """The indices a continuation makes: those whose file is not in `out`, and the grid's (it is drawn from them,
    so they are made again, to the same images); and how many of `indices` are there."""
    import os

    from .images import sample_file

    present = set(os.listdir(out))
    there = [sample_file(out, i).name in present for i in indices]
    return [i for i, ok in zip(indices, there) if i < shown or not ok], sum(there)


def _write_samples(loaded, indices: list[int], out: Path | None, shown: int, ctx, *, seed: int, sample_cfg, batch_size: int, class_label,
                   prompts, gif_frames: int | None) -> tuple[list, list, list]:
    """Sample `indices` batch by batch, writing each to `out` (None: --out FILE.png, only the grid) as it comes, with a
    progress bar on rank 0 and, on an interrupt, a line saying how to continue. Returns the grid's samples
    (index, image), each batch's (NFE, count) and, for the GIF, the grid rows' trajectories."""
    from .console import progress, stderr_console
    from .images import save_images

    recorder = TrajectoryRecorder() if gif_frames is not None else None
    kept, nfes, trajectories = [], [], []
    bar = progress(stderr_console(), "sample", len(indices)) if ctx.rank == 0 else contextlib.nullcontext(lambda k: None)
    try:
        with bar as advance:
            for chunk, _, result in iterate_samples(loaded, indices, seed=seed, sample_cfg=sample_cfg, batch_size=batch_size,
                                                    device=ctx.device, class_label=class_label, on_step=recorder, prompts=prompts):
                rows = [k for k, i in enumerate(chunk) if i < shown]
                kept += [(chunk[k], result.x[k].cpu().clone()) for k in rows]  # a copy: a view would hold the whole batch
                nfes.append((result.nfe, len(chunk)))
                if recorder is not None:  # one process (a GIF refuses --gpus/--nproc): the grid's rows lead each batch
                    frames = recorder.take(gif_frames)
                    if rows:
                        trajectories.append(_first_rows(frames, len(rows)))
                if out is not None:
                    for k, i in enumerate(chunk):  # each rank writes its own samples, named by global index
                        save_images(result.x[k : k + 1], out, start_index=i)
                advance(len(chunk))
                del result
    except KeyboardInterrupt:
        if out is not None and ctx.rank == 0:
            stderr_console().print(f"{out}: the samples written so far are complete; run the same command again to make the rest", highlight=False)
        raise
    return kept, nfes, trajectories


def _first_rows(frames: list[tuple[float, torch.Tensor]], rows: int) -> list[tuple[float, torch.Tensor]]:
    """A batch's trajectory (TrajectoryRecorder.take) cut to its first `rows` samples; a state that repeats
    stays one object (merge_trajectories drops a frame that repeats in every batch by identity)."""
    cut: dict[int, torch.Tensor] = {}
    return [(t, cut.setdefault(id(x), x[:rows].clone())) for t, x in frames]
