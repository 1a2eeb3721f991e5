"""FID (and KID) through clean-fid: feature extractors, reference statistics, scoring generated samples.

Default features: clean-fid's InceptionV3 in its "clean" mode (PIL bicubic resize of each channel to
299x299 in float, then the StyleGAN2-ADA TorchScript Inception `inception-2015-12-05.pt`), built from a
local file: nothing is downloaded. KID is clean-fid's own function; the Frechet distance is fmcli.metrics'
(the same formula in float64 through symmetric eigendecompositions, exact for singular covariances).

A feature extractor is any callable mapping uint8 images [B,3,H,W] (0..255) to float features [B,D], with
a `name` (recorded in statistics files, so features never get mixed) and an `input_size` (the size it
resizes to). `--features tiny` is a small fixed random conv net for tests and for users without the
Inception weights; its numbers are NOT comparable to published FID.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import math
import os
import sys
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .data.decode import IMAGE_EXTENSIONS as READABLE_IMAGE_EXTENSIONS
from .errors import UsageError
from .fsutil import atomic_write

INCEPTION_FILE = "inception-2015-12-05.pt"
# The URL clean-fid downloads from (cleanfid.downloads_helper.inception_url) and the file's sha256 (95,607,719 bytes).
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
# Every still image type fm can read; GIFs are left out of scored folders (they are trajectory animations).
IMAGE_EXTENSIONS = set(READABLE_IMAGE_EXTENSIONS) - {".gif"}
STATS_FORMAT = 1
# How `fm fid` and training accept an Inception file of another sha256 (`fm eval` has no such option).
UNVERIFIED_OPTION = "--inception-unverified (--set eval.inception_unverified=true)"


class FeatureExtractor(Protocol):
    name: str
    input_size: int

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """uint8 [B,3,H,W] in 0..255 -> float64 [B,D]."""


@dataclass
class Statistics:
    """Gaussian statistics of a feature set, with what is needed to refuse mixing incompatible ones."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    features: str  # the feature extractor's name
    image_size: int | None  # resolution of the images the features came from (None: unknown or mixed)
    feats: np.ndarray | None = None  # the raw features, kept only when KID is wanted

    def save(self, path: str | Path) -> Path:
        """Write an .npz atomically (temp file, fsync, rename, fsync of the directory)."""
        arrays = dict(
            mu=self.mu,
            sigma=self.sigma,
            count=np.int64(self.count),
            features=np.str_(self.features),
            image_size=np.int64(self.image_size or 0),
            fm_stats_format=np.int64(STATS_FORMAT),
        )
        if self.feats is not None:
            arrays["feats"] = self.feats

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a temp name
                np.savez(f, **arrays)

        return atomic_write(path, write)


@dataclass
class GeneratedFeatures:
    """Features per feature space, and the class each sample was asked for (None: unconditional, or images)."""

    feats: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    nfe_per_sample: float | None = None  # network evaluations per sample, the mean over the samples
    gen_seconds: float | None = None  # time spent sampling (feature extraction excluded)
    image_size: int | None = None
    nfe_max: int | None = None  # the most network evaluations any sample took (dopri5's batches differ)


@dataclass
class FidResult:
    fid: float
    num_samples: int
    ref_count: int
    features: str
    kid: float | None = None
    gen_seconds: float | None = None
    nfe_per_sample: float | None = None
    nfe_max: int | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        from .generate import nfe_fields

        out = {
            "fid": self.fid,
            "num_samples": self.num_samples,
            "ref_count": self.ref_count,
            "features": self.features,
            "comparable_to_published": self.features == InceptionExtractor.name,
        }
        if self.kid is not None:
            out["kid"] = self.kid
        if self.gen_seconds is not None:
            out["gen_seconds"] = round(self.gen_seconds, 3)
            out["nfe_per_sample"] = self.nfe_per_sample  # the name fm plot and earlier rows read; `nfe` is the same number
            out.update(nfe_fields(self.nfe_per_sample, self.nfe_max))
        out.update(self.extra)
        return out


# ------------------------------------------------------------------------------------------ distances


