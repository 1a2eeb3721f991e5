"""Training system: overfitting, exact resume, accumulation, LR schedule, EMA, optimizers, crash safety."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import QuietLog, assert_resumes_bit_exactly, fm_env, fm_in_process
from fmcli import checkpoint as ckpt_mod
from fmcli.checkpoint import load_checkpoint, resolve_checkpoint
from fmcli.config import load_config
from fmcli.data.dataset import PreparedWriter
from fmcli.errors import UsageError
from fmcli.data.sampler import batch_geometry
from fmcli.data.shapes import prepare_shapes
from fmcli.optim import LRSchedule, update_ema
from fmcli.train import train


def cfg_for(data: Path, *overrides):
    return load_config("debug", [f"data.path='{data}'", *overrides])


def test_tiny_model_overfits_two_images(tmp_path):
    rng = np.random.default_rng(0)
    with PreparedWriter(tmp_path / "two", 2, (3, 8, 8), labels=True) as w:
        for k in range(2):
            w.add(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8), k)
        data = w.finish(num_classes=2)
    cfg = cfg_for(
        data, "model.patch_size=2", "train.global_batch_size=2", "train.steps=300", "optim.lr=3e-3",
        "optim.warmup_frac=0.0", "optim.min_lr_factor=1.0", "flow.cond_dropout=0.0", "sample.cfg=1", "train.checkpoint_every=0",
        "train.log_every=100",
    )
    result = train(cfg, tmp_path / "run")
    first, last = np.mean(result.losses[:10]), np.mean(result.losses[-30:])
    assert last < 0.5 * first, (first, last)


def test_the_non_finite_allowance_is_the_runs_not_each_resumes(tmp_path, shapes16, monkeypatch):
    """train.max_nan_skips=1: one non-finite step skipped before a stop, another after the resume, is two in the
    run: the resume stops at the second (it used to start counting from zero again)."""
    import fmcli.step as step_mod
    from fmcli.config import validate_config
    from fmcli.errors import RuntimeFailure

    real_loss, calls = step_mod.flow_matching_loss, {"n": 0}

    def nan_on_calls(pred, target):
        calls["n"] += 1
        return real_loss(pred, target) * (float("nan") if calls["n"] in (2, 5) else 1.0)

    monkeypatch.setattr(step_mod, "flow_matching_loss", nan_on_calls)
    cfg = cfg_for(shapes16, "train.steps=6", "train.max_nan_skips=1", "train.checkpoint_every=0")
    first = train(cfg, tmp_path / "run", stop_at_step=2)  # calls 1-3: call 2 skipped, steps 1 and 2 taken
    assert first.stopped_early and first.step == 2
    ckpt = resolve_checkpoint(tmp_path / "run")
    with pytest.raises(RuntimeFailure, match="non-finite loss or gradients at step 4"):  # calls 4, 5: the run's second skip
        train(validate_config(load_checkpoint(ckpt)["config"]), tmp_path / "run", resume_from=ckpt)


def test_resume_is_bit_exact_with_accumulation_workers_and_ema(tmp_path, shapes16):
    common = ["train.steps=8", "train.global_batch_size=16", "train.micro_batch_size=4", "data.num_workers=1",
              "data.flip=true", "train.log_every=1", "train.checkpoint_every=0", "train.ema_decay=0.9"]
    straight = train(cfg_for(shapes16, *common), tmp_path / "straight")
    first = train(cfg_for(shapes16, *common), tmp_path / "split", stop_at_step=4)
    assert first.stopped_early and first.step == 4
    ckpt = resolve_checkpoint(tmp_path / "split")
    state = load_checkpoint(ckpt)
    from fmcli.config import validate_config

    second = train(validate_config(state["config"]), tmp_path / "split", resume_from=ckpt)
    assert straight.losses == first.losses + second.losses  # bit for bit
    a = load_checkpoint(resolve_checkpoint(tmp_path / "straight"))
    b = load_checkpoint(resolve_checkpoint(tmp_path / "split"))
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    # The metrics log of the split run continues the same numbers.
    logged = [json.loads(line)["loss"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert logged == straight.losses


@pytest.mark.parametrize("settings", [["flow.coupling=ot-exact", "train.micro_batch_size=8"], ["flow.coupling=ot-sinkhorn"],
                                      ["flow.time_sampler=logit_normal", "optim.name=muon", "optim.grad_clip=0.01"]],
                         ids=["ot-exact-accumulated", "ot-sinkhorn", "logit-normal-muon-clipped"])
def test_couplings_time_samplers_and_muon_resume_bit_exactly(tmp_path, shapes16, settings):
    """The resumes the other bit-exactness tests leave out: minibatch OT (per micro-batch, with accumulation),
    logit-normal times, Muon's state, gradient clipping; a stop at step 3 of 6 and its resume equal a straight run."""
    assert_resumes_bit_exactly(tmp_path, [f"data.path='{shapes16}'", "train.steps=6", "train.log_every=1", "train.checkpoint_every=0", *settings])


def _every_tensor(state: dict, keys) -> dict:
    """{path: value} of every tensor and number under `keys` of a checkpoint (model, EMA, optimizer, ...), for a bit-for-bit compare."""
    out = {}

    def walk(obj, path):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        else:
            out[path] = obj

    for key in keys:
        walk(state.get(key), key)
    return out


RESUME_COMBINATIONS = {
    # fm resume with every resume-safe setting that adds periodic work (grids, tiny-feature FID, checkpoints, workers)
    # continues as a straight run without them: none of it perturbs the training draws or the data position.
    "resume-safe-overrides": ([], 3, [["--set", "train.sample_every=1", "--set", "eval.every=2", "--set", "eval.num_samples=4",
                                       "--set", "eval.ref={data}", "--set", "eval.features=tiny", "--set", "data.num_workers=1",
                                       "--set", "train.checkpoint_every=1", "--set", "train.keep_last=1", "--set", "train.log_every=2"]]),
    # stopped, resumed with --stop-at-step, resumed again: Muon with accumulation, EMA warmup, a grid every step, one checkpoint kept.
    "twice-resumed": (["optim.name=muon", "train.micro_batch_size=8", "train.ema_warmup=true", "train.sample_every=1",
                       "train.checkpoint_every=1", "train.keep_last=1"], 2, [["--stop-at-step", "4"], []]),
    # a finished 3-step run (final grid and evaluation done) extended to 6 at a constant LR is a 6-step run.
    "extended-train-steps": (["optim.warmup_frac=0", "optim.min_lr_factor=1", "train.sample_every=1", "eval.every=3",
                              "eval.num_samples=4", "eval.ref={data}", "eval.features=tiny"], None, [["--set", "train.steps=6"]]),
    # epochs of 2 batches (40 images): the stop and the resume fall mid-epoch; flips, exact OT per micro-batch.
    "epochs-of-two-batches": (["data.flip=true", "flow.coupling=ot-exact", "train.micro_batch_size=8"], 3, [[]]),
}


