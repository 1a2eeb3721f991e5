"""`fm export`: the diffusers DiT reproduces fm's velocity, the README snippet samples like fm, bad input refused."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from conftest import fm_in_process
from fmcli.checkpoint import save_atomic
from fmcli.config import config_to_dict, load_config, overrides_with
from fmcli.errors import UsageError
from fmcli.export import export_checkpoint, load_export
from fmcli.generate import initial_noise, load_for_sampling, sample_batch
from fmcli.models import build_model

NUM_CLASSES = 5


def make_checkpoint(path, overrides=(), seed=0):
    """A checkpoint of a tiny model whose every weight is random: adaLN-Zero's zero init would hide mapping errors."""
    cfg = load_config("debug", overrides_with(["model.image_size=16", "model.in_channels=3", f"model.num_classes={NUM_CLASSES}"], list(overrides)))
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / max(1, p.shape[-1] if p.dim() > 1 else 1) ** 0.5)
    sd = model.state_dict()
    info = {"kind": "pixels", "shape": [3, 16, 16], "num_classes": NUM_CLASSES, "class_names": None}
    save_atomic({"model": sd, "ema": sd, "config": config_to_dict(cfg), "step": 7, "data_info": info}, path)
    return model.eval(), cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model, cfg = make_checkpoint(root / "step.pt")
    export_checkpoint(root / "step.pt", root / "dit", "diffusers")
    return model, cfg, root / "dit"


def test_diffusers_dit_gives_fms_velocity_for_every_time_label_and_the_null_class(exported, monkeypatch):
    from diffusers import DiTTransformer2DModel

    from fmcli.models.diffusers_dit import use_fm_time_frequencies

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fm, _, out = exported
    theirs = DiTTransformer2DModel.from_pretrained(str(out)).eval()  # a stock load: all keys present, none extra
    stock = torch.Generator().manual_seed(1)
    x = torch.randn(2 * (NUM_CLASSES + 1), 3, 16, 16, generator=stock)
    labels = torch.arange(NUM_CLASSES + 1).repeat(2)  # every class and the null class (index NUM_CLASSES)
    with torch.no_grad():
        plain = -theirs(x, timestep=1000 * torch.full((len(x),), 0.7), class_labels=labels).sample
        use_fm_time_frequencies(theirs)
        for t in (0.0, 0.013, 0.25, 0.5, 0.7, 0.999, 1.0):
            tb = torch.full((len(x),), t)
            ours = fm(x, tb, labels)
            # diffusers' convention: output d x / d sigma = -(d x / d t); fm's time as timestep = 1000 t.
            v = -theirs(x, timestep=1000 * tb, class_labels=labels).sample
            assert (v - ours).abs().max().item() <= 1e-5, t
        mixed_t = torch.rand(len(x), generator=stock)
        assert (-theirs(x, timestep=1000 * mixed_t, class_labels=labels).sample - fm(x, mixed_t, labels)).abs().max() <= 1e-5
    # Without the frequency fix the model loads but computes something else: why the README has that line.
    assert (plain - fm(x, torch.full((len(x),), 0.7), labels)).abs().max() > 1e-2


def test_export_round_trips_into_fm_bit_for_bit(exported, tmp_path):
    fm, cfg, out = exported
    state = load_export(out)
    for k, v in fm.state_dict().items():
        assert torch.equal(state["ema"][k], v), k
    loaded = load_for_sampling(str(out), torch.device("cpu"))
    assert loaded.step == 7 and loaded.num_classes == NUM_CLASSES
    # The fm format too, for any model: here a U-Net, which has no diffusers DiT form.
    _, _ = make_checkpoint(tmp_path / "unet.pt", ["model.arch='unet'", "model.hidden_size=16", "model.channel_mult=[1, 2]", "model.layers_per_block=1"])
    export_checkpoint(tmp_path / "unet.pt", tmp_path / "unet", "fm")
    ref = torch.load(tmp_path / "unet.pt", weights_only=True)["ema"]
    got = load_for_sampling(str(tmp_path / "unet"), torch.device("cpu")).model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in ref.items())
    assert not list(tmp_path.glob("*.pt.tmp*")) and not any(p.suffix == ".pkl" for p in (tmp_path / "unet").iterdir())


