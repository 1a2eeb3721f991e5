"""`fm prepare-data`: read a source, decode in parallel, stream into the prepared format atomically.

Records are decoded in order by a process pool with a bounded window of batches in flight, so memory
stays flat whatever the dataset size; the writer streams to `OUT.tmp-*` and renames on success, and any
failure (Ctrl-C included) removes the temporary directory.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import shutil
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..console import Bar
from ..errors import UsageError
from .decode import Record, decode_batch
from ..fsutil import clear_stale_temps, named_path, refuse_existing
from .readers import DEFAULT_MAX_MEMBER_MIB, Source, open_captions, open_cifar10, open_folder, open_mnist, open_sklearn_digits, open_tar

SOURCES = ("shapes", "cifar10", "mnist", "sklearn-digits", "folder", "captions", "tar")
SPLIT_SOURCES = ("cifar10", "mnist", "sklearn-digits")  # the sources with a train and a test split (--split)
CAPTION_SOURCES = ("shapes", "captions", "tar")  # the sources whose records can carry captions (tar: shards with .txt/.json)
BATCH = 64  # records per pool task
SHOW_SKIPPED = 5
PROGRESS_EVERY = 256  # records between progress updates


@dataclass
class Summary:
    path: str
    source: str
    count: int
    skipped: int
    classes: int
    seconds: float
    bytes: int
    skipped_examples: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)  # class names with no usable image (not in --json)


def prepare(
    source: str,
    out: str | Path,
    *,
    root: str | None = None,
    split: str = "train",
    size: int = 32,
    limit: int | None = None,
    workers: int = 1,
    force: bool = False,
    count: int = 20000,
    seed: int = 0,
    max_member_mib: float = DEFAULT_MAX_MEMBER_MIB,
    on_start: Callable[[int | None], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Summary:
    """Prepare `source` into `out`; returns counts and timing. Bad input raises UsageError, leaving nothing."""
    start = time.perf_counter()
    out = named_path(out)
    from .dataset import PreparedWriter, refuse_unreplaceable  # imports torch: not at CLI start-up (`fm --help` stays fast)

    refuse_unreplaceable(out)  # first: "pass --force" is advice only for what --force may replace
    refuse_existing(out, force, folders=True)
    if split not in ("train", "test"):
        raise UsageError(f"--split must be train or test, not {split!r}")
    if split != "train" and source not in SPLIT_SOURCES:  # it would be the training images again: a "test" set that leaks
        raise UsageError(f"--split test: the {source} source has no test split (only {', '.join(SPLIT_SOURCES)} do); "
                         "prepare held-out images from their own --root" + (", or shapes with another --seed" if source == "shapes" else ""))
    refuse_out_in_root(source, root, out)
    src = open_source(source, root, split=split, size=size, count=count, seed=seed, max_member_mib=max_member_mib)
    total = src.capacity if limit is None else min(limit, src.capacity or limit)
    if total:
        clear_stale_temps(out)  # first: the temp folder (possibly GBs) a killed earlier write of OUT left is freed
        check_disk_space(out, total * src.channels * size * size)
    if on_start is not None:
        on_start(total)
    skipped, examples = 0, []
    labelled = src.class_names is not None
    with PreparedWriter(out, None, (src.channels, size, size), labels=labelled, captions=src.captions, force=force) as writer:
        # Pixel arrays already at the final size need no decoding: a pool would only copy them around.
        pool_size = 1 if src.native_size == size else workers
        decoded = _decoded(src.records(), size, src.channels, pool_size)
        with contextlib.closing(decoded):  # leaving early (limit, error, Ctrl-C) stops the pool at once
            for n, (record, (pixels, reason)) in enumerate(decoded, 1):
                if pixels is None:
                    skipped += 1
                    if len(examples) < SHOW_SKIPPED:
                        examples.append(f"{record.name} ({reason})")
                else:
                    writer.add(pixels, record.label if labelled else None, record.caption if src.captions else None)
                if on_progress is not None and n % PROGRESS_EVERY == 0:
                    on_progress(PROGRESS_EVERY)
                if limit is not None and writer.count >= limit:
                    break
        if writer.count == 0:
            detail = f": {skipped} skipped, e.g. {examples[0]}" if examples else ""
            raise UsageError(f"no usable images in the {source} source{detail}")
        path = writer.finish(
            num_classes=len(src.class_names or []),
            class_names=src.class_names,
            source=src.name,
            channels=src.channels,
            skipped=skipped,
            **src.info,
        )
        written = writer.count
    return Summary(
        path=str(path),
        source=src.name,
        count=written,
        skipped=skipped,
        classes=len(src.class_names or []),
        seconds=round(time.perf_counter() - start, 2),
        bytes=sum(f.stat().st_size for f in path.iterdir()),
        skipped_examples=examples,
        empty_classes=_empty_classes(path, src.class_names),
    )


def prepare_dataset(
    source: str, out: Path, *, root: str | None, split: str, size: int, limit: int | None, workers: int | None, count: int, seed: int,
    max_member_mib: float, force: bool, encode: dict | None = None, device: str = "auto",
) -> Summary:
    """What `fm prepare-data` does: the pixel pass of any source (with a progress bar) and, with `encode`
    (`vae`, `text_encoder`, `cache_text`, `max_tokens`, `batch_size`), its re-encoding into latents or cached
    text states, the pixel pass then being a temporary step."""
    summaries = []

    def pixels(target: Path) -> Path:
        summary = prepare_with_progress(
            source, target, root=root, split=split, size=size, limit=limit, workers=workers or default_workers(), force=force, count=count, seed=seed,
            max_member_mib=max_member_mib,
        )
        summaries.append(summary)
        return Path(summary.path)

    if not encode:
        pixels(out)
        return summaries[-1]
    if encode.get("text_encoder") and source not in CAPTION_SOURCES:  # said now, not after the (long) pixel pass
        raise UsageError(f"the {source} source has no captions, which --text-encoder encodes: it needs captioned data "
                         f"({', '.join(CAPTION_SOURCES)})")
    from ..hardware import resolve_device

    total = limit or (count if source == "shapes" else None)  # other sources: known only once read
    path = prepare_encoded_with_progress(pixels, out, total, resolve_device(device), force, dict(encode, size=size))
    summary = summaries[-1]
    summary.path = str(path)
    summary.bytes = sum(f.stat().st_size for f in Path(path).iterdir())
    return summary


def _empty_classes(path: Path, class_names: list[str] | None) -> list[str]:
    """The classes (e.g. an empty class folder, or one of damaged files only) that no written image has."""
    if not class_names:
        return []
    import numpy as np

    counts = np.bincount(np.load(Path(path) / "y.npy"), minlength=len(class_names))
    return [name for name, n in zip(class_names, counts) if n == 0]


def empty_classes_note(summary: Summary) -> str | None:
    """A label with no image trains nothing, yet the model and its grids have it: say so, on stderr."""
    if not summary.empty_classes:
        return None
    names = ", ".join(repr(name) for name in summary.empty_classes)
    return (f"warning: {len(summary.empty_classes)} of {summary.classes} classes have no usable image ({names}): "
            "a model trained on it learns nothing for them (an empty or unreadable class folder, or a --limit that stops before them)")


def skipped_note(summary: Summary) -> str | None:
    """The records a pass skipped, a few named, for stderr."""
    if not summary.skipped:
        return None
    shown = "; ".join(summary.skipped_examples)
    more = f" (and {summary.skipped - len(summary.skipped_examples)} more)" if summary.skipped > len(summary.skipped_examples) else ""
    return f"skipped {summary.skipped} unusable item(s): {shown}{more}"


def prepare_with_progress(source: str, target: Path, **kwargs):
    """`prepare` with a progress bar on stderr (when it is a terminal); returns its Summary."""
    with Bar(source) as bar:
        return prepare(source, target, on_start=lambda total: bar.update(total=total), on_progress=bar.advance, **kwargs)


def prepare_encoded_with_progress(pixels, out: Path, total: int | None, device, force: bool, encode: dict) -> Path:
    from .latents import prepare_encoded

    with Bar("encode", total) as bar:
        return prepare_encoded(pixels, out, force=force, device=device, progress=bar.advance, **encode)


def refuse_out_in_root(source: str, root, out: Path) -> None:
    """A folder source reads every file under --root: a dataset written inside it would be read back as input by
    the next run (a class folder of .npy files, or a flat folder turned into class folders)."""
    if source not in ("folder", "captions") or root is None or not Path(root).expanduser().is_dir():
        return
    root_dir = Path(root).expanduser().resolve()
    if out.resolve() == root_dir or root_dir in out.resolve().parents:
        raise UsageError(f"--out {out} is inside --root {root}, whose files the {source} source reads (a later run would read "
                         "this dataset back as images); choose an --out outside it")


def open_source(name: str, root, *, split: str, size: int, count: int, seed: int, max_member_mib: float = DEFAULT_MAX_MEMBER_MIB) -> Source:
    """Validate the source's input now (before any output exists) and return it."""
    if name == "shapes":
        from .shapes import shapes_source

        return shapes_source(size=size, count=count, seed=seed)
    if name == "cifar10":
        return open_cifar10(root, split)
    if name == "mnist":
        return open_mnist(root, split)
    if name == "sklearn-digits":
        return open_sklearn_digits(split)
    if name == "folder":
        return open_folder(root)
    if name == "captions":
        return open_captions(root)
    if name == "tar":
        if root is None:
            raise UsageError("the tar source needs --root 'SHARDS/*.tar'")
        return open_tar(str(root), max_member_bytes=int(max_member_mib * 2**20))
    raise UsageError(f"unknown source {name!r}; choose one of {', '.join(SOURCES)}")


