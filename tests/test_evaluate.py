"""fm fid / fmcli.evaluate: Frechet distance against an independent computation, folder / prepared / stats
references, the offline Inception error, clean-fid's Inception path (on a stand-in TorchScript file),
`fm fid --ckpt` end to end, and FID during training. All offline, with the tiny feature extractor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from conftest import QuietLog, fm_in_process
from fmcli.errors import UsageError

# torch on one thread for this module's tiny in-process models (conftest.one_thread): the same checks, faster.
pytestmark = pytest.mark.usefixtures("one_thread")


NOISE_LEVELS = (8, 24, 64)


# ------------------------------------------------------------------------------------------ fixtures


def _save_pngs(x: np.ndarray, folder: Path) -> Path:
    """uint8 [N,C,H,W] -> one PNG per image (grayscale as mode L)."""
    folder.mkdir(parents=True)
    for i, img in enumerate(x):
        arr = img.transpose(1, 2, 0)
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f"{i:05d}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A prepared 16px shapes dataset, its images as PNGs, and noisier copies of them."""
    from fmcli.data.shapes import prepare_shapes

    root = tmp_path_factory.mktemp("fid")
    prepared = prepare_shapes(root / "prepared", size=16, count=96, seed=3)
    x = np.load(prepared / "x.npy")
    folders = {0: _save_pngs(x, root / "clean")}
    rng = np.random.default_rng(0)
    for s in NOISE_LEVELS:
        noisy = np.clip(np.round(x + s * rng.normal(size=x.shape)), 0, 255).astype(np.uint8)
        folders[s] = _save_pngs(noisy, root / f"noise{s}")
    return {"root": root, "prepared": prepared, "x": x, "folders": folders}


def _json(result) -> dict:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ------------------------------------------------------------------------ Frechet distance, reference


def _independent_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr sqrt(S1^1/2 S2 S1^1/2), with scipy's sqrtm throughout."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = scipy.linalg.sqrtm(s1).real
    middle = r1 @ s2 @ r1
    middle = (middle + middle.T) / 2
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(middle).real))


