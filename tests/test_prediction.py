"""Data prediction (model.prediction = "data"): the velocity from a predicted x1 against the path's own velocity
and against a Gaussian's closed-form marginal velocity; the models return that velocity of their output;
training resumes bit-exactly; refusals (an OT-CFM path, the diffusers export)."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_resumes_bit_exactly
from fmcli.config import ModelConfig, load_config
from fmcli.errors import UsageError
from fmcli.flow import DATA_PREDICTION_EPS, interpolate, velocity_from_data
from fmcli.models import build_model
from fmcli.train import train


def test_the_true_data_gives_the_paths_velocity():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 3, 8, 8, generator=g), torch.randn(64, 3, 8, 8, generator=g)
    t = torch.rand(64, generator=g) * (1 - DATA_PREDICTION_EPS)
    xt, ut = interpolate(x0, x1, t)
    torch.testing.assert_close(velocity_from_data(x1, xt, t), ut, rtol=1e-4, atol=1e-4)


def test_the_posterior_mean_gives_the_gaussian_marginal_velocity():
    """Data N(mu, s^2), noise N(0, 1), x_t = (1 - t) x0 + t x1. The best data prediction is the posterior mean
    E[x1 | x_t] = mu + t s^2 (x_t - t mu) / sd(t)^2, sd(t)^2 = (1 - t)^2 + t^2 s^2; its velocity must be the
    marginal velocity of the flow, which moves x_t = t mu + sd(t) x0 affinely: v = mu + sd'(t) / sd(t) (x - t mu)."""
    mu, s = 0.7, 0.4
    t = torch.linspace(0.0, 1 - DATA_PREDICTION_EPS, 40, dtype=torch.float64)
    x = torch.linspace(-3, 3, 40, dtype=torch.float64).view(-1, 1)  # one x per time
    sd2 = (1 - t) ** 2 + t**2 * s**2
    posterior_mean = mu + (t * s**2 / sd2).view(-1, 1) * (x - t.view(-1, 1) * mu)
    d_sd_over_sd = ((-(1 - t) + t * s**2) / sd2).view(-1, 1)
    marginal = mu + d_sd_over_sd * (x - t.view(-1, 1) * mu)
    torch.testing.assert_close(velocity_from_data(posterior_mean, x, t).double(), marginal, rtol=1e-5, atol=1e-5)


def test_near_the_data_end_the_division_is_clamped():
    x1_hat, xt = torch.ones(2, 1), torch.zeros(2, 1)
    v = velocity_from_data(x1_hat, xt, torch.tensor([1.0, 1 - DATA_PREDICTION_EPS / 2]))
    assert torch.equal(v, torch.full((2, 1), 1 / DATA_PREDICTION_EPS))


@pytest.mark.parametrize("arch", ["dit", "unet"])
def test_a_data_predicting_network_returns_the_velocity_of_its_output(arch):
    size = dict(hidden_size=32, depth=1, heads=2, patch_size=4) if arch == "dit" else dict(hidden_size=8, heads=2, channel_mult=[1, 2], layers_per_block=1)
    common = dict(arch=arch, image_size=16, in_channels=3, num_classes=4, **size)
    torch.manual_seed(0)
    velocity_net = build_model(ModelConfig(**common))
    data_net = build_model(ModelConfig(**common, prediction="data"))
    data_net.load_state_dict(velocity_net.state_dict())  # the same weights: only what the output means differs
    with torch.no_grad():
        for p in data_net.parameters():  # DiT's zero-initialised head would make every output 0
            p.add_(torch.randn_like(p) * 0.02)
        velocity_net.load_state_dict(data_net.state_dict())
        g = torch.Generator().manual_seed(1)
        x, t, y = torch.randn(5, 3, 16, 16, generator=g), torch.tensor([0.0, 0.3, 0.6, 0.94, 0.99]), torch.tensor([0, 1, 2, 3, 4])
        raw = velocity_net(x, t, y)
        expected = (raw - x) / torch.clamp(1 - t, min=DATA_PREDICTION_EPS).view(-1, 1, 1, 1)
        torch.testing.assert_close(data_net(x, t, y), expected, rtol=1e-5, atol=1e-5)


def test_a_data_predicting_run_resumes_bit_exactly(tmp_path, shapes16):
    assert_resumes_bit_exactly(tmp_path, [f"data.path='{shapes16}'", "model.prediction='data'", "train.steps=6", "train.log_every=1",
                                          "train.checkpoint_every=0", "train.global_batch_size=8", "train.micro_batch_size=4"])


def test_a_mean_flow_model_may_predict_the_data(tmp_path, shapes16):
    """The JVP differentiates through the velocity-from-data conversion (its 1 / (1 - t) included)."""
    cfg = load_config("debug", [f"data.path='{shapes16}'", "model.prediction='data'", "flow.objective='meanflow'", "sample.solver='meanflow'",
                                "sample.steps=1", "flow.meanflow_ratio=1.0", "train.steps=2", "train.checkpoint_every=0"])
    result = train(cfg, tmp_path / "run")
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))


def test_refusals():
    with pytest.raises(UsageError, match="flow.sigma_min <= 1e-4"):
        load_config("debug", ["model.prediction='data'", "flow.sigma_min=0.1"])
    with pytest.raises(UsageError, match="prediction"):
        load_config("debug", ["model.prediction='noise'"])
    from fmcli.models.diffusers_dit import check_exportable

    with pytest.raises(UsageError, match="use --format fm"):
        check_exportable(ModelConfig(image_size=16, in_channels=3, num_classes=4, prediction="data"))
