"""fm eval / fmcli.fidelity and fmcli.features: the domain classifier (deterministic for a seed, a validated
cache), DINOv2 from a local directory, the real-vs-real floor, and the command end to end. All offline, tiny."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fm_in_process
from fmcli.errors import UsageError

STEPS = 25  # classifier steps in tests: seconds, not the default's quality


@pytest.fixture()
def data(tmp_path, shapes16) -> Path:
    """A private copy of the 16px shapes data (classifier caches are written beside it)."""
    import shutil

    return Path(shutil.copytree(shapes16, tmp_path / "shapes16"))


# ------------------------------------------------------------------------------------- the classifier


def test_classifier_is_deterministic_for_a_seed(shapes16):
    from fmcli.classifier import train_classifier

    x, y = np.load(shapes16 / "x.npy")[:200], np.load(shapes16 / "y.npy")[:200]
    before = torch.random.get_rng_state()
    a, acc_a, n_a = train_classifier(x, y, 10, seed=1, steps=STEPS)
    b, acc_b, _ = train_classifier(x, y, 10, seed=1, steps=STEPS)
    c, _, _ = train_classifier(x, y, 10, seed=2, steps=STEPS)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left alone
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert acc_a == acc_b and n_a == 20 and 0 <= acc_a <= 1
    assert not all(torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


class _RowCounter:
    """An [N,C,H,W] uint8 array that counts the rows read from it (a dataset's memory map stands in for it)."""

    def __init__(self, x: np.ndarray):
        self.x, self.rows = x, 0
        self.shape, self.dtype = x.shape, x.dtype

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        out = self.x[index]
        self.rows += len(out)
        return out


def test_classifier_reads_only_the_batches_it_draws(shapes16):
    """The classifier trains from the dataset's memory map batch by batch: it reads its steps x batch rows and
    the held-out ones, never the whole training part into memory (as float32, 4x the dataset's size: a 256px
    labelled folder of 30,000 images asked 24 GB). The weights are those of training on the array in memory."""
    from fmcli.classifier import train_classifier

    x, y = np.load(shapes16 / "x.npy")[:400], np.load(shapes16 / "y.npy")[:400]
    counted = _RowCounter(x)
    a, acc_a, n_out = train_classifier(counted, y, 10, seed=3, steps=5, batch_size=8)
    assert n_out == 40 and counted.rows <= 5 * 8 + n_out  # 80 of 400 rows; the old code read all 360 training rows first
    b, acc_b, _ = train_classifier(x, y, 10, seed=3, steps=5, batch_size=8)
    assert acc_a == acc_b and all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_classifier_cache_is_reused_validated_and_rebuilt(data, monkeypatch):
    from fmcli import classifier, features

    logs = []
    first = features.load_or_train_classifier(data, seed=0, steps=STEPS, log=logs.append)
    path = classifier.default_classifier_path(data, 0)
    assert path.is_file() and any("training" in m for m in logs)

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the cache matched")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    again = features.load_or_train_classifier(data, seed=0, steps=STEPS)
    assert again.key == first.key and again.held_out_accuracy == first.held_out_accuracy
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in first.model.state_dict().items())
    monkeypatch.undo()

    # Another dataset behind the same directory (re-prepared: a new manifest) -> retrained, not trusted.
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "created": "another time"}))
    logs.clear()
    rebuilt = features.load_or_train_classifier(data, seed=0, steps=STEPS, log=logs.append)
    assert rebuilt.key != first.key and any("another dataset" in m for m in logs)

    # A corrupt cache is replaced at the default place...
    path.write_bytes(b"not a checkpoint")
    logs.clear()
    features.load_or_train_classifier(data, seed=0, steps=STEPS, log=logs.append)
    assert any("unreadable" in m for m in logs)
    # ... and refused at a path the user gave; the steps are part of what it was trained for, and the refusal says so
    # (it blamed "another dataset, seed or architecture" for a cache of this data trained with other --classifier-steps).
    shorter = data.parent / "shorter.pt"
    features.load_or_train_classifier(data, seed=0, steps=STEPS - 5, path=shorter)
    with pytest.raises(UsageError, match="shorter.pt: trained for another .*number of training steps"):
        features.load_or_train_classifier(data, seed=0, steps=STEPS, path=shorter)
    mine = data.parent / "mine.pt"
    mine.write_bytes(b"garbage")
    with pytest.raises(UsageError, match="mine.pt: unreadable"):
        features.load_or_train_classifier(data, seed=0, steps=STEPS, path=mine)


def test_unlabelled_data_has_no_domain_classifier(tmp_path):
    from fmcli.data.dataset import PreparedWriter
    from fmcli.features import load_or_train_classifier

    with PreparedWriter(tmp_path / "u", 8, (1, 8, 8), labels=False) as w:
        for _ in range(8):
            w.add(np.zeros((1, 8, 8), np.uint8), None)
        w.finish(num_classes=0, class_names=None, source="test")
    with pytest.raises(UsageError, match="labelled pixel dataset.*; for unlabelled images use the inception, dinov2 or tiny features"):
        load_or_train_classifier(tmp_path / "u")


