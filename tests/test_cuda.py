"""GPU checks, selected with `-m cuda` on a machine with CUDA (never part of CI)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_fm
from fmcli.config import ModelConfig, load_config
from fmcli.models import build_model

pytestmark = pytest.mark.cuda


def test_cuda_is_there():
    assert torch.cuda.is_available(), "run the cuda tests on a machine with a CUDA GPU"


def test_bf16_autocast_forward_matches_fp32():
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=384, depth=4, heads=6, patch_size=2, image_size=32, in_channels=4, num_classes=10)).cuda()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x, t, y = torch.randn(8, 4, 32, 32, device="cuda"), torch.rand(8, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    with torch.no_grad():
        ref = model(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x, t, y).float()
    rel = (low - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_training_on_cuda_reduces_loss(tmp_path, shapes16, precision):
    from fmcli.train import train

    cfg = load_config("debug", [f"data.path='{shapes16}'", "train.device='cuda'", f"train.precision='{precision}'", "train.steps=60", "train.checkpoint_every=0", "optim.lr=2e-3"])
    losses = train(cfg, tmp_path / "run").losses
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5


def test_cuda_sampling_is_reproducible_and_sharded_equals_single(tmp_path, debug_run):
    a = run_fm("sample", "--ckpt", debug_run, "-n", "6", "--device", "cuda", "--out", tmp_path / "a")
    b = run_fm("sample", "--ckpt", debug_run, "-n", "6", "--device", "cuda", "--batch-size", "4", "--out", tmp_path / "b")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    for k in range(6):
        assert (tmp_path / "a" / f"{k:06d}.png").read_bytes() == (tmp_path / "b" / f"{k:06d}.png").read_bytes()


def test_gpus_1_training_runs(tmp_path, shapes16):
    out = run_fm("train", "--preset", "debug", "--data", shapes16, "--run-dir", tmp_path / "run", "--gpus", "1", "--set", "train.steps=5", "--set", "train.precision=bf16")
    assert out.returncode == 0, out.stderr
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["device"] != "cpu"
