"""`fm export`: a checkpoint's weights as a safetensors directory (never a pickle), for diffusers or for fm.

--format diffusers (class-conditional or unconditional DiTs): a `DiTTransformer2DModel` directory
(config.json + diffusion_pytorch_model.safetensors, mapped exactly by models/diffusers_dit.py), a
`FlowMatchEulerDiscreteScheduler` config in scheduler/, and a README.md whose snippet samples with both.
--format fm (any model): model.safetensors with fm's own parameter names.
Both also hold fm_export.json (fm's resolved config, data facts, step, layout), so `fm sample --ckpt DIR`
loads either. The directory is written as DIR.tmp-* and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .checkpoint import EXPORT_MANIFEST, load_checkpoint, resolve_checkpoint
from .config import Config, config_to_dict, validate_config
from .errors import UsageError
from .fsutil import commit_or_refuse, named_path, refuse_unreplaceable_folder, refuse_unwritable, temp_folder

EXPORT_FORMATS = ("diffusers", "fm")
EXPORT_VERSION = 1
_FM_WEIGHTS = "model.safetensors"
_DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


@dataclass
class ExportSummary:
    path: str
    format: str
    layout: str  # "diffusers-dit" or "fm"
    params: int
    step: int
    ema: bool


# Everything either format writes (`_write_fm`, `_write_diffusers`): what --force may replace along with the export.
EXPORT_FILES = frozenset({EXPORT_MANIFEST, "README.md", _FM_WEIGHTS, _DIFFUSERS_WEIGHTS, "config.json", "scheduler"})


def export_checkpoint(ckpt: str | Path, out: str | Path, fmt: str = "diffusers", *, use_ema: bool = True, force: bool = False) -> ExportSummary:
    """Write `ckpt`'s (EMA) weights to `out` in `fmt`; refuses, before writing anything, what cannot be exported."""
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
    out = named_path(out)  # a symbolic link: its target replaced, the link kept
    # What --force may not replace is refused first, so that "pass --force" is never advice that --force then refuses.
    if out.exists() and not out.is_dir():
        raise UsageError(f"refusing to replace {out}: it is a file, not an fm export folder; choose another --out")
    if out.exists():
        refuse_unreplaceable_folder(out, "an fm export", EXPORT_MANIFEST, EXPORT_FILES.__contains__)
    if out.exists() and not force:
        raise UsageError(f"{out} already exists; pass --force to replace it")
    refuse_unwritable(out.parent)  # a file where a folder of --out should be: one line now, not an OSError later
    path = resolve_checkpoint(ckpt)
    if is_export(path):
        raise UsageError(f"{path} is already an exported model; export from the training checkpoint")
    state = load_checkpoint(path)
    cfg = validate_config(state["config"], source=str(path))
    weights = state.get("ema") if use_ema else state["model"]
    if weights is None:
        raise UsageError(f"{path} has no EMA weights; use --no-ema")
    if not isinstance(weights, dict):
        raise UsageError(f"{path} is damaged: its {'EMA' if use_ema else 'model'} weights are not a state dict")
    _check_weights(path, weights, cfg, "is damaged: its weights do not fit its own config:")  # else fm would refuse the export
    if fmt == "diffusers":
        from .models.diffusers_dit import check_exportable

        check_exportable(cfg.model)
    meta = {
        "format": EXPORT_VERSION,
        "layout": "diffusers-dit" if fmt == "diffusers" else "fm",
        "weights_file": _DIFFUSERS_WEIGHTS if fmt == "diffusers" else _FM_WEIGHTS,
        "ema": bool(use_ema),
        "step": int(state.get("step", 0)),
        "config": config_to_dict(cfg),
        "data_info": state.get("data_info", {}),
        "source_checkpoint": str(path),
        "fm_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    writer = _write_diffusers if fmt == "diffusers" else _write_fm
    _atomic_dir(out, lambda tmp: writer(tmp, weights, cfg, meta, out.name), force)
    return ExportSummary(path=str(out), format=fmt, layout=meta["layout"], params=sum(v.numel() for v in weights.values()), step=meta["step"], ema=bool(use_ema))


def is_export(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / EXPORT_MANIFEST).is_file()


def load_export(path: str | Path) -> dict:
    """An export directory as a checkpoint-shaped dict: {"model", "ema", "config", "data_info", "step"} (fm names).

    A damaged or modified export is a one-line UsageError, never read silently as something else: the
    manifest must name a weights file inside the folder, and the weights must be exactly fm's model."""
    path = Path(path)
    meta = _read_manifest(path)
    cfg = validate_config(meta["config"], source=str(path / EXPORT_MANIFEST))
    weights = _read_weights(path / meta["weights_file"])
    if meta["layout"] == "diffusers-dit":
        from .models.diffusers_dit import diffusers_to_fm

        try:
            weights = diffusers_to_fm(weights, cfg.model)
        except KeyError as err:
            raise UsageError(f"{path} does not match the model its fm_export.json describes: it lacks {err.args[0]}") from None
        except (IndexError, RuntimeError) as err:  # a tensor of another width than the config's
            raise UsageError(f"{path} does not match the model its fm_export.json describes ({_one_line(err)})") from None
    _check_weights(path, weights, cfg)
    # One set of weights: whichever fm export chose (EMA by default) serves for both keys; `exported_ema` says which.
    return {"model": weights, "ema": weights, "config": meta["config"], "data_info": meta.get("data_info", {}), "step": meta.get("step", 0),
            "exported_ema": meta.get("ema")}  # fmt: skip


def _read_manifest(path: Path) -> dict:
    """fm_export.json, checked: a known format and layout, a config, and a weights file that is a bare
    file name present in the folder (never a path that leads out of it)."""
    manifest = path / EXPORT_MANIFEST
    try:
        meta = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{manifest} is not valid JSON ({_one_line(err)}); export the model again") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_VERSION or meta.get("layout") not in ("fm", "diffusers-dit"):
        found = (meta.get("format"), meta.get("layout")) if isinstance(meta, dict) else (None, None)
        raise UsageError(f"{path}: unsupported export (format {found[0]!r}, layout {found[1]!r})")
    name = meta.get("weights_file")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        raise UsageError(f"{manifest}: weights_file must be the name of a file in {path}, not {name!r}; export the model again")
    if not (path / name).is_file():
        raise UsageError(f"{path} is incomplete: {name} is missing")
    if not isinstance(meta.get("config"), dict):
        raise UsageError(f"{manifest} has no config; export the model again")
    return meta


def _read_weights(weights_file: Path) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(weights_file)
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise UsageError(f"cannot read {weights_file}: corrupt or not safetensors ({_one_line(err)})") from None


def _check_weights(path: Path, weights: dict, cfg: Config, what: str = "does not match the model its fm_export.json describes:") -> None:
    """The weights must be exactly the tensors (names and shapes) of the model the config builds (the manifest's,
    or a checkpoint's before it is exported); `what` says which, after the path."""
    from .models import build_model

    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        expected = {k: tuple(v.shape) for k, v in build_model(cfg.model).state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != expected[k])
    for verb, keys in (("lacks", missing), ("has unexpected", extra), ("has a wrong shape for", wrong)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            raise UsageError(f"{path} {what} it {verb} {keys[0]}{more}")


def _one_line(err: Exception) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:160]


# ------------------------------------------------------------------------------------------ writers


def _write_fm(tmp: Path, weights: dict, cfg: Config, meta: dict, name: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / _FM_WEIGHTS), metadata={"format": "pt"})
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "README.md").write_text(_fm_readme(cfg, meta, name))


