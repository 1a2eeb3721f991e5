"""fmcli.metrics against independent references: scipy's sqrtm and the closed form for Frechet distance,
clean-fid's KID and a brute-force unbiased MMD, the `prdc` package and a loop-by-loop PRDC."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import scipy.linalg

from fmcli import metrics


def _scipy_fd(f1, f2):
    """Heusel et al.'s formula with scipy's sqrtm of the (non-symmetric) product S1 S2."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fd_matches_scipy_on_well_conditioned_data():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 8)) @ rng.normal(size=(8, 8))
    b = rng.normal(size=(1500, 8)) @ rng.normal(size=(8, 8)) + 0.5
    assert metrics.frechet_distance_of(a, b) == pytest.approx(_scipy_fd(a, b), rel=1e-9)


def test_fd_of_two_gaussians_equals_the_closed_form():
    """2x2: tr sqrt(A B) = sqrt(tr(AB) + 2 sqrt(det A det B)) (the trace of a 2x2 SPD matrix's square root)."""
    mu1, mu2 = np.array([0.3, -1.0]), np.array([1.1, 0.4])
    a = np.array([[2.0, 0.7], [0.7, 1.0]])
    b = np.array([[0.5, -0.2], [-0.2, 3.0]])  # does not commute with a
    tr_sqrt = math.sqrt(np.trace(a @ b) + 2 * math.sqrt(np.linalg.det(a) * np.linalg.det(b)))
    closed = ((mu1 - mu2) ** 2).sum() + np.trace(a) + np.trace(b) - 2 * tr_sqrt
    assert metrics.frechet_distance(mu1, a, mu2, b) == pytest.approx(closed, rel=1e-12)
    # Diagonal (commuting) covariances in 64-D: ||dmu||^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(1)
    da, db, dmu = rng.uniform(0.1, 3, 64), rng.uniform(0.1, 3, 64), rng.normal(size=64)
    expected = (dmu**2).sum() + ((np.sqrt(da) - np.sqrt(db)) ** 2).sum()
    assert metrics.frechet_distance(dmu, np.diag(da), np.zeros(64), np.diag(db)) == pytest.approx(expected, rel=1e-12)


def test_fd_of_rank_deficient_features_is_real_and_zero_for_identical_sets():
    """ReLU features of fewer samples than dimensions: singular covariances. The same set gives 0, and a
    shifted copy gives exactly the squared shift (the covariance terms cancel)."""
    rng = np.random.default_rng(2)
    f = np.maximum(rng.normal(size=(40, 128)), 0)  # rank <= 39 < 128, many exact zeros
    # The square root of the ~89 zero eigenvalues turns their 1e-16 round-off into ~1e-8 each: relative 1e-7.
    tol = 1e-7 * np.trace(np.cov(f, rowvar=False))
    assert abs(metrics.frechet_distance_of(f, f)) < tol
    shift = rng.normal(size=128) * 0.1
    assert metrics.frechet_distance_of(f, f + shift) == pytest.approx((shift**2).sum(), abs=tol)


def test_kid_matches_clean_fid():
    from cleanfid.fid import kernel_distance as cleanfid_kid

    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(300, 16)), rng.normal(size=(250, 16)) * 1.1 + 0.1
    np.random.seed(7)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = cleanfid_kid(fake, real, num_subsets=20, max_subset_size=200)
    assert metrics.kernel_distance(real, fake, num_subsets=20, max_subset_size=200, seed=7) == pytest.approx(reference, rel=1e-12)


