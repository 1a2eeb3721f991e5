"""Readers for real datasets: CIFAR-10 (python archive), MNIST (IDX), scikit-learn's 8x8 digits, image
folders, captions, tar shards.

Each `open_*` validates its input up front (a missing root or a wrong format is a UsageError before
anything is written) and returns a `Source` whose records are produced lazily, one at a time.
"""

from __future__ import annotations

import glob
import gzip
import importlib
import json
import os
import pickle
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from ..errors import UsageError
from .decode import IMAGE_EXTENSIONS, Record


@dataclass
class Source:
    """What a reader hands to `prepare`: lazily produced records and what the manifest needs."""

    name: str
    records: Callable[[], Iterator[Record]]
    channels: int = 3
    capacity: int | None = None  # exact count or an upper bound; None when unknown
    class_names: list[str] | None = None
    captions: bool = False
    info: dict = field(default_factory=dict)  # extra manifest fields (root, split, seed)
    native_size: int | None = None  # records are pixel arrays of this size (no decoding needed)


# ------------------------------------------------------------------------------------------- CIFAR-10

CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"


def open_cifar10(root: str | Path, split: str) -> Source:
    """The python version of CIFAR-10: `cifar-10-python.tar.gz` or its extracted `cifar-10-batches-py`."""
    root = _existing(root)
    if root.is_file():
        archive, folder = root, None
    elif (root / "batches.meta").is_file():
        archive, folder = None, root
    elif (root / CIFAR_FOLDER / "batches.meta").is_file():
        archive, folder = None, root / CIFAR_FOLDER
    elif (root / CIFAR_ARCHIVE).is_file():
        archive, folder = root / CIFAR_ARCHIVE, None
    else:
        raise UsageError(f"{root} holds no CIFAR-10 python data: expected {CIFAR_ARCHIVE} or {CIFAR_FOLDER}/ with batches.meta")
    where = archive or folder
    try:
        with _CifarFiles(archive, folder) as files:
            wanted = _cifar_batches(files.names, split)
            if "batches.meta" not in files.names or not wanted:
                need = "data_batch_N" if split == "train" else "test_batch"
                raise UsageError(f"{where} is not CIFAR-10 python data: it needs batches.meta and {need}")
            meta = _cifar_unpickle(files.open("batches.meta"), "batches.meta", where)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UsageError(f"{where} is not a readable CIFAR-10 archive (expected {CIFAR_ARCHIVE} or its extracted {CIFAR_FOLDER}/; {_archive_problem(err)})") from None
    class_names = [str(n) for n in meta.get("label_names", [])]
    if not class_names:
        raise UsageError(f"{where}: batches.meta has no label_names")

    def records() -> Iterator[Record]:
        with _CifarFiles(archive, folder) as files:  # one pass over the archive's headers, then seeks
            for name in wanted:
                try:
                    f = files.open(name)
                except (tarfile.TarError, OSError, EOFError) as err:
                    raise UsageError(f"{where}: cannot read {name} ({_archive_problem(err)})") from None
                batch = _cifar_unpickle(f, name, where)
                data, labels = batch.get("data"), batch.get("labels")
                if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels is None or len(labels) != len(data):
                    raise UsageError(f"{where}: {name} is not a CIFAR-10 batch (expected data [N,3072] uint8 and N labels)")
                pixels = data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32)
                for i, (img, label) in enumerate(zip(pixels, labels)):
                    if not 0 <= int(label) < len(class_names):
                        raise UsageError(f"{where}: {name} row {i} has label {label} outside 0..{len(class_names) - 1}")
                    yield Record(f"{name}[{i}]", img, int(label))

    return Source("cifar10", records, 3, 10000 * len(wanted), class_names, info={"split": split, "root": str(root)}, native_size=32)


class _CifarFiles:
    """The batch files by base name, from the extracted folder or the (gzipped) tar archive."""

    def __init__(self, archive: Path | None, folder: Path | None):
        self.archive, self.folder, self.tar = archive, folder, None

    def __enter__(self):
        if self.archive is not None:
            self.tar = tarfile.open(self.archive, "r:*")
            self.members = {Path(m.name).name: m for m in self.tar.getmembers() if m.isfile()}
            _read_to_end(self.tar)
        else:
            self.members = {p.name: p for p in self.folder.iterdir() if p.is_file()}
        self.names = set(self.members)
        return self

    def open(self, name: str):
        return self.tar.extractfile(self.members[name]) if self.tar is not None else open(self.members[name], "rb")

    def __exit__(self, *exc):
        if self.tar is not None:
            self.tar.close()
        return False