@pytest.mark.parametrize("case", list(RESUME_COMBINATIONS))
def test_feature_combinations_resume_bit_exactly_through_fm_resume(tmp_path, shapes16, case):
    """A straight 6-step run and one stopped at step k then continued by `fm resume`: every tensor of the model, EMA,
    optimizer (and LR schedule), the data position (batches drawn: 6 of 16 images, or 6 over epochs of 2) and the
    global RNG equal bit for bit, and so do the losses in metrics.jsonl."""
    settings, stop_at, resumes = RESUME_COMBINATIONS[case]
    data = prepare_shapes(tmp_path / "shapes40", size=16, count=40, seed=0) if case == "epochs-of-two-batches" else shapes16
    base = [f"data.path='{data}'", "train.log_every=1", "sample.grid_size=2", "sample.steps=2"]  # the preset checkpoints at step 10: here at the end
    settings = [s.format(data=data) for s in settings]
    resumes = [[a.format(data=data) for a in r] for r in resumes]
    straight = train(load_config("debug", [*base, "train.steps=6", *settings]), tmp_path / "straight", log=QuietLog())
    steps = 3 if stop_at is None else 6  # extended: a whole 3-step run first
    first = train(load_config("debug", [*base, f"train.steps={steps}", *settings]), tmp_path / "split", stop_at_step=stop_at, log=QuietLog())
    assert first.step == (stop_at or 3)
    for args in resumes:
        resumed = fm_in_process("resume", tmp_path / "split", *args)
        assert resumed.returncode == 0, resumed.stderr
    a, b = (load_checkpoint(resolve_checkpoint(tmp_path / d)) for d in ("straight", "split"))
    # A retargeted schedule (train.steps set on resume) records where it was re-anchored; its LRs are in the optimizer's groups.
    keys = ["model", "ema", "optimizer", "scaler", "data_position", "step", "rng"] + ([] if stop_at is None else ["schedulers"])
    mine, theirs = _every_tensor(b, keys), _every_tensor(a, keys)
    assert mine.keys() == theirs.keys()
    for path, value in theirs.items():
        assert torch.equal(mine[path], value) if isinstance(value, torch.Tensor) else mine[path] == value, path
    assert a["data_position"] == ({"epoch": 3, "index": 0, "batches": 6} if case == "epochs-of-two-batches" else {"epoch": 0, "index": 96, "batches": 6})

    def losses(run):
        return [r["loss"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses("straight") == straight.losses
    if case != "resume-safe-overrides":  # its resume logs every 2nd step (means of two)
        assert losses("split") == straight.losses


@pytest.mark.parametrize("checkpoint_every", [0, 3], ids=["stop-saves", "step-3-saved-already"])
def test_a_stop_during_skipped_steps_resumes_bit_exactly(tmp_path, shapes16, monkeypatch, checkpoint_every):
    """Batches 3 and 4 give a non-finite loss (skipped, no optimizer step) and SIGTERM arrives during batch 3 or 4:
    the stop saves step 3 with batches=4, or keeps step 3's own checkpoint (batches=3: the resume draws batch 3
    again). Either way the resumed run is the straight run's 6 steps over 8 batches, every tensor bit for bit."""
    from fmcli import step as step_mod
    from fmcli.config import validate_config

    real_step, real_loss, drawing, kill_at = step_mod.TrainingStep.__call__, step_mod.flow_matching_loss, {}, set()

    def step(self, batches, batch_index, at):
        drawing["batch"] = batch_index
        if batch_index in kill_at:
            kill_at.discard(batch_index)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, batches, batch_index, at)

    monkeypatch.setattr(step_mod.TrainingStep, "__call__", step)
    monkeypatch.setattr(step_mod, "flow_matching_loss", lambda *a, **kw: real_loss(*a, **kw) * (math.nan if drawing["batch"] in (3, 4) else 1.0))
    cfg = cfg_for(shapes16, "train.steps=6", "train.max_nan_skips=2", "train.log_every=1", f"train.checkpoint_every={checkpoint_every}",
                  "train.ema_warmup=true", "train.micro_batch_size=8")
    straight = train(cfg, tmp_path / "straight", log=QuietLog())
    kill_at.add(3 if checkpoint_every == 0 else 4)
    first = train(cfg, tmp_path / "split", log=QuietLog())
    assert first.stopped_early and first.step == 3
    ckpt = resolve_checkpoint(tmp_path / "split")
    assert load_checkpoint(ckpt)["data_position"]["batches"] == (4 if checkpoint_every == 0 else 3)
    second = train(validate_config(load_checkpoint(ckpt)["config"]), tmp_path / "split", resume_from=ckpt, log=QuietLog())
    assert first.losses + second.losses == straight.losses
    a, b = (load_checkpoint(resolve_checkpoint(tmp_path / d)) for d in ("straight", "split"))
    assert a["data_position"] == {"epoch": 0, "index": 128, "batches": 8}  # 6 steps, 2 skipped batches
    keys = ["model", "ema", "optimizer", "schedulers", "scaler", "data_position", "step", "rng"]
    mine, theirs = _every_tensor(b, keys), _every_tensor(a, keys)
    assert mine.keys() == theirs.keys()
    for path, value in theirs.items():
        assert torch.equal(mine[path], value) if isinstance(value, torch.Tensor) else mine[path] == value, path


def test_resume_on_a_dataset_of_another_size_is_refused(tmp_path):
    """The data position indexes the epoch permutations of the dataset trained on, which depend on its size: a
    resume on a re-prepared dataset of another size (32 -> 40 images, batch 8: the same (epoch, index) after
    2 batches, so the position check alone let it through) read rows the run never planned. Refused (exit 2)."""
    from fmcli.config import validate_config

    data = prepare_shapes(tmp_path / "shapes", size=8, count=32, seed=0)
    common = ["model.patch_size=4", "train.steps=4", "train.global_batch_size=8", "train.checkpoint_every=0"]
    first = train(cfg_for(data, *common), tmp_path / "run", stop_at_step=2)
    ckpt = resolve_checkpoint(tmp_path / "run")
    assert first.step == 2
    prepare_shapes(data, size=8, count=40, seed=1, force=True)
    with pytest.raises(UsageError, match="trained on 32 images, but .* holds 40"):
        train(validate_config(load_checkpoint(ckpt)["config"]), tmp_path / "run", resume_from=ckpt)


def test_resume_on_other_data_of_the_same_size_is_refused_by_its_fingerprint(tmp_path):
    """The count check let a dataset replaced by another of the same size through (another shapes seed: the data
    position went on in other images). The manifest's content fingerprint, kept in the checkpoint, refuses it
    (exit 2); the same images re-prepared resume; a checkpoint without the fingerprint (an older fm's) resumes on
    the count alone, saying so."""
    from fmcli.config import validate_config

    data = prepare_shapes(tmp_path / "shapes", size=8, count=32, seed=0)
    common = ["model.patch_size=4", "train.steps=3", "train.global_batch_size=8", "train.checkpoint_every=0"]
    train(cfg_for(data, *common), tmp_path / "run", stop_at_step=2)
    ckpt = resolve_checkpoint(tmp_path / "run")
    state = load_checkpoint(ckpt)
    cfg = validate_config(state["config"])
    prepare_shapes(data, size=8, count=32, seed=1, force=True)  # other images, the same count
    with pytest.raises(UsageError, match="trained on other images than .* content fingerprint"):
        train(cfg, tmp_path / "run", resume_from=ckpt)
    del state["data_info"]["fingerprint"]
    older = tmp_path / "older.pt"
    torch.save(state, older)
    notes = []
    log = type("Log", (QuietLog,), {"info": lambda self, message: notes.append(message)})()
    assert train(cfg, tmp_path / "older-run", resume_from=older, log=log).step == 3
    assert any("no content fingerprint" in n for n in notes), notes
    prepare_shapes(data, size=8, count=32, seed=0, force=True)  # the same images again: the same dataset
    assert train(cfg, tmp_path / "run", resume_from=ckpt).step == 3


def test_metrics_epoch_counts_the_epochs_completed(tmp_path):
    """docs/architecture.md: a metrics record's `epoch` is the whole epochs completed by its step (drop-last: 20
    images at batch 8 make 2 steps an epoch, 4 images never read). By hand: floor(8 k / 16) after step k."""
    data = prepare_shapes(tmp_path / "shapes", size=8, count=20, seed=0)
    train(cfg_for(data, "model.patch_size=4", "train.steps=5", "train.global_batch_size=8", "train.log_every=1", "train.checkpoint_every=0"), tmp_path / "run")
    got = [(r["step"], r["epoch"]) for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert got == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2)]


