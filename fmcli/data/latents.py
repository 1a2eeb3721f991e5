"""Encode a prepared pixel dataset with the frozen encoders: VAE latents and, optionally, cached text states.

`fm prepare-data SOURCE --vae PATH [--text-encoder PATH [--cache-text]]` first writes the source's pixels
(the usual way) to a temporary directory, then streams it through `encode_prepared` in batches into the
final directory, so every source gets the latent path and nothing is ever held whole in memory.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..encoders import TextConditioning, check_text_encoder_dir, check_vae_dir, check_vae_encodes, check_vae_image_size, load_text_encoder, load_vae
from ..errors import RuntimeFailure, UsageError
from ..fsutil import named_path, refuse_existing
from .dataset import PreparedDataset, PreparedWriter, refuse_unreplaceable

_COPIED_FIELDS = ("num_classes", "class_names", "source", "image_size", "seed")


def encode_prepared(
    src: str | Path,
    out: str | Path,
    *,
    vae: str | None = None,
    text_encoder: str | None = None,
    cache_text: bool = False,
    max_tokens: int = 128,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    vae_precision: str = "fp32",
    flip: bool = False,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write `out` from the pixel dataset `src`: x = VAE latents (float16) when `vae` is given, else the
    pixels; with `flip` also x_flip = the latents of the horizontally mirrored images (a VAE is not
    flip-equivariant: flipping a latent is not the mirrored image's latent); text.npy / text_mask.npy (+ the
    empty prompt's) when `cache_text`; the manifest records them."""
    if cache_text and not text_encoder:
        raise UsageError("--cache-text needs --text-encoder PATH")
    if flip and not vae:
        raise UsageError("--flip stores the mirrored images' latents: it needs --vae DIR")
    source = PreparedDataset(src)
    manifest = source.manifest
    if manifest["kind"] != "pixels":
        raise UsageError(f"{src} already holds {manifest['kind']}; encode from pixels")
    has_captions = (Path(src) / "captions.jsonl").is_file()
    if text_encoder and not has_captions:
        raise UsageError(f"source {manifest.get('source')} has no captions: --text-encoder needs captioned data")
    encoder_vae = load_vae(vae, device, vae_precision) if vae else None
    encoder_text = load_text_encoder(text_encoder, device, max_tokens) if text_encoder else None
    text = TextConditioning.from_encoder(encoder_text) if cache_text else None

    shape = tuple(manifest["shape"])
    kind, dtype = ("latents", "float16") if encoder_vae else ("pixels", "uint8")
    out_shape = encoder_vae.latent_shape(shape) if encoder_vae else shape
    reader = PreparedDataset(src, text=has_captions)
    n = len(reader)
    extras = {"x_flip": (out_shape, dtype)} if flip else None
    with PreparedWriter(out, n, out_shape, dtype=dtype, kind=kind, labels=reader.has_labels, captions=has_captions, force=force, extras=extras) as writer:
        if text is not None:
            length, width = text.empty_states.shape[1:]
            states = np.lib.format.open_memmap(writer.tmp / "text.npy", mode="w+", dtype=np.float16, shape=(n, length, width))
            masks = np.lib.format.open_memmap(writer.tmp / "text_mask.npy", mode="w+", dtype=np.bool_, shape=(n, length))
            np.save(writer.tmp / "text_empty.npy", _float16_text(text.empty_states.float().cpu().numpy(), "the empty prompt"))
            np.save(writer.tmp / "text_empty_mask.npy", text.empty_mask.cpu().numpy())
        for start in range(0, n, batch_size):
            batch = reader.__getitems__(list(range(start, min(start + batch_size, n))))
            mirrored = {}
            if encoder_vae:
                x = _float16_latents(encoder_vae.encode(batch["x"]).float().cpu().numpy(), start)
                if flip:  # the latents of the mirrored images themselves (only pixels flip exactly)
                    mirrored["x_flip"] = _float16_latents(encoder_vae.encode(batch["x"].flip(-1)).float().cpu().numpy(), start)
            else:
                x = np.round((batch["x"].numpy() + 1.0) * 127.5).astype(np.uint8)
            captions = batch.get("caption")
            if text is not None:
                s, m = text.encode(captions)
                states[start : start + len(x)] = _float16_text(s.float().cpu().numpy(), f"caption {start}..{start + len(x) - 1}")
                masks[start : start + len(x)] = m.cpu().numpy()
            for k in range(len(x)):
                label = int(batch["y"][k]) if "y" in batch else None
                writer.add(x[k], label, captions[k] if captions is not None else None, **{name: v[k] for name, v in mirrored.items()})
            if progress is not None:
                progress(len(x))
        if text is not None:
            states.flush()
            masks.flush()
            del states, masks
        text_info = None
        if encoder_text is not None:
            text_info = {**encoder_text.info(), "cached": cache_text}
        fields = {k: manifest[k] for k in _COPIED_FIELDS if k in manifest}
        if encoder_vae:
            fields["mirrored"] = flip  # whether x_flip.npy holds the mirrored images' latents (validate_prepared checks it)
        return writer.finish(**fields, vae=encoder_vae.info() if encoder_vae else None, text_encoder=text_info)


FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504


def _float16_text(states: np.ndarray, which: str) -> np.ndarray:
    """Text-encoder states as cached (float16); inf there would turn into NaN losses in training."""
    return _checked_float16(
        states,
        lambda row: f"the text encoder produced non-finite states for {which}; check its weights",
        lambda peak: f"the text encoder's states for {which} reach {peak:.4g}, beyond float16's {FLOAT16_MAX:g}, so they cannot be cached: "
        "prepare the data without --cache-text (training then encodes the captions)",
    )  # fmt: skip


def _float16_latents(z: np.ndarray, start: int) -> np.ndarray:
    """Latents as stored (float16)."""
    return _checked_float16(
        z,
        lambda row: f"the VAE produced non-finite latents for image {start + row}; check the VAE weights (or encode in fp32)",
        lambda peak: f"latents reach |z| = {peak:.4g}, beyond float16's {FLOAT16_MAX:g}: the VAE's scaling_factor/shift_factor look wrong",
    )


def _checked_float16(values: np.ndarray, non_finite: Callable[[int], str], too_large: Callable[[float], str]) -> np.ndarray:
    """`values` ([rows, ...]) as float16, refusing a row with nan/inf (`non_finite(row)` names the first) and values
    beyond float16's range, which would be stored as inf (`too_large(peak)`)."""
    bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1)
    if bad.any():
        raise RuntimeFailure(non_finite(int(np.argmax(bad))))
    peak = float(np.abs(values).max()) if values.size else 0.0
    if peak > FLOAT16_MAX:
        raise RuntimeFailure(too_large(peak))
    return values.astype(np.float16)


def prepare_encoded(prepare_pixels: Callable[[Path], Path], out: str | Path, *, force: bool = False, size: int | None = None, **encode_kwargs) -> Path:
    """Run `prepare_pixels(tmp_dir)` (any source's usual writer), then encode it into `out`; the temporary
    pixel dataset is removed whatever happens. `size`: the pixel pass's image size, checked against the VAE first."""
    out = named_path(out)
    refuse_unreplaceable(out)  # --force replaces only a prepared dataset: said now, not after the pixel pass
    refuse_existing(out, force, folders=True)
    # Fail on a wrong encoder path before the (possibly long) pixel pass, not after it.
    if encode_kwargs.get("cache_text") and not encode_kwargs.get("text_encoder"):
        raise UsageError("--cache-text needs --text-encoder PATH")
    if encode_kwargs.get("vae"):
        check_vae_dir(encode_kwargs["vae"])
        check_vae_encodes(encode_kwargs["vae"])
        if size is not None:
            check_vae_image_size(encode_kwargs["vae"], size)
    if encode_kwargs.get("text_encoder"):
        check_text_encoder_dir(encode_kwargs["text_encoder"])
    tmp = out.parent / f".{out.name}.pixels-{uuid.uuid4().hex[:8]}"
    try:
        pixels = prepare_pixels(tmp)
        return encode_prepared(pixels, out, force=force, **encode_kwargs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