def test_latent_models_and_data_are_refused_with_the_way_to_score_them(tmp_path):
    """An unconditional latent model's user met three dead ends that named no way out: `fm eval --ckpt` ("latent and
    text models: not yet"), `fm fid --ckpt` ("which `fm fid` does not do yet") and `fm eval --data LATENTS` ("the
    fidelity metrics compare images"). Each now says what to run instead."""
    from types import SimpleNamespace

    from fmcli.data.dataset import PreparedWriter
    from fmcli.evaluate import _check_scorable
    from fmcli.fidelity import _data_shape, check_scorable, prepare_reference

    latent = SimpleNamespace(info={"kind": "latents"}, is_text=False, shape=(4, 8, 8))
    text = SimpleNamespace(info={"kind": "pixels"}, is_text=True, shape=(3, 16, 16))
    with pytest.raises(UsageError, match=r"not latent ones: write the samples with `fm sample --ckpt CKPT -n N --out DIR` and score them "
                                         r"with `fm eval --gen DIR --data PIXELS`"):  # fmt: skip
        check_scorable(latent)
    with pytest.raises(UsageError, match=r"not text ones: .*`fm sample --ckpt CKPT -n N --prompts FILE --out DIR`"):
        check_scorable(text)
    with pytest.raises(UsageError, match=r"not latent ones: .*`fm sample --ckpt CKPT -n N --out DIR` and score them with --gen DIR"):
        _check_scorable(latent, None)
    with PreparedWriter(tmp_path / "lat", 12, (4, 2, 2), dtype="float16", kind="latents", labels=False) as w:
        for _ in range(12):
            w.add(np.zeros((4, 2, 2), np.float16), None)
        w.finish(num_classes=0, class_names=None, source="test")
    for refuse in (lambda: _data_shape(tmp_path / "lat"), lambda: prepare_reference(tmp_path / "lat", {}, 6)):
        with pytest.raises(UsageError, match=r"holds latents, not pixels: .*pass a pixel dataset of the same images \(`fm prepare-data` without --vae\)"):
            refuse()


# --------------------------------------------------------------------------------------------- DINOv2