def test_accumulation_matches_one_big_batch(tmp_path, shapes16):
    common = ["train.steps=3", "train.global_batch_size=16", "train.checkpoint_every=0", "train.log_every=1"]
    big = train(cfg_for(shapes16, *common), tmp_path / "big")
    acc = train(cfg_for(shapes16, *common, "train.micro_batch_size=4"), tmp_path / "acc")
    np.testing.assert_allclose(big.losses, acc.losses, rtol=1e-5)
    a = load_checkpoint(resolve_checkpoint(tmp_path / "big"))["model"]
    b = load_checkpoint(resolve_checkpoint(tmp_path / "acc"))["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_accumulation_gradient_equals_big_batch_gradient():
    """Direct check on gradients: sum over k micro-batches of loss/k == the loss of the whole batch."""
    from fmcli.config import ModelConfig
    from fmcli.flow import flow_matching_loss, interpolate
    from fmcli.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden_size=32, depth=2, heads=2, patch_size=4, image_size=8, in_channels=3, num_classes=3))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x1, x0, t, y = torch.randn(12, 3, 8, 8), torch.randn(12, 3, 8, 8), torch.rand(12), torch.randint(0, 3, (12,))

    def loss_of(sl):
        xt, ut = interpolate(x0[sl], x1[sl], t[sl], 1e-5)
        return flow_matching_loss(model(xt, t[sl], y[sl]), ut)

    loss_of(slice(0, 12)).backward()
    big = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for k in range(3):
        (loss_of(slice(4 * k, 4 * k + 4)) / 3).backward()
    for g_big, p in zip(big, model.parameters()):
        torch.testing.assert_close(p.grad, g_big, rtol=1e-4, atol=1e-6)


def test_lr_schedule_follows_its_formula(tmp_path, shapes16):
    steps, lr = 20, 1e-3
    cfg = cfg_for(shapes16, f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=0",
                  "optim.warmup_frac=0.25", "optim.warmup_start_factor=0.1", "optim.min_lr_factor=0.1", f"optim.lr={lr}")
    train(cfg, tmp_path / "run")
    logged = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Independent formula: step k (1-based) runs at the lr of schedule position s = k - 1.
    warmup = 5
    expected = []
    for s in range(steps):
        if s < warmup:
            f = 0.1 + 0.9 * s / warmup
        else:
            f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        expected.append(lr * f)
    np.testing.assert_allclose(logged, expected, rtol=1e-9)
    assert LRSchedule(100, 0.05, 0.1, 0.1)(0) == pytest.approx(0.1)
    assert LRSchedule(100, 0.05, 0.1, 0.1)(100) == pytest.approx(0.1)


def test_ema_matches_hand_computed_update():
    model = torch.nn.Linear(3, 2)
    ema = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(2.0), model.bias.fill_(-1.0), ema.weight.fill_(1.0), ema.bias.fill_(0.0)
    update_ema(ema, model, 0.9)
    assert torch.allclose(ema.weight, torch.full((2, 3), 0.9 * 1.0 + 0.1 * 2.0))
    assert torch.allclose(ema.bias, torch.full((2,), 0.9 * 0.0 + 0.1 * -1.0))


def test_ema_is_updated_once_per_optimizer_step_not_per_micro_batch(tmp_path, shapes16):
    """With decay d and k steps, EMA = d^k * init + ...; check the EMA moved by exactly one update per step."""
    cfg = cfg_for(shapes16, "train.steps=1", "train.global_batch_size=16", "train.micro_batch_size=4",
                  "train.ema_decay=0.5", "train.ema_warmup=false", "train.checkpoint_every=0")
    train(cfg, tmp_path / "run")
    state = load_checkpoint(resolve_checkpoint(tmp_path / "run"))
    torch.manual_seed(cfg.train.seed)
    from fmcli.models import build_model
    from fmcli.config import resolve as resolve_data_fields
    from fmcli.data.dataset import read_manifest

    init = build_model(resolve_data_fields(cfg, read_manifest(shapes16)).model).state_dict()
    for name, w in state["model"].items():
        torch.testing.assert_close(state["ema"][name], 0.5 * init[name] + 0.5 * w)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizers_reduce_the_loss_on_shapes(tmp_path, shapes16, optimizer):
    cfg = cfg_for(shapes16, f"optim.name={optimizer}", "train.steps=60", "train.checkpoint_every=0", "train.log_every=20", "optim.lr=2e-3")
    losses = train(cfg, tmp_path / "run").losses
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])


def test_batch_geometry_refuses_non_dividing_sizes():
    assert batch_geometry(576, 96, 2) == (96, 3)
    assert batch_geometry(64, None, 2) == (32, 1)
    with pytest.raises(UsageError, match="not divisible"):
        batch_geometry(100, 16, 2)


def test_crash_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, shapes16, monkeypatch):
    cfg = cfg_for(shapes16, "train.steps=4", "train.checkpoint_every=2", "train.keep_last=1")
    real_replace = os.replace

    def crash_on_second_checkpoint(src, dst):
        if str(dst).endswith("step-0000004.pt"):
            raise OSError("simulated crash between write and rename")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", crash_on_second_checkpoint)
    with pytest.raises(OSError, match="simulated"):
        train(cfg, tmp_path / "run")
    path = resolve_checkpoint(tmp_path / "run")
    assert path.name == "step-0000002.pt"
    assert load_checkpoint(path)["step"] == 2
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if ".tmp-" in p.name]


