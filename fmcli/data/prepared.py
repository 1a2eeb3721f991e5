"""The prepared-dataset format (DESIGN.md section 4): an atomic streaming writer and a memmap reader.

A dataset is a directory with manifest.json, x.npy ([N,C,H,W] uint8 pixels or float16 latents),
optional y.npy (int64 labels) and captions.jsonl. The writer fills preallocated memory-mapped arrays
inside `DIR.tmp-*` and renames it into place only when complete, so an interrupted run leaves nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UsageError

FORMAT_VERSION = 1


class PreparedWriter:
    """Streaming writer: `with PreparedWriter(out, capacity, shape) as w: w.add(img, label, caption)`.

    Rows go straight into a preallocated memmap, so memory stays flat whatever the dataset size.
    """

    def __init__(
        self,
        out: str | Path,
        capacity: int,
        shape: tuple[int, int, int],
        *,
        dtype: str = "uint8",
        kind: str = "pixels",
        labels: bool = False,
        captions: bool = False,
        force: bool = False,
    ):
        self.out = Path(out)
        if self.out.exists() and not force:
            raise UsageError(f"output {self.out} already exists (use --force to replace it)")
        if capacity <= 0:
            raise UsageError("nothing to write: the source has no images")
        self.capacity, self.shape, self.dtype, self.kind = capacity, tuple(shape), dtype, kind
        self.tmp = self.out.parent / f"{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.count = 0
        self._has_labels, self._has_captions = labels, captions

    def __enter__(self):
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        self.x = np.lib.format.open_memmap(self.tmp / "x.npy", mode="w+", dtype=self.dtype, shape=(self.capacity, *self.shape))
        self.y = np.zeros(self.capacity, dtype=np.int64) if self._has_labels else None
        self.captions = open(self.tmp / "captions.jsonl", "w") if self._has_captions else None
        return self

    def add(self, image: np.ndarray, label: int | None = None, caption: str | None = None) -> None:
        if self.count >= self.capacity:
            raise RuntimeError("PreparedWriter capacity exceeded")
        self.x[self.count] = image
        if self.y is not None:
            self.y[self.count] = label
        if self.captions is not None:
            self.captions.write(json.dumps({"i": self.count, "caption": caption or ""}) + "\n")
        self.count += 1

    def finish(self, **manifest_fields) -> Path:
        """Trim to the rows written, write the manifest, fsync, and rename into place."""
        if self.count == 0:
            raise UsageError("no usable images: nothing was written")
        self.x.flush()
        del self.x
        if self.count < self.capacity:
            _truncate_npy(self.tmp / "x.npy", self.count)
        if self.y is not None:
            np.save(self.tmp / "y.npy", self.y[: self.count])
        if self.captions is not None:
            self.captions.close()
        manifest = {
            "format": FORMAT_VERSION,
            "kind": self.kind,
            "count": self.count,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "num_classes": 0,
            "class_names": None,
            "source": None,
            "image_size": self.shape[-1],
            "vae": None,
            "text_encoder": None,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        manifest.update(manifest_fields)
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for f in self.tmp.iterdir():
            _fsync_file(f)
        if self.out.exists():  # only reachable with force=True
            trash = self.out.parent / f"{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, trash)
            os.replace(self.tmp, self.out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        _fsync_dir(self.out.parent)
        return self.out

    def __exit__(self, exc_type, exc, tb):
        # Any failure, Ctrl-C included, removes the temporary directory: no half-written dataset.
        if self.tmp.exists():
            if hasattr(self, "x"):
                del self.x
            if self.captions is not None and not self.captions.closed:
                self.captions.close()
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def _truncate_npy(path: Path, rows: int) -> None:
    """Rewrite an .npy to its first `rows` rows, streaming in chunks (never the whole array in RAM)."""
    src = np.load(path, mmap_mode="r")
    tmp = path.with_suffix(".trim.npy")
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(rows, *src.shape[1:]))
    chunk = 4096
    for start in range(0, rows, chunk):
        dst[start : start + chunk] = src[start : min(start + chunk, rows)]
    dst.flush()
    del dst, src
    os.replace(tmp, path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise UsageError(f"{path} is not a prepared dataset (no manifest.json); create one with `fm prepare-data`")
    try:
        data = json.loads(manifest.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"{manifest} is not valid JSON: {err}") from None
    if data.get("format") != FORMAT_VERSION:
        raise UsageError(f"{manifest}: unsupported format {data.get('format')!r} (expected {FORMAT_VERSION})")
    return data


def read_captions(path: str | Path) -> list[str]:
    lines = (Path(path) / "captions.jsonl").read_text().splitlines()
    return [json.loads(line)["caption"] for line in lines if line.strip()]


class PreparedDataset(Dataset):
    """Reads a prepared dataset through np.load(mmap_mode="r").

    The arrays are opened lazily in each process, so DataLoader workers share the page cache instead of
    receiving pickled copies. Items are dicts: x (float32, pixels in [-1, 1] or latents as stored), y.
    With `text=True` they also carry the cached text states (text, text_mask) when the dataset has them,
    else the caption strings (caption: list[str]).
    """

    def __init__(self, path: str | Path, text: bool = False):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.count = int(self.manifest["count"])
        self.has_labels = (self.path / "y.npy").is_file()
        self.has_cached_text = text and (self.path / "text.npy").is_file()
        self.with_captions = text and not self.has_cached_text
        if self.with_captions and not (self.path / "captions.jsonl").is_file():
            raise UsageError(f"{self.path} has no captions.jsonl (nor cached text.npy): a text model needs captioned data")
        self._x = self._y = self._text = self._text_mask = self._captions = None

    def __len__(self) -> int:
        return self.count

    def _open(self):
        if self._x is None:
            self._x = np.load(self.path / "x.npy", mmap_mode="r")
            self._y = np.load(self.path / "y.npy", mmap_mode="r") if self.has_labels else None
            if self.has_cached_text:
                self._text = np.load(self.path / "text.npy", mmap_mode="r")
                self._text_mask = np.load(self.path / "text_mask.npy", mmap_mode="r")
            if self.with_captions:
                self._captions = read_captions(self.path)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_x"] = state["_y"] = state["_text"] = state["_text_mask"] = state["_captions"] = None  # reopen in the worker
        return state

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, indices) -> dict:
        """Batched fetch (DataLoader uses it when present): one fancy-index read per batch."""
        self._open()
        idx = np.asarray(indices, dtype=np.int64)
        x = torch.from_numpy(np.ascontiguousarray(self._x[idx]))
        x = x.float() / 127.5 - 1.0 if self.manifest["kind"] == "pixels" else x.float()
        out = {"x": x}
        if self._y is not None:
            out["y"] = torch.from_numpy(np.asarray(self._y[idx], dtype=np.int64))
        if self._text is not None:
            out["text"] = torch.from_numpy(np.ascontiguousarray(self._text[idx]))
            out["text_mask"] = torch.from_numpy(np.ascontiguousarray(self._text_mask[idx]))
        if self._captions is not None:
            out["caption"] = [self._captions[i] for i in idx]
        return out


def collate_batched(batch):
    """Identity collate: __getitems__ already returns a batch."""
    return batch