def _cifar_batches(members, split: str) -> list[str]:
    if split == "test":
        return ["test_batch"] if "test_batch" in members else []
    found = [n for n in members if re.fullmatch(r"data_batch_\d+", n)]
    return sorted(found, key=lambda n: int(n.rsplit("_", 1)[1]))


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what numpy arrays need, never arbitrary code."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = module.replace("numpy.core", "numpy._core", 1)
        return getattr(importlib.import_module(module), name)


def _cifar_unpickle(f, name: str, where) -> dict:
    try:
        obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as err:  # truncated, not a pickle, or a forbidden object
        raise UsageError(f"{where}: cannot read {name} ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: {name} is not a CIFAR-10 batch dictionary")
    return {_text(k): ([_text(v) for v in val] if isinstance(val, list) else val) for k, val in obj.items()}


def _text(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


# ---------------------------------------------------------------------------------------------- MNIST

_IDX_DTYPES = {0x08: np.uint8}


def open_mnist(root: str | Path, split: str) -> Source:
    """MNIST IDX files (`train-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]` ...), 1 channel."""
    root = _existing(root, want_dir=True)
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find_idx(root, prefix, "images", 3), dims=3)
    labels = _read_idx(_find_idx(root, prefix, "labels", 1), dims=1)
    if len(images) != len(labels):
        raise UsageError(f"{root}: {len(images)} {prefix} images but {len(labels)} labels")
    if len(labels) and int(labels.max()) > 9:
        raise UsageError(f"{root}: MNIST labels must be 0..9, found {int(labels.max())}")

    def records() -> Iterator[Record]:
        for i in range(len(images)):
            yield Record(f"{prefix}[{i}]", images[i][None], int(labels[i]))

    return Source("mnist", records, 1, len(images), [str(d) for d in range(10)], info={"split": split, "root": str(root)}, native_size=28)


SKLEARN_HINT = "pip install scikit-learn  (or, in the fm checkout: pip install -e '.[bench]')"
DIGITS_TEST_EVERY = 5  # image i is in the test split when i % 5 == 4: 1,438 train, 359 test, every class in both


def open_sklearn_digits(split: str) -> Source:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, values 0..16; nothing downloaded), 1 channel.

    The split is fixed by index (see DIGITS_TEST_EVERY), so train and test are disjoint whatever the
    scikit-learn version; pixels are scaled to 0..255 and resized by `prepare` (Lanczos) to --size.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError(f"the sklearn-digits source needs scikit-learn: {SKLEARN_HINT}") from None
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    keep = [i for i in range(len(images)) if (i % DIGITS_TEST_EVERY == DIGITS_TEST_EVERY - 1) == (split == "test")]

    def records() -> Iterator[Record]:
        for i in keep:
            yield Record(f"digits[{i}]", images[i][None], int(digits.target[i]))

    return Source("sklearn-digits", records, 1, len(keep), [str(d) for d in range(10)], info={"split": split}, native_size=8)


def _find_idx(root: Path, prefix: str, what: str, dims: int) -> Path:
    stem = re.compile(rf"{prefix}-{what}[-.]idx{dims}-ubyte(\.gz)?")
    found = sorted(p for p in root.iterdir() if stem.fullmatch(p.name))
    if not found:
        raise UsageError(f"{root} has no MNIST {prefix} {what}: expected {prefix}-{what}-idx{dims}-ubyte (or .gz)")
    return found[0]