def _eigen_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """The same quantity through symmetric eigendecompositions (robust for rank-deficient covariances)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    e = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(e).sum())


@pytest.mark.parametrize(
    "n,d,rank,jitter",
    [
        (400, 16, 16, 0.0),  # well conditioned
        (300, 32, 4, 0.0),  # rank 4 covariances in 32 dimensions
        (300, 32, 4, 1e-7),  # near-singular: tiny full-rank jitter on a rank-4 structure
        (24, 48, 48, 0.0),  # fewer samples than dimensions: rank <= 23
    ],
)
def test_frechet_distance_matches_independent_computation(n, d, rank, jitter):
    from fmcli.evaluate import frechet_distance, statistics_of

    rng = np.random.default_rng(n + d + rank)
    mix1, mix2 = rng.normal(size=(rank, d)), rng.normal(size=(rank, d))
    f1 = rng.normal(size=(n, rank)) @ mix1 + jitter * rng.normal(size=(n, d))
    f2 = rng.normal(size=(n, rank)) @ mix2 + 0.5 + jitter * rng.normal(size=(n, d))
    s1, s2 = statistics_of(f1, "x", 8), statistics_of(f2, "x", 8)
    np.testing.assert_allclose(s1.mu, f1.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s1.sigma, np.cov(f1, rowvar=False), rtol=1e-12)
    got = frechet_distance(s1, s2)
    expected = _eigen_fid(f1, f2)
    assert got == pytest.approx(expected, rel=1e-6)
    if rank == d and n > d:  # scipy's sqrtm of a singular matrix is itself inexact; use it where it is exact
        assert got == pytest.approx(_independent_fid(f1, f2), rel=1e-6)
    # Identical statistics: zero (up to rounding, relative to the covariance scale).
    assert abs(frechet_distance(s1, s1)) < 1e-6 * np.trace(s1.sigma)


def test_statistics_mismatch_is_a_clear_error(data, tmp_path):
    from fmcli.evaluate import TinyExtractor, frechet_distance, load_statistics, reference_statistics, statistics_of

    tiny = TinyExtractor()
    stats = reference_statistics(data["prepared"], tiny)
    path = stats.save(tmp_path / "s.npz")

    class Other:
        name, input_size = "other-v0", 8

    with pytest.raises(UsageError, match="tiny-randconv-v1"):
        load_statistics(path, Other())
    loaded = load_statistics(path, tiny)
    assert (loaded.features, loaded.image_size, loaded.count) == (tiny.name, 16, 96)
    with pytest.raises(UsageError, match="image sizes differ"):
        frechet_distance(statistics_of(np.random.default_rng(0).normal(size=(10, 64)), tiny.name, 32), loaded)
    with pytest.raises(UsageError, match="feature extractors differ"):
        frechet_distance(statistics_of(np.random.default_rng(0).normal(size=(10, 64)), "other-v0", 16), loaded)


# ------------------------------------------------------------------------------ references and the CLI


def _fid(**kwargs) -> dict:
    """`fm fid` in-process (same code path as the CLI body, without the subprocess start-up)."""
    from fmcli.cli.evaluate import fid_checked as fid_command

    args = dict(gen=None, ckpt=None, save_stats=None, features="tiny", inception=None, num_samples=None, sample_overrides=None,
                seed=0, batch_size=64, ema=True, out=None, kid=False, force=False, device=torch.device("cpu"), log=lambda m: None)
    return fid_command(**{**args, **kwargs})


def test_identical_folders_score_zero_and_noise_increases_fid(data):
    out = _json(fm_in_process("fid", "--gen", data["folders"][0], "--ref", data["folders"][0], "--features", "tiny", "--kid", "--json"))
    assert abs(out["fid"]) < 1e-8
    assert out["num_samples"] == out["ref_count"] == 96
    assert out["features"] == "tiny-randconv-v1" and out["comparable_to_published"] is False
    assert np.isfinite(out["kid"])
    fids = [_fid(gen=data["folders"][s], ref=data["folders"][0])["fid"] for s in NOISE_LEVELS]
    assert 1e-6 < fids[0] < fids[1] < fids[2], fids


def test_save_stats_then_stats_ref_equals_folder_and_prepared_refs(data, tmp_path):
    stats = tmp_path / "ref.npz"
    saved = fm_in_process("fid", "--ref", data["prepared"], "--save-stats", stats, "--features", "tiny")
    assert saved.returncode == 0, saved.stderr
    assert saved.stdout.strip() == str(stats) and stats.is_file()
    with pytest.raises(UsageError, match="--force"):
        _fid(ref=data["prepared"], save_stats=stats)

    noisy = data["folders"][24]
    via_stats = _json(fm_in_process("fid", "--gen", noisy, "--ref", stats, "--features", "tiny", "--json"))
    via_prepared = _fid(gen=noisy, ref=data["prepared"])
    via_folder = _fid(gen=noisy, ref=data["folders"][0])
    assert via_stats["fid"] > 1e-6
    assert via_stats["fid"] == pytest.approx(via_prepared["fid"], rel=1e-9)
    assert via_stats["fid"] == pytest.approx(via_folder["fid"], rel=1e-9)
    assert via_stats["ref_count"] == 96


def test_grayscale_prepared_and_folder_give_identical_features(tmp_path):
    from fmcli.data.dataset import PreparedWriter
    from fmcli.evaluate import TinyExtractor, folder_features, prepared_features

    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(12, 1, 16, 16), dtype=np.uint8)
    with PreparedWriter(tmp_path / "gray", 12, (1, 16, 16)) as w:
        for img in x:
            w.add(img)
        w.finish()
    folder = _save_pngs(x, tmp_path / "gray-png")
    tiny = TinyExtractor()
    a, size_a = prepared_features(tmp_path / "gray", tiny)
    b, size_b = folder_features(folder, tiny)
    np.testing.assert_array_equal(a, b)
    assert size_a == size_b == 16
    # Grayscale means three equal channels.
    np.testing.assert_array_equal(a, tiny(torch.from_numpy(x).repeat(1, 3, 1, 1)))


def test_tiny_extractor_is_deterministic_and_pluggable_by_module_path(data):
    from fmcli.evaluate import TinyExtractor, build_extractor

    images = torch.from_numpy(data["x"][:8])
    a = TinyExtractor()(images)
    b = build_extractor("fmcli.evaluate:TinyExtractor")(images)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (8, 64)
    with pytest.raises(UsageError, match="unknown --features"):
        build_extractor("nope")


def test_missing_inception_weights_exit_2_with_one_line_and_empty_stdout(data, tmp_path):
    result = fm_in_process("fid", "--gen", data["folders"][0], "--ref", data["folders"][0], env={"FM_INCEPTION": ""})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "inception-2015-12-05.pt" in lines[0] and "https://nvlabs-fi-cdn.nvidia.com/" in lines[0] and "--inception" in lines[0]
    with pytest.raises(UsageError, match="not found"):
        _fid(gen=data["folders"][0], ref=data["folders"][0], features="inception", inception=str(tmp_path / "none.pt"))


def test_inception_path_uses_cleanfid_resize_and_network(data, tmp_path, monkeypatch):
    """A stand-in TorchScript file with the Inception file's interface (a `layers` module returning
    [B,2048,1,1]) checks the wiring: PIL bicubic (float, per channel) to 299, (x - 128) / 128, layers."""
    from fmcli.evaluate import InceptionExtractor, build_extractor

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = torch.nn.Sequential(torch.nn.AvgPool2d(13), torch.nn.Conv2d(3, 2048, 3), torch.nn.AdaptiveAvgPool2d(1))

        def forward(self, x, return_features: bool = False):
            return self.layers(x)

    scripted = torch.jit.script(StandIn())
    (tmp_path / "weights").mkdir()
    scripted.save(str(tmp_path / "weights" / "inception-2015-12-05.pt"))
    monkeypatch.setenv("FM_INCEPTION", str(tmp_path / "weights"))  # a directory holding the file
    extractor = build_extractor("inception", unverified=True)  # a stand-in file: its sha256 is not the reference one
    assert isinstance(extractor, InceptionExtractor) and extractor.name == "inception-v3-clean"

    images = data["x"][:3]
    got = extractor(torch.from_numpy(images))
    resized = []
    for img in images:
        channels = [np.asarray(Image.fromarray(c.astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC)).clip(0, 255) for c in img]
        resized.append(np.stack(channels))
    x = (torch.from_numpy(np.stack(resized)) - 128) / 128
    with torch.no_grad():
        expected = scripted.layers(x).view(3, 2048).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- checkpoints and training


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A 4-step debug-preset run with FID every 2 steps (tiny features), and the same run without it."""
    from fmcli.config import load_config
    from fmcli.train import train

    common = ["train.steps=4", "train.checkpoint_every=0", "train.log_every=2", f"data.path='{data['prepared']}'"]
    evals = ["eval.every=2", "eval.num_samples=12", f"eval.ref='{data['folders'][0]}'", "eval.features='tiny'"]
    root = tmp_path_factory.mktemp("runs")
    with_eval = train(load_config("debug", common + evals), root / "with-eval", log=QuietLog())
    without = train(load_config("debug", common), root / "without-eval", log=QuietLog())
    return with_eval, without



