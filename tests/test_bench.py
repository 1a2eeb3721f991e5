"""fm bench: analytic FLOPs against torch's counter, the autotuner on fake measurements, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fmcli.autotune import Trial, auto_micro_batch, autotune, autotune_key
from fmcli.bench import dit_forward_flops, peak_flops
from fmcli.config import resolve_without_data as resolve_bench_config
from fmcli.models import build_bench_model
from fmcli.config import apply_overrides, load_config
from fmcli.errors import RuntimeFailure, UsageError
from tests.conftest import fm_in_process, run_fm

# ----------------------------------------------------------------------------------------- FLOPs


@pytest.mark.parametrize(
    "sets",
    [
        ["model.hidden_size=64", "model.depth=2", "model.heads=4", "model.patch_size=2", "data.image_size=16"],
        ["model.hidden_size=48", "model.depth=3", "model.heads=3", "model.patch_size=4", "model.mlp_ratio=2.0", "data.image_size=32"],
    ],
)
def test_dit_flops_match_flop_counter(sets):
    cfg = resolve_bench_config(load_config("debug", sets))
    model = build_bench_model(cfg.model)
    b, s = 3, cfg.model.image_size
    # The math SDPA backend decomposes attention into counted matmuls (the fused CPU kernel is not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(b, 3, s, s), torch.rand(b), torch.randint(0, 10, (b,)))
    counted = counter.get_total_flops() / b
    assert abs(dit_forward_flops(cfg.model) - counted) / counted < 0.05


@pytest.mark.parametrize(
    "sets",
    [["flow.objective=meanflow", "sample.solver=meanflow"], ["model.cross_attention=true", "model.text_dim=12", "encoders.max_tokens=5", "model.num_classes=0"]],
    ids=["mean-flow", "text"],
)
def test_mean_flow_and_text_dit_flops_equal_the_flop_counter(sets):
    """The interval embedding's MLP and the cross-attention (keys and values over every padded text token) are
    counted: torch's counter, with the math SDPA backend, sees exactly the matmuls the formula adds up."""
    cfg = resolve_bench_config(load_config("debug", ["model.heads=4", "data.image_size=8", "model.patch_size=2", *sets]))
    m, b = cfg.model, 3
    model = build_bench_model(m)
    tokens = cfg.encoders.max_tokens
    extra = {"t_end": torch.ones(b)} if m.end_time else {"text": torch.randn(b, tokens, 12), "text_mask": torch.ones(b, tokens, dtype=torch.bool)}
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(b, 3, 8, 8), torch.rand(b), **extra)
    assert dit_forward_flops(m, tokens) == counter.get_total_flops() / b


def test_bench_of_a_text_model_reports_its_flops(tmp_path):
    """fm bench measured a text model's training and sampling but then refused it ("FLOPs not modelled")."""
    from fmcli.bench import BenchOptions, run_bench

    cfg = load_config("debug", ["model.cross_attention=true", "model.text_dim=12", "encoders.max_tokens=4", "model.num_classes=0", "data.image_size=8",
                                "model.patch_size=2", "sample.steps=1"])
    report = run_bench(cfg, BenchOptions(batch_size=2, mode="both", steps=1, rounds=1, warmup=0))
    assert report["flops_per_image"]["forward"] == dit_forward_flops(resolve_bench_config(cfg).model, 4) > 0
    assert report["train"]["img_per_s"] > 0 and report["sample"]["flops_per_image"] > 0
    with pytest.raises(UsageError, match="model.text_dim"):
        dit_forward_flops(resolve_bench_config(load_config("debug", ["model.cross_attention=true", "model.num_classes=0"])).model, 4)


def test_peak_flops_table():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("cpu") is None


# -------------------------------------------------------------------------------------- autotune


def _fake(throughput, fail_above=None, memory=None, raise_oom=True):
    calls = []

    def measure(b):
        calls.append(b)
        if fail_above is not None and b > fail_above:
            if raise_oom:
                raise torch.OutOfMemoryError("fake CUDA out of memory")
            return Trial(b, ok=False, reason="oom")
        return Trial(b, ok=True, throughput=throughput(b), memory_mib=memory(b) if memory else None)

    return measure, calls


