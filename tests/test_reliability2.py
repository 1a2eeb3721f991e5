"""Issue #32 (reliability hardening 2): one test per numbered item of this part (1, 2, 3, 5, 6, 8, 9, 12),
named after it. Each fails on the code before the fix and passes now.

The probe tests fake the CPU (`hardware.cpu_info`) and the measurement (`hardware._gemm_gflops`): they never
depend on this machine's flags or speed.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path

import pytest
import torch

from fmcli import hardware
from fmcli.config import Config, Strict, load_config, sample_settings
from fmcli.errors import RuntimeFailure, UsageError

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def fm(capsys, *args) -> tuple[int, str, str]:
    """The real CLI in this process: (exit code, stdout, stderr)."""
    from fmcli.cli import app

    with pytest.raises(SystemExit) as exit_info:
        app(args=[str(a) for a in args], prog_name="fm")
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def fake_cpu(*flags, model="AMD EPYC", cores=2) -> hardware.CpuInfo:
    return hardware.CpuInfo(model, {f: f in flags for f in FLAGS}, cores, torch.get_num_threads())


class FakeMachine:
    """hardware's view of a CPU and of its GEMM speed, both made up; counts the measurements."""

    def __init__(self, monkeypatch, tmp_path, cpu: hardware.CpuInfo, gemm: dict):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.delenv(hardware.FORCE_ENV, raising=False)
        self.cpu, self.gemm, self.calls = cpu, gemm, 0
        monkeypatch.setattr(hardware, "cpu_info", lambda: self.cpu)
        monkeypatch.setattr(hardware, "_gemm_gflops", self._measure)
        self.cache = tmp_path / "fm" / "probe.json"

    def _measure(self, width):
        self.calls += 1
        return dict(self.gemm)

    def edit(self, change) -> None:
        data = json.loads(self.cache.read_text())
        change(data, data[next(k for k in data if "|cpu|" in k)])  # the one machine's entries
        self.cache.write_text(json.dumps(data))


AVX512_BF16 = ("avx2", "avx512f", "avx512_bf16")
FAST_BF16 = {"fp32": 100.0, "bf16": 400.0}  # a CPU with native bf16: GEMM 4x faster
SLOW_BF16 = {"fp32": 100.0, "bf16": 0.2}  # emulated bf16


# ----------------------------------------------------------------------------- 1. probe cache values


def _set(path: str, value):
    def change(data, machine):
        entry = machine["w384"]
        *parents, last = path.split(".")
        for p in parents:
            entry = entry[p]
        entry[last] = value

    return change


CORRUPTIONS = {
    "precision-int8": _set("precision", "int8"),
    "precision-fp16": _set("precision", "fp16"),
    "precision-contradicts-numbers": _set("precision", "fp32"),
    "matmul-dtype-junk": _set("matmul_dtype", "fp8"),
    "gemm-not-a-dict": _set("gemm_gflops", [1, 2]),
    "gemm-nan": _set("gemm_gflops.fp32", float("nan")),
    "gemm-negative": _set("gemm_gflops.bf16", -5.0),
    "speedup-string": _set("gemm_speedup", "4"),
    "unknown-field": _set("turbo", True),
    "entry-is-a-string": lambda data, machine: machine.__setitem__("w384", "fast"),
    "machine-is-a-list": lambda data, machine: data.__setitem__(next(k for k in data if "|cpu|" in k), ["w384"]),
}


@pytest.mark.parametrize("corrupt", list(CORRUPTIONS.values()), ids=list(CORRUPTIONS))
def test_item01_malformed_probe_cache_entries_are_measured_again(monkeypatch, tmp_path, corrupt):
    machine = FakeMachine(monkeypatch, tmp_path, fake_cpu(*AVX512_BF16), FAST_BF16)
    assert hardware.probe_cpu(384).precision == "bf16" and machine.calls == 1
    machine.edit(corrupt)
    probe = hardware.probe_cpu(384)
    assert probe.source == "measured" and machine.calls == 2 and probe.precision == "bf16"
    again = hardware.probe_cpu(384)  # the entry was rewritten whole
    assert again.source == "cache" and machine.calls == 2