def _write_diffusers(tmp: Path, weights: dict, cfg: Config, meta: dict, name: str) -> None:
    from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

    from .models.diffusers_dit import diffusers_dit_config, fm_to_diffusers

    model = DiTTransformer2DModel(**diffusers_dit_config(cfg.model))
    model.load_state_dict(fm_to_diffusers(weights, cfg.model), strict=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    # fm's sampling grid is sigma = linspace(1, 0, steps + 1) with the SD3 shift, which is this scheduler's
    # rule given those sigmas (its default grid ends at sigma 1/1000 instead of 0).
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.sample.shift or cfg.flow.shift).save_pretrained(str(tmp / "scheduler"))
    (tmp / EXPORT_MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "README.md").write_text(_diffusers_readme(cfg, meta, name))


def _atomic_dir(out: Path, write, force: bool) -> None:
    """Run write(tmp) in a sibling temporary directory, then rename it to `out` (with `force`, replacing a previous
    export; without, refusing one that appeared while it was written)."""
    with temp_folder(out) as tmp:  # what a killed earlier export to `out` left is dealt with first
        write(tmp)
        commit_or_refuse(tmp, out, force, "export")  # a previous export is swapped out, then deleted


# ------------------------------------------------------------------------------------------ READMEs


def _diffusers_readme(cfg: Config, meta: dict, name: str) -> str:
    m = cfg.model
    k = m.num_classes
    labels = "torch.arange(n) % NUM_CLASSES" if k else "torch.zeros(n, dtype=torch.long)  # unconditional: label 0 is the null class"
    guidance = cfg.sample.cfg if k else 1.0
    lo, hi = cfg.sample.guidance_interval or (0.0, 1.0)
    own = (cfg.sample.solver, cfg.sample.guidance if guidance != 1.0 else "cfg")
    other = "" if own == ("euler", "cfg") else (
        f"\nThis snippet is Euler with plain CFG; the checkpoint samples with {own[0]} and {own[1]} guidance by default, so"
        f" `fm sample --ckpt DIR --solver euler --guidance cfg` is what it reproduces.\n"
    )
    latents = meta["data_info"].get("kind") == "latents"
    samples = ("Samples are VAE latents, z = (posterior mean - shift_factor) * scaling_factor with the VAE config's factors; "
               "the snippet decodes them to images in [0, 1]" if latents else "Samples are in [-1, 1]")  # fmt: skip
    return f"""# {cfg.name}: a flow-matching DiT exported by fm {__version__}

{'Class-conditional' if k else 'Unconditional'} rectified-flow model (fm step {meta['step']}, {'EMA' if meta['ema'] else 'raw'} weights) as a diffusers
`DiTTransformer2DModel` ({m.hidden_size} wide, {m.depth} blocks, patch {m.patch_size}, {m.in_channels}x{m.image_size}x{m.image_size} input,
{k} classes; label {k} is the null class for classifier-free guidance). {samples}.

Conventions (fm's flow; t = 0 is noise, t = 1 is data, sigma = 1 - t):
- `timestep` = 1000 * t = 1000 - (the scheduler's timestep, 1000 * sigma);
- the output is d x / d sigma (noise minus data direction), what FlowMatchEulerDiscreteScheduler.step expects;
- after `from_pretrained`, set `downscale_freq_shift = 0` on every block's time projection: fm's time
  features use frequencies 10000^(-i/128) like the original DiT; diffusers' DiT uses 10000^(-i/127), a
  difference no weight can absorb. Without this line the model is loaded but computes something else.

```python
import numpy as np
import torch
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

DIR, NUM_CLASSES, STEPS, CFG, n = "{name}", {k}, {cfg.sample.steps}, {guidance}, 8
GUIDED = ({lo!r}, {hi!r})  # fm's sample.guidance_interval: CFG only where fm's time t = 1 - sigma is in it
model = DiTTransformer2DModel.from_pretrained(DIR).eval()
for block in model.transformer_blocks:
    block.norm1.emb.time_proj.downscale_freq_shift = 0
scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(DIR, subfolder="scheduler")
scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, STEPS + 1)[:-1])  # fm's grid: ends exactly at sigma = 0

x = torch.randn(n, {m.in_channels}, {m.image_size}, {m.image_size}, generator=torch.Generator().manual_seed(0))
y = {labels}
null = torch.full_like(y, NUM_CLASSES)
with torch.no_grad():
    for i, ts in enumerate(scheduler.timesteps):
        t = 1.0 - float(scheduler.sigmas[i])
        if CFG != 1 and GUIDED[0] - 1e-6 <= t <= GUIDED[1] + 1e-6:
            timestep = (1000 - ts).expand(2 * n)
            out = model(torch.cat([x, x]), timestep=timestep, class_labels=torch.cat([y, null])).sample
            cond, uncond = out.chunk(2)
            velocity = uncond + CFG * (cond - uncond)
        else:
            velocity = model(x, timestep=(1000 - ts).expand(n), class_labels=y).sample
        x = scheduler.step(velocity, ts, x).prev_sample
{_images_snippet(cfg, meta) if latents else 'images = (x.clamp(-1, 1) + 1) / 2  # [n, C, H, W] in [0, 1]'}
```
{other}
`fm sample --ckpt DIR` also reads this directory (fm_export.json holds fm's config). The stock `DiTPipeline`
does not apply: it expects a DDPM noise-prediction model with learned variance.
"""


