"""Issue #15 (reliability hardening): one test per numbered item, named after it, plus fsutil.atomic_write.

Each test fails on the code before the fix (a hang, a silent overwrite, a missing check) and passes now.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fmcli.errors import FmError, RuntimeFailure, UsageError


def fm(capsys, *args) -> tuple[int, str, str]:
    """The real CLI in this process: (exit code, stdout, stderr)."""
    from fmcli.cli import app

    with pytest.raises(SystemExit) as exit_info:
        app(args=[str(a) for a in args], prog_name="fm")
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


@pytest.fixture
def alarm():
    """Fail (instead of hanging the suite) when the code under test does not return within `seconds`."""

    def on_alarm(signum, frame):
        raise TimeoutError("did not terminate")

    old = signal.signal(signal.SIGALRM, on_alarm)
    yield lambda seconds: signal.alarm(seconds)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ------------------------------------------------------------------------------------ fsutil (#17.1)


def test_atomic_write_failure_leaves_the_old_file_and_no_temp(tmp_path):
    from fmcli.fsutil import atomic_write

    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def broken(tmp: Path):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_atomic_write_replaces_a_directory_whole(tmp_path):
    from fmcli.fsutil import atomic_write

    target = tmp_path / "enc"
    target.mkdir()
    (target / "stale.txt").write_text("old")

    def write(tmp: Path):
        tmp.mkdir()
        (tmp / "model.txt").write_text("new")

    atomic_write(target, write)
    assert sorted(p.name for p in target.iterdir()) == ["model.txt"] and [p.name for p in tmp_path.iterdir()] == ["enc"]


def _old_dir(target: Path) -> None:
    target.mkdir()
    (target / "a.txt").write_text("old")
    (target / "b.txt").write_text("old")


def _new_dir(tmp: Path) -> None:
    tmp.mkdir()
    (tmp / "a.txt").write_text("new")
    (tmp / "b.txt").write_text("new")


def _whole(target: Path) -> str | None:
    """"old" or "new" where `target` holds that output complete (both files, one version); None otherwise."""
    if not target.is_dir() or sorted(p.name for p in target.iterdir()) != ["a.txt", "b.txt"]:
        return None
    versions = {(target / n).read_text() for n in ("a.txt", "b.txt")}
    return versions.pop() if len(versions) == 1 else None


_MOVES = ("replace", "rename")  # os's renames; fsutil._exchange (the one-step swap) is wrapped beside them


@pytest.mark.parametrize("exchange", [True, False], ids=["swap", "two-renames"])
@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_directory_replace_interrupted_at_any_rename_keeps_old_or_new(tmp_path, monkeypatch, exchange, when, k):
    """Ctrl-C (KeyboardInterrupt) before or after the k-th rename of a --force replacement of a folder: the folder
    holds the old output or the new one, whole, never neither (the old code moved the old folder aside, and an
    interrupt before the new one was moved in left `target` missing, the old output hidden as .target.old-*)."""
    from fmcli import fsutil

    target = tmp_path / "out dir é"
    _old_dir(target)
    if not exchange:
        monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False, raising=False)
    calls = []

    def wrap(real):
        def move(*args):
            calls.append(args)
            if len(calls) == k and when == "before":
                raise KeyboardInterrupt
            result = real(*args)
            if len(calls) == k and when == "after":
                raise KeyboardInterrupt
            return result

        return move

    for name in _MOVES:
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    if hasattr(fsutil, "_exchange"):
        monkeypatch.setattr(fsutil, "_exchange", wrap(fsutil._exchange))
    try:
        fsutil.atomic_write(target, _new_dir)
    except KeyboardInterrupt:
        pass
    monkeypatch.undo()
    assert _whole(target) in ("old", "new"), sorted(p.name for p in tmp_path.iterdir())
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # the new one, when not moved in, is deleted


_KILL_AT_MOVE = """
import os, signal, sys
from pathlib import Path
from fmcli import fsutil
k, when = int(sys.argv[2]), sys.argv[3]
calls = []
def wrap(real):
    def move(*args):
        calls.append(args)
        if len(calls) == k and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = real(*args)
        if len(calls) == k and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return move