def test_dinov2_features_from_a_local_directory(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    from fmcli.features import Dinov2Extractor, resolve_dinov2_path

    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=7)
    Dinov2Model(cfg).save_pretrained(tmp_path / "dino")
    ext = Dinov2Extractor(resolve_dinov2_path(str(tmp_path / "dino")), "cpu")
    images = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    feats = ext(images)
    assert feats.shape == (5, 32) and feats.dtype == np.float64
    # Reference: the CLS token after the final layer norm, computed from the hidden states by hand.
    x = torch.nn.functional.interpolate(images.float() / 255, size=(28, 28), mode="bicubic", antialias=True).clamp(0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        out = ext.model(pixel_values=x, output_hidden_states=True)
        cls = ext.model.layernorm(out.hidden_states[-1])[:, 0]
    np.testing.assert_allclose(feats, cls.double().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(UsageError, match="no config.json"):
        resolve_dinov2_path(str(tmp_path))


# ------------------------------------------------------------------------------------------ the floor


def test_halves_are_disjoint_and_seeded():
    from fmcli.fidelity import split_halves

    a, b = split_halves(101, seed=0)
    assert len(a) == 50 and len(b) == 51 and not set(a) & set(b) and set(a) | set(b) == set(range(101))
    assert np.array_equal(split_halves(101, seed=0)[0], a) and not np.array_equal(split_halves(101, seed=1)[0], a)


def test_reference_and_floor_are_random_draws_of_a_dataset_stored_class_by_class(data, tmp_path):
    """`fm prepare-data folder` stores class folders one after the other. The reference and the floor took the lowest
    `n` indices of each (sorted) half: on such data, the first classes only (100 of 512 shapes: 2 or 3 of 10 classes),
    so every sample of another class was far from the reference while the floor looked fine. Each must hold the
    classes in about the data's proportions: hypergeometric counts, within 4 standard deviations of n * share."""
    import shutil

    from fmcli.fidelity import prepare_reference

    by_class = Path(shutil.copytree(data, tmp_path / "by-class", ignore=shutil.ignore_patterns("fm-classifier*")))
    x, y = np.load(by_class / "x.npy"), np.load(by_class / "y.npy")
    order = np.argsort(y, kind="stable")
    np.save(by_class / "x.npy", x[order])
    np.save(by_class / "y.npy", y[order])
    mean_pixel = lambda images: images.double().flatten(1).mean(1, keepdim=True).numpy()  # noqa: E731 (any extractor)
    n, total = 100, len(y)
    reference = prepare_reference(by_class, {"pixels": mean_pixel}, n)
    share = np.bincount(y, minlength=10) / total
    sd = np.sqrt(n * share * (1 - share) * (total / 2 - n) / (total / 2 - 1))  # hypergeometric, n of a half of total / 2
    for labels in (reference.ref_labels, reference.floor_labels):
        counts = np.bincount(labels, minlength=10)
        assert len(labels) == n and (counts > 0).all(), counts
        assert (np.abs(counts - n * share) <= 4 * sd + 1).all(), (counts, n * share)


def _json(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_eval_of_the_floor_images_scores_the_floor(data, tmp_path):
    """The floor half saved as PNGs and scored with --gen gives exactly the floor's numbers, and the floor's
    precision/recall/density/coverage equal the `prdc` package's on the same features."""
    from fmcli import classifier, features
    from fmcli.fidelity import split_halves

    x = np.load(data / "x.npy")
    n = 40
    floor_idx, ref_idx = split_halves(len(x), seed=0)
    folder = tmp_path / "gen"
    folder.mkdir()
    for j, i in enumerate(np.sort(floor_idx[:n])):  # the floor's n images, in the order the floor reads them
        Image.fromarray(x[i].transpose(1, 2, 0)).save(folder / f"{j:04d}.png")
    rows = _json(fm_in_process("eval", "--gen", folder, "--data", data, "--classifier-steps", STEPS, "--splits", "1", "--json"))
    (row,) = rows
    assert row["num_samples"] == n and row["floor"]["floor_count"] == n and row["floor"]["ref_count"] == n
    for key, value in row["floor"]["metrics"]["domain"].items():
        assert row["metrics"]["domain"][key] == pytest.approx(value, rel=1e-9, abs=1e-12), key

    trained = features.load_or_train_classifier(data, seed=0, steps=STEPS)
    ext = features.DomainExtractor(trained, 3, "cpu")
    real, fake = ext(torch.from_numpy(x[ref_idx[:n]])), ext(torch.from_numpy(x[floor_idx[:n]]))
    prdc = pytest.importorskip("prdc")
    with contextlib.redirect_stdout(io.StringIO()):
        want = prdc.compute_prdc(real, fake, nearest_k=5)
    got = row["floor"]["metrics"]["domain"]
    assert {k: got[k] for k in want} == pytest.approx({k: float(v) for k, v in want.items()}, abs=1e-12)
    assert row["floor"]["accuracy"] == trained.held_out_accuracy


def test_scores_over_several_reference_draws_are_each_draws_mean_and_spread(data, tmp_path):
    """--splits 3: every number is the mean over three seeded splits of the data, each scored on its own here (the
    classifier's features of each draw's images, the metrics of fmcli.metrics), and each metric's `_sd` is the
    sample standard deviation over them. A single draw of n = 40 moves FD a lot, which is why there are several."""
    from fmcli import features, metrics
    from fmcli.fidelity import split_halves

    x = np.load(data / "x.npy")
    n, folder = 40, tmp_path / "gen"
    folder.mkdir()
    for j in range(n):  # any 40 images: the last ones of the data, flipped left-right
        Image.fromarray(np.ascontiguousarray(x[-1 - j].transpose(1, 2, 0)[:, ::-1])).save(folder / f"{j:04d}.png")
    (row,) = _json(fm_in_process("eval", "--gen", folder, "--data", data, "--classifier-steps", STEPS, "--splits", "3", "--no-kid", "--json"))
    ext = features.DomainExtractor(features.load_or_train_classifier(data, seed=0, steps=STEPS), 3, "cpu")
    gen = ext(torch.from_numpy(np.stack([x[-1 - j][:, :, ::-1] for j in range(n)])))
    per_draw = {"fd": [], "recall": [], "floor_fd": [], "floor_recall": []}
    for seed in range(3):
        floor_idx, ref_idx = split_halves(len(x), seed)
        ref, flo = (ext(torch.from_numpy(x[np.sort(idx[:n])])) for idx in (ref_idx, floor_idx))
        for prefix, fake in (("", gen), ("floor_", flo)):
            scores = metrics.fidelity(ref, fake, k=5, kid=False)
            per_draw[prefix + "fd"].append(scores.fd)
            per_draw[prefix + "recall"].append(scores.recall)
    got, floor = row["metrics"]["domain"], row["floor"]["metrics"]["domain"]
    assert row["floor"]["splits"] == 3
    for key in ("fd", "recall"):
        assert got[key] == pytest.approx(np.mean(per_draw[key]), rel=1e-6)
        assert got[f"{key}_sd"] == pytest.approx(np.std(per_draw[key], ddof=1), rel=1e-6, abs=1e-9)
        assert floor[key] == pytest.approx(np.mean(per_draw["floor_" + key]), rel=1e-6)
        assert floor[f"{key}_sd"] == pytest.approx(np.std(per_draw["floor_" + key], ddof=1), rel=1e-6, abs=1e-9)
    assert len(set(np.round(per_draw["floor_fd"], 6))) == 3  # three different draws, not one scored three times


def test_eval_sweeps_guidance_of_a_checkpoint(data, debug_run):
    result = fm_in_process("eval", "--ckpt", debug_run, "--data", data, "-n", 30, "--classifier-steps", STEPS, "--cfg", "1,2",
                    "--guidance-interval", "0,1", "--guidance-interval", "0.3,1", "--steps", 2, "--no-kid", "--json")  # fmt: skip
    rows = _json(result)
    # cfg 1 is the model alone at every t: no interval ran, and both intervals give that one run, so one row of it.
    assert [(r["cfg"], r["guidance_interval"]) for r in rows] == [(1.0, None), (2.0, [0.0, 1.0]), (2.0, [0.3, 1.0])]
    assert all(r["ckpt"] == str(debug_run) for r in rows)  # which model, as fm fid's rows say: appended files stay apart
    unguided = _json(fm_in_process("eval", "--ckpt", debug_run, "--data", data, "-n", 30, "--classifier-steps", STEPS, "--cfg", "1",
                                   "--steps", 2, "--no-kid", "--json"))[0]  # fmt: skip
    assert rows[0]["metrics"] == unguided["metrics"] and rows[0]["accuracy"] == unguided["accuracy"]
    for r in rows:
        m = r["metrics"]["domain"]
        metric_names = {"fd", "precision", "recall", "density", "coverage"}  # each with its spread over the reference draws
        assert set(m) == metric_names | {f"{k}_sd" for k in metric_names} and 0 <= r["accuracy"] <= 1
        assert r["num_samples"] == 30 and r["steps"] == 2
        # Classes with at least 2 images among both the 30 references and the 30 samples (3 of each class).
        assert 5 <= len(r["per_class_fd"]) <= 10 and r["per_class_fd_mean"] == pytest.approx(np.mean(list(r["per_class_fd"].values())))
    assert rows[0]["nfe_per_sample"] == 2 and rows[1]["nfe_per_sample"] == 2  # CFG's [cond; uncond] batch: one NFE
    # The plain table: the floor first, then one line per setting.
    table = fm_in_process("eval", "--ckpt", debug_run, "--data", data, "-n", 12, "--classifier-steps", STEPS, "--steps", 1, "--no-kid")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].startswith("real vs real (12 vs 12, 5 draws)") and "euler" in lines[2]


def test_eval_autoguidance_by_the_model_itself_is_the_unguided_model(data, debug_run, tmp_path):
    # v = v_guide + w (v_main - v_guide) is v_main whatever w when the guide is the model: the rows must equal
    # the unguided ones. A perturbed guide must change them (the guide is really evaluated).
    from fmcli.checkpoint import load_checkpoint, resolve_checkpoint

    ckpt = str(resolve_checkpoint(debug_run))
    state = load_checkpoint(ckpt)
    state["ema"] = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["ema"].items()}
    other = tmp_path / "perturbed-guide.pt"
    torch.save(state, other)
    common = ("eval", "--ckpt", debug_run, "--data", data, "-n", 20, "--classifier-steps", STEPS, "--steps", 3, "--no-kid", "--json")
    plain = _json(fm_in_process(*common, "--cfg", "1"))[0]
    rows = _json(fm_in_process(*common, "--cfg", "2,3", "--guide-ckpt", ckpt))
    assert [(r["guidance"], r["cfg"]) for r in rows] == [("auto", 2.0), ("auto", 3.0)]
    assert [r.get("guide_ckpt") for r in rows] == [ckpt, ckpt] and "guide_ckpt" not in plain  # each row names the guide that ran, as fm fid's do
    for r in rows:
        assert r["metrics"]["domain"] == pytest.approx(plain["metrics"]["domain"], rel=1e-4, abs=1e-6) and r["accuracy"] == plain["accuracy"]
    guided = _json(fm_in_process(*common, "--cfg", "3", "--guide-ckpt", other))[0]
    assert guided["metrics"]["domain"]["fd"] != pytest.approx(plain["metrics"]["domain"]["fd"], rel=1e-3)
    no_guide = fm_in_process(*common, "--cfg", "2", "--guidance", "auto")
    assert no_guide.returncode == 2 and "--guidance auto needs --guide-ckpt" in no_guide.stderr and "Traceback" not in no_guide.stderr


def test_eval_precision_and_compile_reach_the_sampler_and_its_rows(data, debug_run, monkeypatch):
    """fm eval --precision/--compile as fm fid's: the network runs at the precision given on the command line (the
    checkpoint's sample.precision, fp32 in `debug`, without it), compiled with --compile, and each --json row says
    what ran; a bad value is one line, exit 2, before any work."""
    from fmcli import generate

    ran, compiled = [], []
    real_autocast = generate.autocast
    monkeypatch.setattr(generate, "autocast", lambda precision, device: ran.append(precision) or real_autocast(precision, device))
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: compiled.append(module) or module)  # no inductor build on a CPU test
    common = ("eval", "--ckpt", debug_run, "--data", data, "-n", 8, "--classifier-steps", STEPS, "--steps", 1, "--no-kid", "--json")
    default = _json(fm_in_process(*common))
    assert set(ran) == {"fp32"} and not compiled and (default[0]["precision"], default[0]["compile"]) == ("fp32", False)
    ran.clear()
    given = _json(fm_in_process(*common, "--precision", "bf16", "--compile"))
    assert set(ran) == {"bf16"} and len(compiled) == 1 and (given[0]["precision"], given[0]["compile"]) == ("bf16", True)
    for bad, message in (("fp64", "invalid precision (--precision)"), ("fp16", "needs a CUDA device")):
        result = fm_in_process("eval", "--ckpt", debug_run, "--data", data, "-n", 8, "--device", "cpu", "--precision", bad)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["--data", "{data}"], "score either a checkpoint"),
        (["--data", "{data}", "--gen", "{data}", "--guide-ckpt", "g.pt"], "--guide-ckpt go with --ckpt"),
        (["--data", "{data}", "--ckpt", "x.pt"], "--ckpt needs --num-samples"),
        (["--data", "{data}", "--gen", "{data}", "--features", "bogus"], "choose among"),
        (["--data", "{data}", "--gen", "{gen}", "--features", "dinov2"], "DINOv2 weights not given"),
        (["--data", "{data}", "--gen", "{data}", "--cfg", "1,x"], "--cfg expects numbers"),
        (["--data", "nowhere", "--gen", "{data}"], "not a prepared dataset"),
    ],
)
def test_eval_bad_input_is_one_line_and_exit_2(data, tmp_path, args, message):
    gen = tmp_path / "gen"  # a folder fm eval can score (the data folder holds no images)
    gen.mkdir()
    for i, img in enumerate(np.load(data / "x.npy")[:6]):
        Image.fromarray(img.transpose(1, 2, 0)).save(gen / f"{i:06d}.png")
    result = fm_in_process("eval", *[a.format(data=data, gen=gen) for a in args], env={"FM_DINOV2": ""})
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_eval_refuses_what_it_cannot_score_before_the_classifier_trains(data, debug_run, tmp_path, monkeypatch):
    """A model of another image shape, an NFE budget its solver cannot meet, and a --gen folder with too few images
    or one of another size are one-line usage errors before the domain classifier trains (a minute at the default
    steps) and the reference pass: they came after both."""
    from fmcli import classifier, features
    from fmcli.cli.options import SamplingFlags
    from fmcli.data.shapes import prepare_shapes
    from fmcli.fidelity import EvalRequest, evaluate_fidelity

    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: pytest.fail("the classifier trained before the request was checked"))
    small = prepare_shapes(tmp_path / "shapes8", size=8, count=40, seed=1)
    with pytest.raises(UsageError, match=r"the model makes \[3, 16, 16\] images but .*shapes8 holds \[3, 8, 8\]"):
        evaluate_fidelity(EvalRequest(data=small, ckpt=str(debug_run), num_samples=10), device=torch.device("cpu"))
    heun = SamplingFlags(solver="heun").overrides()
    with pytest.raises(UsageError, match="heun needs at least 2 NFE"):
        evaluate_fidelity(EvalRequest(data=data, ckpt=str(debug_run), num_samples=10, nfes=[1], sample_overrides=heun), device=torch.device("cpu"))
    folder = tmp_path / "gen"
    folder.mkdir()
    for i in range(3):  # too few for the k-NN metrics (k = 5)
        Image.new("RGB", (16, 16), (i, i, i)).save(folder / f"{i:06d}.png")
    with pytest.raises(UsageError, match="3 images in --gen: the k-NN metrics need more than k=5"):
        evaluate_fidelity(EvalRequest(data=data, gen=folder), device=torch.device("cpu"))
    Image.new("RGB", (8, 8)).save(folder / "small.png")
    with pytest.raises(UsageError, match="small.png is 8x8 but the dataset's images are 16x16"):
        evaluate_fidelity(EvalRequest(data=data, gen=folder), device=torch.device("cpu"))
    assert not classifier.default_classifier_path(data, 0).exists() and not classifier.default_classifier_path(small, 0).exists()