def test_truncated_checkpoint_is_a_one_line_error(tmp_path):
    bad = tmp_path / "step-0000001.pt"
    torch.save({"model": {"w": torch.zeros(1000)}, "config": {}}, bad)
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(UsageError, match="corrupt or truncated"):
        load_checkpoint(bad)
    out = fm_in_process("sample", "--ckpt", bad, "--out", tmp_path / "x.png")
    assert out.returncode == 2 and "corrupt or truncated" in out.stderr and "Traceback" not in out.stderr


def test_sigterm_saves_a_resumable_checkpoint(tmp_path, shapes16):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fmcli.cli", "train", "--preset", "debug", "--data", str(shapes16), "--run-dir", str(run_dir),
         "--set", "train.steps=100000", "--set", "train.log_every=1", "--set", "train.checkpoint_every=0"],
        env=fm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "fm resume" in err
    state = load_checkpoint(resolve_checkpoint(run_dir))
    assert 3 <= state["step"] < 100000
    resumed = fm_in_process("resume", run_dir, "--set", f"train.steps={state['step'] + 2}")
    assert resumed.returncode == 0, resumed.stderr
    assert load_checkpoint(resolve_checkpoint(run_dir))["step"] == state["step"] + 2


def test_existing_run_directory_is_never_overwritten(tmp_path, shapes16):
    args = ["train", "--preset", "debug", "--data", shapes16, "--run-dir", tmp_path / "run", "--set", "train.steps=2"]
    assert fm_in_process(*args).returncode == 0
    again = fm_in_process(*args)
    assert again.returncode == 2 and "fm resume" in again.stderr
    cont = fm_in_process(*args[:-1], "train.steps=3", "--resume", "latest")
    assert cont.returncode == 0, cont.stderr
    unsafe = fm_in_process("resume", tmp_path / "run", "--set", "optim.lr=0.5")
    assert unsafe.returncode == 2 and "optim.lr" in unsafe.stderr


def test_non_finite_loss_stops_cleanly_or_is_skipped(tmp_path, shapes16, monkeypatch):
    import fmcli.step as train_mod

    real_loss = train_mod.flow_matching_loss
    calls = {"n": 0}

    def nan_on_third_call(pred, target):
        calls["n"] += 1
        loss = real_loss(pred, target)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_mod, "flow_matching_loss", nan_on_third_call)
    from fmcli.errors import RuntimeFailure

    with pytest.raises(RuntimeFailure, match="non-finite loss or gradients at step 3"):
        train(cfg_for(shapes16, "train.steps=5", "train.checkpoint_every=2"), tmp_path / "stop")
    assert resolve_checkpoint(tmp_path / "stop").name == "step-0000002.pt"  # nothing written after the NaN

    calls["n"] = 0
    result = train(cfg_for(shapes16, "train.steps=5", "train.max_nan_skips=1", "train.checkpoint_every=0"), tmp_path / "skip")
    assert result.step == 5 and len(result.losses) == 5 and all(math.isfinite(x) for x in result.losses)
    state = load_checkpoint(resolve_checkpoint(tmp_path / "skip"))
    assert state["data_position"]["batches"] == 6  # the skipped batch is consumed, not replayed


@pytest.mark.parametrize("checkpoint_every", [0, 2], ids=["unsaved-step", "saved-step"])
def test_a_stop_during_skipped_non_finite_steps_is_honoured_at_once(tmp_path, shapes16, monkeypatch, checkpoint_every):
    """SIGTERM during a stretch of skipped non-finite steps stops at the first skip (the skip `continue`d past the stop
    check: the run skipped on to train.max_nan_skips and failed without saving). Steps 1, 2 take batches 0, 1 and batch 2
    is skipped: step 2's checkpoint says batches=3 (the skip counted as a skip is); where step 2 was saved already, that
    file (batches=2) is the stop's checkpoint, not written again nor set aside."""
    from fmcli import step as step_mod

    real_step = step_mod.TrainingStep.__call__

    def nan_from_step_2(self, batches, batch_index, step):
        out = real_step(self, batches, batch_index, step)
        if step < 2:
            return out
        if batch_index == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step_mod.StepResult(float("nan"), float("nan"), out.lr)

    monkeypatch.setattr(step_mod.TrainingStep, "__call__", nan_from_step_2)
    cfg = cfg_for(shapes16, "train.steps=8", "train.max_nan_skips=3", f"train.checkpoint_every={checkpoint_every}", "train.log_every=100")
    result = train(cfg, tmp_path / "run", log=QuietLog())
    assert result.stopped_early and result.step == 2 and result.checkpoint.name == "step-0000002.pt"
    state = load_checkpoint(resolve_checkpoint(tmp_path / "run"))
    assert state["step"] == 2 and state["data_position"]["batches"] == (3 if checkpoint_every == 0 else 2)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step-0000002.pt"]  # nothing set aside
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2] and all(math.isfinite(r["grad_norm"]) for r in records if "loss" in r)


@pytest.mark.parametrize("tuned", [16, 4], ids=["same", "other"])
def test_a_resume_whose_auto_micro_batch_tunes_to_another_size_says_so(tmp_path, debug_run, monkeypatch, tuned):
    """train.micro_batch_size="auto" is tuned again on resume (another machine, a lost autotune.json): where it gives
    another micro batch than the checkpoint's (16, the debug run's whole batch) the run's accumulation changes (1 -> 16 / 4
    = 4) and it no longer continues bit for bit: one line says so (it changed without a word)."""
    from fmcli import autotune
    from fmcli.config import validate_config, with_setting

    class Lines(QuietLog):
        def __init__(self):
            self.lines = []

        def info(self, message):
            self.lines.append(message)

    monkeypatch.setattr(autotune, "auto_micro_batch", lambda *a, **k: tuned)
    ckpt = resolve_checkpoint(debug_run)
    state = load_checkpoint(ckpt)
    assert state["micro_batch_size"] == 16 and state["step"] == 4
    cfg = with_setting(validate_config(state["config"]), "train.micro_batch_size", "auto")
    log = Lines()
    train(cfg, tmp_path / "run", resume_from=ckpt, log=log)  # at train.steps already: the restore, no step
    notes = [line for line in log.lines if "micro_batch_size=auto" in line]
    assert notes == ([] if tuned == 16 else [notes[0]]) and (tuned == 16 or "trained 16 (gradient accumulation 1 -> 4)" in notes[0])


