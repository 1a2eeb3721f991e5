"""fm's in-domain classifier: a small CNN trained once on a prepared dataset's own labelled images, deterministic
for a seed, cached beside the dataset (DATA/fm-classifier-sSEED.pt) with a key of the dataset manifest, the seed,
the steps and the architecture: a cache whose key differs is rebuilt (or refused at a path the user gave), never
trusted blindly. `fm eval`'s domain features (fmcli/features.py) and REPA's encoder (fmcli/repa.py) use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UsageError

CLASSIFIER_ARCH = "domain-cnn-v1"  # bump when DomainCNN or its training changes: old caches are then rebuilt
CACHE_FORMAT = 1
CLASSIFIER_STEPS = 1500  # optimizer steps of 64 images (~55 s at 32x32 on one thread; see DomainCNN)


class DomainCNN(nn.Module):
    """Four strided conv layers with batch norm (32, 64, 64, 128 channels; 32x32 -> 4x4) and a linear head.

    About 5 M multiply-adds per 32x32 image: the 1,500 steps of 64 take 55 s on one thread (shapes, a shared
    2-core machine; digits: 50 CPU-seconds, 99.3 % held out). Chosen by measurement on 20,000 shapes (2,000 held out), 1,500
    steps of 64: 99.95 % held out (99.8 % on train_classifier's own split), against 98.5 % without the third layer and 95 % with 800 steps (without
    batch norm 86 %); the strided layers are ~4x faster per step on a CPU than conv + max-pool stages.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()

        def layer(cin, cout, kernel, stride):
            return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.GELU()]

        self.body = nn.Sequential(
            *layer(in_channels, 32, 4, 2),  # (N, 32, H/2, W/2)
            *layer(32, 64, 3, 2),  # (N, 64, H/4, W/4)
            *layer(64, 64, 3, 1),  # (N, 64, H/4, W/4)
            *layer(64, 128, 3, 2),  # (N, 128, H/8, W/8)
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (N, 128): the features
        )  # fmt: skip
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


@dataclass
class TrainedClassifier:
    model: DomainCNN
    held_out_accuracy: float
    held_out: int  # images it was scored on (never trained on)
    key: str


def train_classifier(x: np.ndarray, y: np.ndarray, num_classes: int, *, seed: int = 0, steps: int = CLASSIFIER_STEPS,
                     batch_size: int = 64, held_out: int | None = None) -> tuple[DomainCNN, float, int]:
    """Train DomainCNN on uint8 [N,C,H,W] images and labels; returns (model in eval mode, held-out accuracy, held-out count).

    A seeded permutation holds out 10 % of the images (at most 2,000) for the accuracy. AdamW with cosine decay
    to zero: a weaker classifier under-reports sample accuracy. The same seed gives the same weights (on one
    machine: training runs on one thread, so the float summation order is fixed).
    """
    if len(x) < 4 or len(np.unique(y)) < 2:
        raise UsageError(f"the domain classifier needs labelled images of at least 2 classes, got {len(x)} images of {len(np.unique(y))} class(es)")
    with _one_thread():
        return _train(x, y, num_classes, seed=seed, steps=steps, batch_size=batch_size, held_out=held_out)


@contextlib.contextmanager
def _one_thread():
    """Train on one CPU thread: these small convolutions gain little from a second thread, and on a shared
    2-core machine two threads took 428 s instead of 55 s for the same 1,500 steps (each parallel region
    waits for a thread that another process holds). One thread also fixes the summation order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(x, y, num_classes: int, *, seed: int, steps: int, batch_size: int, held_out: int | None) -> tuple[DomainCNN, float, int]:
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g).numpy()
    n_out = held_out if held_out is not None else min(2000, max(1, len(x) // 10))
    test, train = np.sort(order[:n_out]), order[n_out:]
    yt = torch.from_numpy(np.asarray(y)[train]).long()
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays as it was
        torch.manual_seed(seed)
        model = DomainCNN(x.shape[1], num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(train), (min(batch_size, len(train)),), generator=g)
        # Each batch read from x (a memory map of the dataset) as drawn: a copy of the whole training part in
        # float32 would need 4x the dataset's size in memory (24 GB for 30,000 RGB images at 256x256).
        loss = F.cross_entropy(model(to_input(x[train[idx.numpy()]])), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    predicted = predict(model, np.asarray(x[test]))
    return model, float((predicted == np.asarray(y[test])).mean()), int(n_out)


def to_input(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N,C,H,W] -> float32 in [-1, 1], the range fm trains its generators on."""
    x = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    return x.float() / 127.5 - 1.0


