"""generate.py's network runtime: sample.precision / sample.compile resolved like training's, the SamplingNet
(autocast network, fp32 solver), per-index determinism at every precision, and one sampling path for
`fm sample` and `fm bench`."""

from __future__ import annotations

import pytest
import torch

from fmcli import generate as gen_mod
from fmcli import hardware
from fmcli.config import Config, SampleConfig, load_config
from fmcli.errors import UsageError
from fmcli.generate import LoadedModel, SamplingNet, iterate_samples, prepare_for_sampling, resolve_sampling_hardware
from fmcli.models import build_model

CPU = torch.device("cpu")


def tiny_loaded(seed: int = 0) -> LoadedModel:
    """A small class-conditional DiT with random weights (adaLN-Zero's zero init would give zero velocity)."""
    cfg = Config.model_validate({"model": {"hidden_size": 32, "depth": 2, "heads": 2, "patch_size": 4, "image_size": 8, "in_channels": 3, "num_classes": 3}})
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return LoadedModel(model=model.eval(), config=cfg, info={}, step=0)


def samples(loaded, sc, batch_size, n=7, seed=11):
    return torch.cat([r.x for _, _, r in iterate_samples(loaded, list(range(n)), seed=seed, sample_cfg=sc, batch_size=batch_size, device=CPU)])


# ------------------------------------------------------------------------------------------ resolution


@pytest.mark.parametrize("forced, expected", [("bf16-fast", "bf16"), ("bf16-slow", "fp32")])
def test_auto_precision_follows_the_probe_as_training_does(monkeypatch, forced, expected):
    from fmcli.hardware import resolve_hardware

    monkeypatch.setenv(hardware.FORCE_ENV, forced)
    cfg = tiny_loaded().config
    precision, _ = resolve_sampling_hardware(cfg, SampleConfig(precision="auto", compile=False), CPU)
    trained, _, _ = resolve_hardware(cfg.with_section("train", precision="auto"), CPU, (3, 8, 8))
    assert precision.precision == trained.precision == expected
    assert precision.reason.startswith("auto:") and "forced" in precision.reason


def test_seeds_are_32_bit_and_every_32_bit_seed_keeps_its_noise():
    """A seed of 2**32 or more repeated another seed's noise: SeedSequence splits it into 32-bit words and pads
    every key with zeros, so seed 2**32's sample 0 was seed 0's sample 1, and 64-bit masking made 2**64 + 3 seed 3.
    Such seeds (and negative ones) are refused wherever a user gives one (the CLI's parser, a new run's config, the demo);
    every seed in [0, 2**32) draws the numbers it always drew (values pinned from fm before the limit)."""
    import typer

    from fmcli.cli.options import seed_value
    from fmcli.demo import bounded_sampling
    from fmcli.launch import training_config
    from fmcli.generate import initial_noise, sde_noise
    from fmcli.seeding import STREAMS, torch_generator

    assert torch.equal(initial_noise(2**32, [0], (8,)), initial_noise(0, [1], (8,)))  # the collision the limit prevents
    assert torch.equal(initial_noise(2**64 + 3, [2], (8,)), initial_noise(3, [2], (8,)))
    pinned = [
        (initial_noise(5, [0, 3], (2, 2)), [2.3040637969970703, 1.1149739027023315, -0.3950560986995697, 1.3353091478347778,
                                            0.7583979964256287, 1.714313268661499, -0.10379666835069656, 1.8499822616577148]),
        (initial_noise(2**32 - 1, [7], (4,)), [0.35726961493492126, -0.3009973168373108, 0.21812260150909424, 0.7347416877746582]),
        (sde_noise(9, [1], (3,))(2), [-0.6353054642677307, -1.5564509630203247, 0.32397985458374023]),
        (torch.rand(3, generator=torch_generator(STREAMS["epoch"], 11, 2)), [0.29301416873931885, 0.035581111907958984, 0.17114317417144775]),
    ]  # fmt: skip
    for got, values in pinned:
        assert got.flatten().tolist() == values
    for bad in (2**32, -1, 2**64 + 3):
        with pytest.raises(typer.BadParameter, match="a seed is a whole number from 0 to 4294967295"):
            seed_value(str(bad))
        with pytest.raises(UsageError, match=f"train.seed: a seed is a whole number from 0 to 4294967295, got {bad}"):
            training_config("debug", [f"train.seed={bad}"], data=None, run_dir=None, resume=None)  # where a new run starts
        with pytest.raises(UsageError, match="a seed is a whole number from 0 to 4294967295"):
            bounded_sampling(1.0, 1.0, bad)
    assert seed_value(str(2**32 - 1)) == training_config("debug", [f"train.seed={2**32 - 1}"], data=None, run_dir=None, resume=None)[0].train.seed == 2**32 - 1
    assert bounded_sampling(1.0, 1.0, 7.0)[2] == 7 and bounded_sampling(1.0, 1.0, 2**32 - 1)[2] == 2**32 - 1


