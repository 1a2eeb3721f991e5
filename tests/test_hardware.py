"""fmcli.hardware: the precision probe and its cache, auto precision / compile, the compile fallback, fm env."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import QuietLog, run_fm
from fmcli import hardware
from fmcli.checkpoint import load_checkpoint, resolve_checkpoint
from fmcli.config import load_config
from fmcli.train import train

CPU = torch.device("cpu")


def cfg_for(data, *overrides):
    return load_config("debug", [f"data.path='{data}'", *overrides])


class ListLog(QuietLog):
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)


@pytest.mark.parametrize("forced, expected", [("bf16-slow", "fp32"), ("bf16-fast", "bf16")])
def test_forced_probe_decides_auto_precision(monkeypatch, forced, expected):
    monkeypatch.setenv(hardware.FORCE_ENV, forced)
    choice = hardware.resolve_precision("auto", CPU, width=64)
    assert choice.precision == expected and choice.probe.source == "forced"
    assert hardware.matmul_dtype(CPU, 64, choice.probe) == expected  # Muon's orthogonalisation follows the probe
    assert "forced" in choice.reason


@pytest.mark.parametrize("forced", ["bf16-slow", "bf16-fast"])
@pytest.mark.parametrize("explicit", ["fp32", "bf16"])
def test_explicit_precision_is_never_overridden(monkeypatch, forced, explicit):
    monkeypatch.setenv(hardware.FORCE_ENV, forced)
    choice = hardware.resolve_precision(explicit, CPU, width=64)
    assert choice.precision == explicit and choice.probe is None


def test_explicit_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_info", lambda: hardware.CpuInfo("test cpu", dict.fromkeys(["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"], False), 2, 2))
    choice = hardware.resolve_precision("bf16", CPU, width=64)
    assert choice.precision == "bf16" and "no native bf16" in choice.warning


def test_measured_probe_decision_follows_the_timings(monkeypatch):
    """The decision is the rule applied to what was measured: slow bf16 -> fp32, fast bf16 -> bf16."""
    for gemm, step, expected in [({"fp32": 100.0, "bf16": 0.5}, {"fp32": 50.0, "bf16": 900.0}, "fp32"), ({"fp32": 100.0, "bf16": 400.0}, {"fp32": 50.0, "bf16": 30.0}, "bf16")]:
        monkeypatch.setattr(hardware, "_gemm_gflops", lambda width, g=gemm: dict(g))
        monkeypatch.setattr(hardware, "_step_ms", lambda fn, s=step: dict(s))
        probe = hardware.probe_cpu(64, model_step=lambda p: None, step_key="k", use_cache=False)
        assert probe.precision == expected and probe.source == "measured"
        assert probe.step_speedup == pytest.approx(step["fp32"] / step["bf16"])


def test_probe_is_cached_per_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # a CPU with native bf16 (a cached bf16 verdict is refused on one without: tests/test_reliability2.py)
    monkeypatch.setattr(hardware, "cpu_info", lambda: hardware.CpuInfo("test cpu", {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_tile": False, "amx_bf16": False}, 2, 2))
    calls = []
    monkeypatch.setattr(hardware, "_gemm_gflops", lambda width: calls.append(width) or {"fp32": 10.0, "bf16": 30.0})
    first = hardware.probe_cpu(48)
    second = hardware.probe_cpu(48)
    assert calls == [48] and first.source == "measured" and second.source == "cache"
    assert second.gemm_gflops == first.gemm_gflops and second.precision == first.precision == "bf16"
    cache = json.loads((tmp_path / "fm" / "probe.json").read_text())
    assert hardware.machine_key(CPU) in cache and torch.__version__ in hardware.machine_key(CPU)
    hardware.probe_cpu(96)  # another width is another measurement
    assert calls == [48, 96]


def test_real_probe_is_short_and_sane(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    step = hardware.forward_backward_fn(model, (torch.randn(64, 32),))
    probe = hardware.probe_cpu(32, step, "mlp")
    assert probe.seconds < 10 and probe.precision in ("fp32", "bf16")
    assert all(v > 0 for v in probe.gemm_gflops.values()) and set(probe.step_ms) == {"fp32", "bf16"}
    assert probe.precision == hardware._choose(probe.gemm_speedup, probe.step_speedup)


def test_compile_setting_explicit_and_auto(monkeypatch):
    assert hardware.resolve_compile(True, CPU).compile is True
    assert hardware.resolve_compile(False, CPU).compile is False
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    auto = hardware.resolve_compile("auto", CPU)
    assert auto.compile is False and "no working C++ compiler" in auto.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch logs the notice only where no CUDA runtime is found")
def test_compiling_on_a_cpu_prints_no_cuda_runtime_notice(tmp_path):
    """Where a CUDA toolkit is found (here CUDA_HOME) but no GPU, inductor's first compile logged torch's
    "No CUDA runtime is found, using CUDA_HOME=..." into a CPU run's stderr: torch logs it once per process, when
    torch.utils.cpp_extension is imported (inductor does, though not on every path: the first call imports it
    itself, so that the test does not depend on inductor's cache). A fresh process compiles through
    compile_with_fallback: stderr stays empty, and the compiled module computes what the eager one does."""
    import subprocess
    import sys

    from conftest import fm_env

    if not hardware.cxx_compiler()["works"]:
        pytest.skip("inductor needs a working C++ compiler")
    code = (
        "import torch\n"
        "from fmcli.hardware import CompileChoice, compile_with_fallback\n"
        "m, x = torch.nn.Linear(4, 4), torch.randn(2, 4)\n"
        "first = lambda f: (__import__('torch.utils.cpp_extension'), f(x))\n"
        "c = compile_with_fallback(m, first, print, CompileChoice(True, True, ''))\n"
        "assert c is not m and torch.allclose(c(x), m(x), atol=1e-6)\n"
    )
    # A cold compile (a fresh inductor cache, as on a user's first run): a cached graph never imports cpp_extension.
    env = fm_env({"CUDA_HOME": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc.stderr


def test_compile_failure_at_first_call_falls_back_to_eager(tmp_path, shapes16, monkeypatch):
    """torch.compile is lazy: the failure comes at the first forward. Training goes on eagerly, with one warning,
    and computes exactly what an eager run computes."""

    def failing_compile(model, **kwargs):
        def call(*args, **kw):
            raise RuntimeError("InductorError: C++ compile error\nlong compiler output")

        return call

    eager = train(cfg_for(shapes16, "train.steps=3", "train.checkpoint_every=0"), tmp_path / "eager", log=QuietLog())
    monkeypatch.setattr(torch, "compile", failing_compile)
    log = ListLog()
    result = train(cfg_for(shapes16, "train.steps=3", "train.checkpoint_every=0", "train.compile=true"), tmp_path / "run", log=log)
    warnings = [line for line in log.lines if "torch.compile failed" in line]
    assert len(warnings) == 1 and "\n" not in warnings[0] and "continuing without compile" in warnings[0]
    assert result.losses == eager.losses
    record = load_checkpoint(resolve_checkpoint(tmp_path / "run"))["hardware"]["compile"]
    assert record["fell_back"] is True and record["compile"] is False


def test_auto_precision_is_resolved_and_recorded(tmp_path, shapes16, monkeypatch):
    monkeypatch.setenv(hardware.FORCE_ENV, "bf16-slow")
    log = ListLog()
    train(cfg_for(shapes16, "train.steps=2", "train.precision=auto", "optim.name=muon"), tmp_path / "run", log=log)
    state = load_checkpoint(resolve_checkpoint(tmp_path / "run"))
    assert state["config"]["train"]["precision"] == "fp32"  # resolved once: a resumed run keeps it anywhere
    hw = state["hardware"]
    assert hw["precision"]["setting"] == "auto" and hw["precision"]["probe"]["source"] == "forced"
    assert hw["muon_ns_dtype"] == "fp32"
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert env["hardware"]["precision"]["precision"] == "fp32"
    assert any(line.startswith("precision: fp32") for line in log.lines)


def test_fm_env_json_fields(tmp_path):
    out = run_fm("env", "--json", "--width", "32", env={"XDG_CACHE_HOME": str(tmp_path)}, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["device"] == "cpu" or report["device"].startswith("cuda")
    assert set(report["cpu"]["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
    assert report["cpu"]["cores"] >= 1 and report["cpu"]["threads"] >= 1 and report["cpu"]["model"]
    assert report["versions"]["torch"] == torch.__version__
    assert report["probe"]["width"] == 32 and report["probe"]["gemm_gflops"]["fp32"] > 0 and report["probe"]["gemm_gflops"]["bf16"] > 0
    assert report["auto"]["precision"] in ("bf16", "fp32") and isinstance(report["auto"]["compile"], bool)
    assert report["auto"]["muon_matmul_dtype"] in ("bf16", "fp32")
    assert set(report["cxx_compiler"]) == {"path", "works", "error"}
    assert set(report["extras"]) == set(hardware.OPTIONAL_EXTRAS)
    assert (tmp_path / "fm" / "probe.json").exists()
    again = run_fm("env", "--width", "32", env={"XDG_CACHE_HOME": str(tmp_path), hardware.FORCE_ENV: "bf16-slow"}, timeout=300)
    assert again.returncode == 0 and "precision fp32" in again.stdout


def test_budget_lowers_steps_on_a_slow_machine_and_resume_keeps_them(tmp_path, shapes16, monkeypatch):
    from fmcli import budget as budget_mod
    from fmcli.config import validate_config

    # A slow machine, whatever this one is: 20 ms per step (the real measurement is tested to be positive below).
    real = budget_mod.RunBudget._measure_step_seconds
    measured = []
    monkeypatch.setattr(budget_mod.RunBudget, "_measure_step_seconds", lambda self, probes: measured.append(real(self, probes)) or 0.02)

    monkeypatch.setattr(budget_mod, "clock", lambda: 0.0)  # setup takes no time on this clock (tests/test_budget.py drives refits)
    request = ["train.steps=40", "train.budget_minutes=0.005", "train.checkpoint_every=0", "train.log_every=1000"]
    first = train(cfg_for(shapes16, *request), tmp_path / "run", stop_at_step=2, log=QuietLog())
    state = load_checkpoint(resolve_checkpoint(tmp_path / "run"))
    budget = state["hardware"]["budget"]
    assert budget["requested_steps"] == 40 and budget["step_seconds"] == 0.02 and measured[0] > 0
    # 0.3 s at 0.02 s/step, less the 1 % margin (the final checkpoint and grid measure 0 s on this clock): 14 steps
    assert budget["steps"] == int((0.3 - 0.01 * 0.3) / 0.02) == 14
    assert state["config"]["train"]["steps"] == budget["steps"] and first.stopped_early == (budget["steps"] > 2)
    # a resume (config from the checkpoint, as fm resume / fm train --resume build it) keeps the fitted steps
    resumed = train(validate_config(state["config"]), tmp_path / "run", resume_from=resolve_checkpoint(tmp_path / "run"), log=QuietLog())
    assert resumed.step == budget["steps"]
    assert load_checkpoint(resolve_checkpoint(tmp_path / "run"))["hardware"]["budget"] == budget  # not re-measured


def assert_same_state(a, b, where):
    """Nested state dicts equal exactly (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_budget_never_raises_steps_and_its_timing_leaves_training_untouched(tmp_path, shapes16):
    # The budget is timed with real training steps that are then undone: a run whose steps fit the budget
    # must end with exactly the weights, EMA and optimizer state of a run without a budget.
    common = ["train.steps=3", "train.checkpoint_every=0", "optim.name=muon"]
    result = train(cfg_for(shapes16, *common, "train.budget_minutes=1000"), tmp_path / "budget", log=QuietLog())
    assert result.step == 3
    train(cfg_for(shapes16, *common), tmp_path / "plain", log=QuietLog())
    timed, plain = (load_checkpoint(resolve_checkpoint(tmp_path / name)) for name in ("budget", "plain"))
    assert timed["hardware"]["budget"]["steps"] == 3 and plain["hardware"]["budget"] is None
    for part in ("model", "ema", "optimizer"):
        assert_same_state(timed[part], plain[part], part)


def test_fm_bench_reports_the_precision_and_compile_it_used(tmp_path):
    out = run_fm(
        "bench", "--preset", "debug", "--json", "--mode", "train", "--batch-size", "2", "--steps", "1", "--warmup", "0",
        "--precision", "auto", "--set", "optim.name=muon", env={"XDG_CACHE_HOME": str(tmp_path), hardware.FORCE_ENV: "bf16-fast"}, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["precision"] == "bf16" and report["compile"] is False  # debug preset: compile false, obeyed
    hw = report["hardware"]
    assert hw["precision"]["setting"] == "auto" and hw["precision"]["probe"]["source"] == "forced"
    assert hw["muon_ns_dtype"] == "bf16" and hw["compile"]["setting"] is False
    assert report["train"]["compiled"] is False and "precision: bf16" in out.stderr


def test_a_working_compile_is_used_and_computes_what_eager_does(tmp_path, shapes16, monkeypatch):
    """The compiled module is what trains (a stand-in for torch.compile's OptimizedModule, which has no
    truth value: `bool()` on it raises, as on the real one around a DiT)."""

    class Compiled:
        calls = 0

        def __init__(self, module):
            self.module = module

        def __len__(self):
            raise TypeError(f"{type(self.module).__name__} does not support len()")

        def __call__(self, *args, **kwargs):
            Compiled.calls += 1
            return self.module(*args, **kwargs)

    eager = train(cfg_for(shapes16, "train.steps=3", "train.checkpoint_every=0"), tmp_path / "eager", log=QuietLog())
    monkeypatch.setattr(torch, "compile", lambda model, **kw: Compiled(model))
    log = ListLog()
    result = train(cfg_for(shapes16, "train.steps=3", "train.checkpoint_every=0", "train.compile=true"), tmp_path / "run", log=log)
    assert not [line for line in log.lines if "torch.compile failed" in line], log.lines
    assert Compiled.calls == 1 + 3  # the proving forward/backward, then every step's forward
    assert result.losses == eager.losses
    assert load_checkpoint(resolve_checkpoint(tmp_path / "run"))["hardware"]["compile"]["compile"] is True


_PROBE_AT_ONCE = """
import sys, time
from pathlib import Path
from fmcli import hardware
def gemm(width):  # a slow, fixed measurement: whoever measures is seen, and the two would overlap
    print("measuring", file=sys.stderr)
    time.sleep(1.5)
    return {"fp32": 10.0, "bf16": 30.0}
hardware._gemm_gflops = gemm
Path(f"ready-{sys.argv[1]}").touch()
while not all(Path(f"ready-{k}").exists() for k in (0, 1)):
    time.sleep(0.01)
print(hardware.probe_cpu(40).source)
"""


def test_two_runs_started_at_once_measure_the_probe_once(tmp_path):
    """Two `fm train` of a sweep started together with precision auto and no cached probe: one measures, the other
    waits and reads its result (the same precision for both). Before, both measured at once, each slowed by the
    other (on 2 cores they chose bf16 and fp32), and the last to finish overwrote the other's cache entry."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    env.pop("FM_PROBE_FORCE", None)
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE_AT_ONCE, str(k)], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    results = [p.communicate(timeout=300) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    assert sorted(out.strip() for out, _, _ in results) == ["cache", "measured"]
    assert sum(err.count("measuring") for _, err, _ in results) == 1
    assert json.loads((tmp_path / "cache" / "fm" / "probe.json").read_text())  # one whole JSON document


class FakeGemmClock:
    """A made-up CPU's GEMM timings on a fake clock: each dtype's first call costs `first` seconds (allocation, kernel
    selection, JIT), every later one `steady`; the probe's real matmuls only advance the clock."""

    def __init__(self, monkeypatch, first: dict, steady: dict):
        import types

        self.now, self.first, self.steady, self.calls = 0.0, first, steady, {"fp32": 0, "bf16": 0}
        real = torch.Tensor.__matmul__

        def matmul(a, b):
            p = "bf16" if a.dtype == torch.bfloat16 else "fp32"
            self.now += (self.first if self.calls[p] == 0 else self.steady)[p]
            self.calls[p] += 1
            return real(a[:1, :1], b[:1, :1])  # the clock says what the GEMM cost; the real one need not run

        monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
        monkeypatch.setattr(hardware, "time", types.SimpleNamespace(perf_counter=lambda: self.now))


@pytest.mark.parametrize("first, steady, expected", [
    # bf16 barely faster (1.1x): the GEMM-only precision and Muon's dtype are fp32; fp32's slow first call
    # (one-off costs) counted as its time made it look 2.4x faster and picked bf16 for both
    ({"fp32": 0.12, "bf16": 0.05}, {"fp32": 0.055, "bf16": 0.05}, "fp32"),
    # bf16 3x faster once warm: bf16 for both; its first call (a JIT) counted as its time made it look 0.3x
    ({"fp32": 0.06, "bf16": 0.2}, {"fp32": 0.06, "bf16": 0.02}, "bf16"),
])
def test_gemm_probe_times_each_dtype_after_its_warmup(monkeypatch, first, steady, expected):
    """The GEMM probe's ratio is the warm one (fp32 time / bf16 time of calls after the first), whichever dtype's
    first call is slow; both answers of the GEMM-only decision and of Muon's dtype are reached."""
    monkeypatch.delenv(hardware.FORCE_ENV, raising=False)
    FakeGemmClock(monkeypatch, first, steady)
    probe = hardware.probe_cpu(256, use_cache=False)
    assert probe.gemm_speedup == pytest.approx(steady["fp32"] / steady["bf16"])  # the closed form of the made-up machine
    assert (probe.precision, probe.matmul_dtype) == (expected, expected)


def test_gemm_probe_times_a_very_slow_dtype_once(monkeypatch):
    """bf16 emulated at a large width (seconds a call): one call, its first, is its timing (a second would double the
    probe's cost for a verdict that cannot change)."""
    monkeypatch.delenv(hardware.FORCE_ENV, raising=False)
    fake = FakeGemmClock(monkeypatch, {"fp32": 0.3, "bf16": 30.0}, {"fp32": 0.2, "bf16": 29.0})
    probe = hardware.probe_cpu(1152, use_cache=False)
    assert fake.calls["bf16"] == 1 and probe.gemm_speedup == pytest.approx(0.2 / 30.0)
    assert (probe.precision, probe.matmul_dtype) == ("fp32", "fp32")


class FakeStepClock:
    """A model's forward/backward on a fake clock: per precision, the first call `first` seconds, later ones `steady`."""

    def __init__(self, monkeypatch, first: dict, steady: dict):
        import types

        self.now, self.first, self.steady, self.calls = 0.0, first, steady, {"fp32": 0, "bf16": 0}
        monkeypatch.setattr(hardware, "time", types.SimpleNamespace(perf_counter=lambda: self.now))

    def step(self, precision: str) -> None:
        self.now += (self.first if self.calls[precision] == 0 else self.steady)[precision]
        self.calls[precision] += 1


@pytest.mark.parametrize("first, steady, expected_ms, bf16_calls", [
    # bf16 emulated (~10x): its 15 s warm-up ends the probe; 2 rounds more would have cost 30 s of a budgeted run
    ({"fp32": 1.6, "bf16": 15.0}, {"fp32": 1.5, "bf16": 15.0}, {"fp32": 1600.0, "bf16": 15000.0}, 1),
    # bf16 fast once warm, its first call slow (a JIT) but under 2 s: timed in rounds, the warm times decide
    ({"fp32": 0.4, "bf16": 1.9}, {"fp32": 0.3, "bf16": 0.2}, {"fp32": 300.0, "bf16": 200.0}, 3),
    # bf16 a little slower, its warm-up over 2 s but under 3x fp32's: timed in rounds
    ({"fp32": 1.0, "bf16": 2.5}, {"fp32": 0.9, "bf16": 1.0}, {"fp32": 900.0, "bf16": 1000.0}, 3),
])
def test_model_step_probe_stops_after_an_emulated_bf16_warmup(monkeypatch, first, steady, expected_ms, bf16_calls):
    fake = FakeStepClock(monkeypatch, first, steady)
    ms = hardware._step_ms(fake.step)
    assert ms == pytest.approx(expected_ms) and fake.calls["bf16"] == bf16_calls
    expected = "bf16" if expected_ms["fp32"] / expected_ms["bf16"] >= hardware.MIN_STEP_SPEEDUP else "fp32"
    assert hardware._choose(10.0, expected_ms["fp32"] / expected_ms["bf16"]) == expected  # both answers: fp32, bf16, fp32


def test_model_step_probe_of_a_slow_model_is_judged_on_the_gemm(monkeypatch):
    fake = FakeStepClock(monkeypatch, {"fp32": 2.5, "bf16": 1.0}, {"fp32": 2.4, "bf16": 1.0})
    assert hardware._step_ms(fake.step) is None and fake.calls == {"fp32": 1, "bf16": 0}


@pytest.mark.parametrize("name, major, expected", [("Tesla T4", 7, "fp32"), ("Tesla V100-SXM2-16GB", 7, "fp32"), ("NVIDIA A100-SXM4-40GB", 8, "bf16")])
def test_cuda_auto_precision_is_bf16_only_where_the_card_has_it_natively(monkeypatch, name, major, expected):
    """bf16 tensor cores come with compute capability 8.0 (Ampere). torch.cuda.is_bf16_supported() also answers yes
    where a bf16 tensor can merely be created (emulated: far slower than fp32 on a T4 or V100), which auto took for
    support; made-up cards here, whose answers follow torch's rule (including_emulation=True: always yes)."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return major >= 8 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.version, "hip", None)
    choice = hardware.resolve_precision("auto", torch.device("cuda"), width=64)
    assert choice.precision == expected and name in choice.reason
    assert hardware.matmul_dtype(torch.device("cuda"), 64) == expected  # Muon's Newton-Schulz follows


@pytest.mark.parametrize("device, triton, compiler_works, expected", [
    ("cuda", True, False, True), ("cuda", False, True, False), ("cpu", False, True, True), ("cpu", True, False, False),
])
def test_compile_auto_takes_each_answer_of_its_checks(monkeypatch, device, triton, compiler_works, expected):
    """compile "auto": on CUDA triton decides (the C++ compiler does not), on a CPU the C++ compiler (triton does not);
    both answers of each, with the checks faked."""
    monkeypatch.setattr(hardware, "_has_triton", lambda: triton)
    monkeypatch.setattr(hardware, "cxx_compiler", lambda use_cache=True: {"path": "/usr/bin/g++", "works": compiler_works, "error": None if compiler_works else "boom"})
    choice = hardware.resolve_compile("auto", torch.device(device))
    assert choice.compile is expected and choice.setting == "auto"
    assert ("triton" in choice.reason) == (device == "cuda") and ("C++" in choice.reason) == (device == "cpu")