def _read_idx(path: Path, dims: int) -> np.ndarray:
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # zlib.error: a damaged deflate stream (BadGzipFile is an OSError)
        raise UsageError(f"cannot read {path} ({type(err).__name__}: {err})") from None
    if len(raw) < 4 + 4 * dims or raw[0:2] != b"\0\0" or raw[2] not in _IDX_DTYPES or raw[3] != dims:
        raise UsageError(f"{path} is not an IDX file of {dims} dimension(s) of unsigned bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(dims))
    start = 4 + 4 * dims
    if len(raw) - start != int(np.prod(shape)):
        raise UsageError(f"{path} is truncated or damaged: header says {shape}, file holds {len(raw) - start} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(shape)


# --------------------------------------------------------------------------------------- image folder


def open_folder(root: str | Path) -> Source:
    """Class sub-folders (labels, class_names sorted) or a flat folder of images (unconditional).

    Every non-hidden file is tried: files that are not images, or are damaged, are skipped and counted.
    """
    root = _existing(root, want_dir=True)
    # Hidden folders and macOS archives' __MACOSX (resource forks, "._NAME" files) are no classes: as one they
    # would shift every later class's label and end up an empty class.
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    if classes:
        groups = [(k, _files(root / c)) for k, c in enumerate(classes)]
        stray = [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")]
    else:
        groups, stray = [(None, _files(root))], []
    total = sum(len(files) for _, files in groups)
    if total == 0:
        raise UsageError(f"{root} holds no files" + (" in its class folders" if classes else ""))

    def records() -> Iterator[Record]:
        for p in stray:
            yield Record(_rel(p, root), None, problem="outside the class folders")
        for label, files in groups:
            for p in files:
                yield Record(_rel(p, root), str(p), label)

    return Source("folder", records, 3, total + len(stray), classes or None, info={"root": str(root)})


# ------------------------------------------------------------------------------------------- captions


def open_captions(root: str | Path) -> Source:
    """A jsonl file of {"image": path relative to the file, "caption": text}, or a folder of x.jpg + x.txt."""
    root = _existing(root)
    if root.is_dir():
        return _caption_folder(root)
    entries = _read_jsonl(root)

    def records() -> Iterator[Record]:
        for image, caption in entries:
            path = Path(image) if os.path.isabs(image) else root.parent / image
            yield Record(image, str(path), caption=caption)

    return Source("captions", records, 3, len(entries), captions=True, info={"root": str(root)})


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    entries = []
    try:
        # -sig: a byte-order mark (Windows editors) is not text; lines end at "\n" only (JSON allows a raw U+2028 or U+0085
        # in a string, which str.splitlines takes for a line end)
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError(f"cannot read {path} as a jsonl file of image/caption pairs ({type(err).__name__})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path} line {n} is not JSON ({err.msg}); expected {{\"image\": PATH, \"caption\": TEXT}}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("caption"), str):
            raise UsageError(f"{path} line {n}: expected {{\"image\": PATH, \"caption\": TEXT}}")
        entries.append((obj["image"], obj["caption"]))
    if not entries:
        raise UsageError(f"{path} has no image/caption lines")
    return entries


def _caption_folder(root: Path) -> Source:
    images = [p for p in _files(root) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise UsageError(f"{root} holds no images (expected pairs like x.jpg + x.txt)")

    def records() -> Iterator[Record]:
        for p in images:
            text = p.with_suffix(".txt")
            if not text.is_file():
                yield Record(_rel(p, root), None, problem=f"no caption file {text.name}")
                continue
            try:
                caption = text.read_text(encoding="utf-8-sig").strip()  # a byte-order mark is not part of the caption
            except (OSError, UnicodeDecodeError) as err:
                yield Record(_rel(p, root), None, problem=f"unreadable caption ({type(err).__name__})")
                continue
            yield Record(_rel(p, root), str(p), caption=caption)

    return Source("captions", records, 3, len(images), captions=True, info={"root": str(root)})


# ----------------------------------------------------------------------------------------- tar shards


DEFAULT_MAX_MEMBER_MIB = 64  # a tar member above this is skipped unread (counted like any unusable item)


class _TooLarge:
    """Stands in for a tar member that was not read because of its size."""

    def __init__(self, size: int):
        self.size = size


def open_tar(pattern: str, max_member_bytes: int = DEFAULT_MAX_MEMBER_MIB * 2**20) -> Source:
    """Webdataset-style shards: members `key.jpg|png|webp|...` with `key.txt` or `key.json` ({"caption"}).

    Members are read into memory one sample at a time; one larger than `max_member_bytes` is never read
    (a crafted or broken shard cannot exhaust memory): its sample is skipped and counted.
    """
    shards = sorted(glob.glob(os.path.expanduser(pattern)))
    if not shards and Path(pattern).is_dir():
        shards = sorted(str(p) for p in Path(pattern).glob("*.tar*"))
    if not shards:
        raise UsageError(f"no tar shards match {pattern!r} (quote the pattern, e.g. --root 'shards/*.tar')")
    keys, captioned = 0, False
    for shard in shards:
        try:
            with tarfile.open(shard, "r:*", tarinfo=_HeaderCheckedTarInfo) as tar:
                members = tar.getmembers()
                damage = getattr(tar, "fm_damage", None)
                _read_to_end(tar)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise UsageError(f"{shard} is not a readable tar shard (expected a .tar, .tar.gz, .tar.bz2 or .tar.xz archive; {_archive_problem(err)})") from None
        if damage is not None:
            raise UsageError(f"{shard} is truncated or damaged after its first {len(members)} members ({damage}); tar stops reading "
                             "there, dropping the rest: re-download or re-create it")
        names = [m.name for m in members if m.isfile()]
        keys += len({_split_key(n)[0] for n in names})
        captioned = captioned or any(_split_key(n)[1].rsplit(".", 1)[-1] in ("txt", "json") for n in names)
    if keys == 0:
        raise UsageError(f"the shards matching {pattern!r} are empty")

    def records() -> Iterator[Record]:
        for shard in shards:
            with tarfile.open(shard, "r|*") as tar:  # streaming: members in order, nothing kept behind
                key, files = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = _split_key(member.name)
                    if k != key and key is not None:
                        yield _tar_record(shard, key, files, captioned)
                        files = {}
                    key = k
                    files[ext] = _TooLarge(member.size) if member.size > max_member_bytes else tar.extractfile(member).read()
                if key is not None:
                    yield _tar_record(shard, key, files, captioned)

    return Source("tar", records, 3, keys, captions=captioned, info={"root": pattern, "shards": len(shards)})


def _read_to_end(tar: tarfile.TarFile) -> None:
    """Read an opened archive on to its end (a few blocks past the last header): a compressed archive's CRC is checked
    only there, and listing reads nothing else, so damage that still decodes would pass for good data."""
    while tar.fileobj.read(1 << 20):
        pass


class _HeaderCheckedTarInfo(tarfile.TarInfo):
    """tarfile ends an archive silently at a member header cut short (a download stopped there) or unreadable (damaged),
    as at its end: such a header is noted on the TarFile (`fm_damage`) for `open_tar` to refuse the shard."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.EOFHeaderError, tarfile.EmptyHeaderError):  # the end-of-archive block, or the file's end at a header
            raise
        except tarfile.HeaderError as err:
            tar.fm_damage = f"a bad member header at byte {tar.offset}: {err}"
            raise


def _split_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the file name."""
    head, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext.lower()


def _tar_record(shard: str, key: str, files: dict, captioned: bool) -> Record:
    name = f"{Path(shard).name}:{key}"
    files = {ext.rsplit(".", 1)[-1]: data for ext, data in files.items()}  # "webp.png" decodes as png
    big = next(((ext, v.size) for ext, v in files.items() if isinstance(v, _TooLarge)), None)
    if big is not None:
        return Record(name, None, problem=f".{big[0]} member of {big[1] / 2**20:.1f} MiB is above the --max-member-mib limit")
    image = next((files[e] for e in ("jpg", "jpeg", "png", "webp", "bmp", "ppm") if e in files), None)
    if image is None:
        return Record(name, None, problem="no image member")
    caption = None
    if "txt" in files:
        caption = files["txt"].decode("utf-8-sig", "replace").strip()
    elif "json" in files:
        try:
            meta = json.loads(files["json"])
            caption = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            return Record(name, None, problem="unreadable json member")
    if captioned and not isinstance(caption, str):
        return Record(name, None, problem="no caption")
    return Record(name, image, caption=caption if captioned else None)


# ---------------------------------------------------------------------------------------------- paths


def _archive_problem(err: BaseException) -> str:
    """One line for an archive that did not open: tarfile's "could not be opened successfully" lists every
    compression it tried, one line each."""
    if isinstance(err, tarfile.ReadError) and "could not be opened successfully" in str(err):
        return "not a tar archive, plain or compressed"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _existing(root, want_dir: bool = False) -> Path:
    if root is None:
        raise UsageError("this source needs --root PATH")
    root = Path(root).expanduser()
    if not root.exists():
        raise UsageError(f"--root {root} does not exist")
    if want_dir and not root.is_dir():
        raise UsageError(f"--root {root} must be a directory")
    if not os.access(root, os.R_OK):
        raise UsageError(f"--root {root} is not readable")
    return root


def _files(folder: Path) -> list[Path]:
    """Non-hidden regular files under `folder`, recursively, in a stable (sorted) order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def _rel(path: Path, root: Path) -> str:
    return str(path.relative_to(root))
