"""A careless user's bad inputs through the real CLI (issue #15): each one must end with exit code 1 or 2,
no traceback, nothing on stdout, exactly one clear `error:` line on stderr, and no file created or changed.

The CLI runs in this process (no interpreter start-up per case); the damaged inputs are made once per
module. Every file under the module's work directory and the shared fixtures is snapshotted (size and
modification time) before each case and compared after it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch


def _run_with(ckpt, run_dir, section: str, key: str, value):
    """A run directory holding `ckpt` with one config value changed (its checkpoints/latest names it)."""
    state = torch.load(ckpt, weights_only=True)
    state["config"][section][key] = value
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(state, run_dir / "checkpoints" / ckpt.name)
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return run_dir


@pytest.fixture(scope="module")
def w(tmp_path_factory, shapes16, debug_run) -> dict:
    """The work directory: damaged datasets, checkpoints and stats files, and outputs that already exist."""
    root = tmp_path_factory.mktemp("bad-input")
    p = {"root": root, "data": shapes16, "cwd": root / "cwd"}
    p["cwd"].mkdir()
    p["run"] = root / "run"  # a copy: resume cases that wrongly ran would change it, never the shared run
    shutil.copytree(debug_run, p["run"])
    ckpt = p["run"] / "checkpoints" / (p["run"] / "checkpoints" / "latest").read_text().strip()
    p["run_ckpt"] = ckpt

    def dataset(name, damage):
        d = root / name
        shutil.copytree(shapes16, d)
        damage(d)
        p[name] = d

    def edit_manifest(d, **fields):
        m = json.loads((d / "manifest.json").read_text())
        m.update(fields)
        (d / "manifest.json").write_text(json.dumps(m))

    def labels(d):
        y = np.load(d / "y.npy")
        y[0] = 10
        np.save(d / "y.npy", y)

    dataset("truncated", lambda d: (d / "x.npy").write_bytes((d / "x.npy").read_bytes()[:-777]))
    dataset("badlabels", labels)
    dataset("fewcaptions", lambda d: (d / "captions.jsonl").write_text("\n".join((d / "captions.jsonl").read_text().splitlines()[:100]) + "\n"))
    dataset("badjson", lambda d: (d / "manifest.json").write_text("{not json"))
    dataset("floatpixels", lambda d: np.save(d / "x.npy", np.zeros((512, 3, 16, 16), np.float32)))
    dataset("wrongcount", lambda d: edit_manifest(d, count=9999))
    dataset("oldformat", lambda d: edit_manifest(d, format=99))
    (root / "empty").mkdir()
    p["empty"] = root / "empty"
    (root / "afile").write_text("a file where an output folder would go\n")
    p["afile"] = root / "afile"
    (root / "bad.toml").write_text("[train\nsteps = 3\n")
    p["bad_toml"] = root / "bad.toml"
    (root / "unknown.toml").write_text("[train]\nstepz = 3\n")
    p["unknown_toml"] = root / "unknown.toml"
    p["garbage_ckpt"] = root / "garbage.pt"
    p["garbage_ckpt"].write_bytes(np.random.default_rng(0).bytes(4096))
    p["truncated_ckpt"] = root / "truncated.pt"
    p["truncated_ckpt"].write_bytes(ckpt.read_bytes()[:-5000])

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    p["evil_ckpt"] = root / "evil.pt"
    torch.save({"model": Payload(), "config": {}}, p["evil_ckpt"])
    p["not_fm_ckpt"] = root / "tensors.pt"
    torch.save({"weights": torch.zeros(3)}, p["not_fm_ckpt"])
    p["dangling"] = root / "dangling"
    (p["dangling"] / "checkpoints").mkdir(parents=True)
    (p["dangling"] / "checkpoints" / "latest").write_text("step-0000099.pt\n")
    p["stats_bad"] = root / "bad-stats.npz"
    p["stats_bad"].write_bytes(b"PK\x03\x04 not really a zip")
    p["exists_png"] = root / "exists.png"
    p["exists_png"].write_bytes(b"user's picture")
    p["exists_gif"] = root / "exists.gif"
    p["exists_gif"].write_bytes(b"user's animation")
    p["exists_npz"] = root / "exists.npz"
    p["exists_npz"].write_bytes(b"user's statistics")
    p["samples"] = root / "samples"
    p["samples"].mkdir()
    (p["samples"] / "000000.png").write_bytes(b"user's sample")
    p["images"] = root / "images"  # a real folder of images, for --gen
    p["images"].mkdir()
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(p["images"] / f"{i}.png")
    state = torch.load(ckpt, weights_only=True)  # an autoguidance guide of the same run with another class order
    state["data_info"]["class_names"] = state["data_info"]["class_names"][::-1]
    p["guide_order"] = root / "guide-other-order.pt"
    torch.save(state, p["guide_order"])
    p["fake_inception"] = root / "inception-2015-12-05.pt"
    torch.jit.script(torch.nn.Identity()).save(str(p["fake_inception"]))
    p["sweep"] = root / "sweep.json"  # an `fm fid --nfe` sweep whose default output is a user's file
    p["sweep"].write_text(json.dumps([{"fid": 50.0, "nfe_per_sample": n, "solver": "euler"} for n in (1, 2)]))
    (root / "sweep.png").write_bytes(b"user's picture named like the sweep")
    # A run whose data is fm's own shapes data (data/shapes-16-n512-s0, relative: absent in cwd), deleted since.
    p["nodata_run"] = _run_with(ckpt, root / "nodata-run", "data", "path", "data/shapes-16-n512-s0")
    # A run configured for the CPU (train.device=cpu): --gpus would replace it.
    p["cpu_run"] = _run_with(ckpt, root / "cpu-run", "train", "device", "cpu")
    p["shared"] = [shapes16, debug_run]
    return p


TRAIN = ("train", "--preset", "debug", "--set", "train.device=cpu")

# (id, arguments built from the work directory[, a phrase the error line must contain])
CASES = [
    # presets, keys, types, ranges
    ("unknown-preset", lambda w: ("train", "--preset", "no-such-preset")),
    ("preset-file-missing", lambda w: ("train", "--preset", w["root"] / "missing.toml")),
    ("preset-invalid-toml", lambda w: ("train", "--preset", w["bad_toml"])),
    ("preset-unknown-key", lambda w: ("train", "--preset", w["unknown_toml"], "--data", w["data"])),
    ("set-unknown-key", lambda w: (*TRAIN, "--data", w["data"], "--set", "model.depthh=3")),
    ("set-unknown-section", lambda w: (*TRAIN, "--data", w["data"], "--set", "nosuch.key=3")),
    ("set-without-equals", lambda w: (*TRAIN, "--data", w["data"], "--set", "train.steps")),
    ("set-wrong-type", lambda w: (*TRAIN, "--data", w["data"], "--set", "train.steps=abc")),
    ("set-negative-steps", lambda w: (*TRAIN, "--data", w["data"], "--set", "train.steps=-5")),
    ("set-zero-lr", lambda w: (*TRAIN, "--data", w["data"], "--set", "optim.lr=0")),
    ("set-bad-precision", lambda w: (*TRAIN, "--data", w["data"], "--set", "train.precision=fp64")),
    ("set-bad-coupling", lambda w: (*TRAIN, "--data", w["data"], "--set", "flow.coupling=ot-magic")),
    ("print-config-bad-key", lambda w: ("train", "--preset", "debug", "--print-config", "--set", "train.nope=1")),
    ("set-section-to-scalar", lambda w: ("train", "--preset", "debug", "--print-config", "--set", "train=1"), "train"),
    ("set-fallback-overrides-scalar", lambda w: ("train", "--preset", "debug", "--print-config", "--set", "train.budget_minutes=5",
                                                 "--set", "model.depth=3", "--set", "train.budget_fallback.overrides=1"), "budget_fallback"),
    ("fp16-on-cpu", lambda w: (*TRAIN, "--data", w["data"], "--set", "train.precision=fp16", "--run-dir", w["root"] / "new-run")),
    ("batch-not-divisible", lambda w: (*TRAIN, "--data", w["data"], "--set", "train.global_batch_size=15", "--set", "train.micro_batch_size=2", "--run-dir", w["root"] / "new-run")),
    ("batch-above-dataset", lambda w: (*TRAIN, "--data", w["data"], "--set", "train.global_batch_size=4096", "--run-dir", w["root"] / "new-run")),
    ("stop-at-step-zero", lambda w: (*TRAIN, "--data", w["data"], "--stop-at-step", "0")),
    # non-finite numbers and settings training cannot honour (issue #32)
    ("set-budget-inf", lambda w: (*TRAIN, "--data", w["data"], "--set", "train.budget_minutes=inf", "--run-dir", w["root"] / "new-run"), "finite"),
    ("set-lr-nan", lambda w: (*TRAIN, "--data", w["data"], "--set", "optim.lr=nan", "--run-dir", w["root"] / "new-run"), "finite"),
    ("set-betas-inf", lambda w: (*TRAIN, "--data", w["data"], "--set", "optim.betas=[0.9,inf]", "--run-dir", w["root"] / "new-run"), "finite"),
    ("train-guidance-auto", lambda w: (*TRAIN, "--data", w["data"], "--set", "sample.guidance=auto", "--run-dir", w["root"] / "new-run"), "sample.guidance"),
    # seeds outside [0, 2**32): each repeated another seed's numbers (seed 2**32's sample 0 was seed 0's sample 1)
    ("set-train-seed-2-32", lambda w: (*TRAIN, "--data", w["data"], "--set", f"train.seed={2**32}", "--run-dir", w["root"] / "new-run"), "train.seed: a seed is a whole number from 0 to 4294967295"),
    ("set-train-seed-negative", lambda w: (*TRAIN, "--data", w["data"], "--set", "train.seed=-1", "--run-dir", w["root"] / "new-run"), "train.seed"),
    ("set-data-seed-negative", lambda w: (*TRAIN, "--set", "data.seed=-1", "--run-dir", w["root"] / "new-run"), "data.seed"),
    ("prepare-data-seed-negative", lambda w: ("prepare-data", "shapes", "--out", w["root"] / "new-shapes", "--count", "8", "--seed", "-1"), "--seed"),
    ("sample-seed-2-32", lambda w: ("sample", "--ckpt", w["run"], "--seed", str(2**32), "--out", w["root"] / "new.png"), "from 0 to 4294967295"),
    ("sample-seed-negative", lambda w: ("sample", "--ckpt", w["run"], "--seed", "-1", "--out", w["root"] / "new.png"), "from 0 to 4294967295"),
    ("class-grid-seed-2-64", lambda w: ("class-grid", "--ckpt", w["run"], "--seed", str(2**64), "--out", w["root"] / "new.png"), "from 0 to 4294967295"),
    ("fid-seed-2-32", lambda w: ("fid", "--ckpt", w["run"], "-n", "4", "--ref", w["data"], "--features", "tiny", "--seed", str(2**32)), "from 0 to 4294967295"),
    ("eval-seed-2-32", lambda w: ("eval", "--data", w["data"], "--ckpt", w["run"], "-n", "8", "--seed", str(2**32)), "from 0 to 4294967295"),
    ("eval-classifier-seed-2-32", lambda w: ("eval", "--data", w["data"], "--ckpt", w["run"], "-n", "8", "--classifier-seed", str(2**32)), "--classifier-seed"),
    ("reflow-seed-2-32", lambda w: ("reflow", "--ckpt", w["run"], "-n", "4", "--seed", str(2**32), "--out", w["root"] / "new-pairs"), "from 0 to 4294967295"),
    # bad paths, damaged datasets
    ("data-missing", lambda w: (*TRAIN, "--data", w["root"] / "no-such-data")),
    ("data-empty-dir", lambda w: (*TRAIN, "--data", w["empty"])),
    ("data-truncated-x", lambda w: (*TRAIN, "--data", w["truncated"], "--run-dir", w["root"] / "new-run"), "truncated"),
    ("data-label-out-of-range", lambda w: (*TRAIN, "--data", w["badlabels"], "--run-dir", w["root"] / "new-run"), "labels span"),
    ("data-captions-count", lambda w: (*TRAIN, "--data", w["fewcaptions"], "--run-dir", w["root"] / "new-run")),
    ("data-manifest-not-json", lambda w: (*TRAIN, "--data", w["badjson"], "--run-dir", w["root"] / "new-run")),
    ("data-float-pixels", lambda w: (*TRAIN, "--data", w["floatpixels"], "--run-dir", w["root"] / "new-run")),
    ("data-manifest-count", lambda w: (*TRAIN, "--data", w["wrongcount"], "--run-dir", w["root"] / "new-run")),
    ("data-format-version", lambda w: (*TRAIN, "--data", w["oldformat"], "--run-dir", w["root"] / "new-run")),
    ("run-dir-exists", lambda w: (*TRAIN, "--data", w["data"], "--run-dir", w["run"])),
    # launch flags without the hardware
    ("train-gpus-absent", lambda w: (*TRAIN, "--data", w["data"], "--gpus", "64", "--run-dir", w["root"] / "new-run")),
    ("train-gpus-and-nproc", lambda w: (*TRAIN, "--data", w["data"], "--gpus", "1", "--nproc", "2")),
    ("train-nnodes-without-endpoint", lambda w: (*TRAIN, "--data", w["data"], "--run-dir", w["root"] / "new-run", "--nnodes", "2"), "--rdzv-endpoint"),
    ("train-gpus-with-device-cpu", lambda w: (*TRAIN, "--data", w["data"], "--gpus", "2", "--run-dir", w["root"] / "new-run"), "train.device=cpu would be ignored"),
    ("resume-gpus-with-device-cpu", lambda w: ("resume", w["cpu_run"], "--gpus", "2"), "--set train.device=cuda beside --gpus"),
    ("sample-gpus-absent", lambda w: ("sample", "--ckpt", w["run"], "--gpus", "64", "--out", w["root"] / "new.png")),
    ("sample-gpus-with-device-cpu", lambda w: ("sample", "--ckpt", w["run"], "--gpus", "1", "--device", "cpu", "--out", w["root"] / "new.png"), "--device cpu"),
    ("fid-gpus-without-ckpt", lambda w: ("fid", "--gen", w["images"], "--ref", w["data"], "--nproc", "2")),
    # checkpoints and resume
    ("resume-missing", lambda w: ("resume", w["root"] / "no-such-run")),
    ("resume-dir-without-ckpt", lambda w: ("resume", w["empty"])),
    ("resume-latest-dangling", lambda w: ("resume", w["dangling"])),
    ("resume-garbage-ckpt", lambda w: ("resume", w["garbage_ckpt"])),
    ("resume-truncated-ckpt", lambda w: ("resume", w["truncated_ckpt"])),
    ("resume-pickled-code", lambda w: ("resume", w["evil_ckpt"]), "refused to unpickle code"),
    ("resume-not-fm-ckpt", lambda w: ("resume", w["not_fm_ckpt"])),
    ("resume-unsafe-lr", lambda w: ("resume", w["run"], "--set", "optim.lr=0.5"), "optim.lr"),
    ("resume-unsafe-sigma", lambda w: ("resume", w["run"], "--set", "flow.sigma_min=0.5"), "flow.sigma_min"),
    ("resume-bad-value", lambda w: ("resume", w["run"], "--set", "train.steps=abc")),
    ("resume-stop-at-passed-step", lambda w: ("resume", w["run"], "--set", "train.steps=8", "--stop-at-step", "3"), "--stop-at-step 3"),
    ("resume-stop-at-resumed-step", lambda w: ("resume", w["run"], "--set", "train.steps=8", "--stop-at-step", "4"), "--stop-at-step 4"),
    ("train-resume-stop-at-passed-step", lambda w: ("train", "--preset", "debug", "--run-dir", w["run"], "--resume", "latest", "--set", "train.steps=8", "--stop-at-step", "2"), "--stop-at-step 2"),
    ("resume-budget-minutes", lambda w: ("resume", w["run"], "--set", "train.budget_minutes=5"), "train.steps=N"),
    ("train-resume-unsafe-lr", lambda w: ("train", "--preset", "debug", "--data", w["data"], "--run-dir", w["run"], "--resume", "latest", "--set", "optim.lr=0.5"), "optim.lr"),
    ("train-resume-unsafe-ema", lambda w: ("train", "--preset", "debug", "--run-dir", w["run"], "--resume", "latest", "--set", "train.ema_decay=0"), "train.ema_decay"),
    ("train-resume-missing-path", lambda w: (*TRAIN, "--data", w["data"], "--run-dir", w["root"] / "new-run", "--resume", w["root"] / "nope.pt")),
    ("train-resume-into-new-run-dir", lambda w: (*TRAIN, "--run-dir", w["root"] / "new-run", "--resume", w["run"]), "train.init_from"),
    ("train-resume-into-other-run", lambda w: (*TRAIN, "--run-dir", w["dangling"], "--resume", w["run_ckpt"]), "train.init_from"),
    ("resume-data-missing", lambda w: ("resume", w["nodata_run"]), "--size 16 --count 512 --seed 0"),
    # sampling: wrong-model flags, bad values, existing outputs
    ("sample-ckpt-missing", lambda w: ("sample", "--ckpt", w["root"] / "nope.pt", "--out", w["root"] / "new.png")),
    # A run's config.json given as --ckpt: torch's refusal opened with "Re-running `torch.load` with `weights_only` set to
    # False will likely succeed" (advice to execute the file), cut mid-sentence; the cause is what is shown now.
    ("sample-ckpt-is-json", lambda w: ("sample", "--ckpt", w["run"] / "config.json", "--out", w["root"] / "new.png"), "not an fm checkpoint (Unsupported operand 123)"),
    ("sample-prompt-on-class-model", lambda w: ("sample", "--ckpt", w["run"], "--prompt", "a red circle", "--out", w["root"] / "new.png")),
    ("sample-class-label-range", lambda w: ("sample", "--ckpt", w["run"], "--class-label", "99", "--out", w["root"] / "new.png")),
    ("sample-unknown-solver", lambda w: ("sample", "--ckpt", w["run"], "--solver", "leapfrog", "--out", w["root"] / "new.png")),
    ("sample-zero-steps", lambda w: ("sample", "--ckpt", w["run"], "--steps", "0", "--out", w["root"] / "new.png")),
    ("sample-negative-cfg", lambda w: ("sample", "--ckpt", w["run"], "--cfg", "-1", "--out", w["root"] / "new.png")),
    ("sample-cfg-inf", lambda w: ("sample", "--ckpt", w["run"], "--cfg", "inf", "--out", w["root"] / "new.png"), "finite"),
    ("sample-cfg-nan", lambda w: ("sample", "--ckpt", w["run"], "--cfg", "nan", "--out", w["root"] / "new.png"), "finite"),
    ("sample-sde-noise-inf", lambda w: ("sample", "--ckpt", w["run"], "--solver", "euler-sde", "--sde-noise", "inf", "--out", w["root"] / "new.png"), "finite"),
    ("eval-cfg-sweep-nan", lambda w: ("eval", "--data", w["data"], "--ckpt", w["run"], "-n", "8", "--cfg", "1,nan"), "finite"),
    ("eval-cfg-sweep-inf", lambda w: ("eval", "--data", w["data"], "--ckpt", w["run"], "-n", "8", "--cfg", "inf"), "finite"),
    ("sample-interval-nan", lambda w: ("sample", "--ckpt", w["run"], "--guidance-interval", "nan,0.5", "--out", w["root"] / "new.png"), "finite"),
    ("sample-cfg-overflows", lambda w: ("sample", "--ckpt", w["run"], "--cfg", "1e300", "--out", w["root"] / "new.png"), "not finite"),
    ("sample-dopri5-zero-init", lambda w: ("sample", "--ckpt", w["run"], "--solver", "dopri5", "--guidance", "cfg-zero", "--cfg", "2", "--steps", "1", "--out", w["root"] / "new.png"), "--zero-init-steps"),
    ("sample-guide-other-class-order", lambda w: ("sample", "--ckpt", w["run"], "--guide-ckpt", w["guide_order"], "--cfg", "2", "--out", w["root"] / "new.png"), "class names"),
    ("reflow-sde-solver", lambda w: ("reflow", "--ckpt", w["run"], "-n", "4", "--solver", "euler-sde", "--out", w["root"] / "new-pairs"), "stochastic"),
    ("reflow-meanflow-on-flow-model", lambda w: ("reflow", "--ckpt", w["run"], "-n", "4", "--steps", "2", "--solver", "meanflow", "--out", w["root"] / "new-pairs"), "mean-flow"),
    ("sample-guidance-interval", lambda w: ("sample", "--ckpt", w["run"], "--guidance-interval", "0.9,0.1", "--out", w["root"] / "new.png")),
    ("sample-gif-not-gif", lambda w: ("sample", "--ckpt", w["run"], "--gif", w["root"] / "t.png", "--out", w["root"] / "new.png")),
    ("sample-prompts-file-missing", lambda w: ("sample", "--ckpt", w["run"], "--prompts", w["root"] / "prompts.txt", "--out", w["root"] / "new.png")),
    ("sample-out-exists", lambda w: ("sample", "--ckpt", w["run"], "--out", w["exists_png"]), "--force"),
    ("sample-gif-exists", lambda w: ("sample", "--ckpt", w["run"], "--out", w["root"] / "new.png", "--gif", w["exists_gif"])),
    ("sample-dir-sample-exists", lambda w: ("sample", "--ckpt", w["run"], "-n", "2", "--out", w["samples"])),
    ("sample-unknown-option", lambda w: ("sample", "--ckpt", w["run"], "--temperature", "2")),
    ("class-grid-out-exists", lambda w: ("class-grid", "--ckpt", w["run"], "--out", w["exists_png"])),
    ("class-grid-not-png", lambda w: ("class-grid", "--ckpt", w["run"], "--out", w["root"] / "grid.jpg")),
    # evaluation
    ("fid-nothing-to-score", lambda w: ("fid", "--ref", w["data"], "--features", "tiny")),
    ("fid-ckpt-without-n", lambda w: ("fid", "--ckpt", w["run"], "--ref", w["data"], "--features", "tiny")),
    ("fid-gen-missing", lambda w: ("fid", "--gen", w["root"] / "no-images", "--ref", w["data"], "--features", "tiny")),
    ("fid-gen-and-ckpt", lambda w: ("fid", "--gen", w["images"], "--ckpt", w["run"], "--ref", w["data"], "--features", "tiny")),
    ("fid-unknown-features", lambda w: ("fid", "--gen", w["images"], "--ref", w["data"], "--features", "vgg")),
    ("fid-stats-exists", lambda w: ("fid", "--ref", w["data"], "--save-stats", w["exists_npz"], "--features", "tiny")),
    ("fid-out-sample-exists", lambda w: ("fid", "--ckpt", w["run"], "-n", "2", "--ref", w["data"], "--features", "tiny", "--out", w["samples"])),
    ("fid-corrupt-stats", lambda w: ("fid", "--gen", w["images"], "--ref", w["stats_bad"], "--features", "tiny")),
    ("fid-inception-wrong-hash", lambda w: ("fid", "--gen", w["images"], "--ref", w["data"], "--inception", w["fake_inception"])),
    ("fid-nfe-and-steps", lambda w: ("fid", "--ckpt", w["run"], "-n", "2", "--ref", w["data"], "--features", "tiny", "--nfe", "1,2", "--steps", "4"), "drop --steps"),
    ("eval-nfe-and-steps", lambda w: ("eval", "--ckpt", w["run"], "-n", "8", "--data", w["data"], "--nfe", "1,2", "--steps", "4"), "drop --steps"),
    ("fid-nfe-below-one-step", lambda w: ("fid", "--ckpt", w["run"], "-n", "2", "--ref", w["data"], "--features", "tiny", "--nfe", "1,3", "--solver", "rk4"), "needs at least"),
    # options that set how --ckpt samples, beside a folder to score (nothing is sampled): refused, not ignored
    ("fid-gen-seed", lambda w: ("fid", "--gen", w["images"], "--ref", w["data"], "--features", "tiny", "--seed", "3"), "--seed"),
    ("fid-gen-no-ema", lambda w: ("fid", "--gen", w["images"], "--ref", w["data"], "--features", "tiny", "--no-ema"), "--ema/--no-ema"),
    ("eval-gen-seed", lambda w: ("eval", "--gen", w["images"], "--data", w["data"], "--features", "tiny", "--seed", "3"), "--seed"),
    ("eval-gen-ema", lambda w: ("eval", "--gen", w["images"], "--data", w["data"], "--features", "tiny", "--ema"), "--ema/--no-ema"),
    ("eval-gen-batch-size", lambda w: ("eval", "--gen", w["images"], "--data", w["data"], "--features", "tiny", "--batch-size", "8"), "--batch-size"),
    # options of a part the command does not run here: refused, not ignored
    ("fid-save-stats-with-n", lambda w: ("fid", "--ref", w["data"], "--save-stats", w["root"] / "new.npz", "--features", "tiny", "-n", "4"), "--num-samples"),
    ("fid-inception-with-tiny", lambda w: ("fid", "--gen", w["images"], "--ref", w["data"], "--features", "tiny", "--inception", w["fake_inception"]), "--inception"),
    ("eval-dinov2-without-its-space", lambda w: ("eval", "--gen", w["images"], "--data", w["data"], "--features", "tiny", "--dinov2", w["root"]), "--dinov2"),
    ("eval-classifier-seed-without-domain", lambda w: ("eval", "--gen", w["images"], "--data", w["data"], "--features", "tiny", "--classifier-seed", "1"), "--classifier-seed"),
    ("eval-classifier-steps-without-domain", lambda w: ("eval", "--gen", w["images"], "--data", w["data"], "--features", "tiny", "--classifier-steps", "5"), "--classifier-steps"),
    # guidance options where no row guides (every --cfg is 1): refused, not reported on unguided rows
    ("eval-cfg-1-interval", lambda w: ("eval", "--ckpt", w["run"], "-n", "8", "--data", w["data"], "--features", "tiny", "--cfg", "1", "--guidance-interval", "0.2,1"), "--guidance-interval"),
    ("fid-inception-missing", lambda w: ("fid", "--gen", w["images"], "--ref", w["data"], "--inception", w["root"] / "none.pt")),
    # plot, bench, prepare-data
    ("plot-run-missing", lambda w: ("plot", w["root"] / "no-run")),
    ("plot-bad-extension", lambda w: ("plot", w["run"], "--out", w["root"] / "curves.txt")),
    ("plot-out-exists", lambda w: ("plot", w["run"], "--out", w["exists_png"])),
    ("plot-sweep-default-out-exists", lambda w: ("plot", w["sweep"]), "--force"),
    ("plot-binary-file", lambda w: ("plot", w["images"] / "0.png"), "not text"),
    ("bench-bad-batch", lambda w: ("bench", "--preset", "debug", "--batch-size", "lots")),
    ("prepare-unknown-source", lambda w: ("prepare-data", "imagenet", "--out", w["root"] / "new-data")),
    ("prepare-out-exists", lambda w: ("prepare-data", "shapes", "--out", w["data"], "--count", "4")),
    ("prepare-cifar-root-missing", lambda w: ("prepare-data", "cifar10", "--root", w["root"] / "cifar", "--out", w["root"] / "new-data")),
    ("prepare-tar-no-match", lambda w: ("prepare-data", "tar", "--root", str(w["root"] / "shards" / "*.tar"), "--out", w["root"] / "new-data")),
    ("prepare-cifar-root-not-archive", lambda w: ("prepare-data", "cifar10", "--root", w["images"] / "0.png", "--out", w["root"] / "new-data"), "0.png"),
    ("prepare-tar-root-not-archive", lambda w: ("prepare-data", "tar", "--root", w["images"] / "0.png", "--out", w["root"] / "new-data"), "0.png"),
    ("prepare-bad-split", lambda w: ("prepare-data", "shapes", "--split", "valid", "--out", w["root"] / "new-data")),
    ("prepare-cache-text-without-encoder", lambda w: ("prepare-data", "shapes", "--cache-text", "--count", "4", "--out", w["root"] / "new-data"), "--text-encoder"),
    ("prepare-size-too-small", lambda w: ("prepare-data", "shapes", "--size", "4", "--out", w["root"] / "new-data")),
    ("unknown-command", lambda w: ("trian", "--preset", "debug")),
    # an output under a file: refused before any work, not an OSError after it
    ("sample-out-under-a-file", lambda w: ("sample", "--ckpt", w["run"], "-n", "2", "--out", w["afile"] / "x.png"), "is a file, not a folder"),
    ("sample-dir-under-a-file", lambda w: ("sample", "--ckpt", w["run"], "-n", "2", "--out", w["afile"] / "samples"), "is a file, not a folder"),
    ("prepare-out-under-a-file", lambda w: ("prepare-data", "shapes", "--count", "4", "--out", w["afile"] / "data"), "is a file, not a folder"),
    ("class-grid-out-under-a-file", lambda w: ("class-grid", "--ckpt", w["run"], "--out", w["afile"] / "grid.png"), "is a file, not a folder"),
    # numbers far past any real use: refused up front, not an allocation failure (or a full disk) later
    # An option the source does not read was accepted and ignored (`folder --count 2` prepared every image).
    ("prepare-folder-count", lambda w: ("prepare-data", "folder", "--root", w["images"], "--count", "2", "--size", "8", "--out", w["root"] / "new-data"), "--count is not read by the folder source"),
    ("prepare-folder-seed", lambda w: ("prepare-data", "folder", "--root", w["images"], "--seed", "3", "--size", "8", "--out", w["root"] / "new-data"), "--seed is not read"),
    ("prepare-shapes-root", lambda w: ("prepare-data", "shapes", "--root", w["images"], "--count", "4", "--out", w["root"] / "new-data"), "--root is not read by the shapes source"),
    ("prepare-digits-root", lambda w: ("prepare-data", "sklearn-digits", "--root", w["images"], "--out", w["root"] / "new-data"), "--root is not read"),
    ("prepare-folder-max-member", lambda w: ("prepare-data", "folder", "--root", w["images"], "--max-member-mib", "1", "--out", w["root"] / "new-data"), "--max-member-mib is not read"),
    ("prepare-count-beyond-the-disk", lambda w: ("prepare-data", "shapes", "--count", "1000000000000", "--out", w["root"] / "new-data"), "GB free"),
    ("prepare-size-huge", lambda w: ("prepare-data", "shapes", "--size", "100000", "--out", w["root"] / "new-data"), "--size"),
    ("sample-steps-huge", lambda w: ("sample", "--ckpt", w["run"], "--steps", "1000000000000", "--out", w["root"] / "new.png"), "--steps"),
    ("sample-n-huge", lambda w: ("sample", "--ckpt", w["run"], "-n", "99999999999999999999999", "--out", w["root"] / "many"), "--num-samples"),
    ("train-run-dir-is-a-file", lambda w: ("train", "--preset", "debug", "--data", w["data"], "--run-dir", w["afile"]), "is a file, not a run directory"),
    ("train-run-dir-under-a-file", lambda w: ("train", "--preset", "debug", "--data", w["data"], "--run-dir", w["afile"] / "run"), "is a file, not a folder"),
    ("fid-save-stats-under-a-file", lambda w: ("fid", "--gen", w["images"], "--ref", w["data"], "--features", "tiny", "--save-stats", w["afile"] / "st.npz"), "is a file, not a folder"),
]


def _snapshot(roots) -> dict:
    files = {}
    for root in roots:
        for path in [Path(root), *Path(root).rglob("*")]:
            st = path.lstat()
            files[str(path)] = (st.st_size, st.st_mtime_ns) if path.is_file() else "dir"
    return files


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("make_args, expect", [(c[1], c[2] if len(c) > 2 else "") for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(make_args, expect, w, capsys, monkeypatch):
    from fmcli.cli import app

    monkeypatch.chdir(w["cwd"])  # relative defaults (runs/, data/, samples/) land inside the snapshot
    args = [str(a) for a in make_args(w)]
    roots = [w["root"], *w["shared"]]
    before = _snapshot(roots)
    with pytest.raises(SystemExit) as exit_info:
        app(args=args, prog_name="fm")
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert exit_info.value.code in (1, 2), (args, err)
    assert out == "", (args, out)
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > 20, (args, err)
    assert expect in lines[0], (args, err)
    assert _snapshot(roots) == before, args


# Issue #32 (reliability 2, training side): reflow work folders and damaged exports, in the same harness.
@pytest.fixture(scope="module")
def w32(w, debug_run):
    from safetensors.torch import load_file, save_file

    from fmcli.checkpoint import resolve_checkpoint
    from fmcli.export import export_checkpoint

    root = w["root"] / "issue32"
    root.mkdir()
    p = {**w, "root": root}
    for name, files in (("user", {"notes.txt": "the user's own file"}), ("damaged", {"plan.json": "{damaged"}), ("list", {"plan.json": "[1, 2]"})):
        partial = root / f"{name}.partial"
        partial.mkdir()
        for file, text in files.items():
            (partial / file).write_text(text)
        p[f"reflow_{name}"] = root / name
    export = root / "export"
    export_checkpoint(resolve_checkpoint(debug_run), export, "diffusers")
    weights = "diffusion_pytorch_model.safetensors"

    def damaged(name, damage):
        shutil.copytree(export, root / name)
        damage(root / name)
        p[name] = root / name

    def edit_weights(d, change):
        state = load_file(d / weights)
        change(state)
        save_file(state, str(d / weights))

    def edit_manifest(d, **fields):
        m = json.loads((d / "fm_export.json").read_text())
        m.update(fields)
        (d / "fm_export.json").write_text(json.dumps({k: v for k, v in m.items() if v is not None}))

    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    damaged("export_tuned", lambda d: edit_weights(d, lambda s: s[key].mul_(2)))
    damaged("export_no_weights_key", lambda d: edit_manifest(d, weights_file=None))
    damaged("export_outside", lambda d: edit_manifest(d, weights_file="../export/" + weights))
    damaged("export_truncated", lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:-999]))
    damaged("export_missing_tensor", lambda d: edit_weights(d, lambda s: s.pop("proj_out_1.weight")))
    return p


REFLOW = ("reflow", "--device", "cpu", "-n", "4", "--steps", "1", "--batch-size", "4")
CASES_32 = [
    ("reflow-partial-of-user-files", lambda w: (*REFLOW, "--ckpt", w["run"], "--out", w["reflow_user"]), "plan.json"),
    ("reflow-partial-damaged-plan", lambda w: (*REFLOW, "--ckpt", w["run"], "--out", w["reflow_damaged"]), "plan.json is damaged"),
    ("reflow-partial-plan-not-a-plan", lambda w: (*REFLOW, "--ckpt", w["run"], "--out", w["reflow_list"]), "not a reflow plan"),
    ("export-embeddings-differ", lambda w: ("sample", "--ckpt", w["export_tuned"], "--out", w["root"] / "x.png"), "embeddings"),
    ("export-no-weights-file", lambda w: ("sample", "--ckpt", w["export_no_weights_key"], "--out", w["root"] / "x.png"), "weights_file"),
    ("export-weights-outside", lambda w: ("sample", "--ckpt", w["export_outside"], "--out", w["root"] / "x.png"), "weights_file"),
    ("export-truncated-weights", lambda w: ("sample", "--ckpt", w["export_truncated"], "--out", w["root"] / "x.png"), "corrupt"),
    ("export-missing-tensor", lambda w: ("sample", "--ckpt", w["export_missing_tensor"], "--out", w["root"] / "x.png"), "does not match"),
]


@pytest.mark.parametrize("make_args, expect", [(c[1], c[2]) for c in CASES_32], ids=[c[0] for c in CASES_32])
def test_bad_input_issue32(make_args, expect, w32, capsys, monkeypatch):
    test_bad_input(make_args, expect, w32, capsys, monkeypatch)


@pytest.mark.parametrize("damage", ["wrong-shape", "machine-not-a-dict", "precision-int8", "precision-fp16"])
def test_corrupt_probe_cache_is_measured_again(damage, shapes16, tmp_path, monkeypatch, capsys):
    """A damaged $XDG_CACHE_HOME/fm/probe.json (issue #32.1) is not an input error: auto precision measures again,
    trains, and writes a precision that later commands accept; no traceback, no AttributeError."""
    from fmcli.cli import app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    cache = tmp_path / "xdg" / "fm" / "probe.json"

    def train(name):
        args = [*TRAIN, "--data", shapes16, "--set", "train.precision=auto", "--set", "train.steps=2", "--run-dir", tmp_path / name]
        with pytest.raises(SystemExit) as exit_info:
            app(args=[str(a) for a in args], prog_name="fm")
        err = capsys.readouterr().err
        assert exit_info.value.code in (0, None) and "Traceback" not in err and "AttributeError" not in err, err
        return json.loads((tmp_path / name / "config.json").read_text())["train"]["precision"]

    train("first")  # fills the cache
    data = json.loads(cache.read_text())
    key = next(k for k in data if "|cpu|" in k)
    if damage == "wrong-shape":
        data[key] = {workload: ["not", "a", "probe"] for workload in data[key]}
    elif damage == "machine-not-a-dict":
        data[key] = 7
    else:
        for entry in data[key].values():
            entry["precision"] = damage.removeprefix("precision-")
    cache.write_text(json.dumps(data))
    assert train("second") in ("fp32", "bf16")
    with pytest.raises(SystemExit) as exit_info:  # the run is usable: sampling accepts its config
        app(args=["sample", "--ckpt", str(tmp_path / "second"), "-n", "2", "--out", str(tmp_path / "s.png"), "--device", "cpu"], prog_name="fm")
    code = exit_info.value.code
    assert code in (0, None), capsys.readouterr().err


@pytest.mark.parametrize("command", ["prepare-data", "reflow", "export"])
def test_force_is_advised_only_where_force_replaces(command, debug_run, tmp_path, capsys):
    """An --out folder of the user's (not an earlier output of this command, not empty): the error must not say
    "pass --force", because --force is refused for it too (the user's file would go with it). Checked by
    following the advice: whatever the first refusal says, with --force the user's folder is still refused,
    so the first message may not advise --force; both refusals leave the user's file as it was."""
    from fmcli.cli import app

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    args = {
        "prepare-data": ["prepare-data", "shapes", "--count", "4", "--size", "8"],
        "reflow": ["reflow", "--ckpt", debug_run, "-n", "2", "--steps", "1", "--device", "cpu"],
        "export": ["export", "--ckpt", debug_run, "--format", "fm"],
    }[command] + ["--out", mine]

    def run(*extra):
        with pytest.raises(SystemExit) as exit_info:
            app(args=[str(a) for a in [*args, *extra]], prog_name="fm")
        return exit_info.value.code, capsys.readouterr().err

    (code, err), (forced_code, forced_err) = run(), run("--force")
    assert code == 2 and forced_code == 2, (err, forced_err)  # --force does not replace a folder of the user's
    assert "--force" not in err and "choose another --out" in err, err  # so it is never the advice
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my notes"


def test_prepare_data_shapes_options_still_reach_the_generator(tmp_path, capsys):
    """--count and --seed, now None when not given, still set the shapes images: the CLI's dataset equals the
    library's `prepare("shapes", count=5, seed=7)`, and without --seed the seed-0 dataset."""
    from fmcli.cli import app
    from fmcli.data.prepare import prepare

    for args, seed in ((["--seed", "7"], 7), ([], 0)):
        with pytest.raises(SystemExit) as exit_info:
            app(args=["prepare-data", "shapes", "--count", "5", "--size", "8", *args, "--out", str(tmp_path / f"cli{seed}")], prog_name="fm")
        assert exit_info.value.code in (0, None), capsys.readouterr().err
        prepare("shapes", tmp_path / f"lib{seed}", count=5, seed=seed, size=8)
        assert np.array_equal(np.load(tmp_path / f"cli{seed}" / "x.npy"), np.load(tmp_path / f"lib{seed}" / "x.npy"))


def _fm(capsys, *args):
    from fmcli.cli import app

    with pytest.raises(SystemExit) as exit_info:
        app(args=[str(a) for a in args], prog_name="fm")
    return exit_info.value.code or 0, capsys.readouterr().err


def test_a_grid_image_is_refused_before_sampling_past_what_pil_opens(debug_run, tmp_path, capsys, monkeypatch):
    """`fm sample -n HUGE --out FILE.png` and `fm class-grid --samples-per-class HUGE` held every sample for one grid
    image and died of a raw allocation error. A grid PIL would refuse to open is now one line (exit 2) before any work.
    The reference is PIL itself: at the largest count allowed the written grid opens without a decompression-bomb error."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1444 // 2)  # 16x16 samples: 2 a row, 2 rows is (2*18+2)^2 = 1444
    code, err = _fm(capsys, "sample", "--ckpt", debug_run, "-n", "4", "--steps", "1", "--device", "cpu", "--out", tmp_path / "ok.png")
    assert code == 0, err
    with Image.open(tmp_path / "ok.png") as img:  # raises DecompressionBombError past 2 * MAX_IMAGE_PIXELS
        assert img.size == (38, 38)
    for args in (["sample", "-n", "5", "--out", tmp_path / "big.png"], ["sample", "-n", "10", "--grid", "5", "--out", tmp_path / "dir"],
                 ["class-grid", "--samples-per-class", "1000000000", "--out", tmp_path / "cg.png"]):
        code, err = _fm(capsys, *args, "--ckpt", debug_run, "--steps", "1", "--device", "cpu")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "more than PIL opens" in err, (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.png"]


def test_sampling_into_a_folder_does_not_name_every_sample_before_it_starts(tmp_path):
    """`fm sample -n 1000000000 --out DIR` built the paths of all n files (and a list of all n indices) before its first
    batch: a MemoryError or the OS's kill. The check now reads the folder: the same files as naming every sample
    and keeping those that exist (brute force, small n), in memory that does not grow with n."""
    import tracemalloc

    from fmcli.distributed import DistContext, shard_indices
    from fmcli.generate import sample_outputs
    from fmcli.images import sample_file

    out = tmp_path / "dir"
    out.mkdir()
    for name in ("000002.png", "000999.png", "1234567.png", "0000003.png", "notes.txt", "grid-old.png"):
        (out / name).write_text("x")
    for n in (1, 3, 1000, 2000):
        brute = [sample_file(out, i) for i in range(n) if sample_file(out, i).exists()]
        assert sample_outputs(out, n)[2:] == brute, n
    assert [p.name for p in sample_outputs(out, 10**9)[2:]] == ["000002.png", "000999.png", "1234567.png"]
    tracemalloc.start()
    sample_outputs(out, 10**6)
    indices = shard_indices(10**9, DistContext())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1_000_000 and len(indices) == 10**9 and indices[-1] == 10**9 - 1, peak


def test_env_width_has_a_maximum(capsys):
    """`fm env --width 1000000` asked the probe for a [1000000, 4000000] GEMM weight (16 TB): a raw allocation error.
    Widths past 8192 (every DiT is below 4096) are a usage line now, before any probe."""
    code, err = _fm(capsys, "env", "--width", "1000000")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "8192" in err, err