@pytest.mark.parametrize("clip, overflowing", [(1.0, "adamw"), (0.0, "muon")], ids=["clip-adamw-overflows", "no-clip-muon-overflows"])
def test_an_fp16_overflow_skips_every_optimizer_not_only_the_one_that_overflowed(shapes16, clip, overflowing):
    """fp16's GradScaler decides per optimizer; an overflow in one optimizer's gradients (Muon + AdamW) left the other
    stepping on the clipped gradients: zeros (x 1 / inf, the clip) or NaN (inf / inf without a clip), its weights
    changed or NaN. A skipped step leaves every weight and the EMA bit for bit as they were, and the scale halves
    (GradScaler's backoff 0.5: 2^16 -> 2^15). CPU stand-in for CUDA: an enabled GradScaler("cpu"), the same code path."""
    import itertools

    from fmcli.data.dataset import PreparedDataset, collate_batched
    from fmcli.distributed import DistContext
    from fmcli.step import TrainingStep

    cfg = cfg_for(shapes16, "optim.name=muon", f"optim.grad_clip={clip}", "model.image_size=16", "model.in_channels=3", "model.num_classes=10")
    step = TrainingStep(cfg, DistContext(), micro=8, accum=1, shape=(3, 16, 16))
    step.scaler = torch.amp.GradScaler("cpu", enabled=True)
    params = dict(step.model.named_parameters())
    muon_params = {id(p) for o in step.optimizer.optimizers if type(o).__name__ == "Muon" for g in o.param_groups for p in g["params"]}
    name = next(n for n, p in params.items() if (id(p) in muon_params) == (overflowing == "muon"))
    params[name].register_hook(lambda g: torch.full_like(g, float("inf")))  # this optimizer's gradients only
    before = {k: v.clone() for k, v in {**step.model.state_dict(), **{f"ema.{n}": p for n, p in step.ema.state_dict().items()}}.items()}
    batch = collate_batched(PreparedDataset(shapes16).__getitems__(list(range(8))))
    with warnings.catch_warnings(record=True) as caught:  # torch's "lr_scheduler.step() before optimizer.step()" is not the user's doing
        warnings.simplefilter("always")
        out = step(itertools.repeat(batch), 0, 0)
    assert [str(w.message) for w in caught if "lr_scheduler" in str(w.message)] == []
    assert math.isfinite(out.loss) and not math.isfinite(out.grad_norm)
    after = {**step.model.state_dict(), **{f"ema.{n}": p for n, p in step.ema.state_dict().items()}}
    assert [k for k in before if not torch.equal(before[k], after[k])] == []
    assert [len(o.state) for o in step.optimizer.optimizers] == [0, 0]  # no optimizer stepped: none holds a moment or momentum
    assert step.scaler.get_scale() == 2.0**15


def test_fp16_on_cpu_is_refused(tmp_path, shapes16):
    with pytest.raises(UsageError, match="fp16 needs a CUDA"):
        train(cfg_for(shapes16, "train.precision=fp16"), tmp_path / "run")


def test_init_from_a_model_of_another_depth_is_one_line_naming_the_setting(tmp_path, shapes16, debug_run):
    """train.init_from with another model: one line naming the setting that differs (debug_run: the `debug` preset's
    depth 2) and the --set that fits, not torch's list of every missing weight (4 blocks x 10 weights at depth 6).
    Where the settings agree but the weights do not, the counts by kind and the first few names."""
    ckpt = resolve_checkpoint(debug_run)
    for depth in (6, 1):
        with pytest.raises(UsageError) as err:
            train(cfg_for(shapes16, f"train.init_from='{debug_run}'", f"model.depth={depth}", "train.steps=1"), tmp_path / f"depth{depth}")
        message = str(err.value)
        assert f"(model.depth 2 in the checkpoint, {depth} here); train with the checkpoint's model settings: --set model.depth=2" in message
        assert "\n" not in message and "blocks." not in message and len(message) < 300, message
    state = load_checkpoint(ckpt)  # settings that agree, weights that do not: one weight gone, one extra, one reshaped
    del state["config"]["model"]["depth"]
    ema = state["ema"]
    ema.pop("blocks.1.attn.proj.bias")
    ema["blocks.2.attn.proj.bias"] = torch.zeros(32)
    ema["x_embed.weight"] = torch.zeros(1, 2)
    torch.save(state, tmp_path / "edited.pt")
    with pytest.raises(UsageError) as err:
        train(cfg_for(shapes16, f"train.init_from='{tmp_path / 'edited.pt'}'", "train.steps=1"), tmp_path / "edited")
    assert str(err.value).endswith(
        "its model differs from this one (1 weights missing (e.g. blocks.1.attn.proj.bias), 1 weights unexpected (e.g. blocks.2.attn.proj.bias), "
        "1 weights of another shape (e.g. x_embed.weight)); use the checkpoint's model settings"
    ), err.value


def test_muon_from_the_command_line(tmp_path, shapes16):
    out = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", tmp_path / "run", "--set", "optim.name=muon", "--set", "train.steps=3")
    assert out.returncode == 0, out.stderr
    state = load_checkpoint(resolve_checkpoint(tmp_path / "run"))
    assert state["config"]["optim"]["name"] == "muon"
    assert len(state["optimizer"]["optimizers"]) == 2  # AdamW for embeddings/norms/biases/final layer + Muon


def test_guided_grids_without_condition_dropout_are_refused_before_the_run(tmp_path, shapes16, debug_run):
    """flow.cond_dropout=0 trains no unconditional branch; guidance (sample.cfg != 1) extrapolates from it, so the
    run's sample grids came from an untrained null class. Refused before any work; a reflow student's recipe
    (cfg 1) trains. Sampling such a model with --cfg > 1 says what the guidance extrapolates from."""
    import dataclasses

    import torch

    from fmcli.errors import UsageError
    from fmcli.generate import guidance_that_runs, load_for_sampling

    with pytest.raises(UsageError, match="flow.cond_dropout=0 trains no unconditional branch, which sample.cfg=2"):
        train(cfg_for(shapes16, "flow.cond_dropout=0", "sample.cfg=2", "train.steps=1"), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    train(cfg_for(shapes16, "flow.cond_dropout=0", "sample.cfg=1", "train.steps=1"), tmp_path / "student", log=QuietLog())
    loaded = load_for_sampling(str(debug_run), torch.device("cpu"))
    no_dropout = dataclasses.replace(loaded, config=loaded.config.with_section("flow", cond_dropout=0.0))
    for model, noted in ((loaded, False), (no_dropout, True)):
        notes = []
        ran = guidance_that_runs(model, model.config.sample.model_copy(update={"cfg": 3.0}), notes.append)
        assert ran.cfg == 3.0 and any("cond_dropout=0" in n for n in notes) == noted


def test_a_stop_between_log_intervals_logs_its_steps_and_the_resume_continues_the_log(tmp_path, shapes16):
    """Steps 1-3 of a run stopped at step 3 (log_every=5) are in a record at step 3 (they were in none); the
    resumed run's record at step 5 averages its own steps 4-5, computed here from the losses each call returned."""
    common = ["train.steps=10", "train.log_every=5", "train.checkpoint_every=0"]
    first = train(cfg_for(shapes16, *common), tmp_path / "run", stop_at_step=3, log=QuietLog())
    ckpt = resolve_checkpoint(tmp_path / "run")
    from fmcli.config import validate_config

    second = train(validate_config(load_checkpoint(ckpt)["config"]), tmp_path / "run", resume_from=ckpt, log=QuietLog())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 5, 10]
    expected = [sum(first.losses) / 3, sum(second.losses[:2]) / 2, sum(second.losses[2:]) / 5]
    assert [r["loss"] for r in records] == pytest.approx(expected, rel=1e-12)


