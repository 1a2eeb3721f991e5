"""Presets: shipped inside the package, `base = "NAME"` inheritance, the DiT size registry, the EMA-share check."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from conftest import REPO, fm_in_process
from fmcli.config import MODEL_SIZES, apply_overrides, config_to_dict, load_config, preset_names, presets_dir
from fmcli.errors import UsageError
from fmcli.optim import EMA_INITIAL_SHARE_LIMIT, ema_decay_at, ema_initial_share, ema_warning, update_ema

TEXT_VARIANTS = ("overfit", "hparam_tuning", "full_scale", "text-debug")
# The presets written for VAE latents (their comments prepare the data with --vae): the data decides the space, not the config.
LATENT_PRESETS = {"celebahq256", "stability", *TEXT_VARIANTS}


# --------------------------------------------------------------------------------------- package data


def _source_copy(dest: Path) -> Path:
    """The files a build reads, copied so that the build's build/ and egg-info stay out of the checkout."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fmcli", "presets"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _pip_install(src: Path, target: Path, *extra: str) -> None:
    pytest.importorskip("setuptools", reason="building without network needs setuptools in this environment")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(target), *extra, str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert done.returncode == 0, done.stderr


def _python(code: str, cwd: Path, env_extra: dict, *flags: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env_extra
    done = subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


_REPORT = """
import importlib.resources, json
import fmcli, fmcli.config as c
c.load_config('quickstart')
res = importlib.resources.files('fmcli.presets')
print(json.dumps({'fmcli': fmcli.__file__, 'dir': str(c.presets_dir().joinpath('quickstart.toml')),
                  'resources': sorted(e.name for e in res.iterdir() if e.name.endswith('.toml')),
                  'configs': {n: c.config_to_dict(c.load_config(n)) for n in c.preset_names()}}))
"""


def test_a_non_editable_install_ships_the_presets(tmp_path):
    src, target, elsewhere = _source_copy(tmp_path / "src"), tmp_path / "site", tmp_path / "elsewhere"
    _pip_install(src, target)
    elsewhere.mkdir()
    got = _python(_REPORT, elsewhere, {"PYTHONPATH": str(target)})
    assert Path(got["fmcli"]).is_relative_to(target)
    assert Path(got["dir"]).is_relative_to(target / "fmcli" / "presets")  # read through importlib.resources
    assert got["resources"] == sorted(f"{n}.toml" for n in preset_names())
    assert got["configs"] == {n: config_to_dict(load_config(n)) for n in preset_names()}
    # The package list in pyproject.toml is explicit: every module of the source tree must be in the install.
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "fmcli").rglob("*.py")}
    assert modules <= {p.relative_to(target).as_posix() for p in (target / "fmcli").rglob("*.py")}


def test_an_editable_install_finds_the_same_presets(tmp_path):
    src, target, elsewhere = _source_copy(tmp_path / "src"), tmp_path / "site", tmp_path / "elsewhere"
    _pip_install(src, target, "-e")
    elsewhere.mkdir()
    # -S: no site processing, so an editable fm already installed in this venv cannot answer `import fmcli`. The new
    # install's .pth runs first (its finder module has the same name as the venv's), then the venv's packages are
    # put on the path plainly, without running their .pth files.
    import site

    paths = [*site.getsitepackages(), site.getusersitepackages()]
    code = f"import sys, site; site.addsitedir({str(target)!r}); sys.path += {paths!r}\n" + _REPORT
    got = _python(code, elsewhere, {}, "-S")
    assert Path(got["fmcli"]).is_relative_to(src)
    assert Path(got["dir"]).is_relative_to(src / "presets")
    assert got["resources"] == sorted(f"{n}.toml" for n in preset_names())  # package-dir maps fmcli.presets here too
    assert got["configs"] == {n: config_to_dict(load_config(n)) for n in preset_names()}


# -------------------------------------------------------------------------------------------- base = NAME