def _decoded(records: Iterable[Record], size: int, channels: int, workers: int) -> Iterator[tuple[Record, tuple]]:
    """(record, (pixels or None, reason)) in source order; `workers` > 1 decodes in a process pool."""
    decode = partial(decode_batch, size=size, channels=channels)
    batches = iter(lambda it=iter(records): list(islice(it, BATCH)), [])
    if workers <= 1:
        for batch in batches:
            yield from zip(batch, decode(batch))
        return
    pool = _pool_context().Pool(workers, initializer=_ignore_sigint)
    pending = deque()  # a bounded window of tasks: reading never runs far ahead of decoding
    try:
        for batch in batches:
            pending.append((batch, pool.apply_async(decode, (batch,))))
            if len(pending) >= 4 * workers:
                done, result = pending.popleft()
                yield from zip(done, result.get())
        while pending:
            done, result = pending.popleft()
            yield from zip(done, result.get())
    finally:
        # No Pool.terminate() (what `with Pool` does): its teardown can deadlock against idle workers.
        # The work still in flight is bounded (4 batches per worker): let it finish, then join.
        for _, result in pending:
            result.wait()
        pool.close()
        pool.join()


def check_disk_space(out: Path, need: int) -> None:
    """Refuse a dataset whose pixels (uint8) cannot fit where it goes, before writing any of it."""
    where = next(p for p in [out, *out.parents] if p.exists())
    free = shutil.disk_usage(where).free
    if need > free:
        raise UsageError(f"the dataset needs {need / 1e9:.1f} GB for its pixels and {where} has {free / 1e9:.1f} GB free; "
                         "lower --count or --size, or choose another --out")


def _pool_context():
    """fork (fast) when this process runs no other thread; else forkserver, so that workers never
    inherit a lock held by another thread (rich's progress refresh thread, for one)."""
    if threading.active_count() == 1:
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["fmcli.data.decode"])
    return ctx


def _ignore_sigint():
    """Ctrl-C is handled by the parent (which tears the pool down); workers must not print tracebacks."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers() -> int:
    """Decoding processes when --workers is not given: the usable cores, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))