def test_item01_fm_env_survives_a_cache_of_the_wrong_shape(monkeypatch, tmp_path, capsys):
    machine = FakeMachine(monkeypatch, tmp_path, fake_cpu(*AVX512_BF16), FAST_BF16)
    machine.cache.parent.mkdir(parents=True)
    assert fm(capsys, "env", "--json", "--device", "cpu")[0] == 0
    key = next(k for k in json.loads(machine.cache.read_text()) if "|cpu|" in k)
    for content in ('["not", "a", "dict"]', json.dumps({key: 7}), json.dumps({key: {"w384": [1]}})):
        machine.cache.write_text(content)
        code, out, err = fm(capsys, "env", "--json", "--device", "cpu")
        assert code == 0 and "Traceback" not in err, err
        assert json.loads(out)["probe"]["source"] == "measured"


@pytest.mark.parametrize("bad", ["int8", "fp16"])
def test_item01_a_resolved_precision_is_validated_before_anything_is_written(shapes16, tmp_path, monkeypatch, bad):
    """Whatever "auto" resolves to passes validation (and the fp16-needs-CUDA rule) before config.json exists."""
    from fmcli.train import train

    real = hardware.resolve_hardware

    def resolve(cfg, device, shape):
        precision, compile_choice, ns_dtype = real(cfg, device, shape)
        return dataclasses.replace(precision, precision=bad), compile_choice, ns_dtype

    monkeypatch.setattr(hardware, "resolve_hardware", resolve)
    monkeypatch.setenv(hardware.FORCE_ENV, "bf16-slow")  # no real measurement: the value is replaced anyway
    run_dir = tmp_path / "run"
    cfg = load_config("debug", [f"data.path='{shapes16}'", "train.steps=2", "train.precision='auto'"])
    with pytest.raises(UsageError, match="train.precision"):
        train(cfg, run_dir)
    assert not (run_dir / "config.json").exists() and not (run_dir / "checkpoints").exists()


# -------------------------------------------------------------------- 2. a probe from another machine


def test_item02_the_cache_key_tells_cpus_of_one_model_name_apart(monkeypatch, tmp_path):
    """Two "AMD EPYC" generations, with and without AVX512-BF16, sharing one cache file (home, image, CI)."""
    machine = FakeMachine(monkeypatch, tmp_path, fake_cpu(*AVX512_BF16), FAST_BF16)
    assert hardware.probe_cpu(384).precision == "bf16"
    machine.cpu, machine.gemm = fake_cpu("avx2"), SLOW_BF16  # same model name, no native bf16
    probe = hardware.probe_cpu(384)
    assert probe.source == "measured" and probe.precision == "fp32" and probe.matmul_dtype == "fp32"
    machine.cpu = fake_cpu(*AVX512_BF16, cores=8)  # same flags, other core count: another machine too
    assert hardware.probe_cpu(384).source == "measured" and machine.calls == 3


def test_item02_a_cached_bf16_verdict_is_never_used_on_a_cpu_without_native_bf16(monkeypatch, tmp_path):
    machine = FakeMachine(monkeypatch, tmp_path, fake_cpu("avx2"), FAST_BF16)  # numbers as if copied from a bf16 CPU
    assert hardware.probe_cpu(384).precision == "bf16"
    machine.gemm = SLOW_BF16
    probe = hardware.probe_cpu(384)
    assert probe.source == "measured" and probe.precision == "fp32" and machine.calls == 2


def test_item02_implausibly_slow_cached_figures_are_measured_again(monkeypatch, tmp_path):
    """A probe taken under heavy load: fp32 at 0.05 GFLOP/s on two AVX-512 cores is not what the CPU does."""
    machine = FakeMachine(monkeypatch, tmp_path, fake_cpu(*AVX512_BF16), {"fp32": 0.05, "bf16": 0.2})
    assert hardware.probe_cpu(384).precision == "bf16"
    machine.gemm = {"fp32": 100.0, "bf16": 90.0}  # the quiet machine: bf16 no faster
    probe = hardware.probe_cpu(384)
    assert probe.source == "measured" and probe.precision == "fp32"
    assert hardware.probe_cpu(384).source == "cache"  # plausible figures are kept