for name in ("replace", "rename"):
    setattr(os, name, wrap(getattr(os, name)))
if hasattr(fsutil, "_exchange"):
    fsutil._exchange = wrap(fsutil._exchange)
def write(tmp):
    tmp.mkdir()
    (tmp / "a.txt").write_text("new")
    (tmp / "b.txt").write_text("new")
fsutil.atomic_write(Path(sys.argv[1]), write)
"""


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize("k", [1, 2])
def test_directory_replace_killed_at_any_rename_keeps_old_or_new(tmp_path, when, k):
    """SIGKILL (no clean-up runs) before or after the k-th rename of a folder's replacement: the folder holds the
    old output or the new one, whole (one atomic exchange of the two folders where the filesystem has it)."""
    import subprocess
    import sys

    from fmcli import fsutil

    if getattr(fsutil, "_exchange", None) and not fsutil._renameat2():
        pytest.skip("no renameat2 here: a kill between the two renames of the fallback leaves the old folder aside")
    target = tmp_path / "out"
    _old_dir(target)
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    subprocess.run([sys.executable, "-c", _KILL_AT_MOVE, str(target), str(k), when], env=env, timeout=60)
    assert _whole(target) in ("old", "new"), sorted(p.name for p in tmp_path.iterdir())


def test_directory_commit_fsyncs_every_folder_in_it(tmp_path, monkeypatch):
    """A durable commit of a folder fsyncs every file and every folder in it (a subfolder's entries too: export's
    scheduler/) before the rename; the list to cover is os.walk's, not fsutil's."""
    from fmcli import fsutil

    tmp = tmp_path / ".exp.tmp-1"
    (tmp / "scheduler" / "deep").mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(b"w")
    (tmp / "scheduler" / "scheduler_config.json").write_text("{}")
    (tmp / "scheduler" / "deep" / "x").write_text("x")
    expected = set()
    for folder, _dirs, files in os.walk(tmp):
        expected |= {Path(folder), *(Path(folder) / f for f in files)}
    synced, real_replace = set(), os.replace
    monkeypatch.setattr(fsutil, "fsync_file", lambda p: synced.add(Path(p)))
    monkeypatch.setattr(fsutil, "fsync_dir", lambda p: synced.add(Path(p)))

    def replace(src, dst):
        assert expected <= synced, sorted(map(str, expected - synced))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(fsutil, "_exchange", lambda a, b: False, raising=False)
    fsutil.commit(tmp, tmp_path / "exp")
    assert (tmp_path / "exp" / "scheduler" / "deep" / "x").read_text() == "x"


def _tiny_dataset(out, value: int, force: bool = False) -> None:
    from fmcli.data.dataset import PreparedWriter

    with PreparedWriter(out, None, (1, 2, 2), force=force) as w:
        w.add(np.full((1, 2, 2), value, np.uint8))
        w.finish()


def test_folder_output_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    """`--out LINK --force`, LINK a symbolic link to a folder (data on a big disk): the target is replaced in its own
    folder and the link stays (the old code swapped the link itself for a real folder beside it: the data landed
    beside the link, the link was deleted). A link to nothing, and a loop, are one-line refusals."""
    from fmcli.errors import UsageError

    (tmp_path / "big").mkdir()
    (tmp_path / "proj").mkdir()
    _tiny_dataset(tmp_path / "big" / "data", 1)
    link = tmp_path / "proj" / "data"
    link.symlink_to(tmp_path / "big" / "data")
    _tiny_dataset(link, 7, force=True)
    assert link.is_symlink() and os.readlink(link) == str(tmp_path / "big" / "data")
    assert sorted(os.listdir(tmp_path / "proj")) == ["data"] and sorted(os.listdir(tmp_path / "big")) == ["data"]
    assert np.load(tmp_path / "big" / "data" / "x.npy").ravel().tolist() == [7, 7, 7, 7]
    (tmp_path / "proj" / "dangling").symlink_to(tmp_path / "big" / "nothing")
    (tmp_path / "proj" / "a").symlink_to(tmp_path / "proj" / "b")
    (tmp_path / "proj" / "b").symlink_to(tmp_path / "proj" / "a")
    for bad, says in (("dangling", "which does not exist"), ("a", "cannot be followed")):
        with pytest.raises(UsageError, match=f"symbolic link .*{says}"):
            _tiny_dataset(tmp_path / "proj" / bad, 7, force=True)
    assert sorted(os.listdir(tmp_path / "big")) == ["data"]


def _killed_mid_write(out: Path) -> None:
    """A PreparedWriter of `out` SIGKILLed (no clean-up runs) after 2,000,256 bytes of x.npy, in a forked child."""
    pid = os.fork()
    if pid == 0:
        try:
            from fmcli.data.dataset import PreparedWriter

            with PreparedWriter(out, None, (1, 1000, 1000)) as w:
                w.add_batch(np.zeros((2, 1, 1000, 1000), np.uint8))
                w._streams["x"].file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)


def test_the_next_write_of_an_output_removes_what_a_killed_write_left(tmp_path, capsys):
    """A write of a folder output killed mid-way (SIGKILL, OOM: no clean-up) leaves its hidden temp folder; the next
    write of that output removes it and says so, with its size (the old code left it, possibly GBs, forever)."""
    out = tmp_path / "data"
    _killed_mid_write(out)
    (left,) = [n for n in os.listdir(tmp_path) if n.startswith(".data.tmp-")]
    _tiny_dataset(out, 3)
    assert sorted(os.listdir(tmp_path)) == ["data"]
    err = capsys.readouterr().err
    assert f"removed {tmp_path / left} (2.0 MB)" in err, err


def test_leftover_clean_up_spares_live_writes_and_what_fm_cannot_tell_is_its_own(tmp_path, capsys):
    """Only a temp folder this host's fm marked and whose writer's lock is free is removed: a live write (its lock
    held, here by this process) is left alone; an unmarked one (an older fm's) or another host's is kept and reported
    with the command that removes it; other names are not fm's and are neither touched nor named."""
    from fmcli import fsutil

    out = tmp_path / "data"
    unmarked, other_host = tmp_path / ".data.tmp-0123abcd", tmp_path / ".data.tmp-89abcdef"
    for folder in (unmarked, other_host, tmp_path / ".data.tmp-user", tmp_path / ".datax.tmp-01234567"):
        folder.mkdir()
        (folder / "x.npy").write_bytes(b"0" * 1000)
    (other_host / fsutil.TEMP_MARK).write_text("another-host 1234\n")
    (tmp_path / ".data.tmp-fedcba98").write_text("a file")
    before = sorted(os.listdir(tmp_path))
    capsys.readouterr()
    with fsutil.temp_folder(out) as live:
        warnings = [line for line in capsys.readouterr().err.splitlines() if line]  # temp_folder looks first
        assert len(warnings) == 2 and all("rm -rf" in w for w in warnings), warnings
        assert [w.split()[1] for w in warnings] == [str(unmarked), str(other_host)]
        assert fsutil.clear_stale_temps(out) == []  # the live one (locked here) is spared; the others said once per process
        assert sorted(os.listdir(tmp_path)) == sorted(before + [live.name])
        assert capsys.readouterr().err.strip() == ""
        (live / "x.npy").write_bytes(b"1")
        fsutil.commit(live, out)
    assert os.listdir(out) == ["x.npy"]  # no marker in the output


def test_no_writer_renames_a_temp_file_by_hand():
    """Every writer goes through fsutil: no module but fsutil renames a temp file (os.replace(tmp, ...)),
    so no copy of the write-fsync-rename dance can miss a step."""
    import ast

    root = Path(__file__).resolve().parent.parent / "fmcli"
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "fsutil.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.replace", "os.rename", "shutil.move") and "tmp" in ast.unparse(node.args[0]):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def test_streams_table_keeps_its_values():
    """The named streams are one table; their key prefixes are part of the reproducibility contract."""
    from fmcli.generate import initial_noise
    from fmcli.seeding import STREAMS, normal

    assert len(set(STREAMS.values())) == len(STREAMS)
    assert (STREAMS["sample_noise"], STREAMS["step"], STREAMS["epoch"]) == (1, 2, 3)
    # sample i's noise is the PCG64 stream of SeedSequence([1, seed, i]) (computed here without fm)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([1, 7, 3])))
    expected = rng.standard_normal((2, 4, 4), dtype=np.float32)
    assert np.array_equal(initial_noise(7, [3], (2, 4, 4))[0].numpy(), expected)
    assert torch.equal(normal((2, 4, 4), 1, 7, 3), torch.from_numpy(expected))


