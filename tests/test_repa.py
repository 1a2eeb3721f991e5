"""REPA (fmcli/repa.py): the token grid and the loss against brute force, the hidden tokens against the blocks run
by hand, what a step trains (projector yes, encoder no, blocks after repa.depth as without REPA), resume, DDP,
and the refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import assert_resumes_bit_exactly, fm_in_process, one_and_two_processes
from fmcli.config import load_config
from fmcli.distributed import DistContext
from fmcli.errors import UsageError
from fmcli.repa import Alignment, ConvProjector, Encoder, on_token_grid, spatially_normalised, untrained_encoder
from fmcli.step import TrainingStep

REPA = ["repa.encoder=domain", "repa.depth=1"]
IREPA = ["repa.projector=conv", "repa.spatial_norm=true", "repa.feature_stride=4"]


@pytest.fixture(scope="module")
def repa_data(shapes16):
    """shapes16 with REPA's classifier (seed 1) cached beside it: trained once here, not in each run."""
    from fmcli.classifier import load_or_train_classifier

    load_or_train_classifier(shapes16, seed=1)
    return shapes16


def debug_cfg(*extra):
    return load_config("debug", ["data.path='unused'", "model.image_size=16", "model.in_channels=3", "model.num_classes=10", *extra])


# ----------------------------------------------------------------------------------------------- pure parts