def test_autotune_doubles_then_stops_on_plateau_and_bisects():
    # Throughput peaks at b = 200: doubling 4..256 improves, 512 and 1024 do not (patience 1); bisect 256..512.
    measure, calls = _fake(lambda b: b * math.exp(-b / 200))
    result = autotune(measure, start=4, max_batch=4096, min_gain=0.03)
    assert calls[:9] == [4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert all(256 < c < 512 for c in calls[9:]) and len(calls) > 9  # bisection happened, inside the bracket
    assert result.stop == "plateau"
    measured = {t.batch: t.throughput for t in result.trials}
    assert result.batch == max(measured, key=measured.get)
    # Within 5% of the best batch of a brute-force sweep over every size up to 4096.
    best = max(b * math.exp(-b / 200) for b in range(1, 4097))
    assert result.batch * math.exp(-result.batch / 200) >= 0.95 * best


def test_autotune_handles_oom_bisects_and_keeps_a_margin():
    measure, calls = _fake(lambda b: float(b), fail_above=300)
    result = autotune(measure, start=4, max_batch=4096, margin=0.1)
    assert calls[:8] == [4, 8, 16, 32, 64, 128, 256, 512]
    assert result.stop == "oom"
    failed = [t.batch for t in result.trials if not t.ok]
    ok = [t.batch for t in result.trials if t.ok]
    assert all(b > 300 for b in failed) and all(b <= 300 for b in ok)
    assert min(failed) - max(ok) <= max(ok) // 8  # bisection narrowed the bracket to 1/8
    assert result.batch <= max(ok) and result.batch <= 0.9 * min(failed)
    assert result.batch >= 0.75 * 300  # and did not give away much


def test_autotune_memory_budget_counts_as_failure():
    measure, _ = _fake(lambda b: float(b), memory=lambda b: 100 + 10 * b)  # MiB
    result = autotune(measure, start=4, max_batch=4096, max_memory_mib=2100, margin=0.1)  # fits up to b = 200
    assert result.stop == "memory budget"
    assert 100 + 10 * result.batch <= 2100 and result.batch >= 150


def test_autotune_failed_trial_without_exception_and_first_failure():
    measure, _ = _fake(lambda b: float(b), fail_above=40, raise_oom=False)
    assert autotune(measure, start=4, max_batch=4096).batch <= 40
    measure, _ = _fake(lambda b: float(b), fail_above=0)  # not even batch 1 fits
    with pytest.raises(RuntimeFailure, match="batch size 1 already fails"):
        autotune(measure, start=4)


@pytest.mark.parametrize("fits, raise_oom", [(1, True), (2, True), (3, False), (2, None)])
def test_autotune_whose_start_fails_tries_smaller_batches(fits, raise_oom):
    """The search starts at 4; a model of which only 1, 2 or 3 images fit (a large model, a small card, --max-memory)
    was told "batch size 4 already fails; nothing fits". It halves until a batch fits and returns the largest one
    that does (brute force: `fits`), each batch measured once; the failing start is not measured again."""
    if raise_oom is None:  # over the memory budget rather than out of memory
        measure, calls = _fake(lambda b: float(b), memory=lambda b: 100.0 * b)
        result = autotune(measure, start=4, max_memory_mib=100.0 * fits + 50)
    else:
        measure, calls = _fake(lambda b: float(b), fail_above=fits, raise_oom=raise_oom)
        result = autotune(measure, start=4)
    assert result.batch == fits and result.stop in ("oom", "memory budget")
    assert calls[:2] == [4, 2] and len(calls) == len(set(calls))


def test_autotune_one_noisy_trial_is_not_a_plateau():
    measure, calls = _fake(lambda b: 1.0 if b == 16 else float(b))
    result = autotune(measure, start=4, max_batch=128)
    assert calls == [4, 8, 16, 32, 64, 128] and result.batch == 128 and result.stop == "max batch"


def test_autotune_stops_at_max_batch():
    measure, calls = _fake(lambda b: float(b))
    result = autotune(measure, start=4, max_batch=48)
    assert calls == [4, 8, 16, 32, 48] and result.batch == 48 and result.stop == "max batch"


# --------------------------------------------------------------------------- micro_batch_size=auto


def test_auto_micro_batch_uses_cache_and_refuses_ddp_without_one(tmp_path, monkeypatch):
    cfg = resolve_bench_config(load_config("debug", ["train.micro_batch_size=auto", "train.global_batch_size=24"]))
    dev = torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")  # a DDP rank with no cache: refuse (the launcher tunes, ranks never do)
    with pytest.raises(UsageError, match="DDP"):
        auto_micro_batch(cfg, tmp_path, dev, 2, False)
    monkeypatch.delenv("WORLD_SIZE")
    keys = [autotune_key(cfg, dev, cfg.train.precision, False, ns_dtype=None, world_size=w) for w in (1, 2)]
    (tmp_path / "autotune.json").write_text(json.dumps({keys[0]: {"batch": 10}, keys[1]: {"batch": 10}}))
    assert auto_micro_batch(cfg, tmp_path, dev, 1, False) == 8  # largest divisor of 24 that is <= 10
    assert auto_micro_batch(cfg, tmp_path, dev, 2, False) == 6  # of 12 per rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    other = resolve_bench_config(load_config("debug", ["train.micro_batch_size=auto", "model.depth=3"]))
    with pytest.raises(UsageError):
        auto_micro_batch(other, tmp_path, dev, 1, False)  # WORLD_SIZE>1: never autotune


def test_the_autotune_cache_is_not_reused_for_another_muon_dtype_or_world_size(tmp_path, monkeypatch):
    """A cached batch answers only the setting it was tuned for: Muon's Newton-Schulz in bf16 vs fp32 changes the
    step's speed, and the world size the per-rank batch the search may reach (global / world size). Each new
    setting tunes (here a fake search that records its cap); the same setting again reads the cache."""
    import fmcli.autotune as autotune_mod
    from fmcli.autotune import AutotuneResult

    caps = []

    def fake_autotune(cfg, base, *, max_batch, **kw):
        caps.append((base.muon_ns_dtype, max_batch))
        return AutotuneResult(batch=max_batch, stop="max batch", trials=[Trial(max_batch, ok=True, throughput=1.0, memory_mib=1.0)])

    monkeypatch.setattr(autotune_mod, "autotune_training", fake_autotune)
    cfg = resolve_bench_config(load_config("debug", ["train.micro_batch_size=auto", "train.global_batch_size=16", "optim.name=muon"]))
    dev = torch.device("cpu")
    assert auto_micro_batch(cfg, tmp_path, dev, 2, False, ns_dtype="fp32") == 8  # tuned for 2 ranks: at most 16 / 2
    assert auto_micro_batch(cfg, tmp_path, dev, 1, False, ns_dtype="fp32") == 16  # one rank may take the whole batch
    assert auto_micro_batch(cfg, tmp_path, dev, 1, False, ns_dtype="bf16") == 16
    assert caps == [("fp32", 8), ("fp32", 16), ("bf16", 16)]  # three settings, three searches
    for world, dtype in ((2, "fp32"), (1, "fp32"), (1, "bf16")):  # each again: the cache answers
        auto_micro_batch(cfg, tmp_path, dev, world, False, ns_dtype=dtype)
    assert len(caps) == 3 and len(json.loads((tmp_path / "autotune.json").read_text())) == 3


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"K": {"batch": -3}}', '{"K": {"batch": "8"}}', '{"K": {"stop": "x"}}', '{"K": 4}'])
def test_a_damaged_autotune_cache_is_one_error_naming_the_file(tmp_path, text):
    from fmcli.errors import RuntimeFailure

    cfg = resolve_bench_config(load_config("debug", ["train.micro_batch_size=auto", "train.global_batch_size=24"]))
    dev = torch.device("cpu")
    key = autotune_key(cfg, dev, cfg.train.precision, False, ns_dtype=None, world_size=1)
    (tmp_path / "autotune.json").write_text(text.replace('"K"', json.dumps(key)))
    with pytest.raises(RuntimeFailure, match=r"autotune cache .*autotune\.json.*delete"):
        auto_micro_batch(cfg, tmp_path, dev, 1, False)