def test_item02_fm_env_remeasure(monkeypatch, tmp_path, capsys):
    machine = FakeMachine(monkeypatch, tmp_path, fake_cpu(*AVX512_BF16), FAST_BF16)
    assert fm(capsys, "env", "--json", "--device", "cpu")[0] == 0
    code, out, _ = fm(capsys, "env", "--device", "cpu")
    assert code == 0 and "cache" in out and "--remeasure" in out
    code, out, _ = fm(capsys, "env", "--json", "--device", "cpu", "--remeasure")
    assert code == 0 and json.loads(out)["probe"]["source"] == "measured" and machine.calls == 2


# ---------------------------------------------------------------------------------- 3. reflow and SDEs


def test_item03_reflow_refuses_stochastic_solvers(debug_run, tmp_path, capsys):
    out = tmp_path / "pairs"
    code, stdout, err = fm(capsys, "reflow", "--ckpt", debug_run, "-n", "4", "--solver", "euler-sde", "--out", out, "--device", "cpu")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "stochastic" in lines[0] and "Traceback" not in err, err
    assert not out.exists() and not (tmp_path / "pairs.partial").exists() and stdout == ""


def test_item03_generate_pairs_refuses_stochastic_solvers(debug_run, tmp_path):
    from fmcli import distributed as D
    from fmcli.generate import load_for_sampling
    from fmcli.reflow import generate_pairs

    loaded = load_for_sampling(str(debug_run), torch.device("cpu"))
    sde = loaded.config.sample.model_copy(update={"solver": "euler-sde"})
    with pytest.raises(UsageError, match="stochastic"):
        generate_pairs(loaded, tmp_path / "pairs", num_pairs=4, seed=0, sample_cfg=sde, batch_size=2, ctx=D.DistContext(device=torch.device("cpu")), checkpoint=str(debug_run))
    assert not (tmp_path / "pairs.partial").exists()


def test_item03_sde_sampling_needs_the_real_seed_and_indices(debug_run):
    """Without them every batch (reflow chunk, training grid) drew batch 0's Brownian increments for seed 0."""
    from fmcli.generate import load_for_sampling, sample_batch

    loaded = load_for_sampling(str(debug_run), torch.device("cpu"))
    sde = loaded.config.sample.model_copy(update={"solver": "euler-sde", "steps": 3})
    x0, y = torch.randn(2, *loaded.shape), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="seed"):
        sample_batch(loaded.model, x0, y, sde)
    a = sample_batch(loaded.model, x0, y, sde, seed=0, indices=[0, 1]).x
    b = sample_batch(loaded.model, x0, y, sde, seed=0, indices=[2, 3]).x  # another chunk: other noise
    c = sample_batch(loaded.model, x0, y, sde, seed=1, indices=[0, 1]).x  # another seed: other noise
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_item03_training_sample_grids_key_sde_noise_by_the_run_seed(shapes16, tmp_path, monkeypatch):
    from fmcli import train as train_mod

    calls = []
    real = train_mod.sample_batch
    monkeypatch.setattr(train_mod, "sample_batch", lambda *a, **k: calls.append(k) or real(*a, **k))
    cfg = load_config("debug", [f"data.path='{shapes16}'", "train.steps=1", "train.seed=7", "sample.solver='euler-sde'", "sample.steps=2"])
    train_mod.train(cfg, tmp_path / "run")
    assert calls and all(k["seed"] == 7 and list(k["indices"]) == list(range(cfg.sample.grid_size)) for k in calls)


# -------------------------------------------------------------------------- 5. cfg-zero's zero-init


@pytest.mark.parametrize("solver", ["dopri5", "euler", "heun", "ab2"])
@pytest.mark.parametrize("given", [{"steps": 1}, {"zero_init_steps": 8, "steps": 8}])
def test_item05_one_zero_init_rule_for_every_solver_named_by_its_option(solver, given):
    base = load_config("debug").sample
    with pytest.raises(UsageError) as err:
        sample_settings(base, solver=solver, guidance="cfg-zero", cfg=2.0, **given)
    message = str(err.value)
    assert "--zero-init-steps" in message and "--cfg" not in message, message
    ok = sample_settings(base, solver=solver, guidance="cfg-zero", cfg=2.0, steps=2)  # K=1 < 2 steps: fine
    assert ok.zero_init_steps == 1


