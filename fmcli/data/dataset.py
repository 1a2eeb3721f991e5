"""The prepared-dataset format (docs/architecture.md section 5): an atomic streaming writer and a memmap reader.

A dataset is a directory with manifest.json, x.npy ([N,C,H,W] uint8 pixels or float16 latents),
optional y.npy (int64 labels) and captions.jsonl. Kind "pairs" (`fm reflow`) stores float32 x0.npy (noise)
and x1.npy (the teacher's sample from it) instead of x.npy. The writer streams rows into
`.npy` files inside `.DIR.tmp-*` (fsutil.temp_folder) and renames it into place only when complete (fsutil.commit:
every file and the directory fsynced, then the rename), so an interrupted run leaves nothing; what a kill leaves
is removed by the next write of DIR.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import RuntimeFailure, UsageError
from ..fsutil import commit_or_refuse, named_path, refuse_existing, refuse_unreplaceable_folder, temp_folder

FORMAT_VERSION = 1


class PreparedWriter:
    """Streaming writer: `with PreparedWriter(out, capacity, shape) as w: w.add(img, label, caption)`.

    Rows are appended to `.npy` files through ordinary buffered writes (no memmap, so the process's
    resident memory stays flat whatever the dataset size); the header is written last with the real row
    count. `capacity` is an upper bound (None: unknown). `extras` declares more per-row arrays, e.g.
    `{"text": ((77, 768), "float16"), "text_mask": ((77,), "bool")}` for cached text-encoder states.
    """

    def __init__(
        self,
        out: str | Path,
        capacity: int | None,
        shape: tuple[int, ...],
        *,
        dtype: str = "uint8",
        kind: str = "pixels",
        labels: bool = False,
        captions: bool = False,
        force: bool = False,
        extras: dict[str, tuple[tuple[int, ...], str]] | None = None,
        x_name: str = "x",
    ):
        self.out = named_path(out)
        refuse_unreplaceable(self.out)
        refuse_existing(self.out, force, folders=True)
        self._force = force
        if capacity is not None and capacity <= 0:
            raise UsageError("nothing to write: the source has no images")
        self.capacity, self.shape, self.dtype, self.kind = capacity, tuple(shape), dtype, kind
        self.tmp: Path | None = None  # fsutil.temp_folder's, made on entering
        self.count = 0
        self._has_labels, self._has_captions = labels, captions
        self._extras = dict(extras or {})
        self._streams: dict[str, _NpyStream] = {}
        self.captions = None
        self._captions_hash = hashlib.sha256()  # the captions file's bytes as written (`content_fingerprint`)
        self._x_name = x_name  # the file of the images (add_batch's first argument): x.npy, or x1.npy for pairs

    def __enter__(self):
        self._temp = temp_folder(self.out)  # what a killed earlier write of self.out left is dealt with first
        self.tmp = self._temp.__enter__()
        self._streams["x"] = _NpyStream(self.tmp / f"{self._x_name}.npy", self.shape, self.dtype)
        if self._has_labels:
            self._streams["y"] = _NpyStream(self.tmp / "y.npy", (), "int64")
        for name, (row_shape, dtype) in self._extras.items():
            self._streams[name] = _NpyStream(self.tmp / f"{name}.npy", tuple(row_shape), dtype)
        if self._has_captions:
            self.captions = open(self.tmp / "captions.jsonl", "w", encoding="utf-8")
        return self

    def add(self, image: np.ndarray, label: int | None = None, caption: str | None = None, **extras) -> None:
        """Append one row: `image` [C,H,W], its label (if labelled), caption (if captioned), extras by name."""
        self.add_batch(
            np.asarray(image)[None],
            None if label is None else np.asarray([label]),
            None if caption is None else [caption],
            **{k: np.asarray(v)[None] for k, v in extras.items()},
        )

    def add_batch(self, images: np.ndarray, labels=None, captions=None, **extras) -> None:
        """Append rows: images [B,C,H,W]; labels [B]; captions: B strings; extras: name -> [B,...]."""
        n = len(images)
        if self.capacity is not None and self.count + n > self.capacity:
            raise RuntimeError(f"PreparedWriter capacity {self.capacity} exceeded")
        if self._has_labels != (labels is not None) or self._has_captions != (captions is not None):
            raise ValueError("labels/captions must be given exactly when the writer was opened with them")
        if set(extras) != set(self._extras):
            raise ValueError(f"extras must be exactly {sorted(self._extras)}, got {sorted(extras)}")
        rows = {"x": images, **extras}
        if labels is not None:
            rows["y"] = labels
        for name, values in rows.items():
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} rows for {n} images")
        for name, values in rows.items():
            self._streams[name].write(values)
        if captions is not None:
            if len(captions) != n:
                raise ValueError(f"captions: {len(captions)} rows for {n} images")
            for k, caption in enumerate(captions):
                line = json.dumps({"i": self.count + k, "caption": _encodable(caption or "")}, ensure_ascii=False) + "\n"
                self.captions.write(line)
                self._captions_hash.update(line.encode("utf-8"))
        self.count += n

    def finish(self, **manifest_fields) -> Path:
        """Write the headers and the manifest, fsync, and rename into place."""
        if self.count == 0:
            raise UsageError("no usable images: nothing was written")
        for stream in self._streams.values():
            stream.close()
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
            "fingerprint": self._fingerprint(),
        }
        manifest.update(manifest_fields)
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        # An existing self.out (force=True) is swapped with it, then removed; without --force one that appeared
        # since the check in __init__ (another command writing it) is refused, not replaced.
        commit_or_refuse(self.tmp, self.out, self._force, "dataset")
        return self.out

    def _fingerprint(self) -> str:
        """`content_fingerprint` of what was written, from the hashes kept while writing (nothing is read back)."""
        parts = {stream.path.name: stream.fingerprint_part() for stream in self._streams.values()}
        if self.captions is not None:
            parts["captions.jsonl"] = self._captions_hash.hexdigest()
        return content_fingerprint(parts)

    def __exit__(self, exc_type, exc, tb):
        # Any failure, Ctrl-C included, leaves no half-written dataset: the files are closed here, and temp_folder's
        # exit removes the temporary directory (after a commit, the swapped-out old output), then releases its lock.
        if self.tmp.exists():
            for stream in self._streams.values():
                stream.abort()
            if self.captions is not None and not self.captions.closed:
                self.captions.close()
        self._temp.__exit__(None, None, None)
        return False


def _encodable(caption: str) -> str:
    """`caption` with any lone surrogate (a JSON "\\ud83d" cut from its pair, common in scraped captions) replaced
    by U+FFFD: UTF-8 cannot hold one, so the captions file, and a tokenizer, would fail on it."""
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in caption)
    return caption


class _NpyStream:
    """An .npy file written row by row: a reserved header, raw rows appended, the real header written last."""

    HEADER_BYTES = 256  # room for any shape; a multiple of 64 as numpy itself aligns

    def __init__(self, path: Path, row_shape: tuple[int, ...], dtype: str):
        self.path, self.row_shape, self.dtype = path, tuple(row_shape), np.dtype(dtype)
        self.rows = 0
        self.hash = hashlib.sha256()  # the data bytes, as written (`fingerprint_part`)
        self.file = open(path, "wb", buffering=1 << 20)
        self.file.write(b"\0" * self.HEADER_BYTES)

    def write(self, values) -> None:
        values = np.asarray(values)
        if values.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path.name}: rows of shape {values.shape[1:]}, expected {self.row_shape}")
        with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
            values = np.ascontiguousarray(values.astype(self.dtype, casting="same_kind", copy=False))
        if self.dtype.kind == "f" and not np.isfinite(values).all():  # float16 overflow shows up here as inf
            raise RuntimeFailure(f"{self.path.name}: non-finite values (NaN/inf, or beyond the float16 range) in rows {self.rows}..{self.rows + len(values) - 1}")
        data = memoryview(values).cast("B")
        self.file.write(data)
        self.hash.update(data)
        self.rows += len(values)

    def fingerprint_part(self) -> str:
        """This file's part of `content_fingerprint`: dtype, shape and the SHA-256 of its data bytes."""
        return npy_fingerprint_part(self.dtype, (self.rows, *self.row_shape), self.hash.hexdigest())

    def close(self) -> None:
        self.file.seek(0)
        self.file.write(_npy_header((self.rows, *self.row_shape), self.dtype, self.HEADER_BYTES))
        self.file.close()

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()