def test_fid_during_training_is_logged_and_leaves_training_unchanged(trained):
    with_eval, without = trained
    assert with_eval.losses == without.losses  # evaluation draws no randomness from the training streams
    records = [json.loads(line) for line in (with_eval.run_dir / "metrics.jsonl").read_text().splitlines()]
    fids = [r for r in records if "fid" in r]
    assert [r["step"] for r in fids] == [2, 4]
    assert all(np.isfinite(r["fid"]) and r["fid"] > 0 and r["fid_num_samples"] == 12 for r in fids)
    assert all("fid" not in r for r in (json.loads(line) for line in (without.run_dir / "metrics.jsonl").read_text().splitlines()))


def test_eval_every_without_ref_says_so_and_trains_without_fid(data, tmp_path):
    from fmcli.config import load_config
    from fmcli.train import train

    class Recording(QuietLog):
        lines: list = []

        def info(self, message):
            self.lines.append(message)

    log = Recording()
    cfg = load_config("debug", [f"data.path='{data['prepared']}'", "eval.every=2", "eval.features='tiny'", "train.steps=2"])
    train(cfg, tmp_path / "run", log=log)
    assert any("eval.ref is unset" in line for line in log.lines)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all("fid" not in r for r in records)


def test_fid_from_checkpoint_end_to_end(trained, data, tmp_path):
    from fmcli.evaluate import TinyExtractor, folder_features, frechet_distance, reference_statistics, statistics_of

    run_dir = trained[0].run_dir
    out_dir = tmp_path / "samples"
    result = _json(
        fm_in_process("fid", "--ckpt", run_dir, "--num-samples", 12, "--ref", data["folders"][0], "--features", "tiny", "--steps", 3, "--batch-size", 5, "--out", out_dir, "--json")
    )
    assert result["num_samples"] == 12 and result["nfe_per_sample"] == 3 and result["steps"] == 3
    assert result["gen_seconds"] > 0 and np.isfinite(result["fid"]) and result["fid"] > 0
    assert sorted(p.name for p in out_dir.glob("*.png")) == [f"{i:06d}.png" for i in range(12)]
    # Scoring in memory equals scoring the PNGs it wrote (same uint8 values).
    tiny = TinyExtractor()
    feats, size = folder_features(out_dir, tiny)
    from_pngs = frechet_distance(statistics_of(feats, tiny.name, size), reference_statistics(data["folders"][0], tiny))
    assert result["fid"] == pytest.approx(from_pngs, rel=1e-9)