def _run_readme_snippet(out) -> dict:
    """Run the python block of an export's README with DIR pointing at `out`; its variables."""
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    code = re.sub(r'^DIR, (.*?) = "[^"]*", ', lambda m: f'DIR, {m.group(1)} = {str(out)!r}, ', code, flags=re.M)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def test_readme_snippet_samples_what_fm_samples(exported, monkeypatch):
    """Run the exported README's code (diffusers model + FlowMatchEulerDiscreteScheduler) against fm's sampler."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fm, cfg, out = exported
    scope = _run_readme_snippet(out)
    n = scope["n"]
    x0 = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % NUM_CLASSES
    expected = sample_batch(fm, x0, labels, cfg.sample).x  # Euler, cfg.sample.steps steps, CFG weight cfg.sample.cfg
    assert scope["STEPS"] == cfg.sample.steps and scope["CFG"] == cfg.sample.cfg
    np.testing.assert_allclose(scope["x"].numpy(), expected.numpy(), atol=1e-4)


def test_readme_snippet_follows_the_guidance_interval_and_shift(tmp_path, monkeypatch):
    """The quickstart's default guides only on t in [0.3, 1] (and shifts its grid): the snippet must do the same,
    or the exported model samples other images than `fm sample --ckpt EXPORT` does with the same settings."""
    from fmcli.config import with_sampling_shift

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fm, cfg = make_checkpoint(tmp_path / "step.pt", ["sample.guidance_interval=[0.3, 1.0]", "flow.shift=2.0", "sample.steps=10"])
    export_checkpoint(tmp_path / "step.pt", tmp_path / "dit", "diffusers")
    out = tmp_path / "dit"
    scope = _run_readme_snippet(out)
    n = scope["n"]
    x0 = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sample_cfg = with_sampling_shift(cfg).sample
    expected = sample_batch(fm, x0, torch.arange(n) % NUM_CLASSES, sample_cfg).x
    unguided_early = sample_batch(fm, x0, torch.arange(n) % NUM_CLASSES, sample_cfg.model_copy(update={"guidance_interval": None})).x
    assert (expected - unguided_early).abs().max() > 1e-2  # the interval matters for this model
    np.testing.assert_allclose(scope["x"].numpy(), expected.numpy(), atol=1e-4)


def test_readme_snippet_of_a_latent_model_decodes_its_latents_to_images(tmp_path, monkeypatch):
    """An unconditional latent DiT's README ended with `images = (x.clamp(-1, 1) + 1) / 2`: 4-channel latents, not
    images, and "decode with the VAE" without the VAE's factors. The snippet must decode x through the run's VAE as
    z / scaling_factor + shift_factor (this VAE: 0.5 and 0.1, written out by hand below)."""
    from diffusers import AutoencoderKL

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
                  scaling_factor=0.5, shift_factor=0.1).save_pretrained(tmp_path / "vae")  # fmt: skip
    fm, cfg = make_checkpoint(tmp_path / "step.pt", ["model.in_channels=4", "model.image_size=8", "model.num_classes=0", "sample.steps=4"])
    state = torch.load(tmp_path / "step.pt", weights_only=True)
    # The dataset recorded the VAE where it was encoded; the run's config names where it is now (a resume's
    # --set encoders.vae), which `fm sample` uses and so must the snippet.
    vae_info = {"path": str(tmp_path / "moved-away"), "scaling_factor": 0.5, "shift_factor": 0.1, "latent_channels": 4, "downsample": 2}
    state["data_info"] = {"kind": "latents", "shape": [4, 8, 8], "num_classes": 0, "class_names": None, "image_size": 16, "vae": vae_info}
    state["config"]["encoders"]["vae"] = str(tmp_path / "vae")
    save_atomic(state, tmp_path / "step.pt")
    export_checkpoint(tmp_path / "step.pt", tmp_path / "dit", "diffusers")
    readme = (tmp_path / "dit" / "README.md").read_text()
    assert readme.startswith("# ") and "Unconditional rectified-flow model" in readme
    scope = _run_readme_snippet(tmp_path / "dit")
    n = scope["n"]
    z = sample_batch(fm, torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(0)), None, cfg.sample).x
    np.testing.assert_allclose(scope["x"].numpy(), z.numpy(), atol=1e-4)  # the latents fm samples
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    with torch.no_grad():
        expected = (vae.decode(z / 0.5 + 0.1).sample.clamp(-1, 1) + 1) / 2
    assert tuple(scope["images"].shape) == (n, 3, 16, 16)
    np.testing.assert_allclose(scope["images"].numpy(), expected.numpy(), atol=1e-4)


def test_fm_sample_accepts_an_export_directory(exported, tmp_path):
    from fmcli.images import save_grid

    fm, cfg, out = exported
    res = fm_in_process("sample", "--ckpt", out, "-n", "4", "--steps", "3", "--out", tmp_path / "grid.png", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    x0 = initial_noise(0, range(4), (3, 16, 16))
    x = sample_batch(fm, x0, torch.arange(4) % NUM_CLASSES, cfg.sample.model_copy(update={"steps": 3})).x
    assert (tmp_path / "grid.png").read_bytes() == save_grid(x, tmp_path / "expected.png").read_bytes()


@pytest.mark.parametrize("overrides", [["model.arch='unet'", "model.hidden_size=16", "model.channel_mult=[1, 2]", "model.layers_per_block=1"], ["model.mlp_ratio=2.0"]])
def test_unsupported_model_for_diffusers_is_one_line_and_writes_nothing(tmp_path, overrides):
    make_checkpoint(tmp_path / "step.pt", overrides)
    res = fm_in_process("export", "--ckpt", tmp_path / "step.pt", "--format", "diffusers", "--out", tmp_path / "out")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "--format fm" in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step.pt"]


def test_existing_out_needs_force(tmp_path):
    make_checkpoint(tmp_path / "step.pt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    res = fm_in_process("export", "--ckpt", tmp_path / "step.pt", "--out", tmp_path / "out")
    # not an export: refused, and --force (which refuses it too) is not the advice
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--force" not in res.stderr and "choose another --out" in res.stderr
    forced = fm_in_process("export", "--ckpt", tmp_path / "step.pt", "--out", tmp_path / "out", "--force")
    assert forced.returncode == 2 and "refusing" in forced.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "step.pt"]
    export_checkpoint(tmp_path / "step.pt", tmp_path / "new", "fm")
    with pytest.raises(UsageError, match="--force"):
        export_checkpoint(tmp_path / "step.pt", tmp_path / "new", "diffusers")
    export_checkpoint(tmp_path / "step.pt", tmp_path / "new", "diffusers", force=True)  # a previous export may be replaced
    assert (tmp_path / "new" / "diffusion_pytorch_model.safetensors").is_file() and (tmp_path / "new" / "scheduler" / "scheduler_config.json").is_file()
    assert not (tmp_path / "new" / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out", "step.pt"]  # no temporary directory left


def test_force_never_deletes_the_users_files_inside_an_export(tmp_path):
    """--force replaces an earlier export (either format over the other), not a file of the user's put inside it;
    `--out .` is the current folder by its name (it had no name to put a temporary sibling beside)."""
    make_checkpoint(tmp_path / "step.pt")
    export_checkpoint(tmp_path / "step.pt", tmp_path / "e", "diffusers")
    (tmp_path / "e" / "notes.txt").write_text("keep")
    with pytest.raises(UsageError, match="notes.txt"):
        export_checkpoint(tmp_path / "step.pt", tmp_path / "e", "fm", force=True)
    assert (tmp_path / "e" / "notes.txt").read_text() == "keep" and (tmp_path / "e" / "scheduler").is_dir()
    (tmp_path / "e" / "notes.txt").unlink()
    res = fm_in_process("export", "--ckpt", tmp_path / "step.pt", "--format", "fm", "--out", ".", "--force", cwd=tmp_path / "e")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["README.md", "fm_export.json", "model.safetensors"]


def test_out_under_a_file_is_refused_before_any_work(tmp_path, capsys):
    """--out whose folder is a file: exit 2 with one line, as every other output path (not exit 1 with a FileExistsError)."""
    from fmcli.cli import app

    make_checkpoint(tmp_path / "step.pt")
    (tmp_path / "afile").write_text("a file where the export's folder would go\n")
    with pytest.raises(SystemExit) as exit_info:
        app(args=["export", "--ckpt", str(tmp_path / "step.pt"), "--out", str(tmp_path / "afile" / "dit")], prog_name="fm")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "is a file, not a folder" in err
    assert (tmp_path / "afile").read_text() == "a file where the export's folder would go\n"


def test_weights_that_do_not_fit_their_config_are_refused_before_writing(tmp_path):
    """--format fm copied a damaged checkpoint's weights as they were, into an export that fm itself then refused;
    the checkpoint is now checked first (one line, exit 2) and nothing is written."""
    make_checkpoint(tmp_path / "step.pt")
    state = torch.load(tmp_path / "step.pt", weights_only=True)
    state["config"]["model"]["depth"] += 1  # the weights are a depth-2 model's
    save_atomic(state, tmp_path / "damaged.pt")
    res = fm_in_process("export", "--ckpt", tmp_path / "damaged.pt", "--format", "fm", "--out", tmp_path / "out")
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "damaged.pt is damaged" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["damaged.pt", "step.pt"]


def test_no_ema_on_an_export_loads_the_raw_weights_or_is_refused(tmp_path):
    """An export holds one set of weights: --no-ema on an export of the EMA would silently sample the EMA (refused,
    one line); on an export of the raw weights it samples them (checked against the checkpoint's raw model)."""
    model, cfg = make_checkpoint(tmp_path / "step.pt")
    state = torch.load(tmp_path / "step.pt", weights_only=True)
    raw = {k: v + 0.1 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["ema"].items()}
    save_atomic({**state, "model": raw}, tmp_path / "step.pt")  # the raw weights differ from the EMA's
    export_checkpoint(tmp_path / "step.pt", tmp_path / "ema", "fm")
    export_checkpoint(tmp_path / "step.pt", tmp_path / "raw", "fm", use_ema=False)
    refused = fm_in_process("sample", "--ckpt", tmp_path / "ema", "-n", "2", "--steps", "2", "--no-ema", "--out", tmp_path / "e.png")
    assert refused.returncode == 2 and "--no-ema" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "e.png").exists()
    ok = fm_in_process("sample", "--ckpt", tmp_path / "raw", "-n", "2", "--steps", "2", "--no-ema", "--out", tmp_path / "r.png", "--device", "cpu")
    assert ok.returncode == 0, ok.stderr
    model.load_state_dict(raw)
    x = sample_batch(model, initial_noise(0, range(2), (3, 16, 16)), torch.arange(2) % NUM_CLASSES, cfg.sample.model_copy(update={"steps": 2})).x
    from fmcli.images import save_grid

    assert (tmp_path / "r.png").read_bytes() == save_grid(x, tmp_path / "expected.png").read_bytes()