@pytest.mark.parametrize("space,flag,message", [
    ("dinov2", "dinov2", "is not a transformers model directory"),
    ("inception", "inception", "Inception weights not found"),
])
def test_missing_feature_weights_are_refused_before_the_classifier_trains(data, tmp_path, monkeypatch, space, flag, message):
    """`fm eval --features domain,dinov2 --dinov2 DIR` (the README's example) with no model at DIR trained the domain
    classifier (a minute, its cache written) and only then said the DINOv2 directory was missing."""
    from fmcli import classifier, features
    from fmcli.fidelity import EvalRequest, evaluate_fidelity

    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: pytest.fail("the classifier trained before the weights were checked"))
    folder = tmp_path / "gen"
    folder.mkdir()
    for i, img in enumerate(np.load(data / "x.npy")[:8]):
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:06d}.png")
    request = EvalRequest(data=data, gen=folder, spaces=("domain", space), **{flag: str(tmp_path / "nothing")})
    with pytest.raises(UsageError, match=message):
        evaluate_fidelity(request, device=torch.device("cpu"))
    assert not classifier.default_classifier_path(data, 0).exists()


def test_eval_refusing_an_unverified_inception_file_advises_only_options_it_has(data, tmp_path, monkeypatch):
    """An Inception file of another sha256 is refused by `fm eval --features inception` as by `fm fid`, but the refusal
    told users to pass --inception-unverified, which `fm eval` then rejected as "No such option". Every option the
    line names must be one of `fm eval`'s own (its click parameters); `fm fid`, which has the flag, still advises it."""
    import re

    import typer

    from fmcli import classifier
    from fmcli.cli import app

    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: pytest.fail("the classifier trained before the weights were checked"))
    fake = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(torch.nn.Identity()).save(str(fake))
    gen = tmp_path / "gen"
    gen.mkdir()
    for i, img in enumerate(np.load(data / "x.npy")[:8]):
        Image.fromarray(img.transpose(1, 2, 0)).save(gen / f"{i:06d}.png")
    result = fm_in_process("eval", "--gen", gen, "--data", data, "--features", "inception", "--inception", fake)
    assert result.returncode == 2 and "refusing to load it" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    command = typer.main.get_command(app).commands["eval"]
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    named = set(re.findall(r"(?<![\w/-])--[a-z][a-z-]+", result.stderr))
    assert named <= options, named - options
    fid = fm_in_process("fid", "--gen", gen, "--ref", data, "--features", "inception", "--inception", fake)
    assert fid.returncode == 2 and "--inception-unverified" in fid.stderr