def _images_snippet(cfg: Config, meta: dict) -> str:
    """The README snippet's last lines for a latent model: decode the sampled latents with the run's VAE, inverting
    fm's z = (mean - shift_factor) * scaling_factor with the factors of the VAE's own config (as encoders.FrozenVAE)."""
    vae = cfg.encoders.vae or (meta["data_info"].get("vae") or {}).get("path") or "PATH/TO/THE/VAE"  # fm sample's order
    return f"""from diffusers import AutoencoderKL

VAE = {str(vae)!r}  # the VAE the training latents were encoded with
vae = AutoencoderKL.from_pretrained(VAE).eval()
shift = vae.config.shift_factor or 0.0  # fm: z = (posterior mean - shift_factor) * scaling_factor
with torch.no_grad():
    images = vae.decode(x / vae.config.scaling_factor + shift).sample
images = (images.clamp(-1, 1) + 1) / 2  # [n, 3, H, W] in [0, 1]"""


def _fm_readme(cfg: Config, meta: dict, name: str) -> str:
    m = cfg.model
    what = "text-conditioned DiT (cross-attention to text-encoder states)" if m.arch == "dit" and m.cross_attention else (
        "U-Net (a diffusers UNet2D(Condition)Model under `net.`)" if m.arch == "unet" else "DiT"
    )
    prompt = ' --prompt "a photo of a cat"' if m.cross_attention else ""  # a text model needs one (or --prompts FILE)
    return f"""# {cfg.name}: fm model weights (fm {__version__}, step {meta['step']}, {'EMA' if meta['ema'] else 'raw'})

A {what}: `model.safetensors` with fm's parameter names, `fm_export.json` with fm's resolved config.
Sample with fm{" (any prompt, or --prompts FILE with one per line)" if prompt else ""}:

    fm sample --ckpt {name}{prompt} --num-samples 16 --out samples/

What diffusers cannot load from here: there is no diffusers pipeline for this model. Only class-conditional
DiTs export to a diffusers `DiTTransformer2DModel` (`fm export --format diffusers`); diffusers' DiT has no
text cross-attention, and a U-Net's weights, although they are a diffusers U-Net's, take fm's time
convention (timestep = 1000 t, t = 0 noise, output d x / d t) that no diffusers scheduler uses.
"""