def _own_keys(name: str) -> list[str]:
    """A shipped preset file's own settings (its base excluded) as `--set` items."""
    raw = tomllib.loads((presets_dir() / f"{name}.toml").read_text())
    raw.pop("base", None)
    items = []
    for section, table in raw.items():
        if isinstance(table, dict):
            items += [f"{section}.{key}={json.dumps(value)}" for key, value in table.items()]
        else:
            items.append(f"{section}={json.dumps(table)}")
    return items


@pytest.mark.parametrize("variant", TEXT_VARIANTS)
def test_text_variants_are_stability_plus_their_own_lines(variant):
    raw = tomllib.loads((presets_dir() / f"{variant}.toml").read_text())
    assert raw["base"] == "stability"
    assert set(raw) - {"base", "name"} <= {"train", "eval"}  # only run length, batch and cadence differ
    assert config_to_dict(load_config(variant)) == config_to_dict(load_config("stability", _own_keys(variant)))


def test_inheritance_chains_and_deep_merges(tmp_path):
    (tmp_path / "mid.toml").write_text('base = "stability"\nname = "mid"\n[train]\nlog_every = 7\n[sample]\ncfg = 2.5\n')
    (tmp_path / "sub" / "leaf.toml").parent.mkdir()
    (tmp_path / "sub" / "leaf.toml").write_text('base = "../mid.toml"\n[train]\nsteps = 123\n')
    leaf, stability = load_config(str(tmp_path / "sub" / "leaf.toml")), load_config("stability")
    assert (leaf.name, leaf.train.steps, leaf.train.log_every, leaf.sample.cfg) == ("mid", 123, 7, 2.5)
    # Everything the two files do not state is stability's, table by table (not replaced wholesale).
    assert leaf.train.global_batch_size == stability.train.global_batch_size and leaf.sample.steps == stability.sample.steps
    assert leaf.model == stability.model and leaf.optim == stability.optim


def test_inheritance_cycles_and_unknown_bases_are_clear_errors(tmp_path):
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    (tmp_path / "self.toml").write_text('base = "self.toml"\n')
    (tmp_path / "lost.toml").write_text('base = "nosuch"\n')
    (tmp_path / "typed.toml").write_text("base = 3\n")
    for name, needle in [("a", "cycle: .*a.toml -> .*b.toml -> .*a.toml"), ("self", "cycle"), ("lost", "base 'nosuch'.*unknown preset.*available: .*stability"), ("typed", "base must be")]:
        with pytest.raises(UsageError, match=needle):
            load_config(str(tmp_path / f"{name}.toml"))
    out = fm_in_process("train", "--preset", tmp_path / "a.toml", "--print-config")
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "cycle" in out.stderr


# --------------------------------------------------------------------------------------------- model sizes

# Published parameter counts, in millions, of the /2 models for 256x256 ImageNet (32x32x4 latents, 1000 classes):
# DiT (Peebles & Xie 2023) and SiT (Ma et al. 2024, table 1) report S 33M, B 130M, L 458M, XL 675M.
PAPER_PARAMS_M = {"DiT-S/2": 33, "DiT-B/2": 130, "DiT-L/2": 458, "DiT-XL/2": 675}


@pytest.mark.parametrize("size", sorted(PAPER_PARAMS_M))
def test_sizes_build_the_papers_models(size):
    from fmcli.models import build_model

    cfg = load_config("debug", [f"model.size={size}", "model.image_size=32", "model.in_channels=4", "model.num_classes=1000"])
    with torch.device("meta"):  # shapes only: no memory for the weights
        model = build_model(cfg.model)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == PAPER_PARAMS_M[size]