@pytest.mark.parametrize("works, expected", [(True, True), (False, False)])
def test_auto_compile_follows_the_cxx_compiler(monkeypatch, works, expected):
    monkeypatch.setattr(hardware, "cxx_compiler", lambda use_cache=True: {"path": "/usr/bin/g++", "works": works, "error": None if works else "no"})
    _, compile_choice = resolve_sampling_hardware(tiny_loaded().config, SampleConfig(precision="fp32", compile="auto"), CPU)
    assert compile_choice.compile is expected and compile_choice.reason.startswith("auto:")
    _, explicit = resolve_sampling_hardware(tiny_loaded().config, SampleConfig(precision="fp32", compile=not expected), CPU)
    assert explicit.compile is (not expected) and explicit.reason == "set explicitly"


def test_a_bf16_trained_checkpoint_samples_in_fp32_where_bf16_is_slow(monkeypatch, tmp_path, shapes16):
    """The training run's precision is not the sampling machine's: auto is resolved where sampling runs."""
    from conftest import QuietLog

    from fmcli.generate import load_for_sampling
    from fmcli.train import train

    cfg = load_config("debug", [f"data.path='{shapes16}'", "train.steps=1", "train.precision=bf16", "sample.precision=auto"])
    train(cfg, tmp_path / "run", log=QuietLog())
    loaded = load_for_sampling(str(tmp_path / "run"), CPU)
    assert loaded.config.train.precision == "bf16" and loaded.config.sample.precision == "auto"
    lines = []
    for forced, expected in (("bf16-slow", "fp32"), ("bf16-fast", "bf16")):
        monkeypatch.setenv(hardware.FORCE_ENV, forced)
        prepared = prepare_for_sampling(loaded, loaded.config.sample, CPU, lines.append)
        assert prepared.model.precision == expected and prepared.hardware["precision"].precision == expected
    assert lines[0].startswith("sampling precision: fp32 (auto: ") and lines[-1].startswith("sampling precision: bf16 (auto: ")


def test_fp16_sampling_on_a_cpu_is_refused():
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        resolve_sampling_hardware(tiny_loaded().config, SampleConfig(precision="fp16"), CPU)


# ------------------------------------------------------------------------------------- the network


def test_the_network_runs_in_bf16_and_the_solver_in_fp32():
    loaded = tiny_loaded()
    seen = []
    loaded.model.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    net = prepare_for_sampling(loaded, SampleConfig(precision="bf16", compile=False), CPU).model
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    v = net(x, t, y=y)
    assert seen == [torch.bfloat16] and v.dtype == torch.float32  # autocast inside, fp32 out to the solver
    with torch.no_grad():
        exact = loaded.model(x, t, y=y)
    assert 0 < (v - exact).abs().max() < 0.05  # bf16 rounding: close to fp32, not equal
    fp32 = samples(loaded, SampleConfig(solver="heun", steps=4, cfg=2.0), 7)  # an unprepared model: fp32 eager
    bf16 = samples(prepare_for_sampling(loaded, SampleConfig(precision="bf16", compile=False), CPU), SampleConfig(solver="heun", steps=4, cfg=2.0), 7)
    assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).abs().max() < 0.1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("solver", ["heun", "euler-sde"])