def test_token_grid_repeats_a_coarser_map_and_averages_a_finer_one():
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(2, 3, 2, 2, generator=g)
    tokens = on_token_grid(coarse, 4)
    assert tokens.shape == (2, 16, 3)
    for r in range(4):
        for c in range(4):
            torch.testing.assert_close(tokens[:, r * 4 + c], coarse[:, :, r // 2, c // 2], rtol=0, atol=0)
    fine = torch.randn(2, 3, 8, 8, generator=g)
    tokens = on_token_grid(fine, 4)
    for r in range(4):
        for c in range(4):
            torch.testing.assert_close(tokens[:, r * 4 + c], fine[:, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean((-1, -2)))
    same = torch.randn(2, 3, 4, 4, generator=g)
    torch.testing.assert_close(on_token_grid(same, 4), same.flatten(2).transpose(1, 2), rtol=0, atol=0)


def test_token_grid_takes_the_cell_under_each_tokens_centre_when_the_grid_is_not_a_multiple_of_the_map():
    """48x48 images at patch 6 (8x8 tokens) against the 1/8 map (6x6 cells): token i spans pixels [6i, 6i + 6),
    its centre 6i + 3 lies in cell (6i + 3) // 8. The left edge (torch's "nearest") picks another cell for two
    of the eight tokens per axis."""
    coarse = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(3))
    tokens = on_token_grid(coarse, 8)
    for r in range(8):
        for c in range(8):
            cell_r, cell_c = (6 * r + 3) // 8, (6 * c + 3) // 8
            torch.testing.assert_close(tokens[:, r * 8 + c], coarse[:, :, cell_r, cell_c], rtol=0, atol=0)


def test_alignment_loss_is_one_minus_the_mean_cosine(tmp_path):
    cfg = debug_cfg(*REPA, "repa.weight=0.7")
    conv = nn.Conv2d(3, 5, kernel_size=4, stride=4)  # 16x16 -> a 4x4 map: one cell per token
    align = Alignment(cfg, Encoder(conv, "k"), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    x1, projected = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 16, 5, generator=g)
    feats = conv(x1).detach().double().numpy()
    p = projected.double().numpy()
    cosines = []
    for n in range(2):
        for tok in range(16):
            a, b = p[n, tok], feats[n, :, tok // 4, tok % 4]
            cosines.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert align.loss(projected, x1).item() == pytest.approx(0.7 * (1 - np.mean(cosines)), rel=1e-5)


def test_spatial_norm_standardises_each_channel_over_the_tokens():
    """Against numpy: each image's channel minus its mean over the tokens, over its sample standard deviation."""
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(3, 16, 5, generator=g) * torch.rand(1, 1, 5, generator=g) * 4 + torch.randn(1, 1, 5, generator=g) * 10
    ref = feats.double().numpy()
    ref = (ref - ref.mean(axis=1, keepdims=True)) / (ref.std(axis=1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(spatially_normalised(feats).double().numpy(), ref, rtol=1e-5, atol=1e-5)


def test_the_conv_projector_is_a_3x3_convolution_over_the_token_grid():
    """Brute force: token (r, c)'s output is the bias plus each in-grid neighbour's token times the kernel's tap at
    its offset (zero padding at the edges), on the row-major token grid."""
    torch.manual_seed(5)
    proj = ConvProjector(4, 6)
    tokens = torch.randn(2, 9, 4, dtype=torch.float64)
    proj = proj.double()
    w, b = proj.conv.weight.detach().numpy(), proj.conv.bias.detach().numpy()
    h = tokens.numpy()
    out = proj(tokens).detach().numpy()
    assert out.shape == (2, 9, 6)
    for n in range(2):
        for r in range(3):
            for c in range(3):
                want = b.copy()
                for dr in (-1, 0, 1):
                    for dc in (-1, 0, 1):
                        if 0 <= r + dr < 3 and 0 <= c + dc < 3:
                            want += w[:, :, dr + 1, dc + 1] @ h[n, (r + dr) * 3 + c + dc]
                np.testing.assert_allclose(out[n, r * 3 + c], want, rtol=1e-10, atol=1e-10)


def test_the_alignment_loss_with_spatial_norm_standardises_the_target(tmp_path):
    """repa.spatial_norm: the loss's target is the encoder's tokens standardised per image and channel (numpy)."""
    cfg = debug_cfg(*REPA, *IREPA)
    conv = nn.Conv2d(3, 5, kernel_size=4, stride=4)
    align = Alignment(cfg, Encoder(conv, "k"), torch.device("cpu"))
    assert isinstance(align.projector, ConvProjector)
    g = torch.Generator().manual_seed(6)
    x1, projected = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 16, 5, generator=g)
    feats = conv(x1).detach().double().numpy().reshape(2, 5, 16).transpose(0, 2, 1)  # [N, tokens, D]
    feats = (feats - feats.mean(axis=1, keepdims=True)) / (feats.std(axis=1, ddof=1, keepdims=True) + 1e-6)
    p = projected.double().numpy()
    cosines = [float(p[n, k] @ feats[n, k] / np.linalg.norm(p[n, k]) / np.linalg.norm(feats[n, k])) for n in range(2) for k in range(16)]
    assert align.loss(projected, x1).item() == pytest.approx(0.5 * (1 - np.mean(cosines)), rel=1e-5)


def test_feature_stride_reads_the_classifier_map_at_that_stride():
    """repa.feature_stride: 8 = the whole conv body without its pooling; 4 = its first three conv layers (64 channels
    at 1/4), both against the classifier's layers run by hand."""
    from fmcli.classifier import DomainCNN
    from fmcli.repa import domain_encoder

    torch.manual_seed(7)
    model = DomainCNN(3, 10).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        h, maps = x, []
        for m in model.body:
            if isinstance(m, nn.AdaptiveAvgPool2d):
                break
            h = m(h)
            maps.append(h)
        torch.testing.assert_close(domain_encoder(model, 8)(x), maps[11], rtol=0, atol=0)
        torch.testing.assert_close(domain_encoder(model, 4)(x), maps[8], rtol=0, atol=0)
    assert maps[8].shape == (2, 64, 7, 7) and maps[11].shape == (2, 128, 4, 4)
    assert untrained_encoder(debug_cfg(*REPA, "repa.feature_stride=4")).module(torch.zeros(1, 3, 16, 16)).shape == (1, 64, 4, 4)


def test_hidden_tokens_are_the_output_of_block_k():
    from fmcli.models import build_model

    cfg = debug_cfg()
    torch.manual_seed(0)
    net = build_model(cfg.model).eval()
    g = torch.Generator().manual_seed(2)
    x, t, y = torch.randn(3, 3, 16, 16, generator=g), torch.rand(3, generator=g), torch.tensor([0, 4, 10])
    with torch.no_grad():
        plain = net(x, t, y)
        h = net.x_embed(x).flatten(2).transpose(1, 2) + net.pos_embed
        c = net.t_embed(t) + net.y_embed(y)
        for k, block in enumerate(net.blocks, start=1):
            h = block(h, c, None, None)
            out, hidden = net(x, t, y, hidden_after=k)
            torch.testing.assert_close(out, plain, rtol=0, atol=0)  # the output is the network's, unchanged
            torch.testing.assert_close(hidden, h, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- the step


def one_step(cfg, batch):
    step = TrainingStep(cfg, DistContext(), micro=8, accum=1, shape=(3, 16, 16), encoder=untrained_encoder(cfg) if cfg.repa.encoder == "domain" else None)
    before = {n: p.detach().clone() for n, p in step.model.named_parameters()}
    result = step(iter([batch]), 0, 0)
    return step, before, result


def test_a_repa_step_logs_flow_matching_trains_the_projector_and_leaves_later_blocks_alone():
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, "y": torch.randint(0, 10, (8,), generator=g)}
    base = ["optim.grad_clip=0"]  # no global clipping: each parameter's update depends on its own gradient only
    plain, _, plain_result = one_step(debug_cfg(*base), batch)
    aligned, before, result = one_step(debug_cfg(*base, *REPA), batch)
    # The same initial network, and the logged loss is the flow-matching loss alone (comparable with runs without REPA).
    assert result.loss == plain_result.loss
    encoder_before = {n: p.clone() for n, p in untrained_encoder(debug_cfg(*REPA)).module.named_parameters()}
    for n, p in aligned.align.encoder.named_parameters():
        torch.testing.assert_close(p, encoder_before[n], rtol=0, atol=0)  # frozen
    assert all(p.grad is None for p in aligned.align.encoder.parameters())
    projector_moved = [not torch.equal(p, q) for p, q in zip(aligned.align.projector.parameters(), Alignment(debug_cfg(*REPA), untrained_encoder(debug_cfg(*REPA)), torch.device("cpu")).projector.parameters())]
    assert all(projector_moved)
    a, b = dict(aligned.model.named_parameters()), dict(plain.model.named_parameters())
    for name in a:
        after_block_1 = name.startswith(("blocks.1.", "final."))  # repa.depth = 1: the loss sees blocks.0 and below only
        if after_block_1:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    changed_early = [n for n in a if n.startswith("blocks.0.") and not torch.equal(a[n], b[n])]
    assert changed_early, "the alignment term moved nothing in the block it aligns"
    # The EMA holds the network only: sampling and exports are as without REPA.
    assert set(aligned.ema.state_dict()) == set(plain.ema.state_dict())


def test_a_non_finite_alignment_term_skips_the_step_and_leaves_the_weights(monkeypatch):
    """The logged loss is flow matching's alone, so a non-finite REPA term (finite flow loss) shows only in the
    gradients: the step is skipped as for a non-finite loss, never taken with NaN gradients into the weights."""
    g = torch.Generator().manual_seed(3)
    batch = {"x": torch.rand(8, 3, 16, 16, generator=g) * 2 - 1, "y": torch.randint(0, 10, (8,), generator=g)}
    monkeypatch.setattr(Alignment, "loss", lambda self, projected, x1: projected.float().sum() * float("inf"))
    step, before, result = one_step(debug_cfg(*REPA), batch)
    assert math.isnan(result.loss)  # the trainer counts it against train.max_nan_skips
    for name, p in step.model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, msg=name)
        assert p.grad is None
    assert all(torch.isfinite(p).all() for p in step.align.projector.parameters())


def test_the_projector_is_saved_and_a_resume_checks_the_encoder():
    cfg = debug_cfg(*REPA)
    step = TrainingStep(cfg, DistContext(), micro=8, accum=1, shape=(3, 16, 16), encoder=untrained_encoder(cfg))
    state = step.state_dict()
    assert state["repa"]["encoder_key"] == "untrained"
    other = TrainingStep(cfg, DistContext(), micro=8, accum=1, shape=(3, 16, 16), encoder=Encoder(untrained_encoder(cfg).module, "another"))
    with pytest.raises(UsageError, match="not the one this run trained with"):
        other.load_state_dict(state)
    without = {k: v for k, v in state.items() if k != "repa"}
    with pytest.raises(UsageError, match="trained without REPA"):
        step.load_state_dict(without)


# ------------------------------------------------------------------------------------------------ runs


@pytest.mark.parametrize("variant", [[], IREPA], ids=["mlp", "irepa"])
def test_repa_run_resumes_bit_exactly(tmp_path, repa_data, variant):
    assert_resumes_bit_exactly(tmp_path, [f"data.path='{repa_data}'", *REPA, *variant, "train.steps=6", "train.log_every=1", "train.checkpoint_every=0",
                                          "train.global_batch_size=8", "train.micro_batch_size=4"])


def test_two_processes_average_repa_gradients_like_one(tmp_path, repa_data):
    """The projector is trained beside the network: under DDP its gradients too must be averaged across ranks."""
    a, b = one_and_two_processes(tmp_path, repa_data, REPA)
    for name in a["repa"]["projector"]:
        # Adam turns float noise in near-zero gradients into ~1e-6 steps; a projector not averaged across ranks is off by ~lr (1e-3)
        torch.testing.assert_close(b["repa"]["projector"][name], a["repa"]["projector"][name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("setting, message", [
    (["model.arch=unet"], "aligns a DiT's tokens"),
    (["repa.depth=3"], "deeper than the model"),
    (["flow.objective=meanflow", "sample.solver=meanflow"], "implemented for flow.objective='flow'"),
])  # fmt: skip
def test_repa_refuses_what_it_cannot_align(tmp_path, shapes16, setting, message):
    sets = [a for item in ["repa.encoder=domain", *setting] for a in ("--set", item)]
    result = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", tmp_path / "r", *sets)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_repa_needs_a_labelled_dataset(tmp_path, shapes16):
    import shutil

    data = tmp_path / "unlabelled"
    shutil.copytree(shapes16, data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["num_classes"] = 0
    (data / "manifest.json").write_text(json.dumps(manifest))
    (data / "y.npy").unlink()
    result = fm_in_process("train", "--preset", "debug", "--data", data, "--run-dir", tmp_path / "r", "--set", "repa.encoder=domain",
                           "--set", "model.num_classes=0", "--set", "sample.cfg=1")
    assert result.returncode == 2, result.stderr
    assert "repa.encoder='domain'" in result.stderr and "labelled" in result.stderr and "repa.encoder=none" in result.stderr
    # fm eval's way out (other feature spaces) is not REPA's: repa.encoder has no inception or dinov2
    assert "inception" not in result.stderr and "dinov2" not in result.stderr


def test_a_resume_is_not_advised_to_turn_repa_off(tmp_path, shapes16):
    """A fresh run whose encoder cannot be had may train without REPA; a resume may not (it refuses a change of
    repa.encoder), so its error gives no such advice."""
    import shutil

    from fmcli.repa import load_encoder

    data = tmp_path / "unlabelled"
    shutil.copytree(shapes16, data)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "num_classes": 0}))
    (data / "y.npy").unlink()
    cfg = load_config("debug", [f"data.path='{data}'", *REPA])
    with pytest.raises(UsageError, match="repa.encoder=none"):
        load_encoder(cfg)
    with pytest.raises(UsageError) as refused:
        load_encoder(cfg, resuming=True)
    assert "labelled" in str(refused.value) and "repa.encoder=none" not in str(refused.value)


def test_a_classifier_given_to_a_run_without_repa_is_said_to_be_unused(tmp_path, shapes16):
    # repa.encoder = "auto" that resolves to "none" (a U-Net has no tokens to align): said at the start of the run;
    # with repa.encoder = "none" given outright it is refused at once (config.refuse_unread_settings).
    with pytest.raises(UsageError, match=r"repa\.classifier is a REPA setting and REPA is off"):
        load_config("debug", ["repa.encoder=none", f"repa.classifier={tmp_path / 'mine.pt'}"])
    result = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", tmp_path / "r", "--set", "repa.encoder=auto",
                           "--set", "model.arch=unet", "--set", f"repa.classifier={tmp_path / 'mine.pt'}", "--set", "train.steps=1",
                           "--set", "sample.grid_size=2")
    assert result.returncode == 0, result.stderr
    assert f"repa.classifier={tmp_path / 'mine.pt'} is unused: REPA is off" in result.stderr


@pytest.mark.parametrize("manifest, extra, expected", [
    ({"kind": "pixels", "num_classes": 10}, [], "domain"),
    ({"kind": "pixels", "num_classes": 0}, [], "none"),  # unlabelled: no classifier to align with
    ({"kind": "pixels", "num_classes": 1}, [], "none"),  # one class folder: train_classifier refuses fewer than 2 classes
    ({"kind": "latents", "num_classes": 10}, [], "none"),  # the classifier reads pixels
    ({"kind": "pairs", "num_classes": 10}, ["flow.coupling=pairs"], "none"),
    ({"kind": "pixels", "num_classes": 10}, ["model.arch=unet"], "none"),
    ({"kind": "pixels", "num_classes": 10}, ["flow.objective=meanflow", "sample.solver=meanflow"], "none"),
    ({"kind": "pixels", "num_classes": 10}, ["repa.depth=3"], "none"),  # the debug DiT has 2 blocks
])  # fmt: skip
def test_auto_aligns_only_where_a_run_can(manifest, extra, expected):
    from fmcli.config import resolve

    cfg = load_config("debug", ["repa.encoder=auto", *extra])
    resolved = resolve(cfg, {**manifest, "shape": [3, 16, 16]})
    assert resolved.repa.encoder == expected
    off = [item for item in extra if not item.startswith("repa.")]  # REPA's own settings beside "none" are refused (unread)
    assert resolve(load_config("debug", ["repa.encoder=none", *off]), {**manifest, "shape": [3, 16, 16]}).repa.encoder == "none"


@pytest.mark.parametrize("kind, expected", [(None, "domain"), ("pixels", "domain"), ("latents", "none")])
def test_bench_resolves_auto_with_the_shape_given(tmp_path, kind, expected):
    """fm bench / the autotune (resolve_without_data) with model.image_size, in_channels and num_classes all set:
    "auto" resolves as a training run on that data would (a labelled pixel DiT: on), not left "auto" (= off)."""
    from fmcli.config import resolve_without_data

    shape = ["model.image_size=16", "model.in_channels=3", "model.num_classes=10"]
    if kind is not None:
        (tmp_path / "manifest.json").write_text(json.dumps({"format": 1, "kind": kind, "shape": [3, 16, 16], "num_classes": 10}))
    sets = [f"data.path='{tmp_path}'"] if kind is not None else ["data.source=folder"]
    assert resolve_without_data(load_config("debug", ["repa.encoder=auto", *shape, *sets])).repa.encoder == expected


def test_a_classifier_that_cannot_be_cached_names_repas_setting(shapes16, monkeypatch):
    """A REPA run whose classifier cannot be saved (a full disk) says how REPA keeps it, --set repa.classifier=PATH,
    not fm eval's --classifier flag, which `fm train` does not have."""
    import fmcli.classifier as classifier
    import fmcli.fsutil as fsutil
    from fmcli.repa import load_encoder

    def full_disk(path, write):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fsutil, "atomic_write", full_disk)
    monkeypatch.setattr(classifier, "train_classifier", lambda x, y, n, **kw: (classifier.DomainCNN(x.shape[1], n).eval(), 1.0, 1))
    logs = []
    cfg = load_config("debug", [f"data.path='{shapes16}'", *REPA, "repa.seed=7"])
    load_encoder(cfg, log=logs.append)
    unsaved = [line for line in logs if "could not cache" in line]
    assert len(unsaved) == 1 and "No space left" in unsaved[0] and unsaved[0].endswith("; pass --set repa.classifier=PATH to keep it")
    assert not (shapes16 / "fm-classifier-s7.pt").exists()