def test_sharded_nfe_is_the_mean_over_every_ranks_samples(monkeypatch):
    # dopri5 adapts per batch, so ranks report different NFE: the result must average all samples, not rank 0's.
    # Two ranks are emulated: rank 1's gathered objects come from what rank 1 would have produced.
    from fmcli import distributed as D
    from fmcli import evaluate as E

    nfe_of_rank = {0: 20.0, 1: 32.0}  # rank 0 draws samples 0, 2, 4; rank 1 draws 1, 3

    def fake_generate(loaded, indices, extractors, **_):
        rank = indices[0] % 2
        return E.GeneratedFeatures(feats={"x": np.array([[float(i)] for i in indices])}, labels=None,
                                   nfe_per_sample=nfe_of_rank[rank], gen_seconds=1.0 + rank, nfe_max=int(nfe_of_rank[rank]) + 6)  # fmt: skip

    rank1 = fake_generate(None, [1, 3], {})

    def fake_all_gather(obj, ctx):
        if isinstance(obj, list):  # gather_in_index_order's (index, row) pairs
            return [obj, list(zip([1, 3], rank1.feats["x"]))]
        if isinstance(obj, tuple):  # (NFE total, sample count, largest NFE)
            return [obj, (rank1.nfe_per_sample * 2, 2, rank1.nfe_max)]
        return [obj, rank1.gen_seconds]

    monkeypatch.setattr(E, "generate_features", fake_generate)
    monkeypatch.setattr(D, "all_gather_objects", fake_all_gather)
    got = E.sharded_features(None, 5, {"x": None}, seed=0, sample_cfg=None, batch_size=8, device="cpu", ctx=D.DistContext(rank=0, world_size=2))
    assert got.nfe_per_sample == pytest.approx((3 * 20 + 2 * 32) / 5) and got.nfe_max == 38  # rank 1's largest
    assert got.feats["x"][:, 0].tolist() == [0, 1, 2, 3, 4] and got.gen_seconds == 2.0