def test_cfg_1_rows_of_an_interval_sweep_are_one_run():
    """`fm eval --cfg 1,2 --guidance-interval 0,1 --guidance-interval 0.2,1` (the README's frontier example) scored cfg 1
    twice, once per interval, with identical numbers: at weight 1 the interval guides nothing. Reference: the guided
    velocity itself, which at cfg 1 is the conditional one whatever the interval, and differs by interval at cfg 2."""
    from fmcli.config import load_config
    from fmcli.fidelity import distinct_runs, sweep_settings
    from fmcli.generate import LoadedModel, guidance_that_runs
    from fmcli.solvers import guided_velocity

    torch.manual_seed(0)
    weight = torch.randn(4, 4)

    def model(x, t, label):
        return x @ weight + t[:, None] * (label[:, None].float() - 3)

    x, t = torch.randn(2, 4), torch.tensor(0.1)
    cond, uncond = {"label": torch.tensor([1, 2])}, {"label": torch.tensor([10, 10])}
    velocities = {(w, lo): guided_velocity(model, cond, uncond, w, (lo, 1.0))(x, t) for w in (1.0, 2.0) for lo in (0.0, 0.2)}
    assert torch.equal(velocities[1.0, 0.0], velocities[1.0, 0.2]) and not torch.equal(velocities[2.0, 0.0], velocities[2.0, 0.2])

    cfg = load_config("debug", ["model.num_classes=10"])
    loaded = LoadedModel(model=None, config=cfg, info={}, step=0)  # a class-conditional model's settings, as they run
    runs = distinct_runs([guidance_that_runs(loaded, s) for s in sweep_settings(cfg.sample, [1.0, 2.0], [(0.0, 1.0), (0.2, 1.0)], None)])
    assert [(s.cfg, s.guidance_interval) for s in runs] == [(1.0, None), (2.0, (0.0, 1.0)), (2.0, (0.2, 1.0))]


def test_an_nfe_sweep_of_an_unconditional_model_under_cfg_zero_stays_within_its_budgets():
    """`fm eval --nfe 4 --guidance cfg-zero --cfg 2` of an unconditional model added cfg-zero's zero-init step to the
    budget's steps (they evaluate nothing when guided), then ran unguided, where every step evaluates the network: 5
    NFE under a budget of 4 (`fm fid`, which reads the guidance as it runs first, ran 4). Reference: the network's
    calls counted while each setting of the sweep samples."""
    from fmcli.config import load_config
    from fmcli.fidelity import distinct_runs, sweep_settings
    from fmcli.generate import LoadedModel, guidance_that_runs, sample_batch

    cfg = load_config("debug", ["model.num_classes=0", "sample.guidance='cfg-zero'", "sample.zero_init_steps=1"])
    loaded = LoadedModel(model=None, config=cfg, info={}, step=0)
    calls = []

    def model(x, t, **cond):
        calls.append(x.shape[0])
        return -x

    for solver, budgets in (("euler", [4, 8]), ("heun", [4, 8])):
        base = cfg.sample.model_copy(update={"solver": solver})
        sweep = distinct_runs(sweep_settings(base, [2.0], None, budgets, runs=lambda s: guidance_that_runs(loaded, s)))
        assert len(sweep) == len(budgets)
        for budget, settings in zip(budgets, sweep):
            calls.clear()
            result = sample_batch(model, torch.randn(3, 2), None, settings)
            assert settings.cfg == 1.0 and len(calls) == result.nfe == budget, (solver, budget, settings.steps, len(calls))


