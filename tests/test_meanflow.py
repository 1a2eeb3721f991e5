"""Mean flows (flow.objective = "meanflow"): the identity's sign against a Gaussian's closed form, the JVP target
against finite differences, the loss at t_end = t, the sampler, resume, DDP gradient averaging, init_from,
refusals and export."""

from __future__ import annotations

import json

import pytest
import torch
from scipy import stats

from conftest import assert_resumes_bit_exactly, fm_in_process, one_and_two_processes, run_fm
from fmcli.config import ModelConfig, config_to_dict, load_config, validate_config
from fmcli.distributed import DistContext
from fmcli.flow import flow_matching_loss, interpolate, mean_flow_loss, sample_time_pairs
from fmcli.models import build_model
from fmcli.solvers import solve
from fmcli.step import TrainingStep, mean_flow_target
from fmcli.train import train

# torch on one thread for this module's tiny in-process models (conftest.one_thread): the same checks, faster.
pytestmark = pytest.mark.usefixtures("one_thread")


MEANFLOW = ["flow.objective='meanflow'", "sample.solver='meanflow'", "sample.steps=2"]

# ------------------------------------------------------------- the Gaussian reference (independent closed form)
# Data x1 ~ N(mu, s^2 I), noise x0 ~ N(0, I), rectified-flow path x_t = (1 - t) x0 + t x1. The marginal ODE moves
# every point affinely: x_t = t mu + sd(t) x0 with sd(t) = sqrt((1 - t)^2 + t^2 s^2), so the flow map from t to
# t_end is x -> t_end mu + sd(t_end) / sd(t) (x - t mu), and the average velocity is its displacement / (t_end - t).

MU, S = 0.7, 0.4


def sd(t):
    return torch.sqrt((1 - t) ** 2 + t**2 * S**2)


def flow_map(x, t, t_end):
    t, t_end = t.view(-1, 1), t_end.view(-1, 1)
    return t_end * MU + sd(t_end) / sd(t) * (x - t * MU)


def gaussian_velocity(x, t):
    t = t.view(-1, 1)
    d_sd = (-(1 - t) + t * S**2) / sd(t)
    return MU + d_sd / sd(t) * (x - t * MU)


def gaussian_mean_velocity(x, t, t_end=None, **_):
    """The exact average velocity over [t, t_end] (the velocity itself where t_end = t)."""
    t_end = t if t_end is None else t_end
    h = (t_end - t).view(-1, 1)
    jump = (flow_map(x, t, t_end) - x) / torch.where(h == 0, torch.ones_like(h), h)
    return torch.where(h == 0, gaussian_velocity(x, t), jump)


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (2, 1.0), (4, 3.0)])
def test_exact_mean_flow_samples_the_gaussian_exactly_in_any_number_of_steps(steps, shift):
    x0 = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = solve(lambda x, t, t_end: gaussian_mean_velocity(x, t.expand(len(x)), t_end.expand(len(x))), x0, "meanflow", steps, shift=shift)
    assert result.nfe == steps  # one evaluation per jump
    torch.testing.assert_close(result.x, MU + S * x0, rtol=0, atol=1e-10)  # sample i is the ODE's endpoint of x0_i
    assert stats.kstest(result.x[:, 0].numpy(), stats.norm(MU, S).cdf).pvalue > 1e-3


def test_the_exact_mean_flow_is_the_fixed_point_of_the_target():
    """u = v + (t_end - t) d/dt u holds for the exact u with the marginal v: the identity's sign and direction."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 2, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.9
    t_end = t + (1 - t) * torch.rand(64, generator=g, dtype=torch.float64)
    t_end[:8] = t[:8]  # rows with t_end = t: the target is the velocity
    v = gaussian_velocity(x, t)
    target = mean_flow_target(gaussian_mean_velocity, x, t, t_end, v, {})
    torch.testing.assert_close(target, gaussian_mean_velocity(x, t, t_end), rtol=1e-9, atol=1e-9)
    # The test can tell the sign: the paper's u = v - (t - r) du/dt copied into fm's time unconverted is not a fixed point.
    wrong_sign = v - (target - v)
    assert (wrong_sign - gaussian_mean_velocity(x, t, t_end)).abs().max() > 0.1


def random_mean_flow_dit(dtype=torch.float64):
    """A tiny mean-flow DiT with every weight random (the zero-initialised layers would hide the end time)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, depth=2, heads=2, patch_size=4, image_size=8, in_channels=3, num_classes=3, end_time=True))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.to(dtype)