# ---------------------------------------------------------------------------------------- the items


def test_item05_sinkhorn_nonfinite_raises(alarm):
    from fmcli.flow import couple

    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(8, 3, 4, 4, generator=g), torch.randn(8, 3, 4, 4, generator=g)
    x1[3, 0, 0, 0] = float("nan")
    alarm(20)
    with pytest.raises(FloatingPointError, match="non-finite"):
        couple(x0, x1, method="ot-sinkhorn")
    with pytest.raises(FloatingPointError, match="non-finite"):
        couple(x0, x1, method="ot-exact")


def test_item05_sinkhorn_rounding_terminates_on_a_nan_plan(alarm, monkeypatch):
    """Even if the plan itself were NaN, the greedy rounding ends with a permutation."""
    import fmcli.flow as flow

    monkeypatch.setattr(flow, "sinkhorn_log_plan", lambda cost, reg, iters: torch.full(cost.shape, float("nan"), dtype=torch.float64))
    alarm(20)
    perm = flow.sinkhorn_assignment(torch.rand(6, 6, dtype=torch.float64), 0.05, 10)
    assert sorted(perm.tolist()) == list(range(6))


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - keep])


def test_item08_truncated_dataset_exits_2_before_creating_anything(shapes16, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(shapes16, bad)
    _truncate(bad / "x.npy", 1000)
    code, out, err = fm(capsys, "train", "--preset", "debug", "--data", bad, "--run-dir", tmp_path / "run")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "x.npy is truncated" in err and "--force" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_item08_validate_prepared_checks_the_manifest_against_the_files(shapes16, tmp_path):
    from fmcli.data.dataset import validate_prepared

    assert validate_prepared(shapes16)["count"] == 512
    cases = {
        "count": lambda d: _edit_manifest(d, count=513),
        "shape": lambda d: _edit_manifest(d, shape=[3, 8, 8]),
        "dtype": lambda d: np.save(d / "x.npy", np.zeros((512, 3, 16, 16), np.float32)),
        "captions": lambda d: (d / "captions.jsonl").write_text("\n".join((d / "captions.jsonl").read_text().splitlines()[:-1]) + "\n"),
        "y.npy": lambda d: (d / "y.npy").unlink(),
    }
    expected = {"count": "shape", "shape": "shape", "dtype": "float32", "captions": "511 captions", "y.npy": "y.npy is missing"}
    for name, damage in cases.items():
        d = tmp_path / name
        shutil.copytree(shapes16, d)
        damage(d)
        with pytest.raises(UsageError, match=expected[name]):
            validate_prepared(d)


def _edit_manifest(d: Path, **fields) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    manifest.update(fields)
    (d / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def run_with_ckpt(tmp_path_factory, shapes16):
    """A 2-step debug run (class-conditional, 10 classes) with its checkpoint."""
    from conftest import QuietLog

    from fmcli.config import load_config
    from fmcli.train import train

    run_dir = tmp_path_factory.mktemp("rel") / "run"
    train(load_config("debug", [f"data.path='{shapes16}'", "train.steps=2", "train.log_every=1"]), run_dir, log=QuietLog())
    return run_dir


def test_item09_writers_refuse_existing_outputs_without_force(run_with_ckpt, shapes16, tmp_path, capsys):
    png, gif = tmp_path / "mine.png", tmp_path / "mine.gif"
    png.write_bytes(b"my picture")
    gif.write_bytes(b"my animation")
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "000001.png").write_bytes(b"my sample")
    common = ("--steps", "1", "--device", "cpu")
    refused = [
        ("sample", "--ckpt", run_with_ckpt, "-n", "2", "--out", png, *common),
        ("sample", "--ckpt", run_with_ckpt, "-n", "2", "--out", tmp_path / "new.png", "--gif", gif, *common),
        ("sample", "--ckpt", run_with_ckpt, "-n", "2", "--out", samples, *common),
        ("fid", "--ckpt", run_with_ckpt, "-n", "2", "--ref", shapes16, "--features", "tiny", "--out", samples, *common),
        ("plot", run_with_ckpt, "--out", png),
        ("class-grid", "--ckpt", run_with_ckpt, "--samples-per-class", "1", "--out", png, *common),
        ("prepare-data", "shapes", "--out", shapes16, "--count", "4"),
    ]
    for args in refused:
        code, out, err = fm(capsys, *args)
        assert (code, out) == (2, ""), (args, err)
        assert "already exists" in err and "--force" in err and err.count("\n") == 1, (args, err)
    assert png.read_bytes() == b"my picture" and gif.read_bytes() == b"my animation" and (samples / "000001.png").read_bytes() == b"my sample"
    assert not (tmp_path / "new.png").exists() and sorted(p.name for p in samples.iterdir()) == ["000001.png"]
    code, out, err = fm(capsys, "sample", "--ckpt", run_with_ckpt, "-n", "2", "--out", png, "--force", *common)
    assert code == 0, err
    assert Image.open(png).size[0] > 16  # replaced by the grid


def _png_bytes(size: int, seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_item10_tar_members_above_the_limit_are_skipped_unread(tmp_path):
    from fmcli.data.prepare import prepare

    shard = tmp_path / "shard-0.tar"
    with tarfile.open(shard, "w") as tar:
        for key, size in (("small", 8), ("huge", 256), ("small2", 8)):
            for ext, data in (("png", _png_bytes(size, len(key))), ("txt", f"a {key} image".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    limit_mib = 20_000 / 2**20  # the 256x256 noise PNG is ~197 kB; the 8x8 ones are under 1 kB
    summary = prepare("tar", tmp_path / "out", root=str(shard), size=8, max_member_mib=limit_mib)
    assert summary.count == 2 and summary.skipped == 1
    assert "huge" in summary.skipped_examples[0] and "above the --max-member-mib limit" in summary.skipped_examples[0]


def _evil_module(tmp_path: Path) -> Path:
    """A module whose import leaves a marker file: proof that fm imported code named by a config."""
    marker = tmp_path / "imported.marker"
    (tmp_path / "evilfeatures.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "def make(device):\n    raise SystemExit('called')\n"
    )
    return marker


def test_item11_checkpoint_config_never_names_code_to_import(run_with_ckpt, shapes16, tmp_path, capsys, monkeypatch):
    from fmcli.checkpoint import load_checkpoint, resolve_checkpoint

    marker = _evil_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "downloaded"
    shutil.copytree(run_with_ckpt, run)
    ckpt = resolve_checkpoint(run)
    state = load_checkpoint(ckpt)
    state["config"]["eval"].update(features="evilfeatures:make", every=1, ref=str(shapes16), num_samples=2)
    torch.save(state, ckpt)
    code, out, err = fm(capsys, "resume", run, "--set", "train.steps=3")
    assert (code, out) == (2, "") and "eval.features='evilfeatures:make'" in err and "--set eval.features=" in err, err
    assert not marker.exists()
    # fm fid --ckpt takes its features from the command line only
    code, out, err = fm(capsys, "fid", "--ckpt", run, "-n", "2", "--ref", shapes16, "--features", "tiny", "--steps", "1", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["features"] == "tiny-randconv-v1" and not marker.exists()


def test_item11_the_user_may_repeat_the_trust_decision(run_with_ckpt):
    from fmcli.config import load_config, refuse_checkpoint_trust

    stored = load_config("debug", ["eval.features=evilfeatures:make"])
    with pytest.raises(UsageError, match="never does so"):
        refuse_checkpoint_trust(stored, ["train.steps=9"], "ckpt")
    refuse_checkpoint_trust(stored, ["eval.features=evilfeatures:make"], "ckpt")  # the user's own word
    refuse_checkpoint_trust(load_config("debug"), [], "ckpt")  # inception/tiny: nothing to trust


def test_item12_wrong_inception_hash_refuses_without_the_flag(shapes16, tmp_path, capsys):
    from fmcli.evaluate import build_extractor

    fake = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(torch.nn.Identity()).save(str(fake))
    with pytest.raises(UsageError, match="--inception-unverified"):
        build_extractor("inception", inception=str(fake))
    code, out, err = fm(capsys, "fid", "--gen", tmp_path, "--ref", shapes16, "--features", "inception", "--inception", fake)
    assert (code, out) == (2, "") and "refusing to load it" in err and err.count("\n") == 1


def test_item13_demo_clamps_steps_every_and_images():
    from fmcli.demo import MAX_EVERY, MAX_STEPS, bounded_request

    assert bounded_request(10**6, 10**9, 10**6, max_images=16) == (16, MAX_STEPS, MAX_EVERY)
    assert bounded_request(-3, 0, -1, max_images=16) == (1, 1, 1)
    assert bounded_request(4.0, 20, 5, max_images=16) == (4, 20, 5)
    with pytest.raises(UsageError, match="steps must be a number"):
        bounded_request(1, "nan", 1, max_images=4)


def test_item14_pickled_code_is_not_an_fm_checkpoint(tmp_path, capsys):
    from fmcli.checkpoint import load_checkpoint

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pt"
    torch.save({"model": Payload(), "config": {}}, evil)
    with pytest.raises(UsageError) as info:
        load_checkpoint(evil)
    assert str(info.value) == f"{evil} is not an fm checkpoint (refused to unpickle code)"
    code, out, err = fm(capsys, "sample", "--ckpt", evil, "--out", tmp_path / "x.png")
    assert (code, out, err) == (2, "", f"error: {evil} is not an fm checkpoint (refused to unpickle code)\n")
    _truncate(evil, 50)  # damage is still reported as damage
    with pytest.raises(UsageError, match="corrupt or truncated"):
        load_checkpoint(evil)


def test_item15_numpy_rng_state_is_saved_whole(run_with_ckpt):
    from fmcli.checkpoint import load_checkpoint, resolve_checkpoint, restore_rng, training_state
    from fmcli.distributed import DistContext

    np.random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian and a position inside the key
    np.random.randint(0, 10, size=5)
    ctx = DistContext()
    saved = training_state({}, step=0, batches=0, position=(0, 0), ctx=ctx, config={}, data_info={}, hardware={}, micro=16)
    expected = (np.random.standard_normal(3), np.random.random(4))
    np.random.seed(99)
    restore_rng(saved, ctx)
    got = (np.random.standard_normal(3), np.random.random(4))
    assert all(np.array_equal(a, b) for a, b in zip(expected, got))
    rng = load_checkpoint(resolve_checkpoint(run_with_ckpt))["rng"][0]["numpy"]
    assert set(rng) == {"key", "pos", "has_gauss", "cached_gaussian"} and rng["key"].shape == (624,)


def test_item16_labels_outside_num_classes_are_refused(shapes16, tmp_path):
    from fmcli.data.dataset import PreparedDataset

    bad = tmp_path / "labels"
    shutil.copytree(shapes16, bad)
    y = np.load(bad / "y.npy")
    y[7] = int(json.loads((bad / "manifest.json").read_text())["num_classes"])  # one past the last class
    np.save(bad / "y.npy", y)
    with pytest.raises(UsageError, match=r"labels span \[0, 10\] but the manifest says 10 classes"):
        PreparedDataset(bad)
    y[7] = -1
    np.save(bad / "y.npy", y)
    with pytest.raises(UsageError, match=r"labels span \[-1, "):
        PreparedDataset(bad)


def test_item17_flip_on_text_data_warns():
    from fmcli.config import flip_warning, load_config

    text = load_config("debug", ["model.cross_attention=true", "data.flip=true"])
    assert "left/right" in flip_warning(text)
    assert flip_warning(load_config("debug", ["data.flip=true"])) is None  # class data: flipping is harmless
    assert flip_warning(load_config("debug", ["model.cross_attention=true"])) is None


@pytest.fixture
def fsync_log(monkeypatch):
    """Every os.fsync as the path of the file or directory it flushed."""
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return synced


def test_item18_prepared_writer_and_statistics_fsync_their_directory(tmp_path, fsync_log):
    from fmcli.data.dataset import PreparedWriter
    from fmcli.evaluate import statistics_of

    with PreparedWriter(tmp_path / "ds", 2, (3, 4, 4)) as w:
        w.add_batch(np.zeros((2, 3, 4, 4), np.uint8))
        w.finish()
    assert tmp_path in fsync_log  # the rename into place is durable
    assert any(p.name.startswith(".ds.tmp-") for p in fsync_log)  # the directory's own entries, before the rename
    fsync_log.clear()
    stats = statistics_of(np.random.default_rng(0).standard_normal((5, 3)), "tiny", 8)
    stats.save(tmp_path / "stats" / "s.npz")
    assert tmp_path / "stats" in fsync_log and any(p.name.startswith(".s.npz.tmp-") for p in fsync_log)


def test_item19_torch_generator_seed_is_the_32_bits_torch_keeps():
    from fmcli.seeding import torch_generator

    for keys in ((2, 0, 5), (3, 123, 9), (1, 2**63 + 5, 7)):
        g = torch_generator(*keys)
        assert g.initial_seed() < 2**32  # the seed it reports is the seed it uses
        # ... and the numbers are those of the former 64-bit seed (torch ignored the high half)
        words = np.random.SeedSequence([int(k) & 0xFFFFFFFFFFFFFFFF for k in keys]).generate_state(2, np.uint32)
        former = torch.Generator().manual_seed(int(words[0]) | (int(words[1]) << 32))
        assert torch.equal(torch.rand(16, generator=g), torch.rand(16, generator=former))


def test_item20_logit_mean_is_documented_on_t_with_the_sd3_sign():
    from fmcli.flow import sample_times

    doc = sample_times.__doc__
    assert "t = 1 is data" in doc and "SD3" in doc and "-m" in doc
    g = torch.Generator().manual_seed(0)
    t = sample_times(20000, "logit_normal", logit_mean=1.0, generator=g)
    assert abs(float((t > 0.5).float().mean()) - 0.8413) < 0.01  # P(N(1,1) > 0) = Phi(1): mass toward data


def test_item21_latents_must_be_finite_and_fit_float16(tmp_path):
    from fmcli.data.latents import _float16_latents
    from fmcli.data.dataset import PreparedWriter

    ok = np.ones((2, 4, 2, 2), np.float32)
    assert _float16_latents(ok, 0).dtype == np.float16
    with pytest.raises(RuntimeFailure, match="non-finite latents for image 11"):
        _float16_latents(np.stack([ok[0], ok[1] * np.nan]), 10)
    with pytest.raises(RuntimeFailure, match="beyond float16"):
        _float16_latents(ok * 1e5, 0)
    with pytest.raises(RuntimeFailure, match="non-finite"):
        with PreparedWriter(tmp_path / "lat", 2, (4, 2, 2), dtype="float16", kind="latents") as w:
            w.add_batch(ok * 1e5)  # overflows to inf in float16
    assert list(tmp_path.iterdir()) == []


def test_outputs_in_an_unwritable_folder_are_refused_before_any_work(tmp_path, monkeypatch):
    # As root every folder is writable, so the probe's answer is faked; the check must ask for the nearest
    # existing ancestor (the output's own folders do not exist yet).
    from fmcli import fsutil
    from fmcli.fsutil import refuse_existing

    (tmp_path / "ro").mkdir()
    asked = []

    def can_create_file_in(folder):
        asked.append(Path(folder))
        return Path(folder) != tmp_path / "ro"

    monkeypatch.setattr(fsutil, "_can_create_file_in", can_create_file_in)
    with pytest.raises(UsageError, match=r"ro is not writable \(permission denied\)"):
        refuse_existing([tmp_path / "ro" / "new" / "x.png"], force=True)
    assert asked == [tmp_path / "ro"]
    refuse_existing([tmp_path / "elsewhere" / "x.png"], force=False)  # a new folder under a writable one


@pytest.mark.parametrize("appears", ["folder", "file"])
def test_an_output_that_appears_while_written_is_refused_without_force(tmp_path, appears):
    """`--out` checked free up front, then made by another command while this one wrote: without --force nothing is
    replaced (its files stay byte for byte; a file there is a one-line error, not a NotADirectoryError) and no temp
    folder is left; with --force the dataset replaces the folder, as asked."""
    import numpy as np

    from fmcli.data.dataset import PreparedWriter
    from fmcli.errors import UsageError
    from fmcli.export import _atomic_dir

    def appear(path):
        if appears == "folder":
            path.mkdir()
            (path / "theirs.txt").write_text("another command's output")
        else:
            path.write_text("another command's file")

    def untouched(path):
        return (path / "theirs.txt").read_text() if appears == "folder" else path.read_text()

    out = tmp_path / "data"
    with pytest.raises(UsageError, match="appeared while this dataset was written"):
        with PreparedWriter(out, 2, (1, 4, 4)) as writer:
            writer.add_batch(np.zeros((2, 1, 4, 4), np.uint8))
            appear(out)
            writer.finish()
    assert untouched(out).startswith("another command's") and sorted(os.listdir(tmp_path)) == ["data"]

    export = tmp_path / "export"
    with pytest.raises(UsageError, match="appeared while this export was written"):
        _atomic_dir(export, lambda tmp: (appear(export), (tmp / "model.safetensors").write_bytes(b"w")), False)
    assert untouched(export).startswith("another command's") and sorted(os.listdir(tmp_path)) == ["data", "export"]

    if appears == "folder":  # --force replaces an output of its kind; the folder here is not one, so only the swap is checked
        forced = tmp_path / "forced"
        with PreparedWriter(forced, 2, (1, 4, 4), force=True) as writer:
            writer.add_batch(np.ones((2, 1, 4, 4), np.uint8))
            appear(forced)
            writer.finish()
        assert np.load(forced / "x.npy").tolist() == np.ones((2, 1, 4, 4)).tolist() and not (forced / "theirs.txt").exists()


def test_a_file_output_through_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    """`fm sample --out LINK.png`, `fm plot --out`, `--save-stats` (every file goes through fsutil.atomic_write): a
    symbolic link is written through, its target replaced and the link kept, as a folder output's is; a link to a
    file not there yet creates it (as `echo > LINK` does); a loop is a one-line error."""
    from fmcli.errors import UsageError
    from fmcli.fsutil import write_text_atomic

    big = tmp_path / "big"
    big.mkdir()
    (big / "grid.txt").write_text("old")
    os.symlink(big / "grid.txt", tmp_path / "grid.txt")
    os.symlink(big / "new.txt", tmp_path / "new.txt")
    write_text_atomic(tmp_path / "grid.txt", "new")
    write_text_atomic(tmp_path / "new.txt", "created")
    assert os.readlink(tmp_path / "grid.txt") == str(big / "grid.txt") and (big / "grid.txt").read_text() == "new"
    assert os.readlink(tmp_path / "new.txt") == str(big / "new.txt") and (big / "new.txt").read_text() == "created"
    assert sorted(os.listdir(big)) == ["grid.txt", "new.txt"] and sorted(os.listdir(tmp_path)) == ["big", "grid.txt", "new.txt"]
    os.symlink(tmp_path / "loop.txt", tmp_path / "loop.txt")
    with pytest.raises(UsageError, match="cannot be followed"):
        write_text_atomic(tmp_path / "loop.txt", "x")