def test_a_stop_at_a_step_with_a_grid_and_evaluation_due_has_them_made_by_the_resume(tmp_path, shapes16):
    """A stop at step 2 saves and ends before step 2's grid and tiny-feature FID (train.sample_every=eval.every=2); the
    resume makes them before step 3, from the same EMA: the same grid files byte for byte and the same evaluation
    records (their generation time aside) as a straight run, the same losses. A finished run extended by a resume
    redoes nothing at its last step, whose grid and evaluation it has."""
    from fmcli.config import validate_config

    ref = prepare_shapes(tmp_path / "ref", size=16, count=8, seed=1)  # FID's reference: 8 images, its features in no time
    common = ["train.steps=4", "train.global_batch_size=4", "train.log_every=1", "train.checkpoint_every=0", "train.sample_every=2", "sample.grid_size=2",
              "sample.steps=2", "eval.every=2", "eval.num_samples=4", f"eval.ref='{ref}'", "eval.features=tiny"]
    straight = train(cfg_for(shapes16, *common), tmp_path / "straight", log=QuietLog())
    first = train(cfg_for(shapes16, *common), tmp_path / "split", stop_at_step=2, log=QuietLog())
    ckpt = resolve_checkpoint(tmp_path / "split")
    second = train(validate_config(load_checkpoint(ckpt)["config"]), tmp_path / "split", resume_from=ckpt, log=QuietLog())
    assert first.losses + second.losses == straight.losses

    def grids(run):
        return {p.name: p.read_bytes() for p in sorted((tmp_path / run / "samples").iterdir())}

    def evaluations(run):
        records = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        return [{k: v for k, v in r.items() if k != "fid_gen_seconds"} for r in records if "fid" in r]

    assert list(grids("straight")) == ["step-0000002.png", "step-0000004.png"]
    assert grids("split") == grids("straight")
    assert [r["step"] for r in evaluations("straight")] == [2, 4]
    assert evaluations("split") == evaluations("straight")
    lines = []
    log = type("Log", (QuietLog,), {"info": lambda self, message: lines.append(message)})()
    ckpt = resolve_checkpoint(tmp_path / "straight")
    extended = validate_config({**load_checkpoint(ckpt)["config"], "train": {**load_checkpoint(ckpt)["config"]["train"], "steps": 5}})
    train(extended, tmp_path / "straight", resume_from=ckpt, log=log)
    assert not any("skipped" in line for line in lines), lines
    assert [r["step"] for r in evaluations("straight")] == [2, 4] and list(grids("straight"))[:2] == ["step-0000002.png", "step-0000004.png"]


def test_a_resume_after_a_torn_metrics_line_keeps_every_line_a_record(tmp_path, shapes16):
    """A run killed mid-write leaves a torn last line; the resumed run's first record must not continue it (one
    line that is neither record, which `fm plot` then refuses): the torn fragment is dropped, the records stay."""
    from fmcli.config import validate_config
    from fmcli.plot import read_metrics

    common = ["train.steps=4", "train.log_every=1", "train.checkpoint_every=0"]
    first = train(cfg_for(shapes16, *common), tmp_path / "run", stop_at_step=2, log=QuietLog())
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 0.5, "l')  # what a kill during the next write leaves
    ckpt = resolve_checkpoint(tmp_path / "run")
    second = train(validate_config(load_checkpoint(ckpt)["config"]), tmp_path / "run", resume_from=ckpt, log=QuietLog())
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == list(zip([1, 2, 3, 4], first.losses + second.losses))
    assert [r["step"] for r in read_metrics(tmp_path / "run")[0]] == [1, 2, 3, 4]


def test_config_json_names_the_settings_a_resume_changed(tmp_path, shapes16):
    """config.json is the run's config: after a resume with --set train.steps=7 --set train.log_every=3 it holds
    those values (it kept the first run's 4 and 2)."""
    fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", tmp_path / "run", "--set", "train.steps=4", "--set", "train.log_every=2")
    out = fm_in_process("resume", tmp_path / "run", "--set", "train.steps=7", "--set", "train.log_every=3")
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert (saved["steps"], saved["log_every"]) == (7, 3)


def test_a_terminal_ctrl_c_with_loader_workers_stops_once_with_one_message(tmp_path, shapes16):
    """A terminal's Ctrl-C reaches the whole process group, DataLoader workers too, which inherit the trainer's
    handler: only the main process may take it (each worker printed the stop message as well)."""
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fmcli.cli", "train", "--preset", "debug", "--data", str(shapes16), "--run-dir", str(run_dir),
         "--set", "train.steps=100000", "--set", "train.log_every=1", "--set", "train.checkpoint_every=0", "--set", "data.num_workers=2"],
        env=fm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.count("SIGINT: finishing this step") == 1, err
    assert "stopped at step" in err and "Traceback" not in err


def test_a_second_ctrl_c_while_a_stopped_run_winds_down_is_not_a_traceback(tmp_path, shapes16, monkeypatch):
    """Ctrl-C asks for a stop; once its checkpoint is saved, a second one (while the loader's workers shut down)
    has nothing left to stop: it raised KeyboardInterrupt inside the loader's __del__, a printed traceback."""
    from torch.utils.data import dataloader

    real_shutdown = dataloader._MultiProcessingDataLoaderIter._shutdown_workers
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    def shutdown_with_ctrl_c(self):
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
        return real_shutdown(self)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "_shutdown_workers", shutdown_with_ctrl_c)
    from fmcli import step as step_mod

    real_step = step_mod.TrainingStep.__call__

    def first_ctrl_c(self, batches, batch_index, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, batches, batch_index, step)

    monkeypatch.setattr(step_mod.TrainingStep, "__call__", first_ctrl_c)
    result = train(cfg_for(shapes16, "train.steps=10", "train.checkpoint_every=0", "data.num_workers=1"), tmp_path / "run", log=QuietLog())
    assert result.stopped_early and result.step == 2
    assert not [u for u in unraisable if isinstance(u.exc_value, KeyboardInterrupt)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm-twice", "ctrl-c-twice"])
def test_a_repeated_sigterm_still_saves_the_stop_checkpoint_a_second_ctrl_c_stops_at_once(tmp_path, shapes16, monkeypatch, sig):
    """A scheduler that signals every process of a job (Slurm) reaches the ranks of `--nproc/--gpus N` directly, and
    torchrun forwards the launcher's SIGTERM to them again: the second SIGTERM raised KeyboardInterrupt, losing the
    stop checkpoint (exit 143, the run back at its last checkpoint). Only a second Ctrl-C means "stop at once"
    (README); SIGTERM twice is one stop: step 2's checkpoint, as for one signal."""
    from fmcli import step as step_mod

    real_step = step_mod.TrainingStep.__call__

    def two_signals(self, batches, batch_index, step):
        if step == 1:
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), sig)
        return real_step(self, batches, batch_index, step)

    monkeypatch.setattr(step_mod.TrainingStep, "__call__", two_signals)
    cfg = cfg_for(shapes16, "train.steps=10", "train.checkpoint_every=0")
    if sig == signal.SIGINT:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "run", log=QuietLog())
        assert not (tmp_path / "run" / "checkpoints").exists()
        return
    result = train(cfg, tmp_path / "run", log=QuietLog())
    assert result.stopped_early and result.step == 2
    assert load_checkpoint(resolve_checkpoint(tmp_path / "run"))["step"] == 2