def test_jvp_target_equals_a_finite_difference_along_the_path():
    model = random_mean_flow_dit()
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    t_end = torch.tensor([0.9, 0.35, 1.0, 0.8], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])  # 3: the null class
    xt, v = interpolate(x0, x1, t)
    target = mean_flow_target(model, xt, t, t_end, v, {"y": y})
    du_dt = (target - v) / (t_end - t).view(-1, 1, 1, 1)
    h = 1e-5  # d/dt u(x_t, t, t_end) along the path x_t, t_end held: central difference
    with torch.no_grad():
        plus = model(interpolate(x0, x1, t + h)[0], t + h, y, t_end=t_end)
        minus = model(interpolate(x0, x1, t - h)[0], t - h, y, t_end=t_end)
    reference = (plus - minus) / (2 * h)
    rel = (du_dt - reference).norm() / reference.norm()
    assert rel < 1e-3, rel
    assert reference.norm() > 1e-2  # not a trivial zero


def test_forward_mode_needs_the_math_attention_backend():
    """Why mean_flow_target switches the SDPA backend: the CPU flash kernel has no forward-mode AD."""
    model = random_mean_flow_dit(torch.float32)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 0.4])
    with pytest.raises(NotImplementedError):
        torch.func.jvp(lambda x, t: model(x, t, t_end=t + 0.3), (x, t), (x, torch.ones_like(t)))
    assert torch.isfinite(mean_flow_target(model, x, t, t + 0.3, x, {})).all()
    with pytest.raises(NotImplementedError):  # the math backend was for the JVP only: the fast kernel is back
        torch.func.jvp(lambda x, t: model(x, t, t_end=t + 0.3), (x, t), (x, torch.ones_like(t)))


# ------------------------------------------------------------------------------------- time pairs and loss


def test_time_pairs_follow_the_order_statistics_and_the_ratio():
    t, t_end = sample_time_pairs(40000, 0.25, "uniform", generator=torch.Generator().manual_seed(3))
    assert bool((t <= t_end).all())
    apart = t_end > t
    assert abs(apart.float().mean().item() - 0.25) < 0.01
    # t is the smaller of two uniforms (CDF 1 - (1 - x)^2); t_end, where apart, the larger (CDF x^2).
    assert stats.kstest(t.double().numpy(), lambda x: 1 - (1 - x) ** 2).pvalue > 1e-3
    assert stats.kstest(t_end[apart].double().numpy(), lambda x: x**2).pvalue > 1e-3


def test_adaptive_weighting_against_a_hand_computation():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(5, 3, 4, generator=g, requires_grad=True)
    target = torch.randn(5, 3, 4, generator=g)
    loss, mse = mean_flow_loss(pred, target, power=1.0)
    per = [((pred[i] - target[i]) ** 2).mean() for i in range(5)]
    assert loss.item() == pytest.approx(sum(float(m) / (float(m) + 1e-3) for m in per) / 5, rel=1e-6)
    assert mse.item() == pytest.approx(flow_matching_loss(pred, target).item(), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, pred)
    (ref,) = torch.autograd.grad(sum(m / (m.detach() + 1e-3) for m in per) / 5, pred)  # the weight is a constant
    torch.testing.assert_close(grad, ref)
    plain, _ = mean_flow_loss(pred, target, power=0.0)
    assert plain.item() == pytest.approx(flow_matching_loss(pred, target).item(), rel=1e-6)


