"""The diffusers U-Net wrapper: fm's model contract, time mapping, class and text conditioning, a training step."""

from __future__ import annotations

import numpy as np
import torch

from conftest import QuietLog
from fmcli.config import ModelConfig, apply_overrides, load_config
from fmcli.models import build_model
from fmcli.models.unet import UNet


def _unet(**kw):
    base = dict(arch="unet", hidden_size=16, channel_mult=(1, 2), layers_per_block=1, heads=2, image_size=8, in_channels=3, num_classes=3)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**{**base, **kw}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero-initialised paths: every input must matter
    return model.eval()


@torch.no_grad()
def test_class_unet_contract_and_time_mapping():
    model = _unet()
    assert isinstance(model, UNet)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, generator=g)
    y = torch.tensor([0, 1, 2, 3])  # 3 = the null class
    out = model(x, t, y=y)
    assert out.shape == x.shape
    assert torch.allclose(out, model.net(x, 1000 * t, class_labels=y).sample)  # t in [0,1] -> timestep 1000 t
    assert torch.allclose(model(x, t), model(x, t, y=torch.full((4,), 3)))  # no labels = the null class
    assert (model(x, t, y=torch.zeros(4, dtype=torch.long)) - out).abs().max() > 1e-4  # the class matters


@torch.no_grad()
def test_text_unet_masks_padding():
    model = _unet(cross_attention=True, text_dim=12, num_classes=0)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, generator=g)
    text = torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    out = model(x, t, text=text, text_mask=mask)
    assert out.shape == x.shape
    padded = torch.where(mask[..., None], text, 10 * torch.randn(2, 5, 12, generator=g))
    assert torch.allclose(model(x, t, text=padded, text_mask=mask), out, atol=1e-5)
    real = text.clone()
    real[:, 0] += 1
    assert (model(x, t, text=real, text_mask=mask) - out).abs().max() > 1e-4


def test_unet_trains_a_step(tmp_path, shapes16):
    from fmcli.train import train

    settings = ["model.arch=unet", "model.hidden_size=16", "model.channel_mult=[1, 2]", "model.layers_per_block=1", f"data.path={shapes16}", "train.steps=2", "train.log_every=1", "sample.grid_size=4", "sample.steps=2"]
    cfg = apply_overrides(load_config("debug"), settings)
    result = train(cfg, tmp_path / "run", log=QuietLog())
    assert result.step == 2 and all(np.isfinite(result.losses))
    state = torch.load(result.checkpoint, weights_only=True)
    assert any(k.startswith("net.class_embedding") for k in state["model"])
    assert (tmp_path / "run" / "samples" / "step-0000002.png").is_file()


def test_mnist_unet_preset_builds():
    cfg = load_config("mnist-unet").model.model_copy(update={"image_size": 28, "in_channels": 1, "num_classes": 10})
    model = build_model(cfg)
    out = model(torch.randn(2, 1, 28, 28), torch.rand(2), y=torch.tensor([3, 10]))
    assert out.shape == (2, 1, 28, 28)


def test_muon_with_the_unet_is_refused_rather_than_silently_adamw():
    """Muon updates the DiT blocks' 2-D weights; a U-Net has none, so `--set model.arch=unet` on a Muon preset
    trained every weight with AdamW while the run recorded optim.name='muon'. Refused with a one-line fix."""
    import pytest

    from fmcli.config import OptimConfig
    from fmcli.errors import UsageError
    from fmcli.optim import build_optimizer
    from fmcli.optim_muon import Muon

    optimizer = build_optimizer(_unet(), OptimConfig(name="muon"))  # the premise: nothing goes to Muon
    assert not any(isinstance(o, Muon) for o in optimizer.optimizers)
    with pytest.raises(UsageError, match="optim.name='muon'.*model.arch='unet'.*set optim.name='adamw'"):
        load_config("quickstart", ["model.arch=unet"])
    assert load_config("quickstart", ["model.arch=unet", "optim.name=adamw"]).optim.name == "adamw"


def test_attention_heads_as_the_config_table_says():
    # docs/architecture.md (model.heads): a text U-Net has `heads` heads in every attention layer; a class U-Net
    # hidden_size / heads channels per head, so heads * m at a level of multiplier m (by hand: 16 / 2 = 8 per head).
    from diffusers.models.attention_processor import Attention

    def seen(model):
        return {(a.heads, a.inner_dim // a.heads) for a in model.modules() if isinstance(a, Attention)}

    assert seen(_unet(channel_mult=(1, 2, 4), image_size=8)) == {(4, 8), (8, 8)}  # 32 and 64 channels
    assert seen(_unet(channel_mult=(1, 2, 4), image_size=8, cross_attention=True, text_dim=12, num_classes=0)) == {(2, 16), (2, 32)}