def test_size_names_and_overrides():
    assert {f"DiT-{f}/{p}" for f in ("S", "B", "L", "XL") for p in (2, 4, 8)} == set(MODEL_SIZES)
    xl = load_config("debug", ["model.size=DiT-XL/8"]).model
    assert (xl.hidden_size, xl.depth, xl.heads, xl.patch_size) == (1152, 28, 16, 8)
    # A field stated with the name overrides it (stability: DiT-B with patch 1 for 8x8 latents).
    stability = load_config("stability").model
    assert (stability.size, stability.hidden_size, stability.depth, stability.heads, stability.patch_size) == ("DiT-B/2", 768, 12, 12, 1)
    # A size given later (--set over a preset with explicit fields) takes all four fields, except those given with it.
    small = load_config("quickstart", ["model.size=DiT-S/4", "model.depth=2"]).model
    assert (small.hidden_size, small.depth, small.heads, small.patch_size) == (384, 2, 6, 4)
    again = apply_overrides(load_config("stability"), ["model.size=DiT-L/4"]).model
    assert (again.hidden_size, again.depth, again.heads, again.patch_size) == (1024, 24, 16, 4)
    # Presets whose model is a paper size use the name.
    assert load_config("cifar10").model.size == load_config("cifar10-otcfm").model.size == "DiT-B/2"


def test_unknown_size_lists_the_names():
    with pytest.raises(UsageError, match=r"model.size: .*unknown model size 'DiT-XXL/2'.*DiT-S/2.*DiT-XL/8"):
        load_config("debug", ["model.size=DiT-XXL/2"])
    with pytest.raises(UsageError, match="arch = 'dit'"):
        load_config("mnist-unet", ["model.size=DiT-S/2"])


# ------------------------------------------------------------------------------------------- EMA share


@pytest.mark.parametrize("steps, decay", [(1, 0.9), (50, 0.9), (200, 0.9), (1000, 0.99), (5000, 0.9999), (300, 0.99)])
def test_ema_initial_share_matches_the_closed_form(steps, decay):
    assert ema_initial_share(steps, decay, warmup=False) == pytest.approx(decay**steps, rel=1e-12)
    # With warmup the per-step decay is (1+s)/(10+s) until it reaches `decay`, at the first s >= (10d-1)/(1-d);
    # the product of (1+s)/(10+s) over s < k telescopes to k! 9! / (k+9)! = 1 / C(k+9, 9).
    k = min(steps, math.ceil((10 * decay - 1) / (1 - decay)))
    expected = decay ** (steps - k) / math.comb(k + 9, 9)
    assert ema_initial_share(steps, decay, warmup=True) == pytest.approx(expected, rel=1e-9)


def test_ema_initial_share_is_what_the_ema_update_leaves():
    """Run the real update: a model at 0 pulls an EMA that starts at 1; what remains is the initial share."""
    for warmup in (False, True):
        ema, model = torch.nn.Linear(1, 1, dtype=torch.float64), torch.nn.Linear(1, 1, dtype=torch.float64)
        with torch.no_grad():
            ema.weight.fill_(1.0), ema.bias.fill_(1.0), model.weight.zero_(), model.bias.zero_()
        for step in range(40):
            update_ema(ema, model, ema_decay_at(step, 0.95, warmup))
        assert ema.weight.item() == pytest.approx(ema_initial_share(40, 0.95, warmup), rel=1e-9)


def test_every_shipped_preset_passes_the_ema_check():
    for name in preset_names():
        train = load_config(name).train
        assert ema_warning(train) is None, name
        assert ema_initial_share(train.steps, train.ema_decay, train.ema_warmup) <= EMA_INITIAL_SHARE_LIMIT


def test_the_old_text_presets_fail_the_ema_check():
    # Before the fix: ema_decay 0.9999 without warmup; overfit's 5K steps leave 0.9999^5000 = 61% of the start.
    old = load_config("overfit", ["train.ema_warmup=false"]).train
    assert "61% the initial weights" in ema_warning(old) and "train.ema_warmup=true" in ema_warning(old)
    assert ema_warning(load_config("text-debug", ["train.ema_warmup=false"]).train) is not None
    # Started from another run's weights (a reflow student), the EMA is mostly that model, not an untrained one.
    student = ema_warning(load_config("overfit", ["train.ema_warmup=false", "train.init_from='runs/teacher'"]).train)
    assert "61% the initial weights" in student and "train.init_from's model (runs/teacher)" in student and "untrained" not in student