def test_the_loss_at_t_end_equal_t_is_the_flow_matching_loss(shapes16):
    cfg = load_config("debug", [f"data.path='{shapes16}'", *MEANFLOW, "flow.meanflow_power=0", "model.image_size=16", "model.in_channels=3", "model.num_classes=10"])
    step = TrainingStep(cfg, DistContext(), micro=4, accum=1, shape=(3, 16, 16))
    with torch.no_grad():
        for p in step.model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(5)
    x0, x1, t = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g), torch.rand(4, generator=g)
    xt, ut = interpolate(x0, x1, t)
    cond = {"y": torch.tensor([0, 3, 10, 7])}
    loss, _ = step._mean_flow_loss(xt, t, t.clone(), ut, cond)
    grads = torch.autograd.grad(loss, list(step.model.parameters()), allow_unused=True)
    ref = flow_matching_loss(step.model(xt, t, **cond), ut)  # the network at t_end = t, no JVP involved
    ref_grads = torch.autograd.grad(ref, list(step.model.parameters()), allow_unused=True)
    # float32 rounding only: the JVP's forward runs attention through the math SDPA backend, the reference through
    # the fused kernel, whose sums round differently on some CPUs (1.1e-7 relative on an AMX Xeon); 1e-6 is a few ulps.
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(grads, ref_grads):
        if b is not None:
            torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------- training


def test_mean_flow_run_resumes_bit_exactly(tmp_path, shapes16):
    assert_resumes_bit_exactly(tmp_path, [f"data.path='{shapes16}'", *MEANFLOW, "flow.meanflow_ratio=0.5", "train.steps=6", "train.log_every=1",
                                          "train.checkpoint_every=0", "train.global_batch_size=8", "train.micro_batch_size=4"])


def test_two_processes_average_mean_flow_gradients_like_one(tmp_path, shapes16):
    """The JVP runs outside DDP; the prediction inside it: ranks must still end with the one-process weights."""
    one_and_two_processes(tmp_path, shapes16, ["flow.meanflow_ratio=0.5", *MEANFLOW])


def test_init_from_a_flow_model_starts_as_the_teacher(debug_run):
    from fmcli.generate import load_for_sampling
    from fmcli.train import init_weights

    teacher = load_for_sampling(str(debug_run), torch.device("cpu"))
    raw = config_to_dict(teacher.config)
    raw["flow"]["objective"], raw["sample"]["solver"] = "meanflow", "meanflow"
    del raw["model"]["end_time"]  # follows the objective
    cfg = validate_config(raw)
    step = TrainingStep(cfg, DistContext(), micro=4, accum=1, shape=teacher.shape)
    init_weights(step, str(debug_run))
    g = torch.Generator().manual_seed(6)
    x, t = torch.randn(4, *teacher.shape, generator=g), torch.rand(4, generator=g) * 0.5
    y = torch.tensor([0, 1, 2, 10])
    with torch.no_grad():
        v = teacher.model(x, t, y)
        for t_end in (t, t + 0.5, torch.ones(4)):
            torch.testing.assert_close(step.model(x, t, y, t_end=t_end), v, rtol=0, atol=0)
            torch.testing.assert_close(step.ema(x, t, y, t_end=t_end), v, rtol=0, atol=0)


@pytest.fixture(scope="module")
def mf_run(tmp_path_factory, debug_run, shapes16):
    """debug_run fine-tuned for 2 mean-flow steps (train.init_from)."""
    run = tmp_path_factory.mktemp("mf") / "run"
    train(load_config("debug", [f"data.path='{shapes16}'", *MEANFLOW, "train.steps=2", f"train.init_from='{debug_run}'"]), run)
    return run