@pytest.mark.parametrize("guidance", ["cfg", "cfg-zero", "auto"])
def test_an_nfe_sweep_of_a_guided_model_spends_the_most_steps_that_fit_each_budget(guidance):
    """Every fixed-step solver, guided (a guidance interval; cfg-zero's 2 zero-init steps on top; autoguidance's
    guide beside the main network) at budgets 1..12: the network calls counted here never exceed the budget, equal
    the reported NFE (a guided pair counts once), and one step more would exceed it (brute force)."""
    from fmcli.config import load_config
    from fmcli.evaluate import nfe_sweep
    from fmcli.generate import sample_batch

    cfg = load_config("debug", [f"sample.guidance='{guidance}'", "sample.zero_init_steps=2", "sample.cfg=2.0", "sample.guidance_interval=[0.0, 0.5]"])
    calls, guide_calls = [], []

    def model(x, t, y=None):
        calls.append(x.shape[0])
        return -x

    def guide(x, t, y=None):
        guide_calls.append(x.shape[0])
        return -0.5 * x

    def counted(settings):
        calls.clear()
        result = sample_batch(model, torch.randn(2, 3), torch.tensor([0, 1]), settings, guide=guide, seed=0, indices=[0, 1])
        return len(calls), result.nfe

    for solver in ("euler", "midpoint", "heun", "rk4", "ab2", "euler-sde"):
        budgets = list(range(1, 13))
        for budget, settings in nfe_sweep(cfg.sample.model_copy(update={"solver": solver}), budgets, log=None):
            n, reported = counted(settings)
            more, _ = counted(settings.model_copy(update={"steps": settings.steps + 1}))
            assert n == reported <= budget < more, (solver, budget, settings.steps, n, more)
            assert set(calls) <= {2, 4} and (4 in calls) == (guidance != "auto")  # CFG: one [cond; uncond] forward of 4 rows
    assert guidance != "auto" or guide_calls  # the guide ran, inside the interval, and counted no NFE of its own


# ------------------------------------------------------------------------------------ during training


def test_eval_every_logs_domain_fidelity_and_leaves_training_unchanged(data, tmp_path, monkeypatch):
    from conftest import QuietLog
    from fmcli import classifier, features
    from fmcli.config import load_config
    from fmcli.train import train

    monkeypatch.setattr(features, "CLASSIFIER_STEPS", STEPS)
    common = ["train.steps=4", "train.checkpoint_every=0", "train.log_every=2", f"data.path='{data}'"]
    evals = ["eval.every=2", "eval.num_samples=20", "eval.features='domain'"]  # eval.ref unset: the training data
    with_eval = train(load_config("debug", common + evals), tmp_path / "with", log=QuietLog())
    without = train(load_config("debug", common), tmp_path / "without", log=QuietLog())
    assert with_eval.losses == without.losses  # the classifier and the evaluation draw nothing from training's RNG
    records = [json.loads(line) for line in (tmp_path / "with" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "fd" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert {"fd", "precision", "recall", "density", "coverage", "accuracy", "fd_floor", "recall_floor", "accuracy_floor"} <= set(r)
        assert r["eval_features"] == "domain" and r["eval_num_samples"] == 20 and r["fd"] > r["fd_floor"] >= 0
    assert classifier.default_classifier_path(data, 0).is_file()  # trained once, cached beside the data

    pytest.importorskip("matplotlib")
    result = fm_in_process("plot", tmp_path / "with")
    assert result.returncode == 0, result.stderr
    assert Image.open(tmp_path / "with" / "loss.png").size[1] > 4 * 2.6 * 100  # loss, lr, FD, fidelity, accuracy panels


def test_eval_every_refuses_a_reference_of_another_image_shape_before_any_work(shapes16, tmp_path, monkeypatch):
    """`fm eval` refuses a model whose images differ from --data; during training an eval.ref of another size
    logged FD, recall and accuracy of 16px samples against 8px images (the classifier pools any size)."""
    from fmcli import classifier, features
    from fmcli.config import load_config
    from fmcli.data.shapes import prepare_shapes
    from fmcli.fidelity import TrainingFidelity

    small = prepare_shapes(tmp_path / "shapes8", size=8, count=40, seed=1)
    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: pytest.fail("the classifier trained before the shapes were compared"))
    cfg = load_config("debug", [f"data.path='{shapes16}'", "eval.every=2", "eval.features='domain'", f"eval.ref='{small}'"])
    with pytest.raises(UsageError, match=r"eval.ref .*shapes8 holds \[3, 8, 8\] images but the model makes \[3, 16, 16\]"):
        TrainingFidelity(cfg, shapes16, "cpu")


def _relabelled(data: Path, out: Path, order: list[int]) -> Path:
    """A copy of the prepared dataset `data` whose class c is the old class order[c] (same images, another order)."""
    import shutil

    copy = Path(shutil.copytree(data, out, ignore=shutil.ignore_patterns("fm-classifier*")))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["class_names"] = [manifest["class_names"][c] for c in order]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    y = np.load(copy / "y.npy")
    np.save(copy / "y.npy", np.argsort(order)[y])  # the old class order[c] is now c
    return copy


def test_eval_refuses_a_model_of_other_classes_than_the_data_in_the_domain_space(data, debug_run, tmp_path, monkeypatch):
    """Sample i is asked for the model's class i % K and compared with the classifier's class of that index, which is
    the data's: a dataset with the same classes in another order (or another class count) gave an accuracy and a
    per-class FD of one class's samples against another class. Refused before the classifier trains; other spaces,
    which read no classes, still score it, and so does the data the model was trained on."""
    from fmcli import classifier
    from fmcli.config import load_config, resolve
    from fmcli.fidelity import EvalRequest, TrainingFidelity, evaluate_fidelity

    names = json.loads((data / "manifest.json").read_text())["class_names"]
    reordered = _relabelled(data, tmp_path / "reordered", list(range(len(names)))[::-1])
    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: pytest.fail("the classifier trained before the classes were compared"))
    with pytest.raises(UsageError, match=rf"the model's classes \({names[0]}, {names[1]}, .*\) are not those of .*reordered \({names[-1]}, {names[-2]}, "):
        evaluate_fidelity(EvalRequest(data=reordered, ckpt=str(debug_run), num_samples=10), device=torch.device("cpu"))
    cfg = load_config("debug", [f"data.path='{data}'", "eval.every=2", "eval.features='domain'", f"eval.ref='{reordered}'"])
    cfg = resolve(cfg, json.loads((data / "manifest.json").read_text()))  # as training resolves it: the model's 10 classes
    with pytest.raises(UsageError, match=r"are not those of eval.ref .*reordered"):
        TrainingFidelity(cfg, data, "cpu")
    manifest = json.loads((reordered / "manifest.json").read_text())
    manifest["num_classes"], manifest["class_names"] = 11, None  # another class count, names not recorded
    (reordered / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"the model's classes \(.*\) are not those of .*reordered \(11 classes\)"):
        evaluate_fidelity(EvalRequest(data=reordered, ckpt=str(debug_run), num_samples=10), device=torch.device("cpu"))
    floor, rows = evaluate_fidelity(EvalRequest(data=reordered, ckpt=str(debug_run), num_samples=10, spaces=("tiny",), kid=False,
                                                sample_overrides=lambda base: base.model_copy(update={"steps": 1})), device=torch.device("cpu"))  # fmt: skip
    assert "accuracy" not in rows[0] and rows[0]["metrics"]["tiny"]["fd"] >= 0