def test_item05_dopri5_cfg_zero_never_returns_the_noise_as_a_sample(debug_run, tmp_path, capsys):
    out = tmp_path / "x.png"
    code, stdout, err = fm(capsys, "sample", "--ckpt", debug_run, "--solver", "dopri5", "--guidance", "cfg-zero", "--cfg", "2", "--steps", "1", "--out", out, "--device", "cpu")
    assert code == 2 and "--zero-init-steps" in err and not out.exists() and stdout == "", err


def test_item05_solve_refuses_a_zero_init_that_covers_the_grid():
    from fmcli.solvers import solve

    for solver in ("dopri5", "euler"):
        with pytest.raises(ValueError, match="skip_steps"):
            solve(lambda x, t: -x, torch.ones(1, 2), solver, 1, skip_steps=1)


# -------------------------------------------------------------------------- 6. non-finite numbers


def _float_settings(model=Config, prefix=""):
    """Every float setting of the config: (key, a value of its shape with a placeholder for nan/inf)."""
    for name, field in model.model_fields.items():
        annotation, key = field.annotation, f"{prefix}{name}"
        options = [annotation, *typing.get_args(annotation)]
        section = next((a for a in options if inspect.isclass(a) and issubclass(a, Strict)), None)
        tuples = [a for a in options if typing.get_origin(a) is tuple]
        if section is not None:
            yield from _float_settings(section, key + ".")
        elif tuples and float in [typing.get_args(a)[0] if typing.get_origin(a) is typing.Annotated else a for a in typing.get_args(tuples[0])]:
            yield key, "[{}, 0.5]"
        elif float in options:
            yield key, "{}"


FLOAT_SETTINGS = list(_float_settings())


def test_item06_there_are_float_settings_to_check():
    keys = {k for k, _ in FLOAT_SETTINGS}
    assert {"train.budget_minutes", "optim.lr", "sample.cfg", "sample.sde_noise", "optim.betas", "sample.guidance_interval"} <= keys


@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
@pytest.mark.parametrize("key, shape", FLOAT_SETTINGS, ids=[k for k, _ in FLOAT_SETTINGS])
def test_item06_every_float_setting_refuses_nan_and_inf(key, shape, bad):
    with pytest.raises(UsageError, match="finite"):
        load_config("debug", [f"{key}={shape.format(bad)}"])


def _cli_float_options():
    """(command, option) for every float option of every command, from the signatures Typer reads."""
    from fmcli.cli import app

    for command in app.registered_commands:
        for p in inspect.signature(command.callback, eval_str=True).parameters.values():
            kind, info = p.annotation, p.default
            if typing.get_origin(kind) is typing.Annotated:
                kind, info = typing.get_args(kind)[:2]
            if kind is float or float in typing.get_args(kind):
                decls = [d for d in (*info.param_decls, info.default) if isinstance(d, str) and d.startswith("--")]
                yield command.name or command.callback.__name__, decls[0]


CLI_FLOATS = sorted(set(_cli_float_options()))


def test_item06_the_cli_has_float_options_to_check():
    assert {("sample", "--cfg"), ("sample", "--sde-noise"), ("reflow", "--cfg"), ("bench", "--max-memory")} <= set(CLI_FLOATS)