def test_fine_tune_samples_and_exports_through_the_cli(tmp_path, mf_run, debug_run, shapes16):
    run = mf_run
    sample = fm_in_process("sample", "--ckpt", run, "-n", "3", "--steps", "1", "--out", tmp_path / "one.png", "--json")
    assert sample.returncode == 0, sample.stderr
    assert json.loads(sample.stdout)["nfe"] == 1 and json.loads(sample.stdout)["solver"] == "meanflow"
    fid = fm_in_process("fid", "--ckpt", run, "-n", "10", "--ref", shapes16, "--features", "tiny", "--nfe", "1,2", "--json")
    assert fid.returncode == 0, fid.stderr
    assert [r["nfe_per_sample"] for r in json.loads(fid.stdout)] == [1, 2]
    # Other solvers make no sense for average velocities; the meanflow solver none for a flow model.
    for ckpt, solver, words in ((run, "heun", "mean-flow model"), (debug_run, "meanflow", "needs a mean-flow model")):
        bad = fm_in_process("sample", "--ckpt", ckpt, "-n", "2", "--solver", solver, "--out", tmp_path / f"{solver}.png")
        assert bad.returncode == 2 and words in bad.stderr and "Traceback" not in bad.stderr
    # diffusers cannot hold a two-time DiT: a one-line refusal; --format fm round-trips exactly.
    refused = fm_in_process("export", "--ckpt", run, "--out", tmp_path / "hf")
    assert refused.returncode == 2 and "FlowMapEulerDiscreteScheduler" in refused.stderr and not (tmp_path / "hf").exists()
    assert fm_in_process("export", "--ckpt", run, "--out", tmp_path / "fm", "--format", "fm").returncode == 0
    from fmcli.generate import initial_noise, load_for_sampling, sample_batch

    a, b = (load_for_sampling(str(p), torch.device("cpu")) for p in (run, tmp_path / "fm"))
    x0 = initial_noise(0, range(4), a.shape)
    y = torch.arange(4)
    torch.testing.assert_close(sample_batch(b.model, x0, y, b.config.sample).x, sample_batch(a.model, x0, y, a.config.sample).x, rtol=0, atol=0)


def test_a_refused_sampler_leaves_no_manifest_that_blocks_the_corrected_command(tmp_path, mf_run, debug_run):
    """`fm sample --out DIR` with a solver or guidance the model refuses used to write DIR/fm-sample.json before the
    refusal, and the corrected command was then refused as "other settings (solver)"."""
    for ckpt, bad, fixed in ((mf_run, ["--solver", "heun"], []), (mf_run, ["--guidance", "cfg-zero", "--cfg", "2"], []),
                             (debug_run, ["--solver", "meanflow"], ["--solver", "euler", "--steps", "2"])):
        out = tmp_path / f"{ckpt.parent.name}-{bad[1]}"
        refused = fm_in_process("sample", "--ckpt", ckpt, "-n", "2", *bad, "--out", out)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert not (out / "fm-sample.json").exists()
        again = fm_in_process("sample", "--ckpt", ckpt, "-n", "2", *fixed, "--out", out)
        assert again.returncode == 0, again.stderr


def test_reflow_defaults_to_each_teachers_own_kind_of_solver(tmp_path, mf_run, debug_run):
    """`fm reflow` without --solver: heun for a flow teacher (the documented default), the mean-flow jumps for a
    mean-flow teacher, which no other solver fits (it used to be refused as "not heun", a solver nobody gave)."""
    for ckpt, expected in ((mf_run, "meanflow"), (debug_run, "heun")):
        made = fm_in_process("reflow", "--ckpt", ckpt, "--num-pairs", "4", "--steps", "2", "--out", tmp_path / expected, "--json")
        assert made.returncode == 0, made.stderr
        assert json.loads(made.stdout)["solver"] == expected
    refused = fm_in_process("reflow", "--ckpt", mf_run, "--num-pairs", "4", "--solver", "heun", "--out", tmp_path / "bad")
    assert refused.returncode == 2 and "not heun" in refused.stderr and not (tmp_path / "bad").exists()


def test_init_from_a_mean_flow_checkpoint_advises_settings_that_work(tmp_path, mf_run, shapes16):
    """A flow run from a mean-flow checkpoint: the refusal's advice used to be --set model.end_time=true, which the
    config refuses without the mean-flow objective. Following the advice as given must train."""
    import shlex

    base = ["train", "--preset", "debug", "--data", shapes16, "--set", "train.steps=1", "--set", "train.checkpoint_every=0",
            "--set", f"train.init_from={mf_run}"]
    refused = fm_in_process(*base, "--run-dir", tmp_path / "a")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    advice = shlex.split(refused.stderr.strip().splitlines()[-1].split("train with the checkpoint's model settings: ", 1)[1])
    followed = fm_in_process(*base, *advice, "--run-dir", tmp_path / "b")
    assert followed.returncode == 0, followed.stderr


def test_config_keeps_objective_model_and_solver_together():
    assert load_config("debug", MEANFLOW).model.end_time
    for items, words in ((["flow.objective='meanflow'"], "sample.solver='meanflow'"), (["model.end_time=true"], "model.end_time"),
                         ([*MEANFLOW, "model.arch='unet'"], "model.arch='dit'"), ([*MEANFLOW, "flow.time_sampler='zero'"], "'zero' draws only t = 0")):
        with pytest.raises(Exception, match=words):
            load_config("debug", items)