def _npy_header(shape: tuple[int, ...], dtype: np.dtype, total: int) -> bytes:
    """An .npy version 1.0 header of exactly `total` bytes (magic, length, dict padded with spaces)."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)})
    body_len = total - 10  # magic (6) + version (2) + header length (2)
    if len(text) + 1 > body_len:
        raise ValueError(f"npy header for shape {shape} does not fit in {total} bytes")
    body = text.ljust(body_len - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + body.encode("latin1")


def npy_fingerprint_part(dtype: np.dtype, shape: tuple[int, ...], data_sha256: str) -> str:
    return f"{np.lib.format.dtype_to_descr(np.dtype(dtype))} {list(shape)} {data_sha256}"


def content_fingerprint(parts: dict[str, str]) -> str:
    """A prepared dataset's identity (manifest `fingerprint`, kept in each checkpoint's data_info: a resume on other data
    of the same count is refused): the SHA-256 of its row files' contents, `parts` (file name -> for an array written row
    by row, x/x1/x0/x_flip/y.npy, its dtype, shape and data bytes' SHA-256; for captions.jsonl its bytes' SHA-256) as
    sorted JSON. Content only, neither the path nor `created`: a copy elsewhere is the same dataset. Computed while
    writing; the cached text states, derived from the captions by the recorded encoder, are not part of it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode("utf-8")).hexdigest()