def test_a_run_that_failed_before_its_first_checkpoint_is_not_sent_to_fm_resume(tmp_path, shapes16):
    """config.json and env.json but no checkpoint: `fm train` must not point at `fm resume` (which finds nothing to
    continue); both commands say the run stopped before its first checkpoint, one line, exit 2."""
    run_dir = tmp_path / "run"
    failed = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", run_dir, "--set", "train.steps=4",
                    env={"FM_TEST_FAIL_RANK": "0", "FM_TEST_FAIL_STEP": "1"})
    assert failed.returncode == 1 and (run_dir / "config.json").is_file() and not (run_dir / "checkpoints").exists()
    again = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", run_dir)
    assert again.returncode == 2 and "no checkpoint" in again.stderr and "fm resume" not in again.stderr, again.stderr
    resumed = fm_in_process("resume", run_dir)
    assert resumed.returncode == 2 and "stopped before its first checkpoint" in resumed.stderr and "--run-dir" in resumed.stderr


@pytest.mark.parametrize("num_classes,coupling", [(0, "ot-exact"), (3, "ot-exact"), (3, "ot-sinkhorn")])
def test_the_step_couples_each_rank_micro_batch_within_the_true_class(num_classes, coupling):
    """TrainingStep._pair as rank 1 of 2 (rows 8..15 of the global batch), condition dropout 0.5: each noise
    row is paired only within this micro-batch and, for a class-conditional model, within the data's own class,
    also where dropout shows the network the null class (so every class's and the null class's noise stays
    N(0, I), and the null class's (noise, data) law is the mixture of the classes' laws that guidance assumes).
    Reference: scipy's linear_sum_assignment per class (one group when unconditional), computed here."""
    from scipy.optimize import linear_sum_assignment

    from fmcli.distributed import DistContext
    from fmcli.step import TrainingStep

    cfg = load_config("debug", ["data.source='shapes'", "model.image_size=8", "model.in_channels=1", f"model.num_classes={num_classes}",
                                f"flow.coupling='{coupling}'", "flow.cond_dropout=0.5"])
    step = TrainingStep(cfg, DistContext(), micro=8, accum=1, shape=(1, 8, 8))
    rows, draws = slice(8, 16), step._draws(3)
    assert 0 < int(draws["drop"][rows].sum()) < 8  # the micro-batch mixes dropped and kept labels
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    x = torch.randn(8, 1, 8, 8, generator=g) * 0.3 + (y.float() - 1).view(-1, 1, 1, 1) * 3
    x0, x1, _ = step._pair({"x": x, "y": y}, draws, rows, [])
    noise = draws["noise"][rows]
    perm = [next(j for j in range(8) if torch.equal(x0[i], noise[j])) for i in range(8)]
    assert sorted(perm) == list(range(8))  # a permutation of this rank's own noise: each row used once
    groups = [np.arange(8)] if num_classes == 0 else [np.flatnonzero(y.numpy() == c) for c in range(3)]
    if coupling == "ot-sinkhorn":
        assert all(y[perm[i]] == y[i] for i in range(8)) or num_classes == 0
        return
    a, b = x1.flatten(1).double().numpy(), noise.flatten(1).double().numpy()
    expected = np.empty(8, dtype=int)
    for idx in groups:
        r, c = linear_sum_assignment(((a[idx, None, :] - b[None, idx, :]) ** 2).sum(-1))
        expected[idx[r]] = idx[c]
    assert perm == expected.tolist()
    if num_classes:  # the test can tell: a plan over the whole micro-batch would mix the classes
        r, c = linear_sum_assignment(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
        assert c.tolist() != perm
@pytest.mark.parametrize("floor", [0.1, 0.0])
def test_extending_a_finished_run_says_it_trains_at_the_lr_floor(tmp_path, shapes16, floor):
    """A finished run extended with train.steps keeps the LR continuous: every added step trains at the cosine's end,
    min_lr_factor x lr (1e-3 x 0.1 = 1e-4 by hand; at a floor of 0 no weight changes). fm says so on the resume."""
    from fmcli.config import validate_config

    run = tmp_path / "run"
    over = [f"data.path='{shapes16}'", "train.steps=6", "train.log_every=1", "optim.lr=1e-3", f"optim.min_lr_factor={floor}"]
    train(load_config("debug", over), run, log=QuietLog())
    ckpt = run / "checkpoints" / "step-0000006.pt"
    messages = []

    class Log(QuietLog):
        def info(self, message):
            messages.append(message)

    train(validate_config(load_checkpoint(ckpt)["config"]).with_section("train", steps=9), run, resume_from=ckpt, log=Log())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records[6:]] == pytest.approx([1e-3 * floor] * 3, abs=1e-12)
    said = [m for m in messages if "LR schedule ended at step 6" in m]
    assert len(said) == 1 and "steps 7..9" in said[0], messages
    if floor == 0:
        before, after = torch.load(ckpt, weights_only=True)["model"], torch.load(run / "checkpoints" / "step-0000009.pt", weights_only=True)["model"]
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert said[0].startswith("warning:") and "train.init_from" in said[0]


@pytest.mark.parametrize("stop", ["at_step", "during_grid"])
def test_img_per_s_counts_training_time_only_not_grids_checkpoints_or_evaluation(tmp_path, shapes16, monkeypatch, stop):
    """On a fake clock each optimizer step takes 1 s and each grid, checkpoint and evaluation 100 s: every
    metrics.jsonl record's img_per_s is (its steps x global batch) / (its steps x 1 s) = the global batch, by hand.
    The periodic work used to be counted in the window it fell in (steps 1-4: 4 x B / 204 s), so throughput
    dropped after every grid, save or FID. Also the record a stop writes (at a step, and mid-grid)."""
    import types

    import fmcli.step as step_mod
    from fmcli import train as train_mod

    clock = {"now": 1000.0}
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"], time=time.time))
    real_call = step_mod.TrainingStep.__call__

    def step_takes_one_second(self, *args, **kwargs):
        clock["now"] += 1.0
        return real_call(self, *args, **kwargs)

    def takes_100_seconds(real):
        def work(self):
            clock["now"] += 100.0
            if real is None and stop == "during_grid" and self.step == 6:
                self.stop_requested = True  # what SIGTERM sets, mid-grid
            return real(self) if real is not None else None
        return work

    monkeypatch.setattr(step_mod.TrainingStep, "__call__", step_takes_one_second)
    monkeypatch.setattr(train_mod.Trainer, "_save_checkpoint", takes_100_seconds(train_mod.Trainer._save_checkpoint))
    monkeypatch.setattr(train_mod.Trainer, "_save_samples", takes_100_seconds(None))
    monkeypatch.setattr(train_mod.Trainer, "_evaluate", takes_100_seconds(None))
    cfg = cfg_for(shapes16, "train.steps=8", "train.log_every=4", "train.sample_every=2", "train.checkpoint_every=3", "eval.every=4")
    result = train(cfg, tmp_path / "run", stop_at_step=6 if stop == "at_step" else None, log=QuietLog())
    assert result.stopped_early and result.step == 6
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "img_per_s" in r]
    assert [r["step"] for r in records] == [4, 6]  # steps 1-4 (grid 2, checkpoint 3), steps 5-6 (grid and eval 4 before them)
    B = cfg.train.global_batch_size
    assert [r["img_per_s"] for r in records] == [pytest.approx(4 * B / 4.0), pytest.approx(2 * B / 2.0)]