def test_demo_previews_every_jump_and_offers_only_the_meanflow_sampler(mf_run):
    from fmcli.demo import progressive
    from fmcli.generate import initial_noise, load_for_sampling, sample_batch

    loaded = load_for_sampling(str(mf_run), torch.device("cpu"))
    settings = loaded.config.sample.model_copy(update={"steps": 4})
    frames = list(progressive(loaded, n=2, seed=0, sample_cfg=settings, every=1, device=torch.device("cpu")))
    assert [f.step for f in frames] == [0, 1, 2, 3, 4]
    ref = sample_batch(loaded.model, initial_noise(0, range(2), loaded.shape), torch.arange(2), settings)
    torch.testing.assert_close(frames[-1].x, ref.x)


def test_training_on_reflow_pairs_with_the_recipes_settings(tmp_path, debug_run):
    """The recipe's data path at debug size: `fm reflow` pairs, then the mean-flow student on them."""
    pairs = tmp_path / "pairs"
    made = fm_in_process("reflow", "--ckpt", debug_run, "--num-pairs", "16", "--solver", "heun", "--steps", "2", "--out", pairs)
    assert made.returncode == 0, made.stderr
    recipe = load_config("quickstart-meanflow")
    items = [*MEANFLOW, "flow.coupling='pairs'", "flow.cond_dropout=0", "flow.time_sampler='uniform'", "sample.cfg=1",
             f"flow.meanflow_ratio={recipe.flow.meanflow_ratio}", "train.steps=2", f"train.init_from='{debug_run}'"]
    out = fm_in_process("train", "--preset", "debug", "--data", pairs, "--run-dir", tmp_path / "run", *[a for i in items for a in ("--set", i)])
    assert out.returncode == 0, out.stderr
    assert (recipe.flow.objective, recipe.flow.coupling, recipe.sample.solver, recipe.sample.cfg) == ("meanflow", "pairs", "meanflow", 1.0)


def test_bench_prices_the_mean_flow_step_against_flow_matching():
    proc = run_fm("bench", "--preset", "debug", "--json", "--mode", "train", "--steps", "1", "--warmup", "1", "--batch-size", "4", "--rounds", "2",
                  "--precision", "fp32", *[a for item in MEANFLOW for a in ("--set", item)], timeout=600)
    assert proc.returncode == 0, proc.stderr
    mf = json.loads(proc.stdout)["meanflow"]
    assert mf["meanflow_step_ms"] > 0 and mf["flow_step_ms"] > 0 and mf["jvp_fraction"] == 0.25
    assert mf["step_cost_vs_flow"] == pytest.approx(mf["meanflow_step_ms"] / mf["flow_step_ms"])
    assert mf["step_cost_spread"]["interleaved"] and mf["step_cost_spread"]["rounds"] == 2  # both timed in one trial
    assert "the flow-matching step" in proc.stderr


def test_the_first_jvp_prints_no_torch_deprecation_warning():
    """torch loads its JVP decompositions at a process's first forward-mode call through `torch.jit.script`, which
    printed a FutureWarning (two lines of torch's source) into the first mean-flow step of every run. A fresh
    process (the decompositions load once per process) computes a target by hand-checkable JVP, stderr empty:
    u = x t + t_end, so du/dt along (v, 1) = v t + x and the target is v + (t_end - t)(v t + x)."""
    import subprocess
    import sys

    from conftest import fm_env

    code = (
        "import torch\n"
        "from fmcli.step import mean_flow_target\n"
        "class U(torch.nn.Module):\n"
        "    def forward(self, x, t, t_end):\n"
        "        return x * t[:, None] + t_end[:, None]\n"
        "x, v = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.5, -1.0], [2.0, 1.0]])\n"
        "t, t_end = torch.tensor([0.2, 0.5]), torch.tensor([0.6, 0.9])\n"
        "got = mean_flow_target(U(), x, t, t_end, v, {})\n"
        "want = v + (t_end - t)[:, None] * (v * t[:, None] + x)\n"
        "assert torch.allclose(got, want), (got, want)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=fm_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