def test_kid_on_one_full_subset_is_the_unbiased_mmd():
    """One subset holding every sample: the textbook unbiased MMD^2, written loop by loop."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 3)) + 0.3

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    m = 12
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    assert metrics.kernel_distance(x, y, num_subsets=1) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def _brute_prdc(real, fake, k):
    """Naeem et al.'s definitions written out point by point."""
    def kth(points, i):
        d = sorted(np.linalg.norm(points[i] - points[j]) for j in range(len(points)) if j != i)
        return d[k - 1]

    rr = [kth(real, i) for i in range(len(real))]
    rf = [kth(fake, j) for j in range(len(fake))]
    dist = [[np.linalg.norm(r - f) for f in fake] for r in real]
    n, m = len(real), len(fake)
    return {
        "precision": sum(any(dist[i][j] < rr[i] for i in range(n)) for j in range(m)) / m,
        "recall": sum(any(dist[i][j] < rf[j] for j in range(m)) for i in range(n)) / n,
        "density": sum(dist[i][j] < rr[i] for i in range(n) for j in range(m)) / (k * m),
        "coverage": sum(min(dist[i]) < rr[i] for i in range(n)) / n,
    }


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_brute_force(k, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK", 7)  # several chunks, one ragged
    rng = np.random.default_rng(k)
    real, fake = rng.normal(size=(40, 4)), rng.normal(size=(33, 4)) * 1.5 + 1.0
    got = metrics.prdc(real, fake, k=k)
    want = _brute_prdc(real, fake, k)
    assert got == pytest.approx(want, abs=1e-12)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1  # a case where every term matters


@pytest.mark.parametrize("d", [128, 2048])
def test_prdc_of_duplicated_points_matches_brute_force(d):
    """Equal rows (duplicated images, a collapsed generator) are 0 apart: a real with k copies has a ball of radius 0
    that holds nothing (strict <). The |a|^2 + |b|^2 - 2 a.b expansion left ~1e-6 between equal 2048-D rows and
    counted fakes inside such balls (precision 0.02 where the definition gives 0)."""
    rng = np.random.default_rng(d)
    base = rng.normal(size=(50, d)) * 3
    twice = np.concatenate([base, base])  # every point once more: with k = 1 every ball has radius 0
    assert metrics.prdc(twice, twice.copy(), k=1) == pytest.approx(_brute_prdc(twice, twice, 1), abs=1e-12)
    real = np.concatenate([twice, rng.normal(size=(10, d)) * 3])  # and 10 single points
    fake = np.concatenate([base[:25], base])  # 25 points twice, 25 once
    for k in (1, 2):
        assert metrics.prdc(real, fake, k=k) == pytest.approx(_brute_prdc(real, fake, k), abs=1e-12), k
    same = np.concatenate([base] * 6)  # k = 5 copies of every other point
    assert metrics.prdc(same, same, k=5) == pytest.approx(_brute_prdc(same, same, 5), abs=1e-12)
    assert metrics.kth_neighbour_distance(same, 5).max() == 0.0


def test_prdc_matches_the_prdc_package():
    prdc = pytest.importorskip("prdc")
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(500, 32)), rng.normal(size=(400, 32)) * 1.2 + 0.2
    with contextlib.redirect_stdout(io.StringIO()):
        want = prdc.compute_prdc(real, fake, nearest_k=5)
    assert metrics.prdc(real, fake, k=5) == pytest.approx({k: float(v) for k, v in want.items()}, abs=1e-12)


def test_identical_sets_score_perfectly_and_disjoint_ones_do_not():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(200, 8))
    same = metrics.fidelity(x, x.copy(), kid=True)
    assert same.precision == same.recall == same.coverage == 1.0 and same.density == pytest.approx(1.0)
    far = metrics.fidelity(x, x + 100.0, kid=False)
    assert far.precision == far.recall == far.coverage == far.density == 0.0
    assert far.fd == pytest.approx(8 * 100.0**2, rel=1e-9)


def test_per_class_fd_and_accuracy():
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(60, 3)), rng.normal(size=(60, 3))
    labels = np.arange(60) % 3
    got = metrics.per_class_fd(real, labels, fake, labels)
    assert sorted(got) == [0, 1, 2]
    assert got[1] == pytest.approx(metrics.frechet_distance_of(real[labels == 1], fake[labels == 1]))
    assert metrics.accuracy(np.array([0, 1, 2, 2]), np.array([0, 1, 1, 2])) == 0.75


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="N >= 6"):
        metrics.prdc(np.zeros((5, 2)), np.zeros((10, 2)), k=5)
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