def test_an_export_says_which_weights_it_holds_whatever_flag_asked(tmp_path):
    """An export holds the one set it was made with: sampling it with the default --ema loads the raw set of a
    `fm export --no-ema`, so what runs (`LoadedModel.ema`, reflow's teacher record) must say raw, not what was asked."""
    from fmcli.generate import load_for_sampling

    make_checkpoint(tmp_path / "step.pt")
    export_checkpoint(tmp_path / "step.pt", tmp_path / "ema", "fm")
    export_checkpoint(tmp_path / "step.pt", tmp_path / "raw", "fm", use_ema=False)
    cpu = torch.device("cpu")
    assert load_for_sampling(str(tmp_path / "ema"), cpu).ema is True
    assert load_for_sampling(str(tmp_path / "raw"), cpu).ema is False and load_for_sampling(str(tmp_path / "raw"), cpu, use_ema=False).ema is False
    assert load_for_sampling(str(tmp_path / "step.pt"), cpu, use_ema=False).ema is False
    made = fm_in_process("reflow", "--ckpt", tmp_path / "raw", "-n", 2, "--steps", 2, "--out", tmp_path / "pairs", "--device", "cpu")
    assert made.returncode == 0, made.stderr
    assert json.loads((tmp_path / "pairs" / "manifest.json").read_text())["teacher"]["ema"] is False