def statistics_of(feats: np.ndarray, features: str, image_size: int | None, keep_features: bool = False) -> Statistics:
    """Mean and covariance (np.cov, unbiased) of [N,D] features, as clean-fid computes them."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise UsageError(f"FID needs at least 2 images, got {feats.shape[0] if feats.ndim else 0}")
    return Statistics(
        mu=feats.mean(axis=0),
        sigma=np.cov(feats, rowvar=False),
        count=feats.shape[0],
        features=features,
        image_size=image_size,
        feats=feats.astype(np.float32) if keep_features else None,
    )


def frechet_distance(gen: Statistics, ref: Statistics) -> float:
    """The Frechet distance between the two Gaussians (fmcli.metrics: float64, symmetric eigendecompositions;
    clean-fid's sqrtm warned "Matrix is singular" on rank-deficient covariances), after checking they are comparable."""
    from .metrics import frechet_distance as fd

    check_compatible(gen, ref)
    return fd(ref.mu, ref.sigma, gen.mu, gen.sigma)


def kernel_distance(gen: Statistics, ref: Statistics, seed: int = 0) -> float:
    """clean-fid's KID (subsets of up to 1000) with a fixed seed, leaving numpy's global RNG untouched."""
    from cleanfid.fid import kernel_distance as cleanfid_kid

    check_compatible(gen, ref)
    if gen.feats is None or ref.feats is None:
        raise UsageError("--kid needs the reference features: recompute the statistics with `fm fid --save-stats ... --kid`")
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with _stdout_to_stderr():
            return float(cleanfid_kid(gen.feats.astype(np.float64), ref.feats.astype(np.float64)))
    finally:
        np.random.set_state(state)


def check_compatible(gen: Statistics, ref: Statistics) -> None:
    if gen.features != ref.features:
        raise UsageError(f"feature extractors differ: generated images use {gen.features!r}, the reference {ref.features!r}; use the same --features")
    if gen.mu.shape != ref.mu.shape:
        raise UsageError(f"feature sizes differ: {gen.mu.shape[0]} vs {ref.mu.shape[0]} for {gen.features!r}")
    if gen.image_size and ref.image_size and gen.image_size != ref.image_size:
        raise UsageError(f"image sizes differ: generated {gen.image_size}px, reference {ref.image_size}px; compare images of one resolution")


@contextlib.contextmanager
def _stdout_to_stderr():
    with contextlib.redirect_stdout(sys.stderr):
        yield


# ---------------------------------------------------------------------------------- feature extractors


def build_extractor(spec: str, *, inception: str | None = None, device: torch.device | str = "cpu", unverified: bool = False,
                    unverified_option: str | None = UNVERIFIED_OPTION) -> FeatureExtractor:
    """`inception` (default; local weights), `tiny` (tests; not comparable), or `module:factory`.

    A `module:factory` is called as factory(device) and returns an object with `name`, `input_size` and
    `__call__(uint8 [B,3,H,W]) -> [B,D]`. `unverified` accepts an Inception file with another sha256;
    `unverified_option` is how the command says so (None: it cannot, and the refusal does not advise it).
    """
    device = torch.device(device)
    if spec == "inception":
        return InceptionExtractor(resolve_inception_path(inception), device, unverified=unverified, unverified_option=unverified_option)
    if spec == "tiny":
        return TinyExtractor(device)
    if ":" in spec:
        module_name, attr = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as err:
            raise UsageError(f"--features {spec}: cannot load it ({err})") from None
        extractor = factory(device)
        if not callable(extractor) or not isinstance(getattr(extractor, "name", None), str):
            raise UsageError(f"--features {spec}: the factory must return a callable with a `name` string")
        return extractor
    raise UsageError(f"unknown --features {spec!r}: use inception, tiny or module:factory")


def resolve_inception_path(path: str | None) -> Path:
    """--inception PATH, else $FM_INCEPTION; a directory may hold the file under its usual name."""
    path = path or os.environ.get("FM_INCEPTION")
    if not path:
        raise UsageError(
            f"Inception weights not given: pass --inception PATH (fm train: --set eval.inception=PATH) or set FM_INCEPTION to {INCEPTION_FILE} "
            f"(get it once from {INCEPTION_URL}, sha256 {INCEPTION_SHA256[:16]}...), or use --features tiny (fm train: --set eval.features=tiny; "
            "not comparable to published FID)"
        )
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / INCEPTION_FILE
    if not p.is_file():
        raise UsageError(f"Inception weights not found at {p}: download {INCEPTION_URL} there, or point --inception/FM_INCEPTION at the file")
    return p


class InceptionExtractor:
    """clean-fid's "clean" mode: its PIL-bicubic resizer to 299, then its InceptionV3W forward (2048-D pool3)."""

    name = "inception-v3-clean"
    input_size = 299

    def __init__(self, path: Path, device: torch.device, unverified: bool = False, unverified_option: str | None = UNVERIFIED_OPTION):
        from cleanfid.resize import build_resizer

        digest = _sha256(path)
        if digest != INCEPTION_SHA256 and not unverified:
            # torch.jit.load runs what the file describes: only the known file is loaded without being asked.
            anyway = f", or pass {unverified_option} to use it anyway" if unverified_option else ""
            raise UsageError(
                f"{path} has sha256 {digest[:16]}..., not the reference {INCEPTION_FILE}'s {INCEPTION_SHA256[:16]}...: refusing to load it; "
                f"get the reference file from {INCEPTION_URL}{anyway}"
            )
        if digest != INCEPTION_SHA256:
            print(f"warning: {path} has sha256 {digest[:16]}..., not the reference file's {INCEPTION_SHA256[:16]}...: FID may not be comparable", file=sys.stderr)
        try:
            self.model = load_inception(path).to(device).eval()
        except (RuntimeError, ValueError, AttributeError) as err:
            raise UsageError(f"{path} is not the TorchScript Inception {INCEPTION_FILE} ({type(err).__name__}); get it from {INCEPTION_URL}") from None
        self.resize = build_resizer("clean")
        self.device = device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        arr = images.to("cpu", torch.uint8).permute(0, 2, 3, 1).numpy()  # [B,H,W,3], as clean-fid reads files
        resized = np.stack([self.resize(a) for a in arr]).astype(np.float32)  # [B,299,299,3] float 0..255
        x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
        return self.model(x).double().cpu().numpy()


def load_inception(path: Path) -> torch.nn.Module:
    """clean-fid's InceptionV3W (its own forward: (x - 128) / 128, then the TorchScript layers) from a local file."""
    from cleanfid.inception_torchscript import InceptionV3W

    class LocalInceptionV3W(InceptionV3W):
        def __init__(self, file: Path):  # InceptionV3W.__init__ minus the download and the fixed file name
            torch.nn.Module.__init__(self)
            self.base = torch.jit.load(str(file), map_location="cpu").eval()
            self.layers = self.base.layers
            self.resize_inside = False

    return LocalInceptionV3W(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class TinyExtractor:
    """A fixed, seeded random conv net (64-D): deterministic, cheap, sensitive to pixel perturbations.

    For tests and for users without the Inception weights. Its FID is NOT comparable to published FID.
    """

    name = "tiny-randconv-v1"
    input_size = 32

    def __init__(self, device: torch.device | str = "cpu"):
        g = torch.Generator().manual_seed(8)
        self.device = torch.device(device)
        self.w1 = (torch.randn(32, 3, 3, 3, generator=g) / math.sqrt(27)).to(self.device)
        self.b1 = (0.1 * torch.randn(32, generator=g)).to(self.device)
        self.w2 = (torch.randn(64, 32, 3, 3, generator=g) / math.sqrt(288)).to(self.device)
        self.b2 = (0.1 * torch.randn(64, generator=g)).to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        x = images.to(self.device, torch.float32).contiguous() / 127.5 - 1.0  # one memory layout: identical sums
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        h = F.relu(F.conv2d(x, self.w1, self.b1, stride=2, padding=1))
        h = F.relu(F.conv2d(h, self.w2, self.b2, stride=2, padding=1))
        return h.mean(dim=(2, 3)).double().cpu().numpy()


# --------------------------------------------------------------------------------- reference features


def reference_statistics(ref: str | Path, extractor: FeatureExtractor, *, batch_size: int = 64, keep_features: bool = False, log=None,
                         ctx=None) -> Statistics:
    """Statistics of REF: a stats .npz (checked against the extractor), a prepared dataset, or an image folder.
    Collective under a `ctx` of several ranks (training's evaluator; without `keep_features`): each rank reads its
    block of the images and the statistics are those of all of them (`shared_moments`), so no rank waits at its
    next collective while another reads every image (Inception over a large folder: many minutes)."""
    ref = Path(ref)
    if not ref.exists():
        raise UsageError(f"--ref {ref} does not exist (a prepared dataset directory, an image folder or a stats .npz)")
    if ref.is_file():
        if ref.suffix != ".npz":
            raise UsageError(f"--ref {ref} is a file but not a statistics .npz (written by `fm fid --save-stats`)")
        return load_statistics(ref, extractor)
    # Each rank reads its block under several ranks; the features line is then the whole's, said below.
    share = ctx if ctx is not None and ctx.world_size > 1 and not keep_features else None
    if (ref / "manifest.json").is_file():
        from .data.dataset import validate_prepared

        validate_prepared(ref)  # as `fm train` does: a damaged dataset is one line, not a crash in np.load
        feats, size = prepared_features(ref, extractor, batch_size=batch_size, log=log if share is None else None, share=share)
    else:
        feats, size = folder_features(ref, extractor, batch_size=batch_size, log=log, share=share)
    if share is None:
        return statistics_of(feats, extractor.name, size, keep_features=keep_features)
    mu, sigma, count = shared_moments(feats, ctx)
    if log:
        log(f"features of {count} images from {ref} (shared over {ctx.world_size} ranks)")
    return Statistics(mu=mu, sigma=sigma, count=count, features=extractor.name, image_size=size)


def shared_moments(feats: np.ndarray | None, ctx) -> tuple[np.ndarray, np.ndarray, int]:
    """(mean, unbiased covariance, count) of every rank's rows `feats` [n_r, D] (None: an empty share) taken together,
    as `statistics_of` (np.cov) computes them from their concatenation, to float64 round-off: the summed counts and
    sums give the mean, then the summed cross-products of the rows centred on it the covariance (two passes, as
    np.cov: no cancellation of large sums). Collective: every rank calls it."""
    from . import distributed as D

    shapes = [shape for shape in D.all_gather_objects(None if feats is None or not len(feats) else np.shape(feats), ctx) if shape]
    count = sum(n for n, _ in shapes)
    if count < 2:
        raise UsageError(f"FID needs at least 2 images, got {count}")
    local = np.asarray(feats, dtype=np.float64) if feats is not None and len(feats) else np.zeros((0, shapes[0][1]))
    mu = D.all_reduce_sum(local.sum(axis=0), ctx) / count
    centred = local - mu
    return mu, D.all_reduce_sum(centred.T @ centred, ctx) / (count - 1), count


def load_statistics(path: str | Path, extractor: FeatureExtractor | None = None) -> Statistics:
    """Read a stats .npz; files with only mu/sigma (clean-fid's own) are taken as clean-fid Inception stats."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:  # missing, truncated or not an .npz at all
        raise UsageError(f"cannot read statistics {path}: {err} (write one with `fm fid --ref DATA --save-stats FILE.npz`)") from None
    if "mu" not in data or "sigma" not in data:
        raise UsageError(f"{path} is not a statistics file: it has no mu/sigma (write one with `fm fid --ref DATA --save-stats FILE.npz`)")
    if "features" in data:
        features, size, count = str(data["features"]), int(data["image_size"]) or None, int(data["count"])
    else:
        features, size, count = InceptionExtractor.name, None, 0
        print(f"note: {path} records no feature extractor; assuming clean-fid Inception statistics", file=sys.stderr)
    stats = Statistics(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64), count=count, features=features, image_size=size, feats=data.get("feats"))
    if extractor is not None and stats.features != extractor.name:
        raise UsageError(f"{path} holds {stats.features!r} statistics but the features in use are {extractor.name!r}; recompute it or pass the matching --features")
    return stats


def prepared_features(path: Path, extractor: FeatureExtractor, *, batch_size: int = 64, log=None, share=None) -> tuple[np.ndarray | None, int]:
    """Features of a prepared pixel dataset (uint8 [N,C,H,W], read through a memmap in batches); with `share` (a
    DistContext) only that rank's block of the images (None where the block is empty)."""
    from .data.dataset import read_manifest

    manifest = read_manifest(path)
    if manifest["kind"] != "pixels":
        raise UsageError(f"{path} holds {manifest['kind']}, not pixels: FID needs images (use an image folder or a pixel dataset as --ref)")
    from . import distributed as D

    x = np.load(path / "x.npy", mmap_mode="r")
    rows = D.block_of(len(x), share) if share is not None else slice(None)
    return array_features(x[rows], extractor, batch_size=batch_size, log=log, what=str(path)), int(x.shape[-1])


def array_features(x, extractor: FeatureExtractor, *, batch_size: int = 64, log=None, what: str = "images") -> np.ndarray:
    """Features of uint8 [N,C,H,W] (C = 1 or 3) in batches."""
    feats = []
    for start in range(0, len(x), batch_size):
        batch = torch.from_numpy(np.array(x[start : start + batch_size]))  # a writable copy of the memmap rows
        feats.append(extractor(to_rgb(batch)))
    if log:
        log(f"features of {len(x)} images from {what}")
    return np.concatenate(feats) if feats else None  # None: no images (a rank's empty share)


def read_rgb(path: Path) -> np.ndarray:
    """One image file as uint8 [H,W,3]; an unreadable file is a usage error naming it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except OSError as err:
        raise UsageError(f"cannot read image {path}: {err}") from None


def folder_features(path: Path, extractor: FeatureExtractor, *, batch_size: int = 64, log=None, share=None) -> tuple[np.ndarray | None, int | None]:
    """Features of every image under a folder (sorted, recursive), read as RGB like clean-fid does; with `share` (a
    DistContext; collective) only that rank's block of the files (None where the block is empty), the size every
    rank's images agree on."""
    from . import distributed as D

    files = image_files(path, log)
    if not files:
        raise UsageError(f"{path} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) and no manifest.json")
    feats, sizes = _files_features(files[D.block_of(len(files), share)] if share is not None else files, extractor, batch_size)
    if share is not None:
        sizes = set().union(*D.all_gather_objects(sizes, share))
    elif log:
        log(f"features of {len(files)} images from {path}")
    (h, w), *others = sizes
    return feats, h if not others and h == w else None  # None: mixed or non-square sizes


def _files_features(files: list[Path], extractor: FeatureExtractor, batch_size: int) -> tuple[np.ndarray | None, set]:
    """(features of the image files in order, None for no files; their (height, width) sizes)."""
    feats, sizes, batch = [], set(), []

    def flush():
        if batch:
            feats.append(extractor(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).contiguous()))
            batch.clear()

    for f in files:
        arr = read_rgb(f)
        if batch and arr.shape != batch[0].shape:  # a batch holds one image size
            flush()
        batch.append(arr)
        sizes.add(arr.shape[:2])
        if len(batch) == batch_size:
            flush()
    flush()
    return (np.concatenate(feats) if feats else None), sizes


def image_files(path: Path, log=None) -> list[Path]:
    """The images under `path` (recursively) that a score counts: every one but the grid `fm sample --out DIR`
    writes beside its samples (a montage of them, not a sample: counting it would skew the score)."""
    from .images import is_sample_grid

    files = sorted(p for p in Path(path).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())
    grids = [p for p in files if is_sample_grid(p)]
    if grids and log:
        log(f"note: skipping {grids[0]}" + (f" and {len(grids) - 1} more" if len(grids) > 1 else "") + " (the grid `fm sample` writes beside its samples)")
    return [p for p in files if p not in grids]


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B,1|3,H,W] -> [B,3,H,W]: grayscale repeated to three channels (as PIL's convert("RGB"))."""
    if images.shape[1] == 1:
        return images.repeat(1, 3, 1, 1)
    if images.shape[1] != 3:
        raise UsageError(f"FID needs 1- or 3-channel images, got {images.shape[1]} channels")
    return images


# --------------------------------------------------------------------------------- generated features


def generate_features(
    loaded,
    indices: Iterable[int],
    extractors: dict[str, FeatureExtractor],
    *,
    seed: int,
    sample_cfg,
    batch_size: int,
    device: torch.device,
    out: Path | None = None,
    progress: Callable[[int], None] | None = None,
    labels: np.ndarray | None = None,
) -> GeneratedFeatures:
    """Sample the given global indices (sample i depends only on (seed, i): shardable) and return their
    features in every space of `extractors`, and the class each sample was asked for: `labels[i]` for sample i
    where given (fm eval's classes in the data's proportions), else generate.labels_for's cycle."""
    from .generate import iterate_samples
    from .images import save_images, to_uint8

    indices = list(indices)
    asked = torch.as_tensor(labels[indices]) if labels is not None and indices else None
    feats: dict[str, list] = {space: [] for space in extractors}
    labels, nfe_total, nfe_max, gen_seconds = [], 0, 0, 0.0
    start = time.perf_counter()
    for chunk, y, result in iterate_samples(loaded, indices, seed=seed, sample_cfg=sample_cfg, batch_size=batch_size, device=device, labels=asked):
        pixels = to_rgb(torch.from_numpy(to_uint8(result.x)).permute(0, 3, 1, 2).contiguous())  # the PNG bytes' values, [B,3,H,W]
        gen_seconds += time.perf_counter() - start
        nfe_total += result.nfe * len(chunk)
        nfe_max = max(nfe_max, result.nfe)
        if out is not None:
            for k, i in enumerate(chunk):
                save_images(result.x[k : k + 1], out, start_index=i)
        for space, extractor in extractors.items():
            feats[space].append(extractor(pixels))
        if y is not None:
            labels.append(y.cpu().numpy())
        if progress:
            progress(len(chunk))
        start = time.perf_counter()
    if not indices:  # a rank's empty share (-n below the rank count): its peers' samples are the result
        return GeneratedFeatures(feats={space: np.empty((0,)) for space in extractors}, nfe_per_sample=0.0, gen_seconds=gen_seconds,
                                 image_size=loaded.shape[-1], nfe_max=0)  # fmt: skip
    return GeneratedFeatures(
        feats={space: np.concatenate(f) for space, f in feats.items()}, labels=np.concatenate(labels) if labels else None,
        nfe_per_sample=nfe_total / len(indices), gen_seconds=gen_seconds, image_size=loaded.shape[-1], nfe_max=nfe_max,
    )  # fmt: skip


def sharded_features(loaded, n: int, extractors: dict[str, FeatureExtractor], *, seed: int, sample_cfg, batch_size: int, device,
                     ctx=None, out: Path | None = None, progress_factory=None, labels: np.ndarray | None = None) -> GeneratedFeatures:
    """Samples 0..n-1 shared out over the ranks of `ctx` and their features, gathered in index order on every
    rank (sample i is the same on any rank, so the result is one process's); the time is the slowest rank's, the
    NFE per sample the mean over all ranks' samples (dopri5's differs between ranks), `nfe_max` the largest."""
    from . import distributed as D

    ctx = ctx or D.DistContext(device=device)
    if n < 1:
        raise UsageError("no samples to generate")
    indices = D.shard_indices(n, ctx)
    bar = progress_factory(len(indices)) if progress_factory and ctx.rank == 0 else contextlib.nullcontext(None)
    with bar as advance:
        generated = generate_features(loaded, indices, extractors, seed=seed, sample_cfg=sample_cfg, batch_size=batch_size, device=device, out=out,
                                      progress=advance, labels=labels)  # fmt: skip
    if ctx.world_size == 1:
        return generated
    feats = {space: np.stack(D.gather_in_index_order(indices, list(f), ctx)) for space, f in generated.feats.items()}
    # Every rank joins the gather: one whose share is empty has no labels of its own to say whether there are any.
    has_labels = any(D.all_gather_objects(generated.labels is not None, ctx))
    labels = np.stack(D.gather_in_index_order(indices, list(generated.labels if generated.labels is not None else []), ctx)) if has_labels else None
    nfe_totals = D.all_gather_objects((generated.nfe_per_sample * len(indices), len(indices), generated.nfe_max), ctx)
    nfe_per_sample = sum(total for total, _, _ in nfe_totals) / sum(count for _, count, _ in nfe_totals)
    return replace(generated, feats=feats, labels=labels, nfe_per_sample=nfe_per_sample, nfe_max=max(most for _, _, most in nfe_totals),
                   gen_seconds=max(D.all_gather_objects(generated.gen_seconds, ctx)))  # fmt: skip


# -------------------------------------------------------------------------------------------- fm fid


@dataclass(kw_only=True)
class ScoreRequest:
    """What `fm fid` and `fm eval` score: `num_samples` samples of a checkpoint, or the images of a folder."""

    ckpt: str | None = None
    gen: Path | None = None
    num_samples: int | None = None
    sample_overrides: Callable = lambda base: base  # the command's sampling options over the checkpoint's
    seed: int = 0
    batch_size: int = 64
    ema: bool = True
    guide_ckpt: str | None = None  # autoguidance's guide (--guide-ckpt)


@dataclass(kw_only=True)
class FidRequest(ScoreRequest):
    """What `fm fid` computes (the CLI checks the flags and fills it; `fid` runs it)."""

    ref: Path
    save_stats: Path | None = None
    features: str = "inception"
    inception: str | None = None
    inception_unverified: bool = False
    nfe: list[int] | None = None  # an NFE sweep: the solver's steps chosen per budget by solvers.steps_for_nfe
    out: Path | None = None
    kid: bool = False


def fid(req: FidRequest, *, device: torch.device, log, ctx=None, progress_factory=None) -> dict | list[dict]:
    """The reference statistics (saved with `save_stats`), then the FID of a folder, of a checkpoint's samples,
    or of every budget of an NFE sweep (one row each)."""
    extractor = build_extractor(req.features, inception=req.inception, device=device, unverified=req.inception_unverified)
    loaded = None
    if req.ckpt is not None:  # load the model first: a bad checkpoint fails before the long reference pass
        # What cannot be scored is refused before the probe and the reference pass (minutes for a large dataset).
        check = lambda m: _check_scorable(m, _prepared_size(req.ref))  # noqa: E731
        loaded, sample_cfg = load_sampler(req.ckpt, req.guide_ckpt, req.sample_overrides, ema=req.ema, device=device, log=log, ctx=ctx, check=check)
        sweep = nfe_sweep(sample_cfg, req.nfe, log) if req.nfe is not None else [(None, sample_cfg)]
    if req.gen is not None and not image_files(Path(req.gen)):  # so is an empty --gen
        raise UsageError(f"--gen {req.gen} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    ref_stats = _reference(req, extractor, log, ctx)
    saved = {"stats": str(_save_once(ref_stats, req.save_stats, ctx)), "ref_count": ref_stats.count, "features": ref_stats.features} if req.save_stats else {}
    if req.gen is not None:
        return {**saved, **_score_folder(req, ref_stats, extractor, log)}
    if loaded is None:
        return saved
    _check_scorable(loaded, ref_stats.image_size)  # a folder's size is known once it is read
    rows = []
    for n, settings in sweep:
        if n is not None and log:
            log(f"NFE {n}: {settings.solver}, {settings.steps} steps")
        out = sample_dir(req.out, n)
        scored = _score_checkpoint(loaded, settings, ref_stats, extractor, req, device=device, out=out, ctx=ctx, progress_factory=progress_factory)
        rows.append({**({"nfe_budget": n} if n is not None else {}), **saved, **scored.to_dict()})
    return rows if req.nfe is not None else rows[0]


def _check_scorable(loaded, ref_size: int | None) -> None:
    """What `fm fid` cannot score: a latent model's samples, a text model's (it takes no prompts), or images of another
    size than the reference's (None: unknown)."""
    if loaded.is_text:
        raise UsageError("fm fid --ckpt samples class-conditional or unconditional models; a text-to-image model needs prompts, which "
                         "fm fid does not take: write its samples with `fm sample --ckpt CKPT --prompts FILE --out DIR` and score them with --gen DIR")
    if loaded.info.get("kind", "pixels") != "pixels":
        raise UsageError("fm fid --ckpt samples pixel models, not latent ones: write the samples (decoded by the VAE) with "
                         "`fm sample --ckpt CKPT -n N --out DIR` and score them with --gen DIR")
    if ref_size and loaded.shape[-1] != ref_size:
        raise UsageError(f"image sizes differ: the model makes {loaded.shape[-1]}px images, the reference is {ref_size}px")


def _prepared_size(ref: Path) -> int | None:
    """The image size of a prepared dataset REF from its manifest (None for a folder or a stats file)."""
    from .data.dataset import read_manifest

    return int(read_manifest(ref)["shape"][-1]) if (Path(ref) / "manifest.json").is_file() else None


def sample_dir(out: Path | None, nfe: int | None) -> Path | None:
    """Where `fm fid --out DIR` writes the samples of one row: DIR, or DIR/nfe-N for budget N of an NFE sweep."""
    return out / f"nfe-{nfe}" if out is not None and nfe is not None else out


def _save_once(stats: Statistics, path: Path, ctx) -> Path:
    """--save-stats written by rank 0 alone (every rank holds the same statistics; one writer, one temp file)."""
    return stats.save(path) if ctx is None or ctx.rank == 0 else Path(path)


def _reference(req: FidRequest, extractor: FeatureExtractor, log, ctx=None) -> Statistics:
    """REF's statistics; under several ranks (`fm fid --nproc/--gpus`) each reads its share of the images, not all of
    them (`reference_statistics`; --kid keeps every feature, so each rank reads them all then)."""
    ref_stats = reference_statistics(req.ref, extractor, batch_size=req.batch_size, keep_features=req.kid, log=log, ctx=ctx)
    if not isinstance(extractor, InceptionExtractor):  # said once the inputs are known to be good
        log(f"features: {extractor.name} (not comparable to published FID)")
    if req.kid and ref_stats.feats is None:
        raise UsageError(f"--kid needs reference features, which {req.ref} lacks: write it with `fm fid --ref DATA --save-stats FILE.npz --kid`")
    return ref_stats


def _score_folder(req: FidRequest, ref_stats: Statistics, extractor: FeatureExtractor, log) -> dict:
    feats, size = folder_features(Path(req.gen), extractor, batch_size=req.batch_size, log=log)
    gen_stats = statistics_of(feats, extractor.name, size, keep_features=req.kid)
    scored = FidResult(fid=frechet_distance(gen_stats, ref_stats), num_samples=gen_stats.count, ref_count=ref_stats.count, features=extractor.name)
    if req.kid:
        scored.kid = kernel_distance(gen_stats, ref_stats)
    return scored.to_dict()


def load_sampler(ckpt: str, guide_ckpt: str | None, sample_overrides: Callable, *, ema: bool, device, log, ctx, check: Callable = lambda loaded: None):
    """The checkpoint (and its autoguidance guide) ready to sample at the resolved precision/compile, and the
    sampling settings after the command's overrides. `check(loaded)` refuses what the command cannot score,
    before the precision probe and its log lines."""
    from .generate import guidance_that_runs, load_for_sampling, prepare_for_sampling, with_guide

    loaded = load_for_sampling(ckpt, device, use_ema=ema)
    check(loaded)
    sample_cfg = guidance_that_runs(loaded, sample_overrides(loaded.config.sample), log)
    if guide_ckpt is not None:
        loaded = with_guide(loaded, guide_ckpt, device, use_ema=ema)
    return prepare_for_sampling(loaded, sample_cfg, device, log or (lambda message: None), ctx), sample_cfg


def nfe_sweep(sample_cfg, budgets: list[int], log) -> list[tuple[int, object]]:
    """(budget, settings) for each NFE budget the solver can meet; a budget below one step's NFE (heun at 1,
    rk4 at 2 or 3) is skipped with a note rather than run over budget under its label."""
    from .solvers import nfe_of

    sweep = [(n, settings) for n in budgets if (settings := _settings_for_nfe(sample_cfg, n)) is not None]
    least = nfe_of(sample_cfg.solver, 1)  # after _settings_for_nfe, which refuses dopri5 (no per-step NFE)
    if not sweep:
        raise UsageError(f"--nfe {','.join(map(str, budgets))}: {sample_cfg.solver} needs at least {least} NFE per sample; give larger budgets")
    for n in sorted(set(budgets) - {n for n, _ in sweep}):
        if log:
            log(f"NFE {n}: skipped, {sample_cfg.solver} needs at least {least} NFE per sample")
    return sweep


def _settings_for_nfe(sample_cfg, nfe: int):
    """The sampling settings with the most solver steps whose NFE fits `nfe` (validated: cfg-zero's
    zero-init steps must stay below the steps); None when not even one step fits. cfg-zero's zero-init
    steps evaluate no network (generate.sample_batch skips them where cfg != 1), so they come on top."""
    from .config import validated
    from .solvers import steps_for_nfe

    what = f"--nfe {nfe} with --solver {sample_cfg.solver}"
    try:
        steps = steps_for_nfe(sample_cfg.solver, nfe)
    except ValueError as err:
        raise UsageError(f"{what}: {err}") from None
    if steps == 0:  # not even one step fits the budget
        return None
    if sample_cfg.guidance == "cfg-zero" and sample_cfg.cfg != 1.0:
        steps += sample_cfg.zero_init_steps
    return validated(type(sample_cfg), {**sample_cfg.model_dump(), "steps": steps}, lambda where, problem: f"{what}: {problem}")


def _score_checkpoint(loaded, sample_cfg, ref_stats, extractor, req: FidRequest, *, device, out, ctx, progress_factory) -> FidResult:
    """Generate `req.num_samples` (sharded over the ranks of `ctx`) and score them against the reference."""
    from .generate import guide_record, sampling_record, settings_record

    generated = sharded_features(
        loaded, req.num_samples, {"fid": extractor}, seed=req.seed, sample_cfg=sample_cfg, batch_size=req.batch_size, device=device, ctx=ctx,
        out=out, progress_factory=progress_factory,
    )  # fmt: skip
    gen_stats = statistics_of(generated.feats["fid"], extractor.name, generated.image_size, keep_features=req.kid)
    # Every setting that tells this row's curve from another's (fm plot keeps them apart): the checkpoint, the interval, ...
    extra = {**settings_record(sample_cfg), "seed": req.seed, "step": loaded.step, **sampling_record(loaded), "ckpt": str(req.ckpt),
             **guide_record(sample_cfg, req.guide_ckpt)}  # fmt: skip
    scored = FidResult(
        fid=frechet_distance(gen_stats, ref_stats), num_samples=gen_stats.count, ref_count=ref_stats.count, features=extractor.name,
        gen_seconds=generated.gen_seconds, nfe_per_sample=generated.nfe_per_sample, nfe_max=generated.nfe_max, extra=extra,
    )  # fmt: skip
    if req.kid:
        scored.kid = kernel_distance(gen_stats, ref_stats)
    return scored


def refuse_training_eval(cfg, space: str) -> None:
    """Evaluation during training (FID, or fidelity.TrainingFidelity's metrics) scores pixel samples of a
    class-conditional or unconditional model: anything else is refused before the first step, not at the first
    evaluation. `space`: what the training data holds (`data.dataset.data_space`)."""
    fidelity_without_ref = cfg.eval.features in ("domain", "dinov2") and cfg.eval.ref is None
    what = f"eval.features={cfg.eval.features}" if fidelity_without_ref else "eval.ref is set, but"
    if reason := training_eval_unavailable(cfg, space):
        raise UsageError(f"{what}: {reason}; set eval.every=0")


def training_eval_unavailable(cfg, space: str) -> str | None:
    """Why a run of this model and data cannot be scored during training (None: it can), with what to do after
    training instead: `fm fid --ckpt` refuses latent and text models too, so their samples are scored as a folder."""
    if space != "pixels":
        kind = "latent-space"
    elif cfg.model.cross_attention:
        kind = "text-conditioned"
    else:
        return None
    write = "`fm sample --ckpt RUN --prompts FILE --out DIR`" if cfg.model.cross_attention else "`fm sample --ckpt RUN -n N --out DIR`"
    return f"evaluation during training of {kind} models is not available (after training, score {write} with `fm fid --gen DIR`)"


class TrainingEvaluator:
    """FID of the EMA model during training: extractor and reference statistics are prepared once."""

    def __init__(self, cfg, data_manifest: dict, device: torch.device, log=None, with_reference: bool = True, ctx=None):
        """`cfg.eval.ref` set and the model one `refuse_training_eval` accepts (the Trainer checks both first). Only
        the rank `with_reference` keeps the reference and scores; under a `ctx` of several ranks every rank computes
        its share of it (collective: a folder can take many minutes, which the others would wait at a collective)."""
        self.num_samples, self.device = cfg.eval.num_samples, device
        self.extractor = build_extractor(cfg.eval.features, inception=cfg.eval.inception, device=device, unverified=cfg.eval.inception_unverified)
        shared = ctx is not None and ctx.world_size > 1
        ref = reference_statistics(cfg.eval.ref, self.extractor, log=log, ctx=ctx) if shared or with_reference else None
        size = data_manifest["shape"][-1]
        if ref is not None and ref.image_size and ref.image_size != size:
            raise UsageError(f"eval.ref {cfg.eval.ref} holds {ref.image_size}px images but the model makes {size}px ones")
        self.ref = ref if with_reference else None

    def __call__(self, model, cfg, step: int, batch_size: int, ctx=None) -> dict | None:
        """Every rank generates its share of the samples (`model`: the EMA, as a generate.SamplingNet at the run's
        precision, sampled as `cfg`, the run's config now, says); the rank holding the reference returns the record."""
        from .generate import LoadedModel

        loaded = LoadedModel(model=model, config=cfg, info={"kind": "pixels"}, step=step)
        n = self.num_samples
        generated = sharded_features(
            loaded, n, {"fid": self.extractor}, seed=cfg.train.seed, sample_cfg=cfg.sample, batch_size=batch_size, device=self.device, ctx=ctx
        )  # fmt: skip
        if self.ref is None:
            return None
        stats = statistics_of(generated.feats["fid"], self.extractor.name, generated.image_size)
        return {"step": step, "fid": frechet_distance(stats, self.ref), "fid_num_samples": n, "fid_features": self.extractor.name, "fid_gen_seconds": round(generated.gen_seconds, 3)}