FINGERPRINT = re.compile(r"[0-9a-f]{64}")


TEXT_CACHE_FILES = ("text.npy", "text_mask.npy", "text_empty.npy", "text_empty_mask.npy")
# Every file a prepared dataset can hold (section 5), and the domain classifier fm caches beside it (an interrupted
# write's temporary name too; classifier.default_classifier_path): what --force replaces with it.
DATASET_FILES = ("manifest.json", "x.npy", "x_flip.npy", "x0.npy", "x1.npy", "y.npy", "captions.jsonl", *TEXT_CACHE_FILES)
_FM_CACHE = re.compile(r"\.?fm-classifier-s\d+\.pt(\.tmp-[0-9a-f]+)?")


def _is_dataset_entry(name: str) -> bool:
    return name in DATASET_FILES or bool(_FM_CACHE.fullmatch(name))


def refuse_unreplaceable(path: Path) -> None:
    """--force may replace a previous prepared dataset (holding only a dataset's files) or an empty directory, never
    anything else: a folder of the user's own (the images being prepared, say) inside it would go with it. Run
    before any work, and before `refuse_existing`: its "pass --force" is advice only for what --force may replace.
    A file is `refuse_existing`'s to refuse (not even --force puts a folder in its place)."""
    if path.is_dir():
        refuse_unreplaceable_folder(path, "a prepared dataset", "manifest.json", _is_dataset_entry)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    manifest = path / "manifest.json"
    if not manifest.is_file():
        raise UsageError(f"{path} is not a prepared dataset (no manifest.json); create one with `fm prepare-data`")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{manifest} is not valid JSON: {err}") from None
    if not isinstance(data, dict):  # what fm writes is an object of fields (docs/architecture.md section 5)
        raise UsageError(f"{manifest} is not a dataset manifest (a JSON object of fields); re-create it with `fm prepare-data ... --out {path} --force`")
    if data.get("format") != FORMAT_VERSION:
        raise UsageError(f"{manifest}: unsupported format {data.get('format')!r} (expected {FORMAT_VERSION})")
    return data


def data_space(manifest: dict) -> str:
    """What a dataset's samples are, "pixels" or "latents"; a reflow pairs dataset holds its teacher's kind."""
    return manifest.get("space", "pixels") if manifest["kind"] == "pairs" else manifest["kind"]