def test_plot_draws_the_frontier_of_an_eval_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    floor = {"metrics": {"domain": {"fd": 0.1, "precision": 0.8, "recall": 0.8, "density": 1.0, "coverage": 0.9}}, "accuracy": 0.99}
    rows = [
        {"cfg": w, "guidance_interval": None, "nfe_per_sample": 8, "accuracy": a, "floor": floor,
         "metrics": {"domain": {"fd": 1 + w, "precision": 0.7, "recall": r, "density": 0.9, "coverage": 0.8}}}
        for w, a, r in ((1, 0.6, 0.7), (2, 0.8, 0.5), (4, 0.95, 0.3))
    ]  # fmt: skip
    sweep = tmp_path / "frontier.json"
    sweep.write_text(json.dumps(rows))
    result = fm_in_process("plot", sweep, "--y", "fd")
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "frontier.png" and (tmp_path / "frontier.png").stat().st_size > 0
    bad = fm_in_process("plot", sweep, "--y", "loss", "--out", tmp_path / "x.png")
    assert bad.returncode == 2 and "--y loss" in bad.stderr


# ------------------------------------------------------------------- what `fm sample` wrote, the data


def test_a_folder_written_by_fm_sample_scores_exactly_its_samples(data, debug_run, tmp_path):
    """The README's workflow: `fm sample --out DIR`, then `fm fid --gen DIR` and `fm eval --gen DIR`. The
    grid.png beside the samples is not one of them (it made FID count n + 1 images and eval refuse the folder)."""
    folder = tmp_path / "samples"
    sampled = fm_in_process("sample", "--ckpt", debug_run, "-n", 6, "--steps", 2, "--out", folder)
    assert sampled.returncode == 0, sampled.stderr
    assert (folder / "grid.png").is_file()
    fid = _json(fm_in_process("fid", "--gen", folder, "--ref", data, "--features", "tiny", "--json"))
    assert fid["num_samples"] == 6
    result = fm_in_process("eval", "--gen", folder, "--data", data, "--classifier-steps", STEPS, "--no-kid", "--json")
    (row,) = _json(result)
    assert row["num_samples"] == 6 and "skipping" in result.stderr and "grid.png" in result.stderr


def test_eval_and_fid_refuse_a_damaged_dataset_in_one_line(data, tmp_path):
    """As `fm train` does (data.dataset.validate_prepared): a truncated x.npy is exit 2 naming the file, not
    numpy's 'mmap length is greater than file size' (exit 1) after loading everything else."""
    import os

    folder = tmp_path / "gen"
    folder.mkdir()
    for i, img in enumerate(np.load(data / "x.npy")[:6]):
        Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"{i:06d}.png")
    os.truncate(data / "x.npy", 200_000)
    for args in (("eval", "--gen", folder, "--data", data, "--classifier-steps", STEPS), ("fid", "--gen", folder, "--ref", data, "--features", "tiny")):
        result = fm_in_process(*args)
        assert result.returncode == 2, (args[0], result.stderr)
        assert "x.npy is truncated" in result.stderr and "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_unwritable_data_folder_is_refused_before_the_classifier_trains(shapes16, monkeypatch, tmp_path):
    # The same check without an unprivileged user (which a CI checkout in a private temp folder cannot run):
    # the folder's answer is faked, and training must not start.
    from fmcli import classifier, features, fsutil

    data = Path(shutil.copytree(shapes16, tmp_path / "data"))
    monkeypatch.setattr(fsutil, "can_write_in", lambda folder: Path(folder).resolve() != data.resolve())
    monkeypatch.setattr(classifier, "train_classifier", lambda *a, **k: pytest.fail("trained before the folder was checked"))
    with pytest.raises(UsageError, match=rf"data folder {data} is not writable.*--classifier PATH"):
        features.load_or_train_classifier(data)
    with pytest.raises(UsageError, match=r"--classifier .*cannot write in"):
        features.load_or_train_classifier(data, path=data / "clf.pt")