@torch.no_grad()
def predict(model: DomainCNN, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Class predictions for uint8 [N,C,H,W] images."""
    out = [model(to_input(x[i : i + batch_size]).to(_device_of(model))).argmax(1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def classifier_key(data: Path, seed: int, steps: int) -> str:
    """What the cached weights depend on: the dataset's manifest (it records source, count, seed and creation
    time), the training seed and steps, and the architecture version."""
    manifest = (Path(data) / "manifest.json").read_bytes()
    return hashlib.sha256(manifest + f"|{CLASSIFIER_ARCH}|seed={seed}|steps={steps}".encode()).hexdigest()


def default_classifier_path(data: Path, seed: int) -> Path:
    return Path(data) / f"fm-classifier-s{seed}.pt"


def load_or_train_classifier(data: Path, *, seed: int = 0, path: str | Path | None = None, steps: int = CLASSIFIER_STEPS, log=None,
                             option: str = "--classifier", elsewhere: str = "--classifier PATH (training: --set eval.classifier=PATH)",
                             unlabelled: str = "; for unlabelled images use the inception, dinov2 or tiny features") -> TrainedClassifier:
    """The cached classifier of `data` when its key matches, else a newly trained one (saved atomically).

    At the default location a stale or unreadable cache is replaced; at a path the user gave it is refused
    (it may be another dataset's classifier, which the user meant to keep). `option` names the setting that
    gave `path`, `elsewhere` how to give one and `unlabelled` what to do without labels, in the messages.
    """
    from .data.dataset import read_manifest
    from .fsutil import folder_lock

    data = Path(data)
    manifest = read_manifest(data)
    if manifest["kind"] != "pixels" or not manifest.get("num_classes"):
        raise UsageError(f"{data}: the domain classifier needs a labelled pixel dataset (this one is {manifest['kind']}, "
                         f"{manifest.get('num_classes') or 0} classes){unlabelled}")
    key = classifier_key(data, seed, steps)
    given = path is not None
    path = Path(path) if given else default_classifier_path(data, seed)
    # Processes that start together (the ranks of a REPA run, evaluations in parallel): one trains, the rest read its cache.
    with folder_lock(path.parent):
        return _load_or_train(data, manifest, key, path, given, seed, steps, log, option, elsewhere)


def _load_or_train(data: Path, manifest: dict, key: str, path: Path, given: bool, seed: int, steps: int, log, option: str, elsewhere: str) -> TrainedClassifier:
    from .fsutil import can_write_in

    if path.exists():
        cached, problem = _read_cache(path, key, manifest)
        if cached is not None:
            return cached
        if given:
            raise UsageError(f"{option} {path}: {problem}; delete it (or give a new path) to train one for {data}")
        if log:
            log(f"classifier cache {path}: {problem}; training a new one")
    # Checked before the training (about a minute), not found out when saving its result.
    if not can_write_in(path.parent):
        if given:
            raise UsageError(f"{option} {path}: cannot write in {path.parent}; give a path in a writable folder")
        raise UsageError(f"the data folder {data} is not writable, so the domain classifier cannot be cached beside it; "
                         f"pass {elsewhere} to cache it elsewhere")  # fmt: skip
    if log:
        log(f"training the domain classifier on {data} (seed {seed}, {steps} steps; cached at {path})")
    x, y = np.load(data / "x.npy", mmap_mode="r"), np.load(data / "y.npy")
    model, acc, n_out = train_classifier(x, y, manifest["num_classes"], seed=seed, steps=steps)
    _write_cache(path, model, acc, n_out, key, manifest, log, elsewhere)
    return TrainedClassifier(model, acc, n_out, key)


def _read_cache(path: Path, key: str, manifest: dict) -> tuple[TrainedClassifier | None, str]:
    """(the classifier, "") when the file is a readable cache with this key, else (None, why not)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT:
            return None, "not an fm classifier cache"
        if blob.get("key") != key:
            return None, "trained for another dataset, seed, number of training steps or architecture"
        model = DomainCNN(manifest["shape"][0], manifest["num_classes"])
        model.load_state_dict(blob["state"])
    except (OSError, RuntimeError, KeyError, ValueError, EOFError, TypeError, pickle.UnpicklingError) as err:  # truncated, corrupt, wrong shapes
        return None, f"unreadable ({type(err).__name__})"
    return TrainedClassifier(model.eval(), float(blob["held_out_accuracy"]), int(blob["held_out"]), key), ""


def _write_cache(path: Path, model: DomainCNN, acc: float, n_out: int, key: str, manifest: dict, log, elsewhere: str) -> None:
    from .fsutil import atomic_write

    blob = {"format": CACHE_FORMAT, "key": key, "arch": CLASSIFIER_ARCH, "state": model.state_dict(),
            "held_out_accuracy": acc, "held_out": n_out, "num_classes": manifest["num_classes"]}  # fmt: skip
    try:
        atomic_write(path, lambda tmp: _save(blob, tmp))
    except OSError as err:  # e.g. a full disk (a read-only folder is refused before training): the classifier still works
        if log:
            log(f"could not cache the classifier at {path} ({err}); pass {elsewhere} to keep it")


def _save(blob: dict, path: Path) -> None:
    with open(path, "wb") as f:  # opened here: a failure is an OSError (torch.save(blob, path) raises RuntimeError)
        torch.save(blob, f)


