"""`fm prepare-data`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..console import emit_json, stderr_console
from ..data.prepare import SOURCES
from ..errors import UsageError
from ..fsutil import named_path, refuse_existing
from .app import app, log_line
from .options import float_option


@app.command("prepare-data")
def prepare_data(
    *,
    source: Annotated[str, typer.Argument(help=f"Data source: {', '.join(SOURCES)}.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (written atomically).")],
    root: Annotated[Optional[str], typer.Option("--root", help="Input: archive, folder, jsonl file, or a quoted tar glob 'shards/*.tar'.")] = None,
    split: Annotated[str, typer.Option("--split", help="train or test (cifar10, mnist, sklearn-digits).")] = "train",
    size: Annotated[int, typer.Option("--size", min=8, max=4096, help="Output size: resize the short side, center crop (Lanczos).")] = 32,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Stop after N usable images.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Decoding processes (default: cores, at most 8).")] = None,
    count: Annotated[Optional[int], typer.Option("--count", min=1, help="Number of images (shapes; default 20000).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", min=0, help="Random seed (shapes; default 0).")] = None,
    max_member_mib: Annotated[Optional[float], float_option("--max-member-mib", min=0.001, help="tar: skip (and count) members larger than this, unread (default 64).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
    vae: Annotated[Optional[str], typer.Option("--vae", help="Local diffusers VAE directory: store float16 latents instead of pixels.")] = None,
    flip: Annotated[bool, typer.Option("--flip", help="With --vae: also store the mirrored images' latents (x_flip.npy), which data.flip trains on.")] = False,
    text_encoder: Annotated[Optional[str], typer.Option("--text-encoder", help="Local text encoder directory (T5/CLIP) recorded for the captions.")] = None,
    cache_text: Annotated[bool, typer.Option("--cache-text", help="Also store the text encoder's states and masks (text.npy, text_mask.npy).")] = False,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Text tokens per caption (padding masked).")] = 128,
    encode_batch: Annotated[int, typer.Option("--encode-batch-size", min=1, help="Images per encoder batch.")] = 64,
    device: Annotated[str, typer.Option("--device", help="Encoder device: auto, cpu or cuda.")] = "auto",
):
    """Turn a dataset into fm's prepared format (manifest.json + x.npy + y.npy + captions.jsonl).

    Examples:

      fm prepare-data shapes --out data/shapes-32 --size 32 --count 20000

      fm prepare-data cifar10 --root cifar-10-python.tar.gz --split train --out data/cifar10

      fm prepare-data mnist --root mnist/ --size 32 --out data/mnist

      fm prepare-data sklearn-digits --size 32 --out data/digits32            # scikit-learn's 8x8 digits, upscaled

      fm prepare-data folder --root celeba_hq/ --size 256 --workers 8 --out data/celebahq256 --vae weights/sd-vae-ft-mse --flip

      fm prepare-data tar --root 'shards/*.tar' --size 64 --out data/captions64

      fm prepare-data captions --root pairs.jsonl --size 64 --out data/t2i-64 --vae weights/sd-vae-ft-mse --text-encoder weights/t5-small --cache-text
    """

    from ..data.prepare import empty_classes_note, prepare_dataset, skipped_note

    if cache_text and not text_encoder:  # else the dataset would silently hold no text states
        raise UsageError("--cache-text stores a text encoder's states: give the encoder with --text-encoder DIR")
    if flip and not vae:  # pixels are mirrored exactly at load time; only latents need their mirrors encoded
        raise UsageError("--flip stores the mirrored images' latents: it needs --vae DIR (pixel datasets are flipped when training, by data.flip)")
    from ..data.dataset import refuse_unreplaceable
    from ..data.prepare import DEFAULT_MAX_MEMBER_MIB

    refuse_unread_options(source, root=root, count=count, seed=seed, max_member_mib=max_member_mib)
    out = named_path(out)  # `--out .`: the current folder, by its name
    refuse_unreplaceable(out)  # first: "pass --force" is advice only for what --force may replace
    refuse_existing(out, force, folders=True)
    encode = dict(vae=vae, flip=flip, text_encoder=text_encoder, cache_text=cache_text, max_tokens=max_tokens, batch_size=encode_batch) if vae or text_encoder else None
    summary = prepare_dataset(
        source, out, root=root, split=split, size=size, limit=limit, workers=workers, count=20000 if count is None else count,
        seed=seed or 0, max_member_mib=DEFAULT_MAX_MEMBER_MIB if max_member_mib is None else max_member_mib, force=force, encode=encode, device=device,
    )  # fmt: skip
    for note in (skipped_note(summary), empty_classes_note(summary)):
        if note:
            log_line(note)
    if as_json:
        emit_json({k: v for k, v in vars(summary).items() if k not in ("skipped_examples", "empty_classes")})
    else:
        stderr_console().print(f"wrote {summary.count} images ({summary.bytes / 1e6:.1f} MB) in {summary.seconds:.1f} s", highlight=False)
        print(summary.path)


def refuse_unread_options(source: str, **given) -> None:
    """An option the source never reads (None: not given) would be accepted and do nothing: `folder --count 1000`
    prepared every image (--limit N is the cap), `sklearn-digits --root DIR` scikit-learn's own digits. Exit 2."""
    reads = {"root": set(SOURCES) - {"shapes", "sklearn-digits"}, "count": {"shapes"}, "seed": {"shapes"}, "max_member_mib": {"tar"}}
    if source not in SOURCES:
        return  # prepare_dataset names the sources
    unread = [f"--{name.replace('_', '-')}" for name, value in given.items() if value is not None and source not in reads[name]]
    if unread:
        hint = "; --limit N stops after N images" if "--count" in unread else ""
        raise UsageError(f"{', '.join(unread)} {'is' if len(unread) == 1 else 'are'} not read by the {source} source: drop {', '.join(unread)}{hint}")