def test_fm_train_warns_once_about_an_initial_weight_ema(tmp_path, shapes16):
    """Through the CLI: one stderr line, the check's own text. (That shipped presets stay silent: test above.)"""
    sets = ["train.steps=2", "train.checkpoint_every=0", "train.ema_warmup=false", "sample.grid_size=2", "sample.steps=1"]
    out = fm_in_process("train", "--preset", "debug", "--data", shapes16, "--run-dir", tmp_path / "run", *[a for s in sets for a in ("--set", s)])
    assert out.returncode == 0, out.stderr
    expected = ema_warning(load_config("debug", sets).train)
    assert expected is not None and [line for line in out.stderr.splitlines() if "EMA" in line] == [expected]


# ------------------------------------------------------------------------------ settings a model refuses


def test_no_shipped_preset_schedules_what_its_own_model_refuses_or_ignores():
    """celebahq256 (latents) and stability with its variants (latents, text) set eval.every, which their models
    cannot run: every run printed "evaluation during training ... is not available". Nor may an unconditional
    preset ask for cfg/cfg-zero guidance, which `guidance_that_runs` turns off with a note."""
    from types import SimpleNamespace

    from fmcli.evaluate import training_eval_unavailable
    from fmcli.generate import guidance_that_runs

    for name in preset_names():
        text = (presets_dir() / f"{name}.toml").read_text()
        base = tomllib.loads(text).get("base")
        meant_for_latents = "--vae" in text + ((presets_dir() / f"{base}.toml").read_text() if base else "")
        assert meant_for_latents == (name in LATENT_PRESETS), name
        cfg = load_config(name)
        space = "latents" if name in LATENT_PRESETS else "pixels"
        assert cfg.eval.every == 0 or training_eval_unavailable(cfg, space) is None, (name, cfg.eval.every)
        notes = []
        classes = 10 if cfg.model.num_classes is None and not cfg.model.cross_attention else cfg.model.num_classes or 0  # shapes, mnist, cifar10
        loaded = SimpleNamespace(num_classes=classes, is_text=cfg.model.cross_attention, config=cfg)
        guidance_that_runs(loaded, cfg.sample, notes.append)
        assert notes == [], (name, notes)


def test_the_celebahq256_comment_states_its_parameter_count():
    from fmcli.models import build_model

    cfg = load_config("celebahq256", ["model.image_size=32", "model.in_channels=4"])  # 256px through an 8x VAE: 32x32x4
    count = sum(p.numel() for p in build_model(cfg.model).parameters())
    # By hand: 8 blocks x 4,726,272 (qkv, proj, MLP 4x, adaLN 6x) + patch embed 8,704 + time MLP 394,240
    # + final adaLN 525,312 and linear 8,208 + the 512-wide null condition = 38,747,152.
    assert count == 38_747_152
    assert f"about {count / 1e6:.1f}M parameters" in (presets_dir() / "celebahq256.toml").read_text()


def test_a_shipped_preset_copied_into_a_users_file_loads(tmp_path):
    """The usual way to start a custom preset is to copy a shipped one and edit it. A user's file is held to the rule
    that a setting the run never reads is refused (config.refuse_unread_settings), so a shipped preset must state
    none: its copy would be refused before the user changed a line."""
    from fmcli.config import load_config, preset_names, presets_dir

    for name in preset_names():
        copy = tmp_path / f"my-{name}.toml"
        shutil.copyfile(presets_dir() / f"{name}.toml", copy)
        assert load_config(str(copy)).model_dump() == load_config(name).model_dump() | {"name": load_config(str(copy)).name}, name
