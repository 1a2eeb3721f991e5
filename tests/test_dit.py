"""DiT: shapes, adaLN-Zero initialisation, conditioning, positional embedding."""

import numpy as np
import pytest
import torch

from fmcli.config import ModelConfig
from fmcli.models import build_model
from fmcli.models.dit import sincos_2d_embedding


def tiny(**kw):
    base = dict(hidden_size=32, depth=2, heads=2, patch_size=4, image_size=16, in_channels=3, num_classes=10)
    base.update(kw)
    return build_model(ModelConfig(**base))


def test_output_shape_matches_input():
    torch.manual_seed(0)
    model = tiny(in_channels=4, image_size=8, patch_size=2)
    x = torch.randn(5, 4, 8, 8)
    out = model(x, torch.rand(5), torch.randint(0, 10, (5,)))
    assert out.shape == x.shape


def test_zero_initialised_model_outputs_zeros():
    model = tiny()
    x = torch.randn(3, 3, 16, 16)
    out = model(x, torch.rand(3), torch.tensor([0, 5, 10]))  # 10 = the null class
    assert torch.count_nonzero(out) == 0


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_class_and_time_change_the_output_once_trained_weights_are_nonzero():
    torch.manual_seed(1)
    model = perturbed(tiny())
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([0.3, 0.3])
    a = model(x, t, torch.tensor([1, 1]))
    b = model(x, t, torch.tensor([2, 2]))
    c = model(x, torch.tensor([0.7, 0.7]), torch.tensor([1, 1]))
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    # Samples in a batch do not interact (attention is within an image).
    single = model(x[:1], t[:1], torch.tensor([1]))
    assert torch.allclose(single, a[:1], atol=1e-5)


def test_unpatchify_inverts_patchify_layout():
    model = tiny(patch_size=4)
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    p, g = 4, 4
    # patchify the way the linear layer sees it: [B, g*g, p*p*C] with (p, q, c) ordering
    patches = x.reshape(2, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 3)
    assert torch.equal(model.unpatchify(patches), x)


def test_sincos_embedding_matches_formula():
    emb = sincos_2d_embedding(8, 3)
    assert emb.shape == (9, 8)
    # position (row=1, col=2) is index 5; first half encodes the row, second the column
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    np.testing.assert_allclose(emb[5, :4], np.concatenate([np.sin(1 * omega), np.cos(1 * omega)]))
    np.testing.assert_allclose(emb[5, 4:], np.concatenate([np.sin(2 * omega), np.cos(2 * omega)]))


@pytest.mark.parametrize("grad", [True, False], ids=["training", "sampling"])
def test_cpu_bf16_autocast_attention_dtype_and_forward(monkeypatch, grad):
    # CPU bf16 autocast keeps SDPA in fp32 where a backward follows (its bf16 backward is slow on CPU), and in
    # bf16 without gradients (sampling: the faster forward); the GEMMs run in bf16 either way.
    torch.manual_seed(2)
    model = perturbed(tiny())
    x, t, y = torch.randn(4, 3, 16, 16), torch.rand(4), torch.randint(0, 10, (4,))
    seen = []
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real_sdpa(q, k, v, **kw)

    reference = model(x, t, y)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
        qkv_dtype = model.blocks[0].attn.qkv(torch.randn(2, 16, 32)).dtype
    assert qkv_dtype == torch.bfloat16  # the projections really are bf16 under autocast
    expected = (torch.float32, False) if grad else (torch.bfloat16, True)
    assert seen and all(s == expected for s in seen)
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()
    if grad:
        out.float().pow(2).mean().backward()  # and the mixed graph differentiates
        assert all(p.grad is not None for p in model.blocks[0].attn.parameters())


def test_a_mean_flow_dit_draws_a_flow_dits_initial_weights_and_leaves_the_rng_alike():
    # models/dit.py: the interval embedding is drawn on a forked RNG, so every shared weight is a flow DiT's of
    # the same seed (a mean-flow run and a flow run start from the same network) and so is the next global draw.
    def build(end_time):
        torch.manual_seed(3)
        model = tiny(end_time=end_time)
        return model, torch.rand(4)

    flow, after_flow = build(False)
    mean, after_mean = build(True)
    mean_state = mean.state_dict()
    assert set(flow.state_dict()) < set(mean_state)
    for name, value in flow.state_dict().items():
        assert torch.equal(value, mean_state[name]), name
    assert torch.equal(after_flow, after_mean)
    assert torch.count_nonzero(mean.interval_embed.mlp[0].weight) > 0  # drawn, not left at zero
    assert torch.count_nonzero(mean.interval_embed.mlp[2].weight) == 0 and torch.count_nonzero(mean.interval_embed.mlp[2].bias) == 0