def test_same_seed_any_batch_size_gives_the_same_samples_at_each_precision(precision, solver):
    sc = SampleConfig(solver=solver, steps=4, cfg=2.0, precision=precision, compile=False)
    loaded = prepare_for_sampling(tiny_loaded(), sc, CPU)
    a, b, c = samples(loaded, sc, 7), samples(loaded, sc, 3), samples(loaded, sc, 1)
    assert a.abs().max() > 0
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # fp32: other GEMM shapes round the last bits differently
    torch.testing.assert_close(a, c, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compiled_sampling_is_per_index_deterministic_and_close_to_eager():
    """Under torch.compile (a static graph for the first batch size, a dynamic one after) sample i is the same
    whatever the batch size, as in eager; compiled and eager bf16 differ by bf16 rounding (fused kernels keep
    intermediates in fp32)."""
    sc = SampleConfig(solver="euler", steps=2, cfg=2.0, precision="bf16", compile=True)
    loaded = prepare_for_sampling(tiny_loaded(), sc, CPU)
    a, b = samples(loaded, sc, 7), samples(loaded, sc, 3)
    assert loaded.model.compiled
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    eager = samples(prepare_for_sampling(tiny_loaded(), sc.model_copy(update={"compile": False}), CPU), sc, 7)
    assert (a - eager).abs().max() < 0.05


def test_a_compile_that_fails_falls_back_to_eager_with_one_warning(monkeypatch):
    class Broken:
        def __call__(self, *args, **kwargs):
            raise RuntimeError("inductor: no C++ compiler\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda module, **options: Broken())
    loaded, lines = tiny_loaded(), []
    sc = SampleConfig(solver="euler", steps=3, cfg=2.0, precision="fp32", compile=True)
    prepared = prepare_for_sampling(loaded, sc, CPU, lines.append)
    out = samples(prepared, sc, 7)
    assert len(lines) == 1 and lines[0].startswith("warning: torch.compile failed (RuntimeError: inductor: no C++ compiler)")
    assert "--no-compile" in lines[0] and not prepared.model.compiled and prepared.hardware["compile"].fell_back
    torch.testing.assert_close(out, samples(loaded, sc, 7), rtol=0, atol=0)


def test_the_compiled_module_is_built_once_and_sees_one_batch_size(monkeypatch):
    """One torch.compile per command; the last, smaller batch is padded to the graph's batch (no recompile) and
    its samples are those of an unpadded eager run."""
    built, sizes = [], []

    def fake_compile(module, **options):
        assert options == {"options": {"freezing": True}}  # sampling's weights are fixed: inductor may fold them
        built.append(module)
        return lambda x, t, **cond: sizes.append((x.shape[0], t.shape[0], cond["y"].shape[0])) or module(x, t, **cond)

    monkeypatch.setattr(torch, "compile", fake_compile)
    sc = SampleConfig(solver="euler", steps=2, cfg=2.0, precision="fp32", compile=True)
    loaded = tiny_loaded()
    prepared = prepare_for_sampling(loaded, sc, CPU)
    out = samples(prepared, sc, 3)  # batches of 3, 3 and 1 sample(s): CFG-doubled 6, 6, 2
    assert len(built) == 1 and prepared.model.compiled
    assert set(sizes) == {(6, 6, 6)} and len(sizes) == 3 * 2
    torch.testing.assert_close(out, samples(loaded, sc, 3), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------- one path


def test_bench_measures_the_sampling_path_of_fm_sample(monkeypatch, tmp_path, debug_run):
    """A spy on prepare_for_sampling, iterate_samples and SamplingNet.__call__: `fm sample` and the bench's
    sampling trial go through the same functions, at the precision and compile each resolved."""
    from fmcli.bench import measure_bench as measure
    from fmcli.measure import BenchSpec
    from fmcli.config import config_to_dict, resolve_without_data
    from fmcli.distributed import DistContext
    from fmcli.generate import sample_command

    calls = []
    real_prepare, real_iterate, real_call = gen_mod.prepare_for_sampling, gen_mod.iterate_samples, SamplingNet.__call__

    def prepare(loaded, sample_cfg, *a, **k):
        calls.append(("prepare", sample_cfg.precision, sample_cfg.compile))
        return real_prepare(loaded, sample_cfg, *a, **k)

    def iterate(loaded, *a, **k):
        calls.append(("iterate", loaded.model.precision))
        return real_iterate(loaded, *a, **k)

    def call(self, *a, **k):
        calls.append(("net", self.precision, self.compiled))
        return real_call(self, *a, **k)

    monkeypatch.setattr(gen_mod, "prepare_for_sampling", prepare)
    monkeypatch.setattr(gen_mod, "iterate_samples", iterate)
    monkeypatch.setattr(SamplingNet, "__call__", call)
    overrides = lambda base: base.model_copy(update={"precision": "bf16", "compile": False})  # noqa: E731
    summary = sample_command(
        DistContext(), ckpt=str(debug_run), texts=[], n=2, class_label=None, sample_overrides=overrides, seed=0, out=tmp_path / "g.png",
        gif=None, gif_frames=2, batch_size=2, ema=True, vae=None, text_encoder=None,
    )  # fmt: skip
    assert summary["precision"] == "bf16" and summary["compile"] is False
    sampled = list(calls)
    calls.clear()
    cfg = resolve_without_data(load_config("debug"))
    result = measure(BenchSpec(config=config_to_dict(cfg), batch=2, mode="sample", steps=2, warmup=1, sample_precision="bf16", sample_compile=False))
    assert result["sample"]["precision"] == "bf16" and result["sample"]["compiled"] is False
    assert sampled[:2] == calls[:2] == [("prepare", "bf16", False), ("iterate", "bf16")]
    assert {c for c in sampled if c[0] == "net"} == {c for c in calls if c[0] == "net"} == {("net", "bf16", False)}


def test_cli_bench_reports_the_sampling_precision_and_compile(monkeypatch):
    from conftest import run_fm

    r = run_fm(
        "bench", "--preset", "debug", "--json", "--mode", "sample", "--batch-size", "2", "--steps", "1", "--warmup", "0",
        "--set", "sample.precision=auto", env={"FM_PROBE_FORCE": "bf16-fast"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    import json

    report = json.loads(r.stdout)
    assert report["sample"]["precision"] == "bf16" and report["sample"]["compile"] is False
    assert report["hardware"]["sample"]["precision"]["precision"] == "bf16" and "sampling precision: bf16 (auto: " in r.stderr


def test_cli_sample_precision_flag_and_json(tmp_path, debug_run):
    from conftest import fm_in_process as run_fm

    r = run_fm("sample", "--ckpt", debug_run, "-n", "2", "--precision", "bf16", "--no-compile", "--out", tmp_path / "g.png", "--json")
    assert r.returncode == 0, r.stderr
    import json

    info = json.loads(r.stdout)
    assert info["precision"] == "bf16" and info["compile"] is False
    bad = run_fm("sample", "--ckpt", debug_run, "-n", "2", "--precision", "fp16", "--out", tmp_path / "h.png")
    assert bad.returncode == 2 and "fp16 needs a CUDA device" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_fm("sample", "--ckpt", debug_run, "-n", "2", "--precision", "fp8", "--out", tmp_path / "h.png")
    assert bad.returncode == 2 and "precision" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("damage", ["weights-of-another-depth", "weights-not-a-dict", "data-info-not-a-mapping", "class-names-not-a-list", "step-not-a-count"])
def test_a_damaged_checkpoint_is_one_usage_error_naming_it(debug_run, tmp_path, damage):
    """Sampling reads weights, data facts and step from a file: one that does not hold what fm writes is a one-line
    UsageError naming it (exit 2), not torch's many-line state-dict report or an AttributeError (exit 1)."""
    from fmcli.checkpoint import load_checkpoint, resolve_checkpoint, save_atomic
    from fmcli.generate import load_for_sampling

    state = load_checkpoint(resolve_checkpoint(debug_run))
    if damage == "weights-of-another-depth":
        state["config"]["model"]["depth"] += 1
    elif damage == "weights-not-a-dict":
        state["ema"] = [1, 2]
    elif damage == "data-info-not-a-mapping":
        state["data_info"] = "shapes"
    elif damage == "class-names-not-a-list":
        state["data_info"]["class_names"] = 10
    else:
        state["step"] = "4"
    save_atomic(state, tmp_path / "damaged.pt")
    with pytest.raises(UsageError) as err:
        load_for_sampling(str(tmp_path / "damaged.pt"), CPU)
    message = str(err.value)
    assert "damaged.pt is damaged" in message and "\n" not in message


class _Toy(torch.nn.Module):
    """A nonlinear class-conditional velocity (and, with `mean_flow`, an average velocity that reads t_end)."""

    null_class = 3

    def __init__(self, mean_flow: bool = False):
        super().__init__()
        self.end_time = mean_flow

    def forward(self, x, t, y, t_end=None):
        w = (y.float() + 1).view(-1, 1)
        v = torch.sin(3 * x) * w + t.view(-1, 1) * (x - w)
        return v if t_end is None else v * (1 + t_end.view(-1, 1) - t.view(-1, 1))


# A mean-flow model takes --guidance cfg only (solvers.check_solver_for_model refuses cfg-zero with it): not a pair to test.
@pytest.mark.parametrize(
    "solver, guidance",
    [(s, g) for s in ["euler", "midpoint", "heun", "rk4", "ab2", "euler-sde", "dopri5", "meanflow"] for g in ["cfg", "cfg-zero"]
     if (s, g) != ("meanflow", "cfg-zero")],
)  # fmt: skip
def test_the_settings_a_solver_never_reads_are_those_that_change_nothing(solver, guidance):
    """Brute force against `solvers.unused_settings` (what the CLI refuses as options that do nothing): changing a
    setting it lists leaves the samples bit-identical, and changing any other of them changes the samples."""
    from fmcli.config import sample_settings
    from fmcli.generate import sample_batch
    from fmcli.solvers import unused_settings

    model, x0, labels = _Toy(solver == "meanflow"), torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])
    base = dict(solver=solver, guidance=guidance, cfg=2.0, steps=4, zero_init_steps=1, sde_noise=1.0, rtol=1e-4, atol=1e-4)

    def run(**change):
        cfg = sample_settings(SampleConfig(), **{**base, **change})
        return sample_batch(model, x0.clone(), labels, cfg, seed=0, indices=[0, 1]).x

    ref = run()
    unused = unused_settings(solver, guidance)
    for key, other in {"rtol": 1e-1, "atol": 1e-1, "steps": 6, "sde_noise": 0.3, "zero_init_steps": 2}.items():
        assert torch.equal(run(**{key: other}), ref) == (key in unused), (key, unused)


def test_guidance_settings_at_weight_one_change_nothing():
    """Brute force for the CLI's refusal of guidance options at --cfg 1: the interval, the method, cfg-zero's zero-init
    and an autoguidance guide leave the samples bit-identical at weight 1 (the main model alone)."""
    from fmcli.config import sample_settings
    from fmcli.generate import sample_batch

    model, x0, labels = _Toy(), torch.randn(2, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 2])

    def run(guide=None, **change):
        cfg = sample_settings(SampleConfig(), **{"solver": "heun", "steps": 4, "cfg": 1.0, **change})
        return sample_batch(model, x0.clone(), labels, cfg, guide=guide, seed=0, indices=[0, 1]).x

    ref = run()
    for change in ({"guidance_interval": (0.2, 0.8)}, {"guidance": "cfg-zero", "zero_init_steps": 2}, {"guidance": "auto", "guide": lambda x, t, **c: 0 * x}):
        assert torch.equal(run(**change), ref), change
    assert not torch.equal(run(cfg=2.0, guidance="cfg-zero", zero_init_steps=2), ref)  # guided, they do change it


def test_a_row_reports_zero_init_steps_only_where_cfg_zero_zeroed_a_step():
    """cfg-zero zeroes its first steps only when it guides (generate.sample_batch: cfg != 1); at cfg 1 the row
    must not claim a zero-init that never ran."""
    from fmcli.generate import settings_record

    guided = settings_record(SampleConfig(guidance="cfg-zero", cfg=2.0, zero_init_steps=3))
    unguided = settings_record(SampleConfig(guidance="cfg-zero", cfg=1.0))
    assert guided["zero_init_steps"] == 3
    assert "zero_init_steps" not in unguided