KIND_DTYPES = {"pixels": "uint8", "latents": "float16", "pairs": "float32"}
# The array files of each kind: reflow pairs store the noise and the teacher's sample from it.
KIND_FILES = {"pixels": ("x.npy",), "latents": ("x.npy",), "pairs": ("x0.npy", "x1.npy")}


def validate_prepared(path: str | Path) -> dict:
    """Check a prepared dataset before anything uses it; return its manifest.

    The manifest must agree with the files: x.npy holds `count` rows of `shape` in the kind's dtype and
    is as long as its header says (a truncated copy would fail deep inside training as "mmap length is
    greater than file size"); y.npy holds `count` integer labels in [0, num_classes); captions.jsonl and
    cached text states have `count` rows. Any disagreement is a one-line UsageError naming the fix.
    """
    path = Path(path)
    manifest = read_manifest(path)
    redo = f"re-create it with `fm prepare-data ... --out {path} --force`"
    try:
        kind, count, shape = manifest["kind"], manifest["count"], manifest["shape"]
    except KeyError as err:
        raise UsageError(f"{path}/manifest.json lacks a valid {err} field; {redo}") from None
    num_classes = manifest.get("num_classes") or 0
    # JSON integers, as fm writes them: the fields are used as read (model sizes), so "3" or 3.0 would fail deep in setup.
    if not (_is_int(count) and isinstance(shape, list) and all(_is_int(v) for v in shape) and _is_int(num_classes)):
        raise UsageError(f"{path}/manifest.json: count {count!r}, shape {shape!r} and num_classes {num_classes!r} must be whole numbers; {redo}")
    shape = tuple(shape)
    if not isinstance(kind, str) or kind not in KIND_DTYPES or count < 1 or len(shape) != 3:  # a list is no dict key: TypeError
        raise UsageError(f"{path}/manifest.json: kind {kind!r}, count {count}, shape {list(shape)} is not a prepared dataset; {redo}")
    if kind == "pairs" and manifest.get("space", "pixels") not in ("pixels", "latents"):  # what sampling decodes (or not) by
        raise UsageError(f"{path}/manifest.json: space {manifest['space']!r} is not what reflow pairs hold (pixels or latents); re-create them with `fm reflow ... --out {path}`")
    fingerprint = manifest.get("fingerprint")  # compared on resume; absent in data an older fm prepared
    if fingerprint is not None and not (isinstance(fingerprint, str) and FINGERPRINT.fullmatch(fingerprint)):
        raise UsageError(f"{path}/manifest.json: fingerprint {str(fingerprint)[:70]!r} is not a SHA-256 (64 lowercase hex digits); {redo}")
    names = manifest.get("class_names")  # recorded in every checkpoint, whose reader refuses what fm never writes
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise UsageError(f"{path}/manifest.json: class_names {str(names)[:60]} is not null or a list of names (strings); {redo}")
    for name in KIND_FILES[kind]:
        _check_npy(path / name, (count, *shape), KIND_DTYPES[kind], redo)
    if is_mirrored(manifest, path, redo):
        _check_npy(path / "x_flip.npy", (count, *shape), KIND_DTYPES[kind], redo)
    y_file = path / "y.npy"
    if num_classes and not y_file.is_file():
        raise UsageError(f"{path}: the manifest says {num_classes} classes but y.npy is missing; {redo}")
    if y_file.is_file():
        _check_npy(y_file, (count,), None, redo)
        y = np.load(y_file, mmap_mode="r")
        if y.dtype.kind not in "iu":
            raise UsageError(f"{y_file}: labels must be integers, found {y.dtype}; {redo}")
        if num_classes and len(y):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                raise UsageError(f"{y_file}: labels span [{lo}, {hi}] but the manifest says {num_classes} classes (labels must lie in [0, {num_classes})); {redo}")
    captions = path / "captions.jsonl"
    if captions.is_file():
        lines = sum(1 for _ in _caption_lines(captions, redo))
        if lines != count:
            raise UsageError(f"{captions} has {lines} captions for {count} images; {redo}")
    _check_text_cache(path, count, redo)
    return manifest