@pytest.mark.parametrize("bad", ["inf", "nan"])
@pytest.mark.parametrize("command, option", CLI_FLOATS, ids=[f"{c}{o}" for c, o in CLI_FLOATS])
def test_item06_every_float_option_refuses_nan_and_inf(command, option, bad, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = fm(capsys, command, option, bad)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "finite" in lines[0] and out == "", err
    assert list(tmp_path.iterdir()) == []


def test_item06_non_finite_samples_are_an_error_not_black_images(debug_run, tmp_path, capsys):
    from fmcli.generate import sample_batch

    cfg = load_config("debug").sample
    with pytest.raises(RuntimeFailure, match="not finite"):
        sample_batch(lambda x, t, **c: x * float("nan"), torch.ones(3, 3, 4, 4), None, cfg, seed=0, indices=[5, 6, 7])
    out = tmp_path / "grid.png"  # a finite --cfg that overflows float32: the samples are inf/nan
    code, stdout, err = fm(capsys, "sample", "--ckpt", debug_run, "--cfg", "1e300", "-n", "2", "--out", out, "--device", "cpu")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "not finite" in lines[0] and not out.exists() and stdout == "", err


# ---------------------------------------------------------------------------- 8. autoguidance guides


def _guide(debug_run, path: Path, **info) -> Path:
    """A copy of the debug run's checkpoint as a guide whose recorded data facts differ as given."""
    from fmcli.checkpoint import load_checkpoint, resolve_checkpoint

    state = load_checkpoint(resolve_checkpoint(debug_run))
    state["data_info"] = {**state["data_info"], **info}
    torch.save(state, path)
    return path


def test_item08_a_guide_of_other_data_is_refused(debug_run, tmp_path):
    from fmcli.generate import load_for_sampling, with_guide

    loaded = load_for_sampling(str(debug_run), torch.device("cpu"))
    names = loaded.info["class_names"]
    latent = {"kind": "latents", "vae": {"path": "/w/vae", "scaling_factor": 0.18215, "shift_factor": 0.0, "latent_channels": 4, "downsample": 8}}
    cases = {
        "class names": _guide(debug_run, tmp_path / "order.pt", class_names=names[::-1]),  # another class order
        "data kind": _guide(debug_run, tmp_path / "latent.pt", **latent),
    }
    for what, guide in cases.items():
        with pytest.raises(UsageError, match=what):
            with_guide(loaded, str(guide), torch.device("cpu"))
    same = _guide(debug_run, tmp_path / "same.pt")
    assert with_guide(loaded, str(same), torch.device("cpu")).guide is not None


def test_item08_guides_in_another_latent_space_or_text_encoder_are_refused(debug_run, tmp_path, monkeypatch):
    from fmcli import generate

    real = generate.load_for_sampling
    loaded = real(str(debug_run), torch.device("cpu"))
    vae = {"path": "/w/sd-vae", "scaling_factor": 0.18215, "shift_factor": 0.0, "latent_channels": 3, "downsample": 8}
    t5 = {"path": "/w/t5", "model_type": "t5", "hidden_size": 512, "max_tokens": 77}
    text_cfg = loaded.config.model_copy(update={"model": loaded.config.model.model_copy(update={"cross_attention": True, "num_classes": 0, "text_dim": 512})})

    def variant(m, config=None, **info):
        return dataclasses.replace(m, config=config or m.config, info={**m.info, **info})

    cases = [
        ("VAE latent space", variant(loaded, kind="latents", vae=vae), variant(loaded, kind="latents", vae={**vae, "scaling_factor": 0.13025})),
        ("text encoder", variant(loaded, text_cfg, text_encoder=t5), variant(loaded, text_cfg, text_encoder={**t5, "model_type": "clip_text_model"})),
    ]
    for what, main, guide in cases:
        monkeypatch.setattr(generate, "load_for_sampling", lambda *a, g=guide, **k: g)
        with pytest.raises(UsageError, match=what):
            generate.with_guide(main, "guide.pt", torch.device("cpu"))
    warnings = []  # the same facts at another path: maybe moved weights, maybe another fine-tune: said, not refused
    moved = variant(loaded, kind="latents", vae={**vae, "path": "/elsewhere/sd-vae"})
    monkeypatch.setattr(generate, "load_for_sampling", lambda *a, **k: moved)
    generate.with_guide(variant(loaded, kind="latents", vae=vae), "guide.pt", torch.device("cpu"), warn=warnings.append)
    assert len(warnings) == 1 and "/elsewhere/sd-vae" in warnings[0]


# ------------------------------------------------------------------------------------- 9. NFE budgets


def test_item09_steps_for_nfe_never_exceeds_the_budget():
    from fmcli.solvers import nfe_of, steps_for_nfe

    for solver in ("euler", "euler-sde", "midpoint", "heun", "rk4", "ab2"):
        for nfe in range(1, 12):
            steps = steps_for_nfe(solver, nfe)
            assert nfe_of(solver, steps) <= nfe if steps else nfe < nfe_of(solver, 1), (solver, nfe)
    assert steps_for_nfe("heun", 1) == steps_for_nfe("rk4", 2) == steps_for_nfe("ab2", 1) == 0


def test_item09_fid_sweep_skips_budgets_the_solver_cannot_meet(debug_run, shapes16, capsys):
    code, out, err = fm(capsys, "fid", "--ckpt", debug_run, "-n", "2", "--ref", shapes16, "--features", "tiny", "--nfe", "1,2,4", "--solver", "heun", "--device", "cpu", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["nfe_budget"] for r in rows] == [2, 4] and all(r["nfe_per_sample"] <= r["nfe_budget"] for r in rows)
    assert "NFE 1: skipped" in err
    code, out, err = fm(capsys, "fid", "--ckpt", debug_run, "-n", "2", "--ref", shapes16, "--features", "tiny", "--nfe", "1,3", "--solver", "rk4", "--device", "cpu")
    assert code == 2 and "needs at least 4 NFE" in err and out == ""


# ------------------------------------------------------------------------ 12. guidance=auto in training


def test_item12_autoguidance_is_refused_in_a_training_config(shapes16, tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = fm(capsys, "train", "--preset", "debug", "--data", shapes16, "--run-dir", run_dir, "--set", "sample.guidance=auto", "--set", "train.device=cpu")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "sample.guidance" in lines[0] and "Traceback" not in err, err
    assert not run_dir.exists() and out == ""


def test_item12_a_budget_fallback_that_sets_autoguidance_is_refused_too():
    from fmcli.config import check_training_config

    cfg = load_config("debug", ["train.budget_minutes=5", 'train.budget_fallback={min_steps=10, overrides=["sample.guidance=\'auto\'"]}'])
    with pytest.raises(UsageError, match="budget_fallback"):
        check_training_config(cfg)
    check_training_config(load_config("debug"))  # the usual config passes


def test_item12_a_run_saved_with_autoguidance_resumes_once_guidance_is_set(debug_run, tmp_path, capsys):
    """Older fm saved the final checkpoint of such a run before failing: it is refused, and resumable with --set."""
    import shutil

    from fmcli.checkpoint import resolve_checkpoint

    run = tmp_path / "run"
    shutil.copytree(debug_run, run)
    ckpt = resolve_checkpoint(run)
    state = torch.load(ckpt, weights_only=True)
    state["config"]["sample"]["guidance"] = "auto"
    torch.save(state, ckpt)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    code, _, err = fm(capsys, "resume", run, "--set", "train.steps=6")
    assert code == 2 and "sample.guidance" in err and sorted(p.name for p in (run / "checkpoints").iterdir()) == before, err
    code, _, err = fm(capsys, "resume", run, "--set", "train.steps=6", "--set", "sample.guidance=cfg")
    assert code == 0, err


def test_json_output_is_valid_json_when_a_number_is_not_finite(capsys):
    """--json rows with a diverged metric (nan/inf) print null, never Python's NaN/Infinity tokens, which `jq`
    and every strict JSON parser reject."""
    import numpy as np

    from fmcli.console import emit_json

    emit_json({"fid": float("nan"), "rows": [{"kid": float("inf"), "nfe": 4}, (np.float64("-inf"), 1.5)], "ok": True})
    text = capsys.readouterr().out
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"fid": None, "rows": [{"kid": None, "nfe": 4}, [None, 1.5]], "ok": True}


def test_metrics_jsonl_records_are_strict_json_when_a_value_is_not_finite(tmp_path):
    """An fp16 overflow step's grad_norm (inf) or a diverged evaluation (nan) goes into metrics.jsonl as null: a
    strict JSON reader (one that refuses Python's NaN/Infinity tokens, as `jq` does) reads every line."""
    from fmcli.runlog import append_metrics

    def strict(line):
        return json.loads(line, parse_constant=lambda token: pytest.fail(f"non-JSON token {token} in {line!r}"))

    append_metrics(tmp_path, {"step": 1, "loss": 0.5, "grad_norm": float("inf")})
    append_metrics(tmp_path, {"step": 2, "fd": float("nan"), "rows": [float("-inf"), 2.0]})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [strict(line) for line in lines] == [{"step": 1, "loss": 0.5, "grad_norm": None}, {"step": 2, "fd": None, "rows": [None, 2.0]}]
