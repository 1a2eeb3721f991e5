"""fmcli.optim_muon: Newton-Schulz against a float64 reference, torch.optim.Muon's update, state round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fmcli.optim_muon import NS_COEFFICIENTS, Muon, newton_schulz


def reference_newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
    """The quintic iteration written out in float64 numpy, one matrix at a time (Keller Jordan's muon.py)."""
    a, b, c = NS_COEFFICIENTS
    x = g.astype(np.float64)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(np.linalg.norm(x), 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(3, 48, 16), (2, 16, 48), (4, 32, 32)])
def test_batched_fp32_newton_schulz_matches_float64_reference(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(g, dtype=torch.float32)
    assert ours.dtype == torch.float32 and ours.shape == g.shape
    for k in range(shape[0]):
        ref = reference_newton_schulz(g[k].numpy())
        np.testing.assert_allclose(ours[k].numpy(), ref, atol=2e-5, rtol=1e-4)
        # and it orthogonalises: singular values land in the quintic's band around 1 (the smallest of a random
        # square matrix's start near 0 and need more than 5 steps, so the median is checked, not the minimum)
        sv = np.linalg.svd(ref, compute_uv=False)
        assert 0.7 < np.median(sv) and sv.max() < 1.3, sv


def test_bf16_newton_schulz_is_close_to_the_reference():
    g = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(1))
    ours = newton_schulz(g, dtype=torch.bfloat16).float()
    for k in range(2):
        ref = reference_newton_schulz(g[k].numpy())
        assert np.abs(ours[k].numpy() - ref).max() < 0.05


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in [(48, 16), (16, 16), (16, 48), (48, 16)]]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) for p in params]


def test_bf16_update_equals_torch_optim_muon():
    """With ns_dtype=bf16 the update is torch.optim.Muon's (which always orthogonalises in bf16)."""
    ours, theirs = _params(), _params()
    kw = dict(lr=2e-3, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    a, b = Muon(ours, ns_dtype="bf16", **kw), torch.optim.Muon(theirs, **kw)
    for step in range(3):
        for p, q, g in zip(ours, theirs, _grads(ours, step)):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_fp32_update_is_lr_scaled_reference_orthogonalisation():
    """One step from zero momentum: p <- p - lr * 0.2 sqrt(max(A, B)) * NS(nesterov(g)), checked in float64."""
    params = _params()
    start = [p.detach().clone() for p in params]
    grads = _grads(params, 0)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    lr, momentum = 1e-2, 0.95
    Muon(params, lr=lr, weight_decay=0.0, momentum=momentum, adjust_lr_fn="match_rms_adamw", ns_dtype="fp32").step()
    for p, p0, g in zip(params, start, grads):
        buf = (1 - momentum) * g.double().numpy()  # lerp from a zero buffer
        nesterov = g.double().numpy() + momentum * (buf - g.double().numpy())
        expected = p0.double().numpy() - lr * 0.2 * np.sqrt(max(p.shape)) * reference_newton_schulz(nesterov)
        np.testing.assert_allclose(p.detach().numpy(), expected, atol=1e-6)


def test_state_dict_round_trip_continues_bit_exactly():
    straight = _params()
    opt = Muon(straight, lr=1e-2, ns_dtype="fp32")
    for step in range(4):
        for p, g in zip(straight, _grads(straight, step)):
            p.grad = g
        opt.step()

    split = _params()
    first = Muon(split, lr=1e-2, ns_dtype="fp32")
    for step in range(2):
        for p, g in zip(split, _grads(split, step)):
            p.grad = g
        first.step()
    saved = first.state_dict()
    resumed = Muon(split, lr=1e-2, ns_dtype="bf16")  # the saved ns_dtype wins on load: it is part of the state
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["ns_dtype"] == "fp32"
    for step in range(2, 4):
        for p, g in zip(split, _grads(split, step)):
            p.grad = g
        resumed.step()
    for p, q in zip(straight, split):
        assert torch.equal(p, q)


def test_refuses_non_matrices_and_unknown_dtype():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon([torch.nn.Parameter(torch.zeros(3, 3))], ns_dtype="fp8")