@pytest.mark.parametrize("every, evaluated, note", [(5, [5], "the last evaluation is at step 5"), (10, [], "no evaluation falls in steps 1-8"), (4, [4, 8], None)])
def test_a_run_whose_eval_every_does_not_divide_its_steps_says_so_once_at_the_start(tmp_path, shapes16, every, evaluated, note):
    """eval.every evaluates at its multiples (the docs promise no final evaluation; the final checkpoint and grid
    are): train.steps=8 is evaluated at the multiples of k up to 8 by hand, and where k does not divide 8 one line
    at the start says which step is the last evaluated (it used to say nothing)."""
    messages = []

    class Log(QuietLog):
        def info(self, message):
            messages.append(message)

    cfg = cfg_for(shapes16, "train.steps=8", "train.log_every=4", f"eval.every={every}", "eval.features=tiny", f"eval.ref='{shapes16}'",
                  "eval.num_samples=8", "sample.grid_size=2", "sample.steps=2")
    train(cfg, tmp_path / "run", log=Log())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "fid" in r] == evaluated
    notes = [m for m in messages if "none at the final step" in m]
    if note is None:
        assert notes == []
    else:
        assert len(notes) == 1 and note in notes[0] and f"fm fid --ckpt {tmp_path / 'run'}" in notes[0], notes
        assert messages.index(notes[0]) < min(i for i, m in enumerate(messages) if m.startswith("step "))  # before the first step's log


class _LinesLog(QuietLog):
    def __init__(self):
        self.lines = []

    def info(self, message):
        self.lines.append(message)


class _ClosingTracker:
    """A train.tracker whose close does `on_close(failed)` (W&B's finish: an upload error, a Ctrl-C while it uploads)."""

    def __init__(self, on_close):
        self.on_close = on_close

    def log(self, metrics, step):
        pass

    def log_image(self, path, step):
        pass

    def close(self, failed=False):
        self.on_close(failed)


def test_ctrl_c_while_the_tracker_closes_says_so_and_a_second_stops_at_once_with_the_handlers_restored(tmp_path, shapes16, monkeypatch):
    """The loop is over (checkpoint and grid of the last step written): a Ctrl-C said "finishing this step, then saving
    a checkpoint" (false), and a second one, interrupting close, skipped the restore of the caller's signal handlers."""
    import fmcli.train as train_mod

    def two_ctrl_c(failed):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_mod, "make_tracker", lambda *a, **k: _ClosingTracker(two_ctrl_c))
    mine = lambda signum, frame: None  # noqa: E731
    previous = signal.signal(signal.SIGINT, mine)
    log = _LinesLog()
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg_for(shapes16, "train.steps=2"), tmp_path / "run", log=log)
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, previous)
    said = [line for line in log.lines if line.startswith("SIGINT")]
    assert len(said) == 1 and "closing train.tracker" in said[0] and "saving a checkpoint" not in said[0], log.lines
    assert load_checkpoint(resolve_checkpoint(tmp_path / "run"))["step"] == 2


@pytest.mark.parametrize("fails", [False, True], ids=["finished", "training-error"])
def test_a_tracker_close_error_is_one_warning_not_the_runs_error(tmp_path, shapes16, monkeypatch, fails):
    """A W&B upload error in close replaced the training error on its way out (the real cause lost) and failed a run
    whose checkpoints were all written; now it is one warning line, the training error is raised, a finished run returns."""
    import fmcli.train as train_mod
    from fmcli.errors import RuntimeFailure

    def upload_error(failed):
        raise ConnectionError("upload failed")

    monkeypatch.setattr(train_mod, "make_tracker", lambda *a, **k: _ClosingTracker(upload_error))
    if fails:
        monkeypatch.setenv("FM_TEST_FAIL_RANK", "0")
        monkeypatch.setenv("FM_TEST_FAIL_STEP", "1")
    log = _LinesLog()
    cfg = cfg_for(shapes16, "train.steps=2")
    if fails:
        with pytest.raises(RuntimeFailure, match="injected failure"):
            train(cfg, tmp_path / "run", log=log)
    else:
        assert train(cfg, tmp_path / "run", log=log).step == 2
        assert load_checkpoint(resolve_checkpoint(tmp_path / "run"))["step"] == 2
    warned = [line for line in log.lines if "failed to close" in line]
    assert len(warned) == 1 and "ConnectionError: upload failed" in warned[0], log.lines


def test_a_stop_before_a_resumed_runs_first_step_trains_nothing_and_saves_nothing(tmp_path, shapes16, monkeypatch):
    """A signal between the handlers' install and the first step of a resume with no grid or evaluation to catch up
    trained one step and saved it; the checkpoint resumed from is the run's state (`_state_on_disk`), as the docs say."""
    import fmcli.train as train_mod
    from fmcli import step as step_mod

    run_dir = tmp_path / "run"
    cfg = cfg_for(shapes16, "train.steps=4", "train.checkpoint_every=0", "train.sample_every=0")
    first = train(cfg, run_dir, stop_at_step=1, log=QuietLog())
    real_catch_up = train_mod.Trainer._catch_up

    def signal_first(self, result):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_catch_up(self, result)

    steps = []
    real_step = step_mod.TrainingStep.__call__

    def counted(self, batches, batch_index, step):
        steps.append(step)
        return real_step(self, batches, batch_index, step)

    monkeypatch.setattr(train_mod.Trainer, "_catch_up", signal_first)
    monkeypatch.setattr(step_mod.TrainingStep, "__call__", counted)
    result = train(cfg, run_dir, resume_from=first.checkpoint, log=QuietLog())
    assert steps == [] and result.stopped_early and result.step == 1 and result.checkpoint == first.checkpoint
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt")) == [first.checkpoint.name]


def test_a_signal_while_the_last_steps_grid_is_made_says_what_happens_and_the_run_ends_normally(tmp_path, shapes16, monkeypatch):
    """After the last step its checkpoint is saved whatever comes: "finishing this step, then saving a checkpoint" was false."""
    import fmcli.train as train_mod

    real_samples = train_mod.Trainer._save_samples

    def signal_then_grid(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_samples(self)

    monkeypatch.setattr(train_mod.Trainer, "_save_samples", signal_then_grid)
    log = _LinesLog()
    result = train(cfg_for(shapes16, "train.steps=2", "train.sample_every=0"), tmp_path / "run", log=log)
    assert result.step == 2 and not result.stopped_early and (tmp_path / "run" / "samples" / "step-0000002.png").is_file()
    said = [line for line in log.lines if line.startswith("SIGTERM")]
    assert len(said) == 1 and "training is done" in said[0] and "saving a checkpoint" not in said[0], log.lines