def test_scored_folders_skip_only_the_grid_fm_sample_writes_beside_its_samples(tmp_path):
    """`fm sample --out DIR` writes DIR/grid.png beside DIR/NNNNNN.png: the grid is a montage, not a sample, and
    counting it would skew the score. A grid.png among a user's own images is an ordinary image."""
    from fmcli.evaluate import image_files

    img = Image.new("RGB", (8, 8))
    sampled = tmp_path / "sampled"
    (sampled / "nfe-4").mkdir(parents=True)
    for folder in (sampled, sampled / "nfe-4"):
        for name in ("000000.png", "000001.png", "grid.png"):
            img.save(folder / name)
    assert [p.relative_to(sampled).as_posix() for p in image_files(sampled)] == ["000000.png", "000001.png", "nfe-4/000000.png", "nfe-4/000001.png"]
    notes = []
    image_files(sampled, notes.append)
    assert len(notes) == 1 and "grid.png and 1 more" in notes[0]  # said once, on stderr

    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("cat.png", "grid.png", "0001.png"):
        img.save(mine / name)
    assert [p.name for p in image_files(mine)] == ["0001.png", "cat.png", "grid.png"]


def test_an_nfe_sweep_refuses_to_replace_its_samples_without_force(debug_run, shapes16, tmp_path):
    """`fm fid --nfe 2,4 --out DIR` writes DIR/nfe-2/, DIR/nfe-4/: a second run replaced those samples without
    --force (only DIR/NNNNNN.png, which a sweep never writes, was checked)."""
    out = tmp_path / "sweep"
    (out / "nfe-4").mkdir(parents=True)
    mine = out / "nfe-4" / "000001.png"
    Image.new("RGB", (16, 16), (9, 9, 9)).save(mine)
    before = mine.read_bytes()
    common = ("fid", "--ckpt", debug_run, "-n", 3, "--ref", shapes16, "--features", "tiny", "--nfe", "2,4", "--out", out)
    result = fm_in_process(*common)
    assert result.returncode == 2 and "nfe-4/000001.png already exists" in result.stderr and "--force" in result.stderr
    assert mine.read_bytes() == before and not (out / "nfe-2").exists()  # refused before any sample was written
    forced = fm_in_process(*common, "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert mine.read_bytes() != before and sorted(p.name for p in (out / "nfe-2").iterdir()) == [f"{i:06d}.png" for i in range(3)]


def test_fid_json_rows_name_the_checkpoint_and_the_guidance_interval(debug_run, shapes16):
    """A row of `fm fid --json` says what ran: the checkpoint and the guidance interval (absent before, so two sweeps at
    other intervals or of other checkpoints could not be told apart, and `fm plot` joined them into one curve)."""
    res = fm_in_process("fid", "--ckpt", debug_run, "-n", 2, "--ref", shapes16, "--features", "tiny", "--nfe", "2", "--cfg", "2",
                 "--guidance-interval", "0.25,1", "--solver", "euler-sde", "--json")
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)
    assert (row["ckpt"], row["guidance_interval"], row["sde_noise"], row["cfg"]) == (str(debug_run), [0.25, 1.0], 1.0, 2.0)
    assert "guide_ckpt" not in row  # cfg guidance: no guide ran
    from fmcli.checkpoint import resolve_checkpoint

    guide = str(resolve_checkpoint(debug_run))
    auto = fm_in_process("fid", "--ckpt", debug_run, "-n", 2, "--ref", shapes16, "--features", "tiny", "--steps", 2, "--cfg", "2", "--guide-ckpt", guide, "--json")
    assert auto.returncode == 0, auto.stderr
    assert (json.loads(auto.stdout)["guidance"], json.loads(auto.stdout)["guide_ckpt"]) == ("auto", guide)