def test_eval_on_a_read_only_dataset_says_so_before_training_the_classifier(shapes16):
    """The classifier is cached beside the data: a folder the user cannot write in is one line naming
    --classifier, before the (minute-long) training, not a torch.save crash after it. Run unprivileged
    (root writes anywhere); the folder is under /tmp, as pytest's own are closed to other users."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    from conftest import fm_env

    as_user = [] if os.geteuid() else ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
    if as_user and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no unprivileged user to run as")
    root = Path(tempfile.mkdtemp(prefix="fm-readonly-"))
    try:
        data = Path(shutil.copytree(shapes16, root / "data"))
        home = root / "home"
        home.mkdir()
        gen = root / "gen"
        gen.mkdir()
        for i, img in enumerate(np.load(data / "x.npy")[:6]):
            Image.fromarray(img.transpose(1, 2, 0)).save(gen / f"{i:06d}.png")
        for path in (root, data, gen):
            path.chmod(0o555)
        home.chmod(0o777)
        env = fm_env({"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")})

        def fm(*args):
            return subprocess.run([*as_user, sys.executable, "-m", "fmcli.cli", *map(str, args)], env=env, capture_output=True, text=True, timeout=600)

        if as_user and fm("--help").returncode != 0:
            pytest.skip("the unprivileged user cannot run this checkout's Python")
        result = fm("eval", "--gen", gen, "--data", data, "--classifier-steps", STEPS, "--json")
        assert result.returncode == 2, result.stderr
        assert f"data folder {data} is not writable" in result.stderr and "--classifier PATH" in result.stderr
        assert "training the domain classifier" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        elsewhere = fm("eval", "--gen", gen, "--data", data, "--classifier-steps", STEPS, "--classifier", home / "clf.pt", "--no-kid", "--json")
        assert elsewhere.returncode == 0, elsewhere.stderr
        assert (home / "clf.pt").is_file() and json.loads(elsewhere.stdout)[0]["num_samples"] == 6
    finally:
        for path in (root, root / "data", root / "gen"):
            if path.exists():
                path.chmod(0o755)
        shutil.rmtree(root, ignore_errors=True)


def test_table_labels_each_per_class_mean_with_its_own_row():
    """An --nfe sweep (or a --guidance-interval one) has rows that share their cfg: each per-class FD mean is
    named by its row's full setting (as the table's rows are), never by the cfg alone ("cfg 1: a, cfg 1: b")."""
    from fmcli.fidelity import format_table

    m = {"domain": {"fd": 1.0, "precision": 0.5, "recall": 0.5, "density": 0.5, "coverage": 0.5}}
    floor = {"floor_count": 10, "ref_count": 10, "metrics": m, "accuracy": 1.0, "per_class_fd_mean": 0.25}
    rows = [
        {"guidance": "cfg", "cfg": 1.0, "guidance_interval": None, "solver": "meanflow", "steps": s, "nfe_per_sample": s,
         "metrics": m, "accuracy": 0.5, "per_class_fd_mean": fd}
        for s, fd in ((1, 3.0), (2, 2.0))
    ]
    rows.append({"gen": "/x/samples", "metrics": m, "accuracy": 0.5, "per_class_fd_mean": 1.5})
    last = format_table(floor, rows).splitlines()[-1]
    assert last == ("per-class FD (domain), mean over classes: floor 0.2500; "
                    "cfg 1, meanflow 1: 3.0000, cfg 1, meanflow 2: 2.0000, samples: 1.5000")


@pytest.mark.parametrize("counts, n", [([5, 5, 5], 9), ([90, 10], 20), ([7, 1, 2, 30], 13), ([3, 3], 7), ([1, 1000], 10)])
def test_classes_are_asked_in_the_datas_proportions(counts, n):
    """Hamilton's allocation, computed here with exact fractions: each class its quota's whole part, the largest
    remainders (ties: the lower class) one more; equal counts give the cycle i mod K that fm sample uses."""
    from fractions import Fraction

    from fmcli.fidelity import proportional_labels

    labels = proportional_labels(n, counts)
    quota = [Fraction(n * c, sum(counts)) for c in counts]
    alloc = [int(q) for q in quota]
    for k in sorted(range(len(counts)), key=lambda k: (-(quota[k] - alloc[k]), k))[: n - sum(alloc)]:
        alloc[k] += 1
    assert len(labels) == n and np.bincount(labels, minlength=len(counts)).tolist() == alloc
    if len(set(counts)) == 1 and n % len(counts) == 0:
        assert labels.tolist() == [i % len(counts) for i in range(n)]


def test_eval_asks_an_imbalanced_datasets_classes_in_its_proportions(data, debug_run, tmp_path, monkeypatch):
    """A dataset of 1 circle to 3 squares: the samples fm eval scores are asked 1:3 as well (with a cycle through
    the classes a perfect model of that data would score worse than its floor), and are sampled as asked."""
    import fmcli.fidelity as fidelity
    from fmcli.evaluate import sharded_features
    from fmcli.generate import load_for_sampling

    imbalanced = tmp_path / "imbalanced"
    imbalanced.mkdir()
    np.save(imbalanced / "x.npy", np.load(data / "x.npy")[:40])
    np.save(imbalanced / "y.npy", np.array([0] * 10 + [1] * 30))
    manifest = json.loads((data / "manifest.json").read_text())
    (imbalanced / "manifest.json").write_text(json.dumps({**manifest, "count": 40, "num_classes": 2, "class_names": manifest["class_names"][:2]}))
    counts = fidelity.data_labels(imbalanced, 2)
    assert counts.tolist() == [10, 30] and np.bincount(fidelity.proportional_labels(20, counts)).tolist() == [5, 15]
    assert fidelity.data_labels(imbalanced, 10) is None  # the model has other classes: the cycle, as before
    # fm eval hands the data's proportions to the sampler...
    seen = []
    monkeypatch.setattr(fidelity, "sharded_features", lambda *a, **kw: seen.append(kw["labels"]) or sharded_features(*a, **kw))
    rows = _json(fm_in_process("eval", "--ckpt", debug_run, "--data", data, "-n", 20, "--features", "tiny", "--steps", 1, "--no-kid", "--json"))
    y = np.load(data / "y.npy")
    assert len(rows) == 1 and seen[-1].tolist() == fidelity.proportional_labels(20, np.bincount(y, minlength=10)).tolist()
    # ...which samples each index with its label (the labels gathered are the ones asked).
    loaded = load_for_sampling(str(debug_run), torch.device("cpu"))
    asked = np.array([3, 3, 3, 7, 0, 9])
    generated = sharded_features(loaded, 6, {}, seed=0, sample_cfg=loaded.config.sample.model_copy(update={"steps": 1}), batch_size=4,
                                 device=torch.device("cpu"), labels=asked)  # fmt: skip
    assert generated.labels.tolist() == asked.tolist()
