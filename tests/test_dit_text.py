"""Cross-attention DiT: padding masking, the attention against a brute-force reference, state_dict keys,
parameter counts, and the text-to-image presets (docs/architecture.md section 6)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import fm_in_process, run_fm
from fmcli.config import ModelConfig, load_config, preset_names
from fmcli.models import build_model
from fmcli.models.dit import CrossAttention


def _text_dit(seed=0, **kw):
    cfg = ModelConfig(hidden_size=32, depth=2, heads=4, patch_size=2, cross_attention=True, text_dim=12, image_size=8, in_channels=4, num_classes=0, **kw)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():  # leave the zero init behind: every path must carry signal for these tests
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def test_padding_tokens_are_masked():
    model = _text_dit()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.rand(3, generator=g)
    text = torch.randn(3, 7, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    out = model(x, t, text=text, text_mask=mask)
    changed = torch.where(mask[..., None], text, torch.randn(3, 7, 12, generator=g) * 10)
    assert torch.allclose(model(x, t, text=changed, text_mask=mask), out, atol=1e-6)
    # ... while the real tokens do matter (so the assertion above can fail).
    real_changed = text.clone()
    real_changed[:, 0] += 1.0
    assert (model(x, t, text=real_changed, text_mask=mask) - out).abs().max() > 1e-3


@torch.no_grad()
def test_cross_attention_matches_brute_force():
    torch.manual_seed(0)
    attn = CrossAttention(16, 4)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    got = attn(x, ctx, mask[:, None, None, :])
    q = attn.q(x).reshape(2, 5, 4, 4)
    k, v = attn.kv(ctx).reshape(2, 6, 2, 4, 4).unbind(2)
    out = torch.zeros(2, 5, 4, 4)
    for b in range(2):
        for h in range(4):
            for i in range(5):
                scores = [float(q[b, i, h] @ k[b, j, h]) / math.sqrt(4) if mask[b, j] else -math.inf for j in range(6)]
                w = torch.softmax(torch.tensor(scores), dim=0)
                out[b, i, h] = (w[:, None] * v[b, :, h]).sum(0)
    expected = attn.proj(out.reshape(2, 5, 16))
    assert torch.allclose(got, expected, atol=1e-5)


def test_empty_mask_row_does_not_give_nan():
    model = _text_dit()
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), text=torch.randn(2, 3, 12), text_mask=torch.zeros(2, 3, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_text_model_at_init_is_zero_velocity_and_class_keys_unchanged():
    cfg = ModelConfig(hidden_size=32, depth=2, heads=4, patch_size=2, cross_attention=True, text_dim=12, image_size=8, in_channels=4, num_classes=0)
    model = build_model(cfg)
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), text=torch.randn(2, 3, 12), text_mask=torch.ones(2, 3, dtype=torch.bool))
    assert torch.count_nonzero(out) == 0  # adaLN-Zero and zero cross-attention output: identity blocks
    with pytest.raises(ValueError, match="text"):
        model(torch.randn(2, 4, 8, 8), torch.rand(2))
    plain = build_model(cfg.model_copy(update={"cross_attention": False, "num_classes": 3}))
    keys = set(plain.state_dict())
    assert not any("cross" in k or k.startswith("text_embed") for k in keys)
    expected_block = {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "modulation.1.weight", "modulation.1.bias"}
    assert {k.split(".", 2)[2] for k in keys if k.startswith("blocks.0.")} == expected_block


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_celebahq256_dit_has_about_38_75m_parameters():
    cfg = load_config("celebahq256").model.model_copy(update={"image_size": 32, "in_channels": 4})
    n = _count(build_model(cfg))
    assert abs(n - 38.75e6) / 38.75e6 < 0.02, n
    # Independent count from the architecture: per block 18 w^2 + 16 w weights (qkv, proj, 2 MLP, adaLN).
    w, p, c = 512, 2, 4
    block = (3 * w * w + 3 * w) + (w * w + w) + (4 * w * w + 4 * w) + (4 * w * w + w) + (6 * w * w + 6 * w)
    embed = (c * p * p * w + w) + (256 * w + w + w * w + w) + w  # patch conv, time MLP, one null-class row
    final = (2 * w * w + 2 * w) + (w * p * p * c + p * p * c)
    assert n == 8 * block + embed + final


TEXT_PRESETS = {"stability": (30000, 576, 96), "full_scale": (300000, 576, 96), "overfit": (5000, 288, 48), "hparam_tuning": (5000, 288, 48)}


@pytest.mark.parametrize("name", sorted(TEXT_PRESETS))
def test_text_presets_match_the_table(name):
    cfg = load_config(name)
    steps, global_batch, micro = TEXT_PRESETS[name]
    assert (cfg.train.steps, cfg.train.global_batch_size, cfg.train.micro_batch_size) == (steps, global_batch, micro)
    assert cfg.train.global_batch_size == micro * 3 * 2  # 3 accumulation steps on 2 GPUs
    assert cfg.eval.every == 0  # a latent text model cannot evaluate during training (fm sample + fm fid --gen do)
    assert (cfg.optim.lr, cfg.optim.warmup_frac, cfg.optim.warmup_start_factor, cfg.optim.min_lr_factor) == (5e-4, 0.05, 0.1, 0.1)
    m = cfg.model
    assert (m.arch, m.hidden_size, m.depth, m.heads, m.cross_attention) == ("dit", 768, 12, 12, True)
    assert cfg.encoders.max_tokens == 128


def test_every_preset_prints_its_config():
    names = preset_names()
    assert {"stability", "overfit", "hparam_tuning", "text-debug", "full_scale", "celebahq256", "mnist-unet", "quickstart-text", "debug"} <= set(names)
    for name in names:  # in this process (the app's own code path); one through the real entry point below
        res = fm_in_process("train", "--preset", name, "--print-config")
        assert res.returncode == 0, (name, res.stderr)
        assert json.loads(res.stdout)["name"] == name
    res = run_fm("train", "--preset", names[0], "--print-config")
    assert res.returncode == 0 and json.loads(res.stdout)["name"] == names[0], res.stderr
