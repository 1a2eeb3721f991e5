"""Distances between two sets of features: Frechet distance, KID, precision/recall, density/coverage.

Pure numpy, no I/O: features in, numbers out. Every function takes real (reference) features first.

- Frechet distance (Heusel et al. 2017) in float64 through symmetric eigendecompositions: tr sqrt(S1 S2) is
  computed as the sum of square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1), which is symmetric
  positive semi-definite. `scipy.linalg.sqrtm` of the non-symmetric S1 S2 warned "Matrix is singular" on
  rank-deficient covariances (ReLU features of few samples) and returned complex noise there.
- KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
  averaged over random subsets, exactly as clean-fid's `kernel_distance` does (same draws for the same seed).
- Precision and recall (Kynkaanniemi et al. 2019) and density and coverage (Naeem et al. 2020): k-nearest-
  neighbour balls around each sample, as the `prdc` package computes them (strict `<`, k-th neighbour
  excluding the point itself), with distances in row chunks so memory stays O(chunk * N); equal rows are
  exactly 0 apart (the package's dot-product expansion leaves round-off there).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

CHUNK = 1024  # rows of a distance matrix computed at once


@dataclass
class Fidelity:
    """The set-to-set metrics of one feature space (kid is None when not asked for)."""

    fd: float
    precision: float
    recall: float
    density: float
    coverage: float
    kid: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def fidelity(real: np.ndarray, fake: np.ndarray, *, k: int = 5, kid: bool = True, seed: int = 0) -> Fidelity:
    """All metrics of `fake` [M,D] against `real` [N,D] features."""
    p = prdc(real, fake, k=k)
    return Fidelity(
        fd=frechet_distance_of(real, fake),
        kid=kernel_distance(real, fake, seed=seed) if kid else None,
        **p,
    )


# ------------------------------------------------------------------------------------ Frechet distance


def gaussian(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, unbiased covariance) of [N,D] features in float64, as clean-fid computes them."""
    feats = _features(feats, "features", at_least=2)
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance_of(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets."""
    return frechet_distance(*gaussian(real), *gaussian(fake))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(sqrt(S1) S2 sqrt(S1)), in float64.

    sqrt(S1) S2 sqrt(S1) is similar to S1 S2 (same eigenvalues) but symmetric, so `eigvalsh` applies; tiny
    negative eigenvalues (round-off of a rank-deficient product) are clipped to 0 before the square root.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _psd_sqrt(s1)
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)  # symmetrised: round-off must not make it non-symmetric
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix (negative round-off clipped)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# ----------------------------------------------------------------------------------------------- KID


def kernel_distance(real: np.ndarray, fake: np.ndarray, *, num_subsets: int = 100, max_subset_size: int = 1000, seed: int = 0) -> float:
    """clean-fid's KID: mean over `num_subsets` random subsets of size m of the unbiased MMD^2 estimate.

    The subsets are drawn with np.random.RandomState(seed) in clean-fid's order (real, then fake, per subset),
    so the value equals clean-fid's `kernel_distance(fake, real)` after `np.random.seed(seed)`.
    """
    real, fake = _features(real, "real", at_least=2), _features(fake, "fake", at_least=2)
    rng = np.random.RandomState(seed)
    d = real.shape[1]
    m = min(real.shape[0], fake.shape[0], max_subset_size)
    total = 0.0
    for _ in range(num_subsets):
        x = real[rng.choice(real.shape[0], m, replace=False)]
        y = fake[rng.choice(fake.shape[0], m, replace=False)]
        within = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        across = (x @ y.T / d + 1) ** 3
        total += (within.sum() - np.diag(within).sum()) / (m - 1) - across.sum() * 2 / m
    return float(total / num_subsets / m)


# ----------------------------------------------------------------------------- k-NN ball based metrics


def prdc(real: np.ndarray, fake: np.ndarray, *, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of `fake` against `real` with k-nearest-neighbour radii.

    precision: fraction of fakes inside some real's k-NN ball; recall: fraction of reals inside some fake's
    k-NN ball; density: real balls containing each fake, / k, averaged; coverage: fraction of reals whose
    ball holds at least one fake.
    """
    real, fake = _features(real, "real", at_least=k + 1), _features(fake, "fake", at_least=k + 1)
    ids = _row_ids(np.concatenate([real, fake]))  # equal rows share an id: their distance is exactly 0
    id_real, id_fake = ids[: len(real)], ids[len(real) :]
    r_real = kth_neighbour_distance(real, k, id_real)  # [N]
    r_fake = kth_neighbour_distance(fake, k, id_fake)  # [M]
    in_real_balls = np.zeros(fake.shape[0])  # per fake: how many real balls contain it
    real_recalled = np.zeros(real.shape[0], dtype=bool)  # per real: inside some fake ball
    nearest_fake = np.full(real.shape[0], np.inf)  # per real: distance to its nearest fake
    for start in range(0, real.shape[0], CHUNK):
        d = pairwise_distances(real[start : start + CHUNK], fake, id_real[start : start + CHUNK], id_fake)  # [chunk, M]
        inside = d < r_real[start : start + CHUNK, None]
        in_real_balls += inside.sum(axis=0)
        real_recalled[start : start + CHUNK] = (d < r_fake[None, :]).any(axis=1)
        nearest_fake[start : start + CHUNK] = d.min(axis=1)
    return {
        "precision": float((in_real_balls > 0).mean()),
        "recall": float(real_recalled.mean()),
        "density": float(in_real_balls.mean() / k),
        "coverage": float((nearest_fake < r_real).mean()),
    }


def kth_neighbour_distance(x: np.ndarray, k: int, ids: np.ndarray | None = None) -> np.ndarray:
    """Distance from each row to its k-th nearest other row (the row itself, at distance 0, is not counted)."""
    ids = _row_ids(x) if ids is None else ids
    out = np.empty(x.shape[0])
    for start in range(0, x.shape[0], CHUNK):
        d = pairwise_distances(x[start : start + CHUNK], x, ids[start : start + CHUNK], ids)
        rows = np.arange(d.shape[0])
        d[rows, start + rows] = -1.0  # the point itself sorts first whatever round-off gave its distance
        out[start : start + CHUNK] = np.partition(d, k, axis=1)[:, k]
    return out


def pairwise_distances(a: np.ndarray, b: np.ndarray, ids_a: np.ndarray | None = None, ids_b: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances [len(a), len(b)] in float64 (|a|^2 + |b|^2 - 2 a.b, clipped at 0).

    The expansion leaves round-off of ~1e-8 |a| between equal rows (1e-6 for 2048-D features), which the strict
    `<` of the k-NN balls then counts as inside a ball of radius 0: rows with the same id (`_row_ids`) are
    set exactly 0 apart, as the definitions say."""
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    if ids_a is not None and ids_b is not None:
        sq[ids_a[:, None] == ids_b[None, :]] = 0.0
    return np.sqrt(np.clip(sq, 0, None))


def _row_ids(x: np.ndarray) -> np.ndarray:
    """One integer per row, the same for equal rows (duplicated images give equal features)."""
    return np.unique(x, axis=0, return_inverse=True)[1].reshape(-1)


# ------------------------------------------------------------------------------------------- helpers


def accuracy(predicted: np.ndarray, wanted: np.ndarray) -> float:
    """Fraction of samples the classifier assigns to the class they were asked for."""
    predicted, wanted = np.asarray(predicted), np.asarray(wanted)
    if predicted.shape != wanted.shape or predicted.size == 0:
        raise ValueError(f"predictions {predicted.shape} and labels {wanted.shape} must be the same non-empty shape")
    return float((predicted == wanted).mean())


def per_class_fd(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray) -> dict[int, float]:
    """Frechet distance class by class (classes with at least 2 samples on both sides)."""
    out = {}
    for c in np.union1d(np.unique(real_labels), np.unique(fake_labels)):
        r, f = real[real_labels == c], fake[fake_labels == c]
        if len(r) >= 2 and len(f) >= 2:
            out[int(c)] = frechet_distance_of(r, f)
    return out


def _features(x: np.ndarray, what: str, at_least: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < at_least:
        raise ValueError(f"{what} features must be [N,D] with N >= {at_least}, got shape {x.shape}")
    return x
