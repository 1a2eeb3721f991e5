"""Distributed training on CPU (gloo): `fm train --nproc 2` equals one process, resumes exactly, fails fast."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import fm_env, fm_in_process, run_fm


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_process(one_thread):
    """Every process of this module on one torch thread: the launches' ranks (OMP_NUM_THREADS, which fm_env keeps)
    as fm itself chooses for 2 ranks on 2 cores, and the in-process runs they are compared with (conftest.one_thread).
    fm_env's default of 2 put 4 spinning threads on 2 cores under --nproc 2; the checks are the same."""
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if saved is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = saved


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [r["loss"] for r in records(run_dir) if "loss" in r]


def train_args(data, run_dir, steps, *extra):
    # A test's own --set of a default here replaces it (fm refuses a key given twice).
    given = {extra[i + 1].split("=", 1)[0] for i, a in enumerate(extra[:-1]) if a == "--set"}
    defaults = [item for item in (f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=0") if item.split("=", 1)[0] not in given]
    return ["train", "--preset", "debug", "--data", data, "--run-dir", run_dir, *[a for item in defaults for a in ("--set", item)], *extra]


def test_two_processes_match_one_and_resume_exactly(tmp_path, shapes16):
    # FID during training too: generation sharded over the ranks, the same number as one process.
    evals = ["--set", "eval.every=6", "--set", "eval.num_samples=10", "--set", f"eval.ref='{shapes16}'", "--set", "eval.features='tiny'"]
    one = fm_in_process(*train_args(shapes16, tmp_path / "one", 6, *evals))
    assert one.returncode == 0, one.stderr
    two = run_fm(*train_args(shapes16, tmp_path / "two", 6, "--nproc", "2", *evals))
    assert two.returncode == 0, two.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # one run directory per run
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    fid_one, fid_two = ([r["fid"] for r in records(tmp_path / d) if "fid" in r] for d in ("one", "two"))
    assert len(fid_one) == len(fid_two) == 1
    assert fid_two[0] == pytest.approx(fid_one[0], rel=1e-3)

    # Stop the 2-process run halfway, resume it with 2 processes: the losses equal the uninterrupted run.
    half = run_fm(*train_args(shapes16, tmp_path / "split", 6, "--nproc", "2", "--stop-at-step", "3"))
    assert half.returncode == 0, half.stderr
    resumed = run_fm("resume", tmp_path / "split", "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(tmp_path / "split") == losses(tmp_path / "two")


def test_a_resume_at_another_process_count_continues_the_same_training(tmp_path):
    """A run stopped under --nproc 2 (micro 4: 2 accumulation steps per rank) and resumed in one process (4
    accumulation steps) keeps the global batch, the data order across epoch ends (40 images, batch 16: an epoch
    every 2 steps, 8 dropped) and the schedule: its losses are those of the uninterrupted one-process run, to float
    tolerance (sums in another order: not bit for bit). A process count the batch sizes do not fit is refused
    naming the counts that do (micro_batch_size cannot be --set on resume; it used to say to choose sizes)."""
    from fmcli.data.shapes import prepare_shapes

    data = prepare_shapes(tmp_path / "s40", size=16, count=40, seed=0)
    micro = ("--set", "train.micro_batch_size=4", "--set", "train.ema_decay=0.9", "--set", "train.ema_warmup=false")  # an EMA away from the model
    one = fm_in_process(*train_args(data, tmp_path / "one", 6, *micro, "--set", "train.checkpoint_every=3"))
    assert one.returncode == 0, one.stderr
    half = run_fm(*train_args(data, tmp_path / "split", 6, "--nproc", "2", "--stop-at-step", "3", *micro))
    assert half.returncode == 0, half.stderr
    three = run_fm("resume", tmp_path / "split", "--nproc", "3")  # micro 4 x 3 processes does not divide 16
    assert three.returncode == 2 and "resume with a number of processes (--nproc/--gpus) that divides 4" in three.stderr, three.stderr
    resumed = fm_in_process("resume", tmp_path / "split")
    assert resumed.returncode == 0, resumed.stderr
    split, straight = records(tmp_path / "split"), records(tmp_path / "one")
    assert [(r["step"], r["epoch"]) for r in split] == [(r["step"], r["epoch"]) for r in straight] == [(k, k // 2) for k in range(1, 7)]
    np.testing.assert_allclose([r["loss"] for r in split], [r["loss"] for r in straight], rtol=1e-5)
    np.testing.assert_allclose([r["lr"] for r in split], [r["lr"] for r in straight], rtol=1e-12)
    # The weights, the EMA (one update per optimizer step, not per micro-batch: 2 or 4 of them would differ here) and
    # Adam's moments, at the 2-process stop and at the end.
    from fmcli.checkpoint import load_checkpoint

    for step in ("step-0000003.pt", "step-0000006.pt"):
        a, b = (load_checkpoint(tmp_path / d / "checkpoints" / step) for d in ("one", "split"))
        for key in ("model", "ema"):
            for name in a[key]:
                torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-5, atol=1e-6)
        for sa, sb in zip(a["optimizer"]["optimizers"][0]["state"].values(), b["optimizer"]["optimizers"][0]["state"].values(), strict=True):
            torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=1e-5, atol=1e-6)


def test_env_json_describes_the_launch_that_trains_and_keeps_the_earlier_ones(tmp_path, shapes16):
    """env.json is this launch's machine and software: a run started in one process and resumed as two says
    world_size 2 (it used to keep the first launch's 1), with the first launch's record kept under `launches`."""
    first = fm_in_process(*train_args(shapes16, tmp_path / "run", 2))
    assert first.returncode == 0, first.stderr
    before = json.loads((tmp_path / "run" / "env.json").read_text())
    resumed = run_fm("resume", tmp_path / "run", "--nproc", "2", "--set", "train.steps=3")
    assert resumed.returncode == 0, resumed.stderr
    env = json.loads((tmp_path / "run" / "env.json").read_text())
    assert (env["world_size"], env["resumed_at_step"], before["world_size"]) == (2, 2, 1)
    assert env["launches"] == [before]


def test_a_resume_that_would_change_the_ot_coupling_batch_is_refused(tmp_path, shapes16):
    """Minibatch OT couples each rank's micro-batch: 8 images per process under --nproc 2 with micro_batch_size
    unset (16 / 2). Resumed in one process it would be 16, another coupling, and the run went on silently with
    other losses than its uninterrupted 2-process run. Refused (exit 2) before anything is written, naming --nproc 2."""
    ot = ("--set", "flow.coupling=ot-exact")
    half = run_fm(*train_args(shapes16, tmp_path / "run", 4, "--nproc", "2", "--stop-at-step", "2", *ot))
    assert half.returncode == 0, half.stderr
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    out = fm_in_process("resume", tmp_path / "run")
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "micro-batches of 8 images" in errors[0] and "would be 16" in errors[0] and "--nproc 2" in errors[0], out.stderr
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before


def test_sigterm_to_the_launcher_saves_the_ranks_checkpoint_and_exits_0(tmp_path, shapes16):
    # As one process does: the signal is forwarded, the ranks save a stop checkpoint, and that is success.
    from fmcli.checkpoint import load_checkpoint, resolve_checkpoint

    run_dir = tmp_path / "run"
    args = train_args(shapes16, run_dir, 100000, "--nproc", "2")
    proc = subprocess.Popen([sys.executable, "-m", "fmcli.cli", *map(str, args)], env=fm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir.joinpath("metrics.jsonl").exists() and len(records(run_dir)) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "fm resume" in err and "error" not in err
    assert 3 <= load_checkpoint(resolve_checkpoint(run_dir))["step"] < 100000


@pytest.mark.parametrize("to_group", [True, False], ids=["terminal-ctrl-c", "launcher-only"])
def test_ctrl_c_on_a_two_process_command_is_one_line_and_exit_130(tmp_path, debug_run, to_group):
    # A terminal's Ctrl-C reaches the launcher and both ranks: each rank printed "error: interrupted", the launcher
    # "error: stopped by SIGINT" and then "error: interrupted" again (four lines). The launcher reports it once.
    import os

    out = tmp_path / "samples"
    args = ["sample", "--ckpt", debug_run, "-n", "100000", "--steps", "50", "--batch-size", "4", "--out", out, "--nproc", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "fmcli.cli", *map(str, args)], env=fm_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out.is_dir() and any(out.glob("*.png"))):
        time.sleep(0.2)
    assert any(out.glob("*.png")), "the ranks never started sampling"
    os.killpg(proc.pid, signal.SIGINT) if to_group else proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 130 and errors == ["error: stopped by SIGINT"], err
    assert "Traceback" not in err and "death signal" not in err


def test_a_failing_rank_stops_the_run_quickly_with_one_error(tmp_path, shapes16):
    start = time.time()
    out = run_fm(*train_args(shapes16, tmp_path / "run", 50, "--nproc", "2"), env={"FM_TEST_FAIL_RANK": "1", "FM_TEST_FAIL_STEP": "2"}, timeout=120)
    elapsed = time.time() - start
    assert out.returncode == 1  # a runtime error, as in one process
    assert elapsed < 60
    assert out.stderr.count("injected failure on rank 1") == 1
    assert "Traceback" not in out.stderr


def test_gpus_beyond_the_machine_is_a_usage_error(tmp_path, shapes16):
    out = fm_in_process(*train_args(shapes16, tmp_path / "run", 2, "--gpus", "64"))
    assert out.returncode == 2
    assert "64" in out.stderr and "GPU" in out.stderr


def test_nproc_beyond_the_cuda_gpus_is_a_usage_error(tmp_path, shapes16, debug_run, monkeypatch):
    """--nproc N runs where the device resolves, CUDA on a GPU machine (train.device / --device auto): one GPU per rank.
    On a 1-GPU machine `--nproc 2` put both ranks on cuda:0, which NCCL refuses on every rank alike ("Duplicate GPU
    detected"), so no rank printed a cause: the launch said only that a message was above. Refused in the launcher
    now (exit 2, nothing written), with the way to CPU processes; train.device=cpu still launches."""
    import torch

    from fmcli import distributed as D

    launched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(D, "relaunch", lambda nproc, argv, **kw: launched.append(nproc) or 0)
    out = fm_in_process(*train_args(shapes16, tmp_path / "run", 2, "--nproc", "2"))
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "1 CUDA GPU" in errors[0] and "--set train.device=cpu" in errors[0], out.stderr
    assert not (tmp_path / "run").exists() and launched == []
    sampled = fm_in_process("sample", "--ckpt", debug_run, "-n", "2", "--out", tmp_path / "samples", "--nproc", "2")
    assert sampled.returncode == 2 and "--device cpu" in sampled.stderr and launched == [], sampled.stderr
    assert fm_in_process(*train_args(shapes16, tmp_path / "cpu", 2, "--nproc", "2", "--set", "train.device=cpu")).returncode == 0
    assert launched == [2]


# -n 2 over 3 ranks: rank 2's share is empty; it must still join every gather (labels included) and add nothing.
# Two samples make an ill-conditioned FD: batch 2 vs batches of 1 move it in the 8th digit.
@pytest.mark.parametrize(("n", "nproc", "rel"), [(10, 2, 1e-9), (2, 3, 1e-6)], ids=["two-processes", "fewer-samples-than-processes"])
def test_fid_generation_sharded_over_processes_equals_one(tmp_path, debug_run, shapes16, n, nproc, rel):
    args = ["fid", "--ckpt", debug_run, "--num-samples", str(n), "--ref", shapes16, "--features", "tiny", "--steps", "2", "--json"]
    one = fm_in_process(*args, "--save-stats", tmp_path / "one" / "ref.npz")
    many = run_fm(*args, "--nproc", str(nproc), "--save-stats", tmp_path / "many" / "ref.npz")
    assert one.returncode == 0 and many.returncode == 0, (one.stderr, many.stderr)
    a, b = json.loads(one.stdout), json.loads(many.stdout)
    assert a["fid"] == pytest.approx(b["fid"], rel=rel) and a["num_samples"] == b["num_samples"] == n
    # The reference, read in shares by the ranks (fm fid --nproc), is the one process's to round-off; rank 0 alone wrote it.
    ref_one, ref_many = np.load(tmp_path / "one" / "ref.npz"), np.load(tmp_path / "many" / "ref.npz")
    assert f"(shared over {nproc} ranks)" in many.stderr, many.stderr  # each rank read its share, not every image
    assert int(ref_one["count"]) == int(ref_many["count"]) and os.listdir(tmp_path / "many") == ["ref.npz"]
    np.testing.assert_allclose(ref_many["mu"], ref_one["mu"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref_many["sigma"], ref_one["sigma"], rtol=1e-10, atol=1e-12)
    assert a["nfe"] == b["nfe"] == 2 and a["nfe_max"] == b["nfe_max"] == 2
    assert "terminate called" not in many.stderr


def test_sample_sharded_over_two_processes_equals_one(tmp_path, debug_run):
    one = fm_in_process("sample", "--ckpt", debug_run, "-n", "5", "--seed", "3", "--out", tmp_path / "one", "--json")
    two = run_fm("sample", "--ckpt", debug_run, "-n", "5", "--seed", "3", "--out", tmp_path / "two", "--json", "--nproc", "2")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    assert len(json.loads(two.stdout)["paths"]) == 5
    for name in ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "grid.png", "fm-sample.json"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert "terminate called" not in two.stderr


def test_relaunched_ranks_count_the_budget_from_the_command_start(tmp_path, monkeypatch):
    """The launcher hands its start time to the ranks it relaunches (FM_STARTED_AT): a rank's budget must count
    data preparation and the launch itself, not begin again when the rank starts."""
    import fmcli.train
    from fmcli.config import config_to_dict, load_config
    from fmcli.launch import STARTED_AT_ENV, train_resolved

    seen = {}

    class Result:
        checkpoint = None

    def fake_train(cfg, run_dir, **kwargs):
        seen.update(kwargs)
        return Result()

    monkeypatch.setattr(fmcli.train, "train", fake_train)
    config_file = tmp_path / "launch-config.json"
    config_file.write_text(json.dumps(config_to_dict(load_config("debug"))))
    monkeypatch.setenv(STARTED_AT_ENV, "1234.5")
    train_resolved(config_file, tmp_path / "run", None, None)
    assert seen["started_at"] == 1234.5
    monkeypatch.delenv(STARTED_AT_ENV)
    train_resolved(config_file, tmp_path / "run", None, None)
    assert seen["started_at"] is None  # a rank started by hand: its own start


def test_every_rank_trains_with_rank_0s_hardware_decisions(tmp_path, shapes16):
    """Precision, compile, Muon's dtype and the autotuned micro batch are decided once (the launcher, rank 0) for
    every rank. Here rank 1 alone sees another machine (a sitecustomize on the ranks' path): its probe says bf16
    is fast and it has a C++ compiler, where the launcher and rank 0 have neither. Rank 1 resolved compile again
    to look up the autotune cache, found no entry for compile on, and stopped the run (exit 2). Now it follows
    rank 0: the run trains in fp32, eager, Muon in fp32, and its losses are those of one fp32 process."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    os.environ['FM_PROBE_FORCE'] = 'bf16-fast'\n"
        "    os.environ.pop('CXX', None)  # set by the launcher, which rank 1 inherits\n"
        "else:\n"
        "    os.environ['CXX'] = '/nonexistent/c++'\n"
    )
    from conftest import REPO

    env = {"FM_PROBE_FORCE": "bf16-slow", "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}
    muon = ["--set", "optim.name=muon", "--set", "train.precision=auto"]
    two = run_fm(*train_args(shapes16, tmp_path / "two", 3, "--nproc", "2", *muon, "--set", "train.compile=auto",
                             "--set", "train.micro_batch_size=auto"), env=env)
    assert two.returncode == 0, two.stderr
    one = run_fm(*train_args(shapes16, tmp_path / "one", 3, *muon), env={"FM_PROBE_FORCE": "bf16-slow"})
    assert one.returncode == 0, one.stderr
    hardware = json.loads((tmp_path / "two" / "env.json").read_text())["hardware"]
    assert (hardware["precision"]["precision"], hardware["compile"]["compile"], hardware["muon_ns_dtype"]) == ("fp32", False, "fp32")
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)


def test_an_error_every_rank_hits_is_printed_once(tmp_path):
    """Under --nproc N every rank printed the same usage error (a batch larger than the dataset: N identical lines).
    The launcher hands its ranks a folder (FM_RANK_ERRORS) in which the first to print a line claims it. Two
    `fm` processes with that folder and the same bad input stand in for two ranks: one line, both exit 2; another
    message is still printed."""
    env = {"FM_RANK_ERRORS": str(tmp_path)}  # console.RANK_ERRORS_ENV
    same = [run_fm("train", "--preset", "nope", env=env) for _ in range(2)]
    assert [p.returncode for p in same] == [2, 2]
    lines = [line for p in same for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "unknown preset 'nope'" in lines[0], lines
    other = run_fm("train", "--preset", "nope2", env=env)
    assert other.returncode == 2 and "unknown preset 'nope2'" in other.stderr


def test_the_launcher_hands_its_ranks_an_error_folder_and_removes_it(monkeypatch):
    import torch.distributed.run as torchrun

    from fmcli import distributed as D

    seen = []
    monkeypatch.setattr(torchrun, "run", lambda parsed: seen.append(os.environ.get("FM_RANK_ERRORS")))
    assert D.relaunch(2, ["sample"]) == 0
    assert seen[0] and not os.path.exists(seen[0]) and "FM_RANK_ERRORS" not in os.environ


def _child_failed(*failures):
    """torchrun's ChildFailedError for (rank, exit code) pairs, in the order torchrun recorded them, all in one second."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    recorded = {}
    for rank, code in failures:
        recorded[rank] = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="<N/A>")
        recorded[rank].timestamp = 1_700_000_000  # whole seconds: ranks that fail together tie
    return ChildFailedError("fmcli.cli", recorded)


@pytest.mark.parametrize("reports, failures, expected", [
    ({1: 2, 0: None}, [(0, 1), (1, 2)], 2),   # rank 1's usage error; rank 0's collective broke (a dead peer), seen first
    ({1: 2}, [(0, -15), (1, 2)], 2),           # rank 0 terminated by torchrun after rank 1's usage error
    ({1: 2, 0: 1}, [(1, 2), (0, 1)], 1),       # a runtime error of rank 0's own outranks rank 1's usage error
    ({0: None}, [(0, 1), (1, -9)], 1),         # rank 1 killed (nothing reported): torchrun's first failure, exit 1
], ids=["usage-on-rank-1-peer-first", "usage-on-rank-1-rank-0-killed", "runtime-and-usage", "no-report"])
def test_a_launch_exits_with_its_ranks_cause_not_torchruns_first_failure(monkeypatch, capsys, reports, failures, expected):
    """fm's contract for one process, for N ranks: 2 when a rank's usage error stopped the run and no rank had a
    runtime error of its own, else 1. The launcher took the code of torchrun's first failure, which (ties of whole
    seconds, in rank order) was often rank 0's exit 1 from a collective broken by rank 1's exit: exit 1 for a usage
    error. The ranks report their cause (console.report_rank_exit, as cli/app.py does) and the launcher follows it."""
    import torch.distributed.run as torchrun

    from fmcli import distributed as D
    from fmcli.console import report_rank_exit

    def ranks_fail(parsed):
        for rank, code in reports.items():
            monkeypatch.setenv("RANK", str(rank))
            report_rank_exit(code)
        monkeypatch.delenv("RANK")
        raise _child_failed(*failures)

    monkeypatch.setattr(torchrun, "run", ranks_fail)
    assert D.relaunch(2, ["sample"]) == expected
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == (0 if 2 in reports.values() or 1 in reports.values() else 1), errors  # a reporting rank printed the line


def test_a_usage_error_on_rank_1_alone_is_exit_2_and_one_line(tmp_path, debug_run):
    """Rank 1 alone runs in another directory (a sitecustomize on the ranks' path), where the relative --ckpt does
    not exist: its usage error is the run's, exit 2, printed once; rank 0, whose collective broke, says nothing."""
    from conftest import REPO

    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    site.mkdir()
    elsewhere.mkdir()
    (site / "sitecustomize.py").write_text(f"import os\nif os.environ.get('RANK') == '1':\n    os.chdir({str(elsewhere)!r})\n")
    (tmp_path / "run").symlink_to(debug_run)
    out = run_fm("sample", "--ckpt", "run", "-n", "2", "--steps", "2", "--out", "samples", "--nproc", "2", cwd=tmp_path,
                 env={"PYTHONPATH": f"{site}{os.pathsep}{REPO}"})
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and errors == ["error: checkpoint not found: run"], out.stderr
    assert "Traceback" not in out.stderr


def test_a_failure_every_rank_shares_is_said_by_the_launcher(tmp_path, debug_run):
    """A collective that fails on every rank alike (NCCL refusing them all, as two ranks on one GPU or a bad network
    setting make it; here a sitecustomize on the ranks' path makes init_process_group raise what NCCL raises) is, on
    each rank, a "peer" failure, so no rank printed it: the launch said only "the failing rank's message is above",
    with nothing above. The launcher now prints what the ranks saw, once, exit 1."""
    from conftest import REPO

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "if 'RANK' in os.environ:\n"
        "    import torch.distributed as dist\n"
        "    def refuse(*args, **kwargs):\n"
        "        raise dist.DistBackendError('NCCL error in: ProcessGroupNCCL.cpp:1727, invalid usage\\n'\n"
        "                                    'Last error:\\nDuplicate GPU detected : rank 1 and rank 0 both on CUDA device 1000')\n"
        "    dist.init_process_group = refuse\n"
    )
    out = run_fm("sample", "--ckpt", debug_run, "-n", "2", "--steps", "2", "--out", tmp_path / "samples", "--nproc", "2",
                 env={"PYTHONPATH": f"{site}{os.pathsep}{REPO}"})
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and len(errors) == 1 and "Duplicate GPU detected" in errors[0] and "above" not in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_the_process_group_waits_fm_dist_timeout_s_for_a_collective(monkeypatch):
    """The group's collective timeout is explicit, the same for gloo and NCCL (NCCL's own default, 10 minutes, aborted
    the waiting ranks while rank 0 alone wrote a large checkpoint or grid): FM_DIST_TIMEOUT_S seconds, default 30 minutes."""
    import datetime

    from fmcli import distributed as D

    seen = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(D.dist, "init_process_group", lambda **kwargs: seen.append(kwargs))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("FM_DIST_TIMEOUT_S", raising=False)
    D.setup("cpu")
    monkeypatch.setenv("FM_DIST_TIMEOUT_S", "7200")
    D.setup("cpu")
    assert [(kw["backend"], kw["timeout"]) for kw in seen] == [("gloo", datetime.timedelta(minutes=30)), ("gloo", datetime.timedelta(hours=2))]


@pytest.mark.parametrize("value", ["0", "1.5", ""])
def test_a_bad_fm_dist_timeout_s_is_one_line_before_anything_is_written(tmp_path, shapes16, value, monkeypatch):
    from fmcli import distributed as D

    monkeypatch.setattr(D, "relaunch", lambda *args, **kwargs: pytest.fail("launched despite a bad FM_DIST_TIMEOUT_S"))
    env = {"FM_DIST_TIMEOUT_S": value}
    out = fm_in_process(*train_args(shapes16, tmp_path / "run", 2, "--nproc", "2"), env=env)
    assert out.returncode == 2 and out.stderr.count("error:") == 1 and "FM_DIST_TIMEOUT_S must be a positive whole number" in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()
    sampled = fm_in_process("sample", "--ckpt", "nowhere", "-n", "2", "--out", tmp_path / "samples", "--nproc", "2", env=env)
    assert sampled.returncode == 2 and "FM_DIST_TIMEOUT_S" in sampled.stderr and not (tmp_path / "samples").exists(), sampled.stderr


def _reference_rank(rank: int, port: int, data, folder, out) -> None:
    """One of two gloo ranks (forked): training's evaluator built as the Trainer builds it, then a folder's statistics
    and `shared_moments` with an empty share; what each rank fed its extractor and computed, saved to `out`."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from conftest import QuietLog
    from fmcli import distributed as D
    from fmcli.config import load_config
    from fmcli.data.dataset import PreparedDataset
    from fmcli.evaluate import TinyExtractor, reference_statistics, shared_moments
    from fmcli.train import make_evaluator

    fed = []
    extract = TinyExtractor.__call__
    TinyExtractor.__call__ = lambda self, images: fed.append(len(images)) or extract(self, images)
    ctx = D.setup("cpu")
    try:
        cfg = load_config("debug", [f"data.path='{data}'", "eval.every=1", "eval.features='tiny'", f"eval.ref='{data}'"])
        evaluator = make_evaluator(cfg, PreparedDataset(data), ctx, QuietLog())
        result = {"fed": sum(fed), "has_ref": evaluator.ref is not None}
        if evaluator.ref is not None:
            result.update(mu=evaluator.ref.mu, sigma=evaluator.ref.sigma, count=evaluator.ref.count, size=evaluator.ref.image_size)
        stats = reference_statistics(folder, TinyExtractor(), batch_size=10, ctx=ctx)
        result.update(folder_mu=stats.mu, folder_sigma=stats.sigma, folder_count=stats.count, folder_size=stats.image_size)
        rows = np.arange(15.0).reshape(5, 3) ** 1.5
        result["moments"] = np.concatenate([a.ravel() for a in shared_moments(rows if rank == 0 else None, ctx)[:2]])
        # eval.features=dinov2's reference (50 + 50 images), the extractor stood in for by the tiny one
        import fmcli.features

        fmcli.features.build_space = lambda *args, **kwargs: TinyExtractor()
        fed.clear()
        fidelity = make_evaluator(cfg.with_section("eval", features="dinov2", ref=None, num_samples=50), PreparedDataset(data), ctx, QuietLog())
        result.update(fidelity_fed=sum(fed), fidelity_has_ref=fidelity.reference is not None)
        if fidelity.reference is not None:
            result.update(fidelity_ref=fidelity.reference.ref["dinov2"], fidelity_floor=fidelity.reference.floor["dinov2"])
    finally:
        D.cleanup()
    np.savez(out / f"rank{rank}.npz", **result)


def test_training_fids_reference_is_shared_over_the_ranks_and_equals_numpys(tmp_path, shapes16):
    """eval.ref's statistics were computed by rank 0 alone while the other ranks waited at their next collective
    (Inception over a large folder: past NCCL's timeout, the run aborted). Every rank now computes the features of
    its half of the images (counted at the extractor), and the mean and covariance rank 0 holds equal numpy's
    mean and np.cov of all the images' features (batched alike, so the features are bit-identical) to round-off:
    a prepared dataset, an image folder, and a share with no rows. eval.features=domain|dinov2's reference features
    likewise: each rank computes half, rank 0 holds them all, equal to the extractor's features image by image."""
    import multiprocessing

    from PIL import Image

    from fmcli.distributed import free_port
    from fmcli.evaluate import TinyExtractor, to_rgb
    from fmcli.train import make_evaluator  # noqa: F401  imported once here, not in each forked rank

    x = np.load(shapes16 / "x.npy")
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(40):
        Image.fromarray(x[i].transpose(1, 2, 0)).save(folder / f"{i:03d}.png")
    port, fork = free_port(), multiprocessing.get_context("fork")
    ranks = [fork.Process(target=_reference_rank, args=(r, port, shapes16, folder, tmp_path)) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(60)
    for p in ranks:
        if p.is_alive():  # a hung rank fails the test, not the session
            p.kill()
    assert [p.exitcode for p in ranks] == [0, 0]
    zero, one = (np.load(tmp_path / f"rank{r}.npz") for r in (0, 1))
    assert (int(zero["fed"]), int(one["fed"])) == (256, 256)  # each rank fed its extractor half of the 512 images
    assert bool(zero["has_ref"]) and not bool(one["has_ref"])

    def direct(images, batch):  # numpy's statistics of features computed in batches as the ranks batch them
        tiny = TinyExtractor()
        feats = np.concatenate([tiny(to_rgb(torch.from_numpy(np.ascontiguousarray(images[i : i + batch])))) for i in range(0, len(images), batch)])
        return feats.mean(axis=0), np.cov(feats, rowvar=False)

    for prefix, images, batch in (("", x, 64), ("folder_", x[:40], 10)):
        mu, sigma = direct(images, batch)
        np.testing.assert_allclose(zero[prefix + "mu"], mu, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(zero[prefix + "sigma"], sigma, rtol=1e-10, atol=1e-13 * np.abs(sigma).max())
        assert (int(zero[prefix + "count"]), int(zero[prefix + "size"])) == (len(images), 16)
    np.testing.assert_allclose(one["folder_sigma"], zero["folder_sigma"], rtol=0, atol=0)  # every rank holds the same
    rows = np.arange(15.0).reshape(5, 3) ** 1.5
    expected = np.concatenate([rows.mean(axis=0), np.cov(rows, rowvar=False).ravel()])
    for rank in (zero, one):
        np.testing.assert_allclose(rank["moments"], expected, rtol=1e-13)
    # The fidelity metrics' reference: each rank half of its 100 images; rank 0 holds the features of the seeded halves.
    from fmcli.fidelity import split_halves

    assert (int(zero["fidelity_fed"]), int(one["fidelity_fed"])) == (50, 50)
    assert bool(zero["fidelity_has_ref"]) and not bool(one["fidelity_has_ref"])
    floor_idx, ref_idx = split_halves(len(x), 0)
    tiny = TinyExtractor()
    for key, idx in (("fidelity_ref", ref_idx), ("fidelity_floor", floor_idx)):
        one_by_one = np.concatenate([tiny(to_rgb(torch.from_numpy(x[i : i + 1]))) for i in np.sort(idx[:50])])
        np.testing.assert_allclose(zero[key], one_by_one, rtol=1e-5, atol=1e-6)