def test_fid_refuses_a_model_of_another_size_before_the_reference_pass(debug_run, tmp_path):
    """A prepared reference's image size is in its manifest: a 16px model against 8px data is refused before its
    features are computed (minutes for 50,000 images through Inception), not after."""
    from fmcli.data.shapes import prepare_shapes

    small = prepare_shapes(tmp_path / "shapes8", size=8, count=40, seed=1)
    result = fm_in_process("fid", "--ckpt", debug_run, "-n", 4, "--ref", small, "--features", "tiny")
    assert result.returncode == 2 and "image sizes differ: the model makes 16px images, the reference is 8px" in result.stderr
    assert "features of" not in result.stderr and "Traceback" not in result.stderr


def test_fid_of_an_empty_gen_folder_is_refused_before_the_reference_pass(data, tmp_path, monkeypatch):
    """An empty --gen is found before the reference's features are computed (minutes for a large dataset)."""
    import fmcli.evaluate

    passes = []
    monkeypatch.setattr(fmcli.evaluate, "reference_statistics", lambda *a, **k: passes.append(a) or pytest.fail("reference pass ran"))
    (tmp_path / "gen").mkdir()
    res = fm_in_process("fid", "--gen", str(tmp_path / "gen"), "--ref", str(data["prepared"]), "--features", "tiny")
    assert res.returncode == 2 and not passes
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: --gen {tmp_path / 'gen'} holds no images (")


def test_save_stats_needs_an_npz_name(data, tmp_path):
    """Statistics saved under another name could not be read back: --ref takes statistics only from a .npz."""
    res = fm_in_process("fid", "--ref", str(data["prepared"]), "--save-stats", str(tmp_path / "ref.txt"), "--features", "tiny")
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [f"error: --save-stats expects a .npz file name, got {tmp_path / 'ref.txt'}"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("zero_init", [1, 2])
def test_an_nfe_budget_with_cfg_zero_gets_the_most_steps_whose_real_nfe_fits(zero_init):
    """cfg-zero's zero-init steps evaluate no network, but `--nfe N` gave the steps of plain sampling: every budget
    ran under-spent (euler at 4: 3 NFE) and heun or ab2 at 2 was refused ("zero_init_steps (1) must be below steps
    (1)"). Reference: solvers.solve with a counting network, the most steps whose evaluations fit, by brute force."""
    from fmcli.config import SampleConfig
    from fmcli.evaluate import _settings_for_nfe
    from fmcli.solvers import solve

    def real_nfe(solver, steps):
        calls = []
        solve(lambda x, t, *rest: calls.append(1) or torch.zeros_like(x), torch.zeros(1, 2), solver, steps, skip_steps=zero_init,
              noise=lambda i: torch.zeros(1, 2))  # fmt: skip
        return len(calls)

    for solver in ("euler", "midpoint", "heun", "rk4", "ab2", "euler-sde"):
        for budget in range(1, 10):
            fitting = [s for s in range(zero_init + 1, 30) if real_nfe(solver, s) <= budget]
            cfg = SampleConfig(solver=solver, guidance="cfg-zero", cfg=3.0, zero_init_steps=zero_init, steps=zero_init + 1)
            got = _settings_for_nfe(cfg, budget)
            assert (got.steps if got is not None else None) == (max(fitting) if fitting else None), (solver, budget)
    unguided = SampleConfig(solver="euler", guidance="cfg-zero", cfg=1.0, zero_init_steps=zero_init, steps=zero_init + 1)
    assert _settings_for_nfe(unguided, 4).steps == 4  # cfg 1: no zero-init runs, every step costs its NFE