def test_train_with_auto_micro_batch_uses_cached_result(tmp_path, shapes16):
    from fmcli.train import train

    cfg = load_config("debug", [f"data.path={shapes16}", "train.micro_batch_size=auto", "train.steps=2", "train.checkpoint_every=0", "sample.grid_size=2"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    resolved = resolve_bench_config(cfg)
    key = autotune_key(resolved, torch.device("cpu"), "fp32", False, ns_dtype=None, world_size=1)
    (run_dir / "autotune.json").write_text(json.dumps({key: {"batch": 4}}))
    logged = []

    class Log:
        def info(self, msg):
            logged.append(msg)

        def progress(self, total, start):
            return lambda step, loss, total=None: None

    result = train(cfg, run_dir, log=Log())
    assert result.step == 2 and len(result.losses) == 2
    assert not any("autotuning" in m for m in logged)  # the cache answered


# ------------------------------------------------------------------------------------------- CLI


def test_cli_bench_debug_json_reports_all_fields():
    proc = run_fm(
        "bench", "--preset", "debug", "--json", "--steps", "1", "--warmup", "1", "--max-batch", "4",
        "--set", "sample.steps=2", "--set", "optim.name=muon", "--compare", "diffusers", "--rounds", "2", timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in ("preset", "device", "precision", "batch_size", "model", "params", "flops_per_image", "peak_flops", "autotune", "train", "sample", "memory", "compare"):
        assert key in report, key
    assert [t["batch"] for t in report["autotune"]["trials"]] == [4] and report["batch_size"] == 4
    assert report["train"]["img_per_s"] > 0 and report["train"]["mfu"] is None  # CPU: no MFU
    assert report["sample"]["nfe"] == 2 and report["sample"]["img_per_s"] > 0
    assert report["memory"]["peak_rss_mib"] > 0
    assert report["params"] == sum(p.numel() for p in build_bench_model(resolve_bench_config(load_config("debug")).model).parameters())
    assert report["flops_per_image"]["train"] == 3 * report["flops_per_image"]["forward"]
    assert set(report["compare"]["ratio"]) == {"train", "sample"}
    for part, spread in report["compare"]["ratio_spread"].items():  # from both models' interleaved rounds in one trial
        assert spread["interleaved"] and spread["rounds"] == 2 and spread["ratio"] == report["compare"]["ratio"][part]
        assert spread["min"] <= spread["max"]
    assert report["compare"]["diffusers"]["train"]["step_ms_spread"]["n"] == 2
    assert report["compare"]["diffusers"]["train"]["img_per_s"] > 0
    assert "fm bench" in proc.stderr  # the rich table went to stderr
    assert "both models train with AdamW" in proc.stderr  # Muon picks fm's matrices by name: equal optimizer instead


def test_cli_bench_prints_its_results_table_on_stdout():
    proc = run_fm("bench", "--preset", "debug", "--mode", "train", "--batch-size", "2", "--steps", "1", "--warmup", "0", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fm bench: debug on cpu" in proc.stdout and "params" in proc.stdout  # the result, for `fm bench > result.txt`
    assert "fm bench: debug" not in proc.stderr


def test_cli_bench_usage_error_exits_2():
    proc = fm_in_process("bench", "--preset", "debug", "--batch-size", "zero")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "sets, opts",
    [
        ([], {"mode": "fly"}),
        ([], {"precision": "fp8"}),
        ([], {"compare": "timm"}),
        ([], {"steps": 0}),
        ([], {"max_batch": 4}),  # the autotune's options beside a given batch (no autotune runs): refused, not ignored
        ([], {"max_memory_gib": 1.0}),
        ([], {"run_dir": "autotune-cache"}),
        (["data.source=folder"], {}),  # input shape unknown without the data: the preset must set it
        (["model.arch=unet"], {}),
    ],
)
def test_run_bench_rejects_bad_options_before_measuring(sets, opts):
    from fmcli.bench import BenchOptions, run_bench

    with pytest.raises(UsageError):
        run_bench(load_config("debug", sets), BenchOptions(batch_size=2, **opts))


def test_autotune_refused_inside_ddp(monkeypatch):
    from fmcli.bench import BenchOptions, run_bench

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="DDP"):
        run_bench(load_config("debug"), BenchOptions(batch_size=None))


@pytest.mark.parametrize("what", ["file", "damaged cache"])
def test_bench_run_dir_is_checked_before_any_measurement(tmp_path, monkeypatch, what):
    # The autotune result goes to --run-dir: a file there (exit 2) or a damaged autotune.json in it (exit 1) used
    # to fail only after the whole autotune (FileExistsError: exit 1, after minutes of trials).
    import fmcli.bench as bench_mod

    measured = []
    monkeypatch.setattr(bench_mod, "autotune_training", lambda *a, **k: measured.append(1) or pytest.fail("autotuned"))
    monkeypatch.setenv("FM_PROBE_FORCE", "bf16-slow")
    run_dir = tmp_path / "run"
    if what == "file":
        run_dir.write_text("not a run directory")
    else:
        run_dir.mkdir()
        (run_dir / "autotune.json").write_text(json.dumps({"cpu|debug|x": {"batch": 0}}))
    proc = fm_in_process("bench", "--preset", "debug", "--mode", "train", "--run-dir", run_dir)
    assert proc.returncode == (2 if what == "file" else 1), proc.stderr
    assert proc.stderr.startswith("error: ") and str(run_dir) in proc.stderr and "Traceback" not in proc.stderr
    assert not measured


@pytest.mark.parametrize("sets", [
    ["sample.solver=ab2", "sample.steps=12"],  # a start-up evaluation: 13 NFE, not 12 x (6 / 5)
    ["sample.guidance_interval=[0.5, 1.0]", "sample.steps=12"],  # guided (2 rows an image) only on part of the grid
    ["sample.guidance=cfg-zero", "sample.zero_init_steps=3", "sample.steps=12"],  # 3 steps without a network call
])
def test_bench_sampling_reports_the_nfe_and_flops_of_the_full_solve(sets):
    """A solve timed over part of its steps reports the full solve's NFE and network rows (the FLOPs): counted
    here by a forward hook on the network over a solve timed whole."""
    from fmcli.bench import _summarise, sample_throughput
    from fmcli.measure import BenchSpec

    cfg = resolve_bench_config(load_config("debug", sets))
    model = build_bench_model(cfg.model, "fm")
    rows = []
    model.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    spec = BenchSpec(config={}, batch=2, mode="sample", steps=cfg.sample.steps, warmup=0)
    whole = sample_throughput(model, cfg, spec, torch.device("cpu"))
    assert whole["timed_steps"] == cfg.sample.steps
    reference_rows, reference_nfe = sum(rows), whole["nfe"]
    part = sample_throughput(model, cfg, BenchSpec(config={}, batch=2, mode="sample", steps=5, warmup=1), torch.device("cpu"))
    assert part["timed_steps"] == 5 and part["nfe"] == reference_nfe
    if cfg.sample.guidance == "cfg-zero":  # --steps 2 <= zero_init_steps: timed over one evaluated step more
        short = sample_throughput(model, cfg, BenchSpec(config={}, batch=2, mode="sample", steps=2, warmup=1), torch.device("cpu"))
        assert short["timed_steps"] == 4 and short["nfe"] == reference_nfe
    fwd = dit_forward_flops(cfg.model)
    summary = _summarise({"params": 0, "memory": {}, "batch": 2, "sample": part}, fwd, None, cfg)
    assert summary["sample"]["flops_per_image"] == fwd * reference_rows / 2


def test_trial_server_ends_quietly_on_ctrl_c():
    """Ctrl-C reaches the whole process group, the trial server (`python -m fmcli.measure`) included: it must end
    by the signal without a KeyboardInterrupt traceback (the fm process prints the one line, exit 130)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "fmcli.measure"], cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while "pipe_read" not in Path(f"/proc/{proc.pid}/wchan").read_text():  # imported torch; waiting for a request
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.skip("cannot tell when the trial server waits on its stdin (/proc/PID/wchan)")
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGINT  # ended by the signal itself, as the kernel's default action does
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err, err.decode()


# ------------------------------------------------------------------------- timing: rounds and spread


def test_timing_spread_and_interleaved_ratio_match_a_hand_computation():
    from fmcli.bench import interleaved_ratio
    from fmcli.measure import timing_spread

    # Sorted 9, 10, 11, 12, 30: median 11, range 30 - 9 = 21, relative 21 / 11.
    assert timing_spread([10.0, 12.0, 11.0, 30.0, 9.0]) == {"n": 5, "median": 11.0, "min": 9.0, "max": 30.0, "rel_spread": 21 / 11}
    # An even count: the median is the mean of the middle two, (2 + 3) / 2 = 2.5; range 4 - 1 = 3.
    assert timing_spread([4.0, 1.0, 3.0, 2.0]) == {"n": 4, "median": 2.5, "min": 1.0, "max": 4.0, "rel_spread": 3 / 2.5}
    assert timing_spread([5.0])["rel_spread"] == 0.0
    # A's times 1, 2, 4 (median 2), B's 2, 3, 4 (median 3): B / A = 1.5; per round 2/1, 3/2, 4/4.
    assert interleaved_ratio([1.0, 2.0, 4.0], [2.0, 3.0, 4.0]) == {"ratio": 1.5, "min": 1.0, "max": 2.0, "rounds": 3, "interleaved": True}


class _FakeClock:
    """A clock that only moves when a fake training step runs: each step takes `cost(model) * load(now)`."""

    def __init__(self, cost, load=lambda now: 1.0):
        self.now, self.cost, self.load = 0.0, cost, load

    def perf_counter(self) -> float:
        return self.now

    def install(self, monkeypatch):
        import types

        import fmcli.bench as bench_mod
        import fmcli.measure as measure_mod

        def fake_step_fn(model, cfg, spec, device):
            def one():
                self.now += self.cost(cfg) * self.load(self.now)

            one.compiled, one.compile_warning = False, None
            return one

        monkeypatch.setattr(measure_mod, "time", types.SimpleNamespace(perf_counter=self.perf_counter))
        monkeypatch.setattr(measure_mod, "train_step_fn", fake_step_fn)
        monkeypatch.setattr(bench_mod, "measure_any", lambda spec, fn=measure_mod.measure: fn(spec))  # in-process trials
        monkeypatch.setenv("FM_PROBE_FORCE", "bf16-slow")


@pytest.mark.parametrize("noisy", [True, False])
def test_bench_reports_rounds_median_and_spread_and_warns_when_noisy(monkeypatch, noisy):
    """Three rounds of 5 steps on a fake clock: steps of 0.1 s, except (noisy) a third round whose steps take
    0.3 s (another process took the CPU). Hand computation: rounds 100, 100, 300 ms a step; median 100 ms, so 20
    img/s at batch 2; range 200 ms = 200% of the median: a warning on stderr and in --json."""
    durations = iter([0.1] * 10 + [0.3 if noisy else 0.1] * 5)
    _FakeClock(lambda cfg: next(durations)).install(monkeypatch)
    proc = fm_in_process("bench", "--preset", "debug", "--mode", "train", "-b", "2", "--steps", "5", "--rounds", "3", "--warmup", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    train = report["train"]
    last = 300.0 if noisy else 100.0
    assert train["step_ms_rounds"] == pytest.approx([100.0, 100.0, last])
    assert train["step_ms"] == pytest.approx(100.0) and train["img_per_s"] == pytest.approx(20.0)
    sp = train["step_ms_spread"]
    assert (sp["n"], sp["median"], sp["min"], sp["max"]) == (3, pytest.approx(100.0), pytest.approx(100.0), pytest.approx(last))
    assert sp["rel_spread"] == pytest.approx(2.0 if noisy else 0.0)
    warned = [w for w in report["warnings"] if "fm train ranges over 200%" in w]
    assert bool(warned) == noisy and all(w in proc.stderr for w in warned)
    assert "median of 3 rounds of 5 steps" in proc.stderr  # the text report's spread line (stderr with --json)
    assert ("range 6.67-20.00 img/s" if noisy else "range 20.00-20.00 img/s") in proc.stderr


def test_bench_warns_when_too_few_steps_or_rounds_to_time(monkeypatch):
    _FakeClock(lambda cfg: 0.1).install(monkeypatch)
    proc = fm_in_process("bench", "--preset", "debug", "--mode", "train", "-b", "2", "--steps", "3", "--rounds", "1", "--warmup", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    warnings = json.loads(proc.stdout)["warnings"]
    assert any("--steps 3 is too few" in w for w in warnings) and any("--rounds 1 shows no spread" in w for w in warnings)
    assert all(w in proc.stderr for w in warnings)
    bad = fm_in_process("bench", "--preset", "debug", "--mode", "train", "-b", "2", "--rounds", "0")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "--rounds" in bad.stderr


def test_mean_flow_cost_is_timed_in_interleaved_rounds_through_a_load_change(monkeypatch):
    """The mean-flow step costs 2x the flow step (fake clock); the machine's load doubles once the mean-flow
    trial is done (5 rounds x 5 steps x 20 ms = 0.5 s). Priced against the mean-flow trial (the old way), the
    flow step timed after it at load 2 costs as much as the mean-flow step at load 1: an impossible 1.0x.
    Interleaved in one trial both run at the same load: every per-round ratio, and the ratio of the medians, is 2."""
    from fmcli.bench import BenchOptions, run_bench

    clock = _FakeClock(lambda cfg: 0.02 if cfg.flow.objective == "meanflow" else 0.01, load=lambda now: 1.0 if now < 0.49 else 2.0)
    clock.install(monkeypatch)
    cfg = load_config("debug", ["flow.objective=meanflow", "sample.solver=meanflow"])
    report = run_bench(cfg, BenchOptions(batch_size=2, mode="train", steps=5, rounds=5, warmup=0))
    mf = report["meanflow"]
    assert report["train"]["step_ms"] == pytest.approx(20.0)  # the mean-flow trial, at load 1
    # Every interleaved round runs at load 2: flow 20 ms, mean flow 40 ms a step.
    assert mf["flow_step_ms"] == pytest.approx(20.0) and mf["meanflow_step_ms"] == pytest.approx(40.0)
    assert mf["step_cost_vs_flow"] == pytest.approx(2.0)
    assert mf["step_cost_spread"] == {"ratio": pytest.approx(2.0), "min": pytest.approx(2.0), "max": pytest.approx(2.0), "rounds": 5, "interleaved": True}


@pytest.mark.parametrize("encoder", ["auto", "none"])
def test_bench_prices_the_repa_step_against_the_same_run_without_it(monkeypatch, encoder):
    """The quickstart ships repa.encoder = "auto" (on for the shapes). On a fake clock a step with REPA takes 30 ms
    and one without 10 ms: hand computation, the REPA step costs 3.00x, every interleaved round too. The twin is
    the same run with REPA off: the interleaved trial's first config has repa.encoder "none", its second the run's
    own ("domain"), nothing else differs. With --set repa.encoder=none there is nothing to price: no "repa" block."""
    import fmcli.bench as bench_mod

    _FakeClock(lambda cfg: 0.03 if cfg.repa.encoder == "domain" else 0.01).install(monkeypatch)
    specs, measure_any = [], bench_mod.measure_any
    monkeypatch.setattr(bench_mod, "measure_any", lambda spec, *fn: specs.append(spec) or measure_any(spec, *fn))
    tiny = ["model.hidden_size=32", "model.depth=2", "data.image_size=16", f"repa.encoder={encoder}"]
    proc = fm_in_process("bench", "--preset", "quickstart", "--mode", "train", "-b", "2", "--steps", "5", "--rounds", "3", "--warmup", "0",
                         *[a for item in tiny for a in ("--set", item)], "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    if encoder == "none":
        assert "repa" not in report and len(specs) == 1 and "REPA step" not in proc.stderr
        return
    repa = report["repa"]
    assert repa["plain_step_ms"] == pytest.approx(10.0) and repa["repa_step_ms"] == pytest.approx(30.0)
    assert repa["step_cost_vs_plain"] == pytest.approx(repa["repa_step_ms"] / repa["plain_step_ms"]) == pytest.approx(3.0)
    assert repa["step_cost_spread"] == {"ratio": pytest.approx(3.0), "min": pytest.approx(3.0), "max": pytest.approx(3.0), "rounds": 3, "interleaved": True}
    assert (repa["depth"], repa["weight"]) == (2, 0.5)
    twin, run = specs[-1].config, specs[-1].other_config
    assert (twin["repa"]["encoder"], run["repa"]["encoder"]) == ("none", "domain")
    assert {**twin, "repa": None} == {**run, "repa": None} and {**twin["repa"], "encoder": None} == {**run["repa"], "encoder": None}
    assert "REPA step 30.0 ms = 3.00x the step without it (10.0 ms; tokens after block 2 aligned; per-round ratio 3.00-3.00x over 3 interleaved rounds)" in proc.stderr


def test_a_noisy_repa_cost_is_warned_about():
    """_ratio_spreads takes the REPA step's cost in: per-round ratios 2-4 around a ratio of 3 range over 67% > 20%."""
    from fmcli.bench import BenchOptions, timing_warnings

    report = {"repa": {"step_cost_spread": {"ratio": 3.0, "min": 2.0, "max": 4.0, "rounds": 3, "interleaved": True}}}
    warnings = timing_warnings(report, BenchOptions(steps=5, rounds=3))
    assert len(warnings) == 1 and "the REPA step's cost ranges over 67% of its median in 3 rounds" in warnings[0]


def test_interleaved_rounds_alternate_so_a_load_change_hits_both_models(monkeypatch):
    """measure_interleaved alone, the load doubling mid-way through its rounds: A (cost 1) and B (cost 2) run
    in the order A B, B A, A B, ...; hand computation of the 4 rounds of one step each, load 1 before t = 4.5."""
    from fmcli.bench import measure_interleaved
    from fmcli.measure import BenchSpec

    clock = _FakeClock(lambda cfg: 2.0 if cfg.flow.objective == "meanflow" else 1.0, load=lambda now: 1.0 if now < 4.5 else 2.0)
    clock.install(monkeypatch)
    flow = resolve_bench_config(load_config("debug"))
    meanflow = resolve_bench_config(load_config("debug", ["flow.objective=meanflow", "sample.solver=meanflow"]))
    from fmcli.config import config_to_dict

    spec = BenchSpec(config=config_to_dict(flow), other_config=config_to_dict(meanflow), batch=2, mode="train", steps=1, warmup=0, rounds=4)
    times = measure_interleaved(spec)["train"]
    # t: A 0-1, B 1-3, B 3-5 (starts before 4.5: load 1), A 5-7 (load 2), A 7-9, B 9-13, B 13-17, A 17-19.
    assert times == {"a": [1.0, 2.0, 2.0, 2.0], "b": [2.0, 2.0, 4.0, 4.0]}


def test_tiny_bench_json_end_to_end_reports_rounds_for_training_and_sampling(monkeypatch):
    """A real (tiny) bench through the CLI, trials in this process: every timed figure carries its rounds, and
    the figure is their median (img/s = batch / median time)."""
    import fmcli.bench as bench_mod
    import fmcli.measure as measure_mod

    monkeypatch.setattr(bench_mod, "measure_any", lambda spec, fn=measure_mod.measure: fn(spec))
    monkeypatch.setenv("FM_PROBE_FORCE", "bf16-slow")
    proc = fm_in_process("bench", "--preset", "debug", "-b", "2", "--steps", "2", "--rounds", "3", "--warmup", "1", "--set", "sample.steps=2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    train, sample = report["train"], report["sample"]
    assert len(train["step_ms_rounds"]) == 3 and train["steps_per_round"] == 2
    assert train["step_ms"] == pytest.approx(sorted(train["step_ms_rounds"])[1]) and train["img_per_s"] == pytest.approx(2000 / train["step_ms"])
    sp = train["step_ms_spread"]
    assert sp["min"] == min(train["step_ms_rounds"]) and sp["max"] == max(train["step_ms_rounds"]) and sp["n"] == 3
    assert len(sample["seconds_rounds"]) == 3 and sample["seconds"] == pytest.approx(sorted(sample["seconds_rounds"])[1])
    assert sample["img_per_s"] == pytest.approx(2 / sample["seconds"]) and sample["seconds_spread"]["n"] == 3
    assert any("--steps 2 is too few" in w for w in report["warnings"])
    assert "fm train:" in proc.stderr and "fm sample:" in proc.stderr and "median of 3 rounds" in proc.stderr


def test_the_autotune_key_changes_with_what_changes_a_steps_cost():
    """A mean-flow step (a JVP on part of its rows) and a REPA step (an encoder, a projector) cost more memory and
    time than a flow step of the same model: a batch tuned for one is not the answer for the other. What does not
    change the step (REPA's weight) keeps the key, so a cached result is reused."""
    base = ["train.micro_batch_size=auto", "model.image_size=16", "model.in_channels=3", "model.num_classes=4"]

    def key(*sets):
        cfg = resolve_bench_config(load_config("debug", base + list(sets)))
        return autotune_key(cfg, torch.device("cpu"), "fp32", False, ns_dtype=None, world_size=1)

    plain = key("repa.encoder=none")
    off = resolve_bench_config(apply_overrides(load_config("debug", base + ["repa.encoder=none"]), ["repa.depth=1", "repa.projector=conv"]))  # a stored config's
    assert autotune_key(off, torch.device("cpu"), "fp32", False, ns_dtype=None, world_size=1) == plain
    keys = {plain, key("flow.objective=meanflow", "sample.solver=meanflow", "repa.encoder=none"), key("flow.objective=meanflow", "sample.solver=meanflow", "flow.meanflow_ratio=1", "repa.encoder=none"),
            key("repa.encoder=domain", "repa.depth=1"), key("repa.encoder=domain", "repa.depth=1", "repa.projector=conv"),
            key("repa.encoder=domain", "repa.depth=1", "repa.feature_stride=4")}
    assert len(keys) == 6
    assert key("repa.encoder=domain", "repa.depth=1", "repa.weight=2") == key("repa.encoder=domain", "repa.depth=1")


@pytest.mark.parametrize("solver, steps", [("dopri5", 4), ("euler", 4)])
def test_a_sampling_round_never_times_the_networks_first_call(monkeypatch, solver, steps):
    """The network's first call costs 10 s on a fake clock (torch.compile, kernel selection), every later one 10 ms.
    With --warmup, no round pays it: every round of a solve is NFE (x rows) of warm calls, its time the same in
    each round (hand computation below). A dopri5 solve had no warm-up: its first round took 10 s more."""
    import types

    import fmcli.measure as measure_mod
    from fmcli.bench import SampleTimer
    from fmcli.config import config_to_dict
    from fmcli.measure import BenchSpec

    clock = {"now": 0.0, "calls": 0}

    class Zero(torch.nn.Module):  # a zero velocity: dopri5 accepts every step, its evaluations a fixed count
        def forward(self, x, t, **cond):
            clock["now"] += 10.0 if clock["calls"] == 0 else 0.01
            clock["calls"] += 1
            return torch.zeros_like(x)

    monkeypatch.setattr(measure_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"]))
    monkeypatch.setenv("FM_PROBE_FORCE", "bf16-slow")
    cfg = resolve_bench_config(load_config("debug", [f"sample.solver={solver}", f"sample.steps={steps}", "sample.cfg=1"]))
    spec = BenchSpec(config=config_to_dict(cfg), batch=2, mode="sample", steps=steps, warmup=1, rounds=3)
    timer = SampleTimer(Zero(), cfg, spec, torch.device("cpu"))
    rounds = [timer.round() for _ in range(3)]
    facts = timer.facts(rounds)
    assert facts["nfe"] >= 1 and rounds == pytest.approx([0.01 * facts["nfe"]] * 3)  # one unguided row batch per NFE
    # steps as every --json row records them: dopri5 chooses its own (null), a fixed-step solve its grid's
    assert (facts["steps"], facts["timed_steps"]) == ((None, None) if solver == "dopri5" else (steps, steps))


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_bench_hardware_of_a_text_model_probes_the_gemm_alone(monkeypatch, tmp_path, precision):
    """A text model's forward needs the text encoder's states: fm train's probe judges it on the GEMM alone, and so
    does fm bench's report of the CPU under an explicit precision (it ran the model without text: a ValueError)."""
    from fmcli import hardware
    from fmcli.bench import resolve_bench_hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(hardware.FORCE_ENV, raising=False)
    monkeypatch.setattr(hardware, "_gemm_gflops", lambda width: {"fp32": 100.0, "bf16": 50.0})
    cfg = resolve_bench_config(load_config("debug", ["model.cross_attention=true", "model.text_dim=16"]))
    hw = resolve_bench_hardware(cfg, torch.device("cpu"), precision, False, lambda line: None)
    probe = hw["precision"]["probe"]
    assert probe["step_ms"] is None and probe["gemm_speedup"] == pytest.approx(0.5) and hw["precision"]["precision"] == "fp32"


@pytest.mark.parametrize("text", ["[1, 2]", '{"format": 1, "kind": "pixels", "shape": "x"}'])
def test_bench_checks_the_manifest_it_reads_the_shape_from(tmp_path, text):
    """fm bench (and the autotune) read the model's shape from data.path's manifest: a damaged one is the same one
    line as for training, not a TypeError or ValueError from deep inside."""
    from conftest import fm_in_process

    (tmp_path / "manifest.json").write_text(text)
    result = fm_in_process("bench", "--preset", "debug", "--set", f"data.path={tmp_path}", "--mode", "train", "--steps", "1", "--warmup", "0")
    assert result.returncode == 2, result.stderr
    assert "manifest" in result.stderr and "fm prepare-data" in result.stderr and "Error:" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script", ["compare_diffusers", "profile_dit"])
def test_benchmark_scripts_time_sampling_at_the_precision_they_label(monkeypatch, capsys, script):
    """benchmarks/compare_diffusers.py and profile_dit.py report each --precisions entry's sampling figure: the
    spec each measurement gets must sample at that precision too (BenchSpec.sample_precision defaults to fp32)."""
    import importlib
    import sys

    mod = importlib.import_module(f"benchmarks.{script}")
    asked = []

    def fake(spec, fn=None):
        asked.append((spec.precision, spec.sample_precision))
        return {"params": 1, "train": {"img_per_s": 1.0}, "sample": {"img_per_s": 1.0}}

    monkeypatch.setattr(mod, "measure_isolated" if script == "compare_diffusers" else "measure", fake)
    extra = ["--variants", "new"] if script == "profile_dit" else []
    monkeypatch.setattr(sys, "argv", [script, "--precisions", "fp32,bf16", "--repeats", "1", "--set", "model.hidden_size=32",
                                      "--set", "model.depth=1", "--set", "model.heads=2", *extra])
    assert mod.main() == 0
    assert asked and {s for _, s in asked} == {"fp32", "bf16"}
    assert all(sample == train for train, sample in asked)
    if script == "compare_diffusers":
        assert "32/1/2" in json.loads(capsys.readouterr().out)["model"]  # the model measured, not always DiT-S/2


def test_an_autotune_cache_from_another_machine_or_torch_is_not_trusted(tmp_path, monkeypatch):
    """Every CPU's device name is "cpu": a run directory resumed on another CPU (another model, core count, RAM: the
    CPU search's budget is half of it) or under another torch must tune again, not reuse a batch tuned elsewhere.
    A process that differs only in its thread count (a DDP rank beside the launcher that tuned) keeps the key."""
    import fmcli.autotune as autotune_mod
    from dataclasses import replace as dc_replace

    from fmcli import hardware

    from fmcli.autotune import AutotuneResult

    searches = []

    def fake_autotune(cfg, base, *, max_batch, **kw):
        searches.append(max_batch)
        return AutotuneResult(batch=4, stop="max batch", trials=[Trial(4, ok=True, throughput=1.0, memory_mib=1.0)])

    monkeypatch.setattr(autotune_mod, "autotune_training", fake_autotune)
    cfg = resolve_bench_config(load_config("debug", ["train.micro_batch_size=auto", "train.global_batch_size=16"]))
    dev = torch.device("cpu")
    assert auto_micro_batch(cfg, tmp_path, dev, 1, False) == 4 and len(searches) == 1
    assert auto_micro_batch(cfg, tmp_path, dev, 1, False) == 4 and len(searches) == 1  # the same machine: cached
    here = hardware.cpu_info()
    monkeypatch.setattr(autotune_mod, "cpu_info", lambda: dc_replace(here, threads=here.threads + 7), raising=False)
    assert auto_micro_batch(cfg, tmp_path, dev, 1, False) == 4 and len(searches) == 1  # threads alone: still cached
    elsewhere = [("cpu_info", lambda: dc_replace(here, model=here.model + " (another)")),
                 ("_physical_memory_gib", lambda: 4096.0), ("os.cpu_count", lambda: 1024)]
    for name, fake in elsewhere:
        with monkeypatch.context() as m:
            m.setattr(autotune_mod.os if name == "os.cpu_count" else autotune_mod, name.split(".")[-1], fake, raising=False)
            auto_micro_batch(cfg, tmp_path, dev, 1, False)
    monkeypatch.setattr(torch, "__version__", "0.0.1-another")
    auto_micro_batch(cfg, tmp_path, dev, 1, False)
    assert len(searches) == 5  # another CPU model, RAM, core count, torch: each tuned again
    assert len(json.loads((tmp_path / "autotune.json").read_text())) == 5


def test_a_cpu_trial_whose_allocation_fails_is_an_oom_not_a_crash():
    """Where malloc refuses (strict overcommit, `ulimit -v`, or here an allocation beyond any address space: 2^40
    images), torch's CPU allocator raises RuntimeError "can't allocate memory", not MemoryError. The trial is a
    batch that does not fit (autotune skips it and bisects), not a failure that ends fm bench / the autotune."""
    from fmcli.config import config_to_dict
    from fmcli.measure import BenchSpec, measure_any, out_of_memory

    with pytest.raises(RuntimeError) as real:  # the allocator's own error, as a trial meets it
        torch.empty(2**50, dtype=torch.uint8)
    assert out_of_memory(real.value) and out_of_memory(MemoryError()) and not out_of_memory(RuntimeError("shape mismatch"))
    cfg = resolve_bench_config(load_config("debug", ["model.image_size=16", "model.in_channels=3", "model.num_classes=4", "repa.encoder=none"]))
    spec = BenchSpec(config=config_to_dict(cfg), batch=2**40, mode="train", steps=1, warmup=0, device="cpu")
    assert measure_any(spec) == {"oom": True, "batch": 2**40}


@pytest.mark.parametrize("sets", [["model.mlp_ratio=2"], ["flow.objective=meanflow", "sample.solver=meanflow"]])
def test_compare_diffusers_refuses_a_model_it_cannot_match_before_measuring(monkeypatch, sets):
    """diffusers' DiT has a 4x MLP and one time input: `--compare diffusers` of another model is a usage error
    (exit 2) before the autotune or any trial, not a failed diffusers trial (exit 1) after fm's was measured."""
    import fmcli.bench as bench_mod
    from fmcli.bench import BenchOptions, run_bench

    def no_trial(*a, **k):
        raise AssertionError("measured before the refusal")

    monkeypatch.setattr(bench_mod, "measure_any", no_trial)
    monkeypatch.setattr(bench_mod, "autotune_training", no_trial)
    with pytest.raises(UsageError, match="--compare diffusers"):
        run_bench(load_config("debug", sets), BenchOptions(batch_size=None, mode="train", compare="diffusers"))


@pytest.mark.parametrize("mode", ["sample", "both", "train"])
def test_bench_refuses_autoguidance_before_measuring_where_it_samples(monkeypatch, mode):
    """fm bench samples without a guide model: sample.guidance = 'auto' failed at the sampling trial, after the
    autotune, with advice to pass --guide-ckpt, an option fm bench has not. It is now refused before any work
    where bench samples; a training-only bench never samples, so it runs."""
    import fmcli.bench as bench_mod
    from fmcli.bench import BenchOptions, run_bench

    class Measured(Exception):
        pass

    def no_trial(*a, **k):
        raise Measured

    monkeypatch.setattr(bench_mod, "measure_any", no_trial)
    monkeypatch.setattr(bench_mod, "autotune_training", no_trial)
    expected = pytest.raises(Measured) if mode == "train" else pytest.raises(UsageError, match=r"sample\.guidance=cfg")
    with expected as err:
        run_bench(load_config("debug", ["sample.guidance=auto"]), BenchOptions(batch_size=None, mode=mode))
    assert "--guide-ckpt" not in str(err.value)


def test_autotune_sweep_measures_at_the_precision_fm_bench_resolves(monkeypatch):
    """benchmarks/autotune_sweep.py passed the preset's train.precision as it is: the quickstart's "auto" reached
    hardware.autocast, which took it for fp16 (on a CPU). Every trial now runs the precision "auto" resolves to,
    and a measurement refuses an unresolved setting."""
    import importlib
    import sys

    from fmcli.autotune import AutotuneResult
    from fmcli.config import config_to_dict
    from fmcli.measure import BenchSpec, measure

    mod = importlib.import_module("benchmarks.autotune_sweep")
    seen = []

    def fake_tune(cfg, base, **kw):
        seen.append(base.precision)
        return AutotuneResult(batch=4, stop="max batch", trials=[Trial(4, ok=True, throughput=1.0, memory_mib=1.0)])

    def fake_measure(spec, fn=None):
        seen.append(spec.precision)
        return {"train": {"img_per_s": 1.0}}

    monkeypatch.setattr(mod, "autotune_training", fake_tune)
    monkeypatch.setattr(mod, "measure_isolated", fake_measure)
    monkeypatch.setattr(sys, "argv", ["autotune_sweep", "--preset", "debug", "--set", "train.precision=auto", "--max-batch", "4", "--repeats", "1"])
    assert mod.main() == 0
    assert len(seen) == 2 and set(seen) <= {"fp32", "bf16"}  # a CPU resolves "auto" to one of these, never fp16
    cfg = resolve_bench_config(load_config("debug", ["train.precision=auto"]))
    with pytest.raises(UsageError, match="resolved precision"):
        measure(BenchSpec(config=config_to_dict(cfg), batch=2, mode="train", steps=1, warmup=0, precision="auto"))


def test_shape_accuracy_reports_the_sampling_precision_beside_the_metrics(monkeypatch, capsys, debug_run, shapes16, tmp_path):
    """benchmarks/shape_accuracy.py's JSON line held the sampling precision ("fp32") and the samples' precision
    metric under one key, "precision": the metric overwrote it. With one sample per class (no per-class FD) it
    stopped on round(None). Now: sample_precision / sample_compile, the metric's precision, per_class_fd_mean null."""
    import importlib
    import sys

    mod = importlib.import_module("benchmarks.shape_accuracy")
    monkeypatch.setattr(sys, "argv", ["shape_accuracy", "--ckpt", str(debug_run), "--data", str(shapes16), "--per-class", "1",
                                      "--steps", "2", "--precision", "fp32", "--no-compile", "--classifier", str(tmp_path / "clf.pt")])
    assert mod.main() == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["sample_precision"] == "fp32" and row["sample_compile"] is False
    assert isinstance(row["precision"], float) and 0.0 <= row["precision"] <= 1.0  # the k-NN precision of the samples
    assert row["per_class_fd_mean"] is None and row["num_samples"] == len(row["per_class"])  # one per class
    assert (row["nfe"], row["nfe_max"]) == (2, 2)  # 2 Euler steps, by hand: a number, as fm's rows give it (was [[2, 10]])


def test_sampler_sweep_rows_give_the_nfe_as_a_number(monkeypatch, capsys, debug_run, shapes16):
    """benchmarks/sampler_sweep.py's rows gave `nfe` as class_grid_samples' (NFE, samples) per batch, [[4, 10]], not
    a number. Reference: the network's forward passes counted by a wrapper (one batch: the grid of 10)."""
    import importlib
    import sys

    import fmcli.generate as generate

    mod = importlib.import_module("benchmarks.sampler_sweep")
    calls, load = [], generate.load_for_sampling

    class Counting(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net, self.null_class = net, net.null_class

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.net(*args, **kwargs)

    def counted(*args, **kwargs):
        loaded = load(*args, **kwargs)
        return dataclasses.replace(loaded, model=Counting(loaded.model))

    monkeypatch.setattr(mod, "load_for_sampling", counted)
    monkeypatch.setattr(mod, "cached_classifier", lambda data, path: (lambda x: torch.zeros(len(x), 10), 1.0))  # no training
    monkeypatch.setattr(sys, "argv", ["sampler_sweep", "--ckpt", str(debug_run), "--data", str(shapes16), "--per-class", "1",
                                      "--solvers", "heun", "--nfe", "5", "--tolerances", ""])
    counts, score = [], mod.class_grid_samples

    def counting_grid(*args, **kwargs):
        before = len(calls)
        out = score(*args, **kwargs)
        counts.append(len(calls) - before)
        return out

    monkeypatch.setattr(mod, "class_grid_samples", counting_grid)
    assert mod.main() == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"]
    assert [(r["nfe"], r["nfe_max"]) for r in rows] == [(n, n) for n in counts] and counts == [4]  # heun at NFE 5: 2 steps


def test_loop_vs_bench_parts_builds_the_step_with_the_data_its_repa_reads(monkeypatch, tmp_path):
    """benchmarks/loop_vs_bench.py parts built the quickstart's TrainingStep without data.path: the quickstart's REPA
    (repa.encoder "auto" -> "domain" on the shapes) loads its encoder from the data, and the script stopped on
    Path(None). The step it builds now sees the dataset it is fed from, as `fm train --data` sets it."""
    import importlib
    import sys
    from pathlib import Path

    import fmcli.step as step_mod

    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on it: undone after the test
    mod = importlib.import_module("benchmarks.loop_vs_bench")
    built = []

    class Stop(Exception):
        pass

    def fake_step(cfg, *a, **k):
        built.append((cfg.repa.encoder, cfg.data.path))
        raise Stop

    monkeypatch.setattr(step_mod, "TrainingStep", fake_step)
    args = type("Args", (), {"work": str(tmp_path), "count": 40, "precision": "fp32", "compile": False, "steps": 1, "rounds": 1})()
    with pytest.raises(Stop):
        mod.parts(args)
    (encoder, path), = built
    assert encoder == "domain" and path is not None and Path(path).resolve() == (tmp_path / "gray28-40").resolve()