def _is_int(value) -> bool:
    """A JSON integer: not a string, a float or a bool (which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_mirrored(manifest: dict, path: Path, redo: str) -> bool:
    """Whether a latent dataset holds the mirrored images' latents (`manifest.mirrored`, x_flip.npy: `fm prepare-data
    --vae DIR --flip`); a value that is not a bool, or one on another kind, is refused."""
    mirrored = manifest.get("mirrored", False)
    if not isinstance(mirrored, bool) or (mirrored and manifest.get("kind") != "latents"):
        raise UsageError(f"{path}/manifest.json: mirrored {mirrored!r} (only a latent dataset may be mirrored, true or false); {redo}")
    return mirrored


def _check_text_cache(path: Path, count: int, redo: str) -> None:
    """Cached text states come as four files that agree: text [count,L,D] float16, text_mask [count,L] bool, and
    the empty prompt's text_empty [1,L,D] / text_empty_mask [1,L] (the unconditional branch)."""
    present = [name for name in TEXT_CACHE_FILES if (path / name).is_file()]
    if not present:
        return
    if len(present) < len(TEXT_CACHE_FILES):
        missing = ", ".join(name for name in TEXT_CACHE_FILES if name not in present)
        raise UsageError(f"{path} holds cached text states without {missing}; {redo}")
    shape = _check_npy(path / "text.npy", None, "float16", redo, rows=count)
    if len(shape) != 3:
        raise UsageError(f"{path / 'text.npy'} holds an array of shape {list(shape)}, expected [count, tokens, width]; {redo}")
    _, length, width = shape
    _check_npy(path / "text_mask.npy", (count, length), "bool", redo)
    _check_npy(path / "text_empty.npy", (1, length, width), "float16", redo)
    _check_npy(path / "text_empty_mask.npy", (1, length), "bool", redo)


def _check_npy(file: Path, shape: tuple[int, ...] | None, dtype: str | None, redo: str, rows: int | None = None) -> tuple[int, ...]:
    """The .npy header matches the expected shape / dtype / row count and the file holds all its bytes; returns
    the shape."""
    if not file.is_file():
        raise UsageError(f"{file} is missing; {redo}")
    try:
        with open(file, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got_shape, _, got_dtype = read_header(f)
            data_start = f.tell()
    except (ValueError, OSError, SyntaxError) as err:
        raise UsageError(f"{file} is not a readable .npy file ({err}); {redo}") from None
    if shape is not None and tuple(got_shape) != tuple(shape):
        raise UsageError(f"{file} holds an array of shape {list(got_shape)}, the manifest expects {list(shape)}; {redo}")
    if rows is not None and (not got_shape or got_shape[0] != rows):
        raise UsageError(f"{file} holds {got_shape[0] if got_shape else 0} rows for {rows} images; {redo}")
    if dtype is not None and got_dtype != np.dtype(dtype):
        raise UsageError(f"{file} holds {got_dtype} values, expected {dtype}; {redo}")
    expected = data_start + int(np.prod(got_shape, dtype=np.int64)) * got_dtype.itemsize
    actual = file.stat().st_size
    if actual < expected:
        raise UsageError(f"{file} is truncated: {actual} bytes, its header needs {expected}; {redo}")
    return tuple(got_shape)


def read_captions(path: str | Path) -> list[str]:
    return list(_caption_lines(Path(path) / "captions.jsonl", f"re-create it with `fm prepare-data ... --out {path} --force`"))


def _caption_lines(file: Path, redo: str) -> Iterator[str]:
    """The captions of captions.jsonl, one `{"i": n, "caption": "..."}` per line, streamed. Lines end at "\\n" only
    (newline="\\n"): the writer escapes no U+2028 / U+0085 in a caption, which str.splitlines takes for line ends.
    Row k must say "i": k: captions are matched to images by position, so rows moved, dropped or repeated in an
    edited file (the count still right) would pair images with other images' captions."""
    try:
        with open(file, encoding="utf-8", newline="\n") as f:
            k = 0  # the image this row belongs to
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict) or not isinstance(row.get("caption"), str):
                    raise UsageError(f"{file} line {n} is not a caption row {{\"i\": N, \"caption\": TEXT}}; {redo}")
                i = row.get("i")
                if type(i) is not int or i != k:  # type: a JSON true would compare equal to 1
                    raise UsageError(f"{file} line {n} is the caption of image {i!r}, expected {k} (rows out of order with the images); {redo}")
                k += 1
                yield row["caption"]
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"{file} is not readable UTF-8 text ({type(err).__name__}); {redo}") from None


class PreparedDataset(Dataset):
    """Reads a prepared dataset through np.load(mmap_mode="r").

    The arrays are opened lazily in each process, so DataLoader workers share the page cache instead of
    receiving pickled copies. Items are dicts: x (float32, pixels in [-1, 1] or latents as stored), y; a mirrored
    latent dataset's also x_flip (the mirrored image's latents, which data.flip trains on instead of flipping x).
    With `text=True` they also carry the cached text states (text, text_mask) when the dataset has them,
    else the caption strings (caption: list[str]).
    """

    def __init__(self, path: str | Path, text: bool = False):
        self.path = Path(path)
        self.manifest = validate_prepared(self.path)
        self.count = int(self.manifest["count"])
        self.has_labels = (self.path / "y.npy").is_file()
        self.is_pairs = self.manifest["kind"] == "pairs"
        self.is_mirrored = bool(self.manifest.get("mirrored", False))  # validated: a latent dataset with x_flip.npy
        self.has_cached_text = text and (self.path / "text.npy").is_file()
        self.with_captions = text and not self.has_cached_text
        if self.with_captions and not (self.path / "captions.jsonl").is_file():
            raise UsageError(f"{self.path} has no captions.jsonl (nor cached text.npy): a text model needs captioned data")
        self._x = self._x0 = self._x_flip = self._y = self._text = self._text_mask = self._captions = None

    def __len__(self) -> int:
        return self.count

    @property
    def space(self) -> str:
        """What the samples are, "pixels" or "latents" (`data_space`)."""
        return data_space(self.manifest)

    def captions(self) -> list[str] | None:
        """Every row's caption (captions.jsonl), or None for data without captions."""
        return read_captions(self.path) if (self.path / "captions.jsonl").is_file() else None

    def empty_text(self) -> tuple[np.ndarray, np.ndarray]:
        """The cached empty prompt: states [1,L,D] and mask [1,L] (text_empty*.npy, written with text.npy)."""
        return np.load(self.path / "text_empty.npy"), np.load(self.path / "text_empty_mask.npy")

    def text_rows(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The cached text states (float32) and masks of `rows` (text.npy, text_mask.npy)."""
        states = np.load(self.path / "text.npy", mmap_mode="r")[rows].astype(np.float32)
        return states, np.load(self.path / "text_mask.npy", mmap_mode="r")[rows]

    def _open(self):
        if self._x is None:
            self._x = np.load(self.path / ("x1.npy" if self.is_pairs else "x.npy"), mmap_mode="r")
            self._x0 = np.load(self.path / "x0.npy", mmap_mode="r") if self.is_pairs else None
            self._x_flip = np.load(self.path / "x_flip.npy", mmap_mode="r") if self.is_mirrored else None
            self._y = np.load(self.path / "y.npy", mmap_mode="r") if self.has_labels else None
            if self.has_cached_text:
                self._text = np.load(self.path / "text.npy", mmap_mode="r")
                self._text_mask = np.load(self.path / "text_mask.npy", mmap_mode="r")
            if self.with_captions:
                self._captions = read_captions(self.path)

    def __getstate__(self):
        state = self.__dict__.copy()
        for k in ("_x", "_x0", "_x_flip", "_y", "_text", "_text_mask", "_captions"):
            state[k] = None  # reopened in the worker
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
        if self._x0 is not None:
            out["x0"] = torch.from_numpy(np.ascontiguousarray(self._x0[idx]))
        if self._x_flip is not None:
            out["x_flip"] = torch.from_numpy(np.ascontiguousarray(self._x_flip[idx])).float()
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
