"""Frozen encoders and the latent / text path, with tiny encoders built from configs (no downloads):
VAE scaling and shift against diffusers itself, the empty prompt as the unconditional branch, padding
masking, prepare-data --vae --text-encoder --cache-text, training and sampling from prompts on stdin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import QuietLog, fm_in_process
from fmcli.config import load_config, overrides_with
from fmcli.encoders import FrozenTextEncoder, FrozenVAE, TextConditioning, build_tiny_text_encoder
from fmcli.errors import UsageError
from fmcli.generate import sample_batch

WORDS = ["a", "an", "red", "blue", "green", "circle", "square", "star", "on", "black", "white", "background"]


def _save_tiny_vae(path, shift_factor):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
        scaling_factor=0.5, shift_factor=shift_factor,
    )
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return _save_tiny_vae(tmp_path_factory.mktemp("enc") / "vae", shift_factor=0.1)


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return build_tiny_text_encoder(tmp_path_factory.mktemp("enc") / "t5", seed=0, words=WORDS, d_model=32, layers=2, heads=4)


@pytest.mark.parametrize("shift", [0.1, None])
def test_vae_round_trip_matches_diffusers(tmp_path, shift):
    from diffusers import AutoencoderKL

    path = _save_tiny_vae(tmp_path / "vae", shift_factor=shift)
    vae = FrozenVAE(path)
    reference = AutoencoderKL.from_pretrained(path).eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = vae.encode(images)
    assert z.shape == (2, 4, 8, 8) and vae.latent_shape((3, 16, 16)) == (4, 8, 8)
    s = 0.0 if shift is None else shift
    with torch.no_grad():
        expected_z = (reference.encode(images).latent_dist.mean - s) * 0.5  # the posterior mean, not a sample
        expected_x = reference.decode(expected_z / 0.5 + s).sample.clamp(-1, 1)
    assert torch.allclose(z, expected_z, atol=1e-6)
    assert torch.allclose(vae.decode(z), expected_x, atol=1e-5)


def test_missing_encoder_paths_are_clear_usage_errors(tmp_path):
    with pytest.raises(UsageError, match=r"config\.json.*huggingface-cli download stabilityai/sd-vae-ft-mse"):
        FrozenVAE(tmp_path / "nowhere")
    (tmp_path / "t5").mkdir()
    with pytest.raises(UsageError, match=r"lacks config\.json.*huggingface-cli download google-t5/t5-small"):
        FrozenTextEncoder(tmp_path / "t5")


def test_padding_does_not_change_the_real_token_states(tiny_t5):
    short, long = FrozenTextEncoder(tiny_t5, max_tokens=8), FrozenTextEncoder(tiny_t5, max_tokens=16)
    prompts = ["a red circle", "a blue star on a white background", ""]
    s8, m8 = short.encode(prompts)
    s16, m16 = long.encode(prompts)
    assert s8.shape == (3, 8, 32) and m8.sum(1).tolist() == [4, 8, 1]  # words + </s>; the empty prompt keeps </s>
    assert torch.equal(m16[:, :8], m8) and not m16[:, 8:].any()
    assert torch.allclose(s16[:, :8], s8, atol=1e-5)
    assert (s8[0] - s8[1]).abs().max() > 1e-2  # different captions, different states


def test_empty_prompt_is_the_unconditional_branch(tiny_t5):
    encoder = FrozenTextEncoder(tiny_t5, max_tokens=8)
    text = TextConditioning.from_encoder(encoder)
    empty_states, empty_mask = encoder.encode([""])
    prompts = ["a red circle", "a blue square"]
    # Training: dropped rows get the empty prompt's states and mask, the others their caption's.
    got = text.for_batch({"caption": prompts}, torch.tensor([True, False]), "cpu")
    assert torch.equal(got["text"][0], empty_states[0]) and torch.equal(got["text_mask"][0], empty_mask[0])
    kept_states, kept_mask = encoder.encode(prompts[1:])
    assert torch.equal(got["text"][1], kept_states[0]) and torch.equal(got["text_mask"][1], kept_mask[0])
    # Sampling with CFG: the uncond half of the batched forward is the empty prompt's encoding.
    seen = []

    def model(x, t, text, text_mask):
        seen.append((text.clone(), text_mask.clone()))
        return torch.zeros_like(x)

    cfg = load_config("debug").sample.model_copy(update={"cfg": 3.0, "steps": 1})
    sample_batch(model, torch.zeros(2, 3, 4, 4), None, cfg, conditions=text.conditions(prompts, "cpu"))
    states, mask = seen[0]
    cond_states, cond_mask = encoder.encode(prompts)
    assert torch.equal(states[:2], cond_states) and torch.equal(mask[:2], cond_mask)
    assert torch.equal(states[2:], empty_states.expand(2, -1, -1)) and torch.equal(mask[2:], empty_mask.expand(2, -1))


def test_clip_text_encoder_works(tmp_path, tiny_t5):
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=len(WORDS) + 3, hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                            max_position_embeddings=12, pad_token_id=0, eos_token_id=1, bos_token_id=1)  # fmt: skip
    CLIPTextModel(config).save_pretrained(tmp_path / "clip")
    AutoTokenizer.from_pretrained(tiny_t5).save_pretrained(tmp_path / "clip")
    encoder = FrozenTextEncoder(tmp_path / "clip", max_tokens=128)
    assert encoder.model_type == "clip_text_model" and encoder.max_tokens == 12  # clamped to CLIP's positions
    states, mask = encoder.encode(["a red star", ""])
    assert states.shape == (2, 12, 24) and mask.sum(1).tolist() == [4, 1]


def test_builtin_tiny_encoder_is_seeded(tmp_path):
    a = build_tiny_text_encoder(tmp_path / "a", seed=0, words=WORDS, d_model=16, layers=1, heads=2)
    b = build_tiny_text_encoder(tmp_path / "b", seed=0, words=WORDS, d_model=16, layers=1, heads=2)
    sa, _ = FrozenTextEncoder(a, max_tokens=6).encode(["a green star"])
    sb, _ = FrozenTextEncoder(b, max_tokens=6).encode(["a green star"])
    assert torch.equal(sa, sb)



def test_building_the_tiny_encoder_again_never_moves_away_the_one_there(tmp_path):
    """DDP ranks that both find no built-in T5 both build it; the second build must leave the first directory in
    place (a rank may be loading it at that moment: it once vanished for an instant and failed that rank), and a
    partial directory (no weights) is still replaced."""
    path = build_tiny_text_encoder(tmp_path / "t5", seed=0, words=WORDS, d_model=16, layers=1, heads=2)
    inode = os.stat(path).st_ino
    build_tiny_text_encoder(path, seed=0, words=WORDS, d_model=16, layers=1, heads=2)
    assert os.stat(path).st_ino == inode  # the same directory, never renamed aside and replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t5"]  # no temporary directory left beside it
    FrozenTextEncoder(path, max_tokens=6).encode(["a green star"])
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    build_tiny_text_encoder(partial, seed=0, words=WORDS, d_model=16, layers=1, heads=2)
    assert (partial / "model.safetensors").is_file()


def test_the_tiny_encoder_built_on_a_nonzero_ddp_rank_has_its_weights(tmp_path, monkeypatch):
    """`fm train --preset quickstart-text --nproc 2` with an explicit precision: every rank builds the built-in T5.
    transformers' save_pretrained writes the weights and config.json on torch.distributed rank 0 only, so rank 1's
    build was a folder of tokenizer files and the run failed with 'lacks config.json, model.safetensors'."""
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: 1)
    path = build_tiny_text_encoder(tmp_path / "t5", seed=0, words=WORDS, d_model=16, layers=1, heads=2)
    monkeypatch.undo()
    assert {"config.json", "model.safetensors"} <= {p.name for p in path.iterdir()}
    reference = build_tiny_text_encoder(tmp_path / "rank0", seed=0, words=WORDS, d_model=16, layers=1, heads=2)
    a, _ = FrozenTextEncoder(path, max_tokens=6).encode(["a green star"])
    b, _ = FrozenTextEncoder(reference, max_tokens=6).encode(["a green star"])
    assert torch.equal(a, b)

TEXT_SETTINGS = [
    "--set", "model.hidden_size=32", "--set", "model.depth=1", "--set", "model.heads=2", "--set", "model.patch_size=2",
    "--set", "train.steps=2", "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=4",
    "--set", "train.precision=fp32", "--set", "train.log_every=1", "--set", "sample.grid_size=4", "--set", "sample.steps=2",
    "--set", "data.num_workers=0", "--set", "encoders.max_tokens=8", "--set", "sample.precision=fp32", "--set", "sample.compile=false",
]  # fmt: skip


def test_latent_text_pipeline_end_to_end(tmp_path, tiny_vae, tiny_t5):
    data = tmp_path / "latents"
    res = fm_in_process("prepare-data", "shapes", "--out", data, "--size", 16, "--count", 32, "--vae", tiny_vae,
                 "--text-encoder", tiny_t5, "--cache-text", "--max-tokens", 8, "--encode-batch-size", 10, "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["kind"] == "latents" and manifest["shape"] == [4, 8, 8] and manifest["dtype"] == "float16"
    assert manifest["vae"]["scaling_factor"] == 0.5 and manifest["vae"]["shift_factor"] == pytest.approx(0.1)
    assert manifest["text_encoder"]["cached"] and manifest["text_encoder"]["hidden_size"] == 32
    # The stored latents are the tiny VAE's encoding of the same shapes pixels.
    from fmcli.data.shapes import prepare_shapes

    pixels = np.load(prepare_shapes(tmp_path / "pixels", size=16, count=32, seed=0) / "x.npy")
    x = np.load(data / "x.npy")
    assert x.dtype == np.float16 and x.shape == (32, 4, 8, 8)
    expected = FrozenVAE(tiny_vae).encode(torch.from_numpy(pixels).float() / 127.5 - 1)
    assert np.allclose(x.astype(np.float32), expected.numpy(), atol=2e-3)
    captions = [json.loads(line)["caption"] for line in (data / "captions.jsonl").read_text().splitlines()]
    states, mask = np.load(data / "text.npy"), np.load(data / "text_mask.npy")
    ref_states, ref_mask = FrozenTextEncoder(tiny_t5, max_tokens=8).encode(captions)
    assert np.array_equal(mask, ref_mask.numpy()) and np.allclose(states.astype(np.float32), ref_states.numpy(), atol=2e-3)

    run_dir = tmp_path / "run"
    res = fm_in_process("train", "--preset", "text-debug", "--data", data, "--run-dir", run_dir, *TEXT_SETTINGS, "--set", f"encoders.vae={tiny_vae}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["text_dim"] == 32 and config["model"]["num_classes"] == 0
    assert config["encoders"]["text_encoder"] == str(tiny_t5)
    assert (run_dir / "samples" / "step-0000002.png").is_file()  # decoded through the VAE
    assert (run_dir / "samples" / "step-0000002.txt").read_text().splitlines() == captions[:4]

    out = tmp_path / "samples"
    res = fm_in_process("sample", "--ckpt", run_dir, "--prompts", "-", "--steps", 2, "--out", out, "--json", input="a red circle\n\na blue star on a white background\n", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["num_samples"] == 2 and len(summary["paths"]) == 2
    from PIL import Image

    assert Image.open(summary["paths"][0]).size == (16, 16)  # decoded images, not 8x8 latents

    from fmcli.generate import iterate_samples, load_for_sampling

    loaded = load_for_sampling(str(run_dir), torch.device("cpu"))
    with pytest.raises(UsageError, match="--prompt"):  # a text model needs prompts
        next(iterate_samples(loaded, [0], seed=0, sample_cfg=loaded.config.sample, batch_size=1, device=torch.device("cpu")))


def test_text_training_encodes_captions_on_the_fly(tmp_path, tiny_t5):
    from fmcli.config import apply_overrides
    from fmcli.data.shapes import prepare_shapes
    from fmcli.train import train

    data = prepare_shapes(tmp_path / "shapes", size=8, count=16, seed=0)
    settings = overrides_with([s for s in TEXT_SETTINGS if s != "--set"], [f"data.path={data}", f"encoders.text_encoder={tiny_t5}", "model.patch_size=4"])
    cfg = apply_overrides(load_config("quickstart-text"), settings)
    result = train(cfg, tmp_path / "run", log=QuietLog())
    assert result.step == 2 and all(np.isfinite(result.losses))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["text_dim"] == 32 and config["model"]["cross_attention"]


def test_text_states_beyond_float16_are_refused_not_cached_as_inf(tmp_path, tiny_t5, monkeypatch):
    # The text cache is float16: states beyond 65504 were stored as inf, and training on them gave NaN losses.
    from fmcli.data.latents import encode_prepared
    from fmcli.data.shapes import prepare_shapes
    from fmcli.encoders import FrozenTextEncoder
    from fmcli.errors import RuntimeFailure

    src = prepare_shapes(tmp_path / "shapes", size=8, count=6, seed=1)
    encode = FrozenTextEncoder.encode

    def loud(self, prompts):
        states, mask = encode(self, prompts)
        return states * 1e6, mask  # |states| ~ 1e5-1e6 > 65504: no float16 holds them

    monkeypatch.setattr(FrozenTextEncoder, "encode", loud)
    with pytest.raises(RuntimeFailure, match="beyond float16's 65504"):
        encode_prepared(src, tmp_path / "cached", text_encoder=tiny_t5, cache_text=True, max_tokens=8, batch_size=4)
    assert not (tmp_path / "cached").exists()  # no half-written dataset


def test_pixels_with_cached_text(tmp_path, tiny_t5):
    from fmcli.data.latents import encode_prepared
    from fmcli.data.dataset import PreparedDataset
    from fmcli.data.shapes import prepare_shapes

    src = prepare_shapes(tmp_path / "shapes", size=8, count=12, seed=1)
    out = encode_prepared(src, tmp_path / "cached", text_encoder=tiny_t5, cache_text=True, max_tokens=8, batch_size=5)
    assert np.array_equal(np.load(out / "x.npy"), np.load(src / "x.npy"))  # pixels copied exactly
    assert np.array_equal(np.load(out / "y.npy"), np.load(src / "y.npy"))
    ds = PreparedDataset(out, text=True)
    assert ds.manifest["kind"] == "pixels" and ds.has_cached_text
    batch = ds.__getitems__([3, 7])
    assert batch["text"].shape == (2, 8, 32) and batch["text_mask"].dtype == torch.bool and "caption" not in batch
    with pytest.raises(UsageError, match="--cache-text needs --text-encoder"):
        encode_prepared(src, tmp_path / "bad", cache_text=True)


def test_training_refuses_encoders_that_did_not_make_the_cached_latents_or_text(tmp_path, tiny_vae, tiny_t5, monkeypatch):
    """A latent / cached-text dataset trained with another VAE or text encoder (a flag, the config or FM_VAE /
    FM_TEXT_ENCODER win over the recorded path) would record encoders that cannot read its latents or states:
    the run's grids and `fm sample` would decode garbage or crash after training. Refused before training;
    the same weights moved elsewhere are accepted."""
    import shutil

    from fmcli.config import apply_overrides, resolve_for_training
    from fmcli.data.dataset import PreparedDataset
    from fmcli.data.latents import encode_prepared
    from fmcli.data.shapes import prepare_shapes

    src = prepare_shapes(tmp_path / "shapes", size=16, count=4, seed=0)
    data = encode_prepared(src, tmp_path / "latents", vae=tiny_vae, text_encoder=tiny_t5, cache_text=True, max_tokens=8)
    dataset = PreparedDataset(data, text=True)
    other_vae = _save_tiny_vae(tmp_path / "other-vae", shift_factor=None)  # shift 0 instead of 0.1
    wider_t5 = build_tiny_text_encoder(tmp_path / "t5-64", seed=0, words=WORDS, d_model=64, layers=1, heads=4)
    moved_vae, moved_t5 = shutil.copytree(tiny_vae, tmp_path / "moved-vae"), shutil.copytree(tiny_t5, tmp_path / "moved-t5")
    monkeypatch.delenv("FM_VAE", raising=False)
    monkeypatch.delenv("FM_TEXT_ENCODER", raising=False)

    def resolved(*settings):
        cfg = apply_overrides(load_config("text-debug"), [f"data.path={data}", *settings])
        return resolve_for_training(cfg, dataset, torch.device("cpu"))[1]

    assert resolved().encoders.vae == str(tiny_vae)  # the recorded encoders
    cfg = resolved(f"encoders.vae={moved_vae}", f"encoders.text_encoder={moved_t5}")
    assert cfg.encoders.vae == str(moved_vae) and cfg.model.text_dim == 32
    with pytest.raises(UsageError, match="shift_factor 0, but the dataset's latents were encoded with shift_factor 0.1"):
        resolved(f"encoders.vae={other_vae}")
    monkeypatch.setenv("FM_VAE", str(other_vae))
    with pytest.raises(UsageError, match="the VAE .* has shift_factor 0"):
        resolved()
    monkeypatch.delenv("FM_VAE")
    with pytest.raises(UsageError, match="width 64, but the dataset's cached text states come from a t5 of width 32"):
        resolved(f"encoders.text_encoder={wider_t5}")


@pytest.mark.parametrize("damage", ["no-empty-prompt", "short-mask", "float32-states"])
def test_damaged_text_cache_is_refused_before_training(tmp_path, tiny_t5, damage):
    """The four text-cache files must agree (text [N,L,D] float16, text_mask [N,L], text_empty [1,L,D],
    text_empty_mask [1,L]); a copy missing the empty prompt or with mismatched arrays failed inside training
    (FileNotFoundError, a tensor-size error). `validate_prepared` now refuses it: exit 2 before any work."""
    from fmcli.data.dataset import validate_prepared
    from fmcli.data.latents import encode_prepared
    from fmcli.data.shapes import prepare_shapes

    src = prepare_shapes(tmp_path / "shapes", size=8, count=4, seed=0)
    data = encode_prepared(src, tmp_path / "cached", text_encoder=tiny_t5, cache_text=True, max_tokens=8)
    validate_prepared(data)
    if damage == "no-empty-prompt":
        (data / "text_empty.npy").unlink()
        expected = "without text_empty.npy"
    elif damage == "short-mask":
        np.save(data / "text_mask.npy", np.load(data / "text_mask.npy")[:, :4])
        expected = "text_mask.npy holds an array of shape \\[4, 4\\]"
    else:
        np.save(data / "text.npy", np.load(data / "text.npy").astype(np.float32))
        expected = "text.npy holds float32 values, expected float16"
    with pytest.raises(UsageError, match=expected):
        validate_prepared(data)


def test_recorded_encoder_paths_work_from_another_directory(tmp_path, tiny_vae, tiny_t5, monkeypatch):
    """`fm prepare-data --vae weights/vae` recorded the path as typed, relative to where it ran: training the
    dataset from another directory ran all its steps, then failed at the first sample grid ("VAE not found"),
    and the run recorded the dead path for `fm sample`. The manifest now records absolute paths."""
    import shutil

    from fmcli.config import apply_overrides, resolve_for_training
    from fmcli.data.dataset import PreparedDataset
    from fmcli.data.latents import encode_prepared
    from fmcli.data.shapes import prepare_shapes

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_vae, work / "weights" / "vae")
    shutil.copytree(tiny_t5, work / "weights" / "t5")
    elsewhere.mkdir()
    monkeypatch.delenv("FM_VAE", raising=False)
    monkeypatch.delenv("FM_TEXT_ENCODER", raising=False)
    monkeypatch.chdir(work)
    src = prepare_shapes("shapes", size=16, count=4, seed=0)
    encode_prepared(src, "latents", vae="weights/vae", text_encoder="weights/t5", cache_text=True, max_tokens=8)
    monkeypatch.chdir(elsewhere)
    dataset = PreparedDataset(work / "latents", text=True)
    cfg = apply_overrides(load_config("text-debug"), [f"data.path={work / 'latents'}"])  # no encoders set: the recorded ones
    cfg = resolve_for_training(cfg, dataset, torch.device("cpu"))[1]
    assert (Path(cfg.encoders.vae) / "config.json").is_file() and Path(cfg.encoders.vae).samefile(work / "weights" / "vae")
    assert Path(cfg.encoders.text_encoder).samefile(work / "weights" / "t5")


def test_relative_encoder_paths_a_run_is_given_are_recorded_absolute(tmp_path, tiny_vae, tiny_t5, monkeypatch):
    """`--set encoders.vae=vae` (or a relative FM_VAE / FM_TEXT_ENCODER) was stored as typed in the run's config,
    so `fm sample` from another directory failed, and its message said to download a VAE. The run now records
    the absolute path of a relative one that exists; a missing one is kept as given; sampling's message names
    the command's VAE option (or FM_VAE) and the VAE the data was encoded with, not a download."""
    import shutil

    from fmcli.config import apply_overrides, resolve_for_training
    from fmcli.data.dataset import PreparedDataset
    from fmcli.data.latents import encode_prepared
    from fmcli.data.shapes import prepare_shapes
    from fmcli.generate import _sampling_encoders

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(tiny_vae, work / "vae")
    shutil.copytree(tiny_t5, work / "t5")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    data = encode_prepared(prepare_shapes("shapes", size=16, count=4, seed=0), "latents", vae=str(work / "vae"), text_encoder=str(work / "t5"),
                           cache_text=True, max_tokens=8)  # fmt: skip
    dataset = PreparedDataset(work / "latents", text=True)
    monkeypatch.setenv("FM_TEXT_ENCODER", "t5")  # relative, from the environment
    monkeypatch.delenv("FM_VAE", raising=False)
    cfg = apply_overrides(load_config("text-debug"), [f"data.path={data}", "encoders.vae=vae"])
    cfg = resolve_for_training(cfg, dataset, torch.device("cpu"))[1]
    assert cfg.encoders.vae == os.path.join(str(work), "vae") and cfg.encoders.text_encoder == os.path.join(str(work), "t5")
    gone = apply_overrides(load_config("text-debug"), [f"data.path={data}", "encoders.vae=no-such-vae"])
    assert resolve_for_training(gone, dataset, torch.device("cpu"))[1].encoders.vae == "no-such-vae"  # not there: kept as typed
    # A run that recorded a relative path, sampled from elsewhere: the message says how to point at the VAE.
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("FM_TEXT_ENCODER", raising=False)
    old = apply_overrides(load_config("debug"), ["encoders.vae=vae"])
    info = {"kind": "latents", "vae": {"path": str(work / "vae")}}
    for option, remedy in (("--vae", "pass --vae DIR or set FM_VAE"), (None, "set FM_VAE=DIR")):
        with pytest.raises(UsageError) as err:
            _sampling_encoders(old, info, torch.device("cpu"), None, None, vae_option=option)
        message = str(err.value)
        assert message.startswith("VAE not found: vae does not exist") and "huggingface-cli" not in message, message
        assert message.endswith(f"; {remedy} to the VAE the model was trained with (its data was encoded with {work / 'vae'})"), message


def test_force_over_a_users_folder_is_refused_before_the_pixel_pass(tmp_path, tiny_vae):
    """`fm prepare-data ... --vae DIR --out USER_FOLDER --force` refused the folder (not a prepared dataset)
    only when writing the latents, after the whole pixel pass and the VAE load; now before any work."""
    from fmcli.data.latents import prepare_encoded

    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    def pixel_pass(target):
        raise AssertionError(f"the pixel pass ran (into {target}) before the output was checked")

    with pytest.raises(UsageError, match="not a prepared dataset"):
        prepare_encoded(pixel_pass, user, force=True, vae=str(tiny_vae))
    assert (user / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_a_size_the_vae_cannot_downsample_is_refused_before_the_pixel_pass(tmp_path, tiny_vae, monkeypatch):
    """`fm prepare-data --vae --size S` with S not a multiple of the VAE's downsampling factor was refused only
    after the whole pixel pass (minutes on a real dataset); now before it, naming a size that works."""
    import fmcli.data.prepare as prepare_module

    def pixel_pass(*args, **kwargs):
        raise AssertionError("the pixel pass ran before the size was checked")

    monkeypatch.setattr(prepare_module, "prepare_with_progress", pixel_pass)
    common = dict(root=None, split="train", limit=None, workers=1, count=4, seed=0, max_member_mib=64.0, force=False, device="cpu")
    # The tiny VAE has 2 blocks: one 2x downsampling (2 ** (2 - 1)); 17 is odd.
    with pytest.raises(UsageError, match=r"^--size 17 is not divisible by the VAE's downsampling factor 2: use a multiple of 2 \(e.g. 16\)$"):
        prepare_module.prepare_dataset("shapes", tmp_path / "latents", size=17, encode={"vae": str(tiny_vae)}, **common)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    summary = prepare_module.prepare_dataset("shapes", tmp_path / "latents", size=16, encode={"vae": str(tiny_vae)}, **common)
    assert json.loads((Path(summary.path) / "manifest.json").read_text())["shape"] == [4, 8, 8]


def test_grayscale_data_with_an_rgb_vae_is_a_usage_error(tmp_path, tiny_vae):
    """A 1-channel source (mnist, sklearn-digits) encoded with an RGB VAE failed inside the VAE's first
    convolution (a RuntimeError, exit 1); now a one-line usage error (exit 2) naming the channels."""
    from fmcli.data.dataset import PreparedWriter
    from fmcli.data.latents import encode_prepared

    with PreparedWriter(tmp_path / "gray", 2, (1, 16, 16), labels=True) as w:
        for k in range(2):
            w.add(np.full((1, 16, 16), 40 * k, np.uint8), k)
        gray = w.finish(num_classes=2)
    with pytest.raises(UsageError, match="encodes 3-channel images, these have 1 channel"):
        encode_prepared(gray, tmp_path / "latents", vae=str(tiny_vae))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gray"]


def test_sampling_refuses_encoders_of_another_latent_space_or_width(tmp_path, tiny_vae, tiny_t5):
    """`fm sample/fid/eval --vae/--text-encoder` (or FM_VAE / FM_TEXT_ENCODER) win over the run's record; a VAE of
    another latent space decoded garbage and a wider text encoder crashed in the model's first text projection.
    Both are refused before any work; the recorded encoders and the same weights elsewhere are accepted."""
    import shutil

    from fmcli.config import apply_overrides
    from fmcli.generate import _sampling_encoders

    cfg = apply_overrides(load_config("text-debug"), [f"encoders.vae={tiny_vae}", f"encoders.text_encoder={tiny_t5}", "model.text_dim=32"])
    info = {"kind": "latents", "vae": FrozenVAE(tiny_vae, torch.device("cpu")).info(),
            "text_encoder": FrozenTextEncoder(tiny_t5, torch.device("cpu"), 8).info()}  # fmt: skip
    cpu = torch.device("cpu")
    assert set(_sampling_encoders(cfg, info, cpu, None, None)) == {"vae", "text"}
    moved = shutil.copytree(tiny_vae, tmp_path / "moved-vae")
    assert "vae" in _sampling_encoders(cfg, info, cpu, str(moved), None)
    other_vae = _save_tiny_vae(tmp_path / "other-vae", shift_factor=None)  # shift 0 instead of 0.1
    with pytest.raises(UsageError, match="shift_factor 0, but the model was trained on latents of shift_factor 0.1.*set --vae"):
        _sampling_encoders(cfg, info, cpu, str(other_vae), None)
    wider_t5 = build_tiny_text_encoder(tmp_path / "t5-64", seed=0, words=WORDS, d_model=64, layers=1, heads=4)
    with pytest.raises(UsageError, match="width 64, but the model was trained on text states of a t5 of width 32"):
        _sampling_encoders(cfg, info, cpu, None, str(wider_t5))


def test_an_encoder_given_to_a_model_that_uses_none_is_refused_not_ignored(tmp_path, tiny_vae, tiny_t5):
    """`fm sample/demo --vae` on a pixel-space model, and `--text-encoder` on a model without text, were silently
    ignored (while --prompt on such a model is refused): each is now a one-line usage error naming the option."""
    from fmcli.config import apply_overrides
    from fmcli.generate import _sampling_encoders

    cpu, pixels = torch.device("cpu"), load_config("debug")
    assert _sampling_encoders(pixels, {"kind": "pixels"}, cpu, None, None) == {}
    with pytest.raises(UsageError, match=f"^--vae given but this model samples pixels, not VAE latents: remove --vae {tiny_vae}$"):
        _sampling_encoders(pixels, {"kind": "pixels"}, cpu, str(tiny_vae), None, vae_option="--vae")
    with pytest.raises(UsageError, match="^--text-encoder given but this model is not text-conditioned"):
        _sampling_encoders(pixels, {"kind": "pixels"}, cpu, None, str(tiny_t5))
    latent = apply_overrides(load_config("debug"), [f"encoders.vae={tiny_vae}"])  # a latent model without text: --vae is used
    assert set(_sampling_encoders(latent, {"kind": "latents"}, cpu, str(tiny_vae), None)) == {"vae"}
    with pytest.raises(UsageError, match="^--text-encoder given but this model is not text-conditioned"):
        _sampling_encoders(latent, {"kind": "latents"}, cpu, str(tiny_vae), str(tiny_t5))


def test_latent_training_without_its_vae_skips_the_grid_instead_of_failing_the_run(tmp_path, tiny_vae, monkeypatch):
    """Training on latents needs no VAE (only the sample grids decode), so one that is not there is not checked
    at setup; but a recorded VAE that had moved failed the run at its first sample grid (exit 2 after the
    steps, and mid-run at `train.sample_every`). The grid is now skipped with a note, as without any VAE, and
    the run ends normally with its checkpoint."""
    import shutil

    from fmcli.config import apply_overrides
    from fmcli.data.latents import encode_prepared
    from fmcli.data.shapes import prepare_shapes
    from fmcli.train import train

    monkeypatch.delenv("FM_VAE", raising=False)
    moved = shutil.copytree(tiny_vae, tmp_path / "vae")
    src = prepare_shapes(tmp_path / "shapes", size=16, count=8, seed=0)
    data = encode_prepared(src, tmp_path / "latents", vae=str(moved))
    shutil.rmtree(moved)  # the VAE the dataset records is gone
    notes = []

    class Log(QuietLog):
        def info(self, message):
            notes.append(message)

    settings = ["model.hidden_size=32", "model.depth=1", "model.heads=2", "train.steps=2", "train.global_batch_size=4", "train.precision=fp32",
                "train.sample_every=1", "sample.grid_size=2", "sample.steps=1", f"data.path={data}", "train.budget_minutes=null", "eval.every=0"]  # fmt: skip
    result = train(apply_overrides(load_config("debug"), settings), tmp_path / "run", log=Log())
    assert result.step == 2 and (tmp_path / "run" / "checkpoints" / "step-0000002.pt").is_file()
    assert not list((tmp_path / "run").glob("samples/*.png"))
    assert any("sample grid skipped" in n and str(moved) in n for n in notes), notes
    # The note's remedy is one `fm train` / `fm resume` take: not `--vae` (fm train has none) or FM_VAE alone
    # (a resumed run's recorded path comes first; the README's `fm resume runs/x` with FM_VAE set kept skipping).
    note = next(n for n in notes if "sample grid skipped" in n)
    assert note == (f"sample grid skipped: VAE not found: {moved} does not exist (expected a local directory with config.json, "
                    "diffusion_pytorch_model.safetensors); to draw the grids, give the VAE with --set encoders.vae=PATH "
                    "(FM_VAE is read by a fresh run only)"), note


def test_a_missing_or_broken_vae_says_what_to_do_as_its_caller_asks(tmp_path):
    """The VAE check's remedy: by default download one, then --vae or FM_VAE (fm sample, fm prepare-data); a caller
    with another remedy (fm train's skipped grid: --set encoders.vae) passes it, and it replaces the default
    whole (train.py cut the default at "; get one with" before: two modules coupled through one phrase)."""
    missing = tmp_path / "no-vae"
    problem = f"VAE not found: {missing} does not exist (expected a local directory with config.json, diffusion_pytorch_model.safetensors)"
    with pytest.raises(UsageError) as err:
        FrozenVAE(missing)
    assert str(err.value) == (f"{problem}; get one with `huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir {missing}` "
                              f"and pass --vae {missing} or set FM_VAE")
    with pytest.raises(UsageError) as err:
        FrozenVAE(missing, remedy="do this instead")
    assert str(err.value) == f"{problem}; do this instead"
    broken = tmp_path / "broken-vae"  # the files are there, but do not load
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    (broken / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    for remedy, tail in ((None, ""), ("do this instead", "; do this instead")):
        with pytest.raises(UsageError) as err:
            FrozenVAE(broken, remedy=remedy)
        message = str(err.value)
        assert message.startswith(f"could not load the VAE from {broken}: ") and message.endswith(tail) and "\n" not in message, message
        assert remedy is not None or "do this instead" not in message


def test_fid_of_a_text_model_is_refused_before_the_reference_pass(tmp_path, tiny_t5):
    """`fm fid --ckpt` of a text-to-image model computed the reference's features (minutes for a large dataset) and
    then failed with "give --prompt TEXT", a flag fm fid does not have. It is now refused right after the checkpoint
    loads, pointing to `fm sample --prompts` and `fm fid --gen`."""
    from conftest import fm_in_process
    from fmcli.config import apply_overrides
    from fmcli.data.shapes import prepare_shapes
    from fmcli.train import train

    data = prepare_shapes(tmp_path / "shapes", size=8, count=8, seed=0)
    settings = overrides_with([s for s in TEXT_SETTINGS if s != "--set"], [f"data.path={data}", f"encoders.text_encoder={tiny_t5}", "model.patch_size=4",
                                                             "train.steps=1", "train.sample_every=0", "sample.grid_size=1"])  # fmt: skip
    train(apply_overrides(load_config("quickstart-text"), settings), tmp_path / "run", log=QuietLog())
    res = fm_in_process("fid", "--ckpt", str(tmp_path / "run"), "--ref", str(data), "-n", "4", "--features", "tiny", "--steps", "1")
    assert res.returncode == 2, res.stderr
    assert "fm sample --ckpt CKPT --prompts FILE" in res.stderr and "--gen DIR" in res.stderr
    assert "features of" not in res.stderr  # no reference pass before the refusal



def test_eval_of_a_folder_against_a_latent_dataset_says_latents_not_a_wrong_image_size(tmp_path, tiny_vae):
    """`fm eval --gen DIR --data LATENTS` (the README: score a text or latent model's `fm sample` folder) said
    "000000.png is 16x16 but the dataset's images are 8x8": the 8x8 was the latents' size, and a user resizing
    their samples to it only met the latent refusal next. The latent dataset is now refused as such."""
    from PIL import Image

    from conftest import fm_in_process

    data = tmp_path / "latents"
    res = fm_in_process("prepare-data", "shapes", "--out", data, "--size", 16, "--count", 12, "--vae", tiny_vae)
    assert res.returncode == 0, res.stderr
    gen = tmp_path / "gen"
    gen.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(gen / f"{i:06d}.png")  # the dataset's image size, 16x16
    res = fm_in_process("eval", "--gen", str(gen), "--data", str(data))
    assert res.returncode == 2, res.stderr
    assert "holds latents, not pixels" in res.stderr and "8x8" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_eval_every_on_a_text_model_points_to_what_scores_it_not_to_refused_settings(tmp_path, tiny_t5):
    """text-debug / stability schedule eval.every: the note suggested eval.ref or eval.features=domain, which a text
    model then refused, and that refusal said "use `fm fid --ckpt` after training", which refuses text models too
    (README, fm fid). Both now name what works: `fm sample --prompts FILE --out DIR`, scored with `fm fid --gen DIR`."""
    from fmcli.config import apply_overrides
    from fmcli.data.shapes import prepare_shapes
    from fmcli.train import train

    class Recording(QuietLog):
        def __init__(self):
            self.lines = []

        def info(self, message):
            self.lines.append(message)

    data = prepare_shapes(tmp_path / "shapes", size=8, count=8, seed=0)
    settings = overrides_with([s for s in TEXT_SETTINGS if s != "--set"], [f"data.path={data}", f"encoders.text_encoder={tiny_t5}", "model.patch_size=4",
                                                             "train.steps=1", "train.sample_every=0", "sample.grid_size=1", "eval.every=1"])  # fmt: skip
    log = Recording()
    train(apply_overrides(load_config("quickstart-text"), settings), tmp_path / "run", log=log)
    note = [line for line in log.lines if "eval.every=1" in line]
    assert len(note) == 1 and "--prompts FILE" in note[0] and "fm fid --gen DIR" in note[0] and "eval.features=domain" not in note[0]
    with pytest.raises(UsageError) as refused:
        train(apply_overrides(load_config("quickstart-text"), settings + ["eval.features=domain"]), tmp_path / "run2", log=QuietLog())
    assert "fm fid --gen DIR" in str(refused.value) and "fm fid --ckpt" not in str(refused.value)

def test_fm_export_readme_of_a_text_model_samples_as_written(tmp_path, tiny_t5, monkeypatch):
    """The README of `fm export --format fm` told every model to `fm sample --ckpt DIR --num-samples 16 --out
    samples/`, which a text-to-image model refuses (exit 2: it needs --prompt). A text model's README now gives a
    prompt; the command as written runs."""
    import shlex

    from conftest import fm_in_process
    from fmcli.config import apply_overrides
    from fmcli.data.shapes import prepare_shapes
    from fmcli.export import export_checkpoint
    from fmcli.train import train

    data = prepare_shapes(tmp_path / "shapes", size=8, count=8, seed=0)
    settings = overrides_with([s for s in TEXT_SETTINGS if s != "--set"], [f"data.path={data}", f"encoders.text_encoder={tiny_t5}", "model.patch_size=4",
                                                             "train.steps=1", "train.sample_every=0", "sample.grid_size=1", "sample.steps=1"])  # fmt: skip
    train(apply_overrides(load_config("quickstart-text"), settings), tmp_path / "run", log=QuietLog())
    export_checkpoint(tmp_path / "run", tmp_path / "exported", "fm")
    lines = [line.strip() for line in (tmp_path / "exported" / "README.md").read_text().splitlines() if line.strip().startswith("fm sample")]
    assert len(lines) == 1
    monkeypatch.chdir(tmp_path)  # the README names the export by its folder name
    res = fm_in_process(*shlex.split(lines[0])[1:])
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "samples").glob("0*.png"))) == 16


def test_a_text_encoder_of_another_architecture_is_a_usage_error_before_any_work(tmp_path, tiny_t5):
    """fm loads T5 (T5EncoderModel) and CLIP text encoders. A directory of another kind (a BERT, say) was loaded as
    a T5 and failed inside transformers (`fm prepare-data --text-encoder`: exit 1, "RuntimeError: You set
    `ignore_mismatched_sizes` to `False`", after the whole pixel pass). It is now a one-line usage error naming the
    kind, before the pixel pass."""
    import shutil

    from fmcli.data.latents import prepare_encoded

    bert = shutil.copytree(tiny_t5, tmp_path / "bert")
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 20, "hidden_size": 16, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 32}))  # fmt: skip
    with pytest.raises(UsageError, match="is a bert.*T5 or CLIP"):
        FrozenTextEncoder(bert, max_tokens=8)

    def pixel_pass(target):
        raise AssertionError(f"the pixel pass ran (into {target}) before the text encoder was checked")

    with pytest.raises(UsageError, match="is a bert.*T5 or CLIP"):
        prepare_encoded(pixel_pass, tmp_path / "out", text_encoder=str(bert), cache_text=True)


@pytest.mark.parametrize("source", ["folder", "cifar10", "mnist", "sklearn-digits"])
def test_a_text_encoder_for_a_source_without_captions_is_refused_before_the_pixel_pass(tmp_path, tiny_t5, monkeypatch, source):
    """These sources never carry captions: the refusal came only after their whole pixel pass."""

    def pixel_pass(*args, **kwargs):
        raise AssertionError("the pixel pass ran before the source was checked for captions")

    monkeypatch.setattr("fmcli.data.prepare.prepare_with_progress", pixel_pass)
    (tmp_path / "root").mkdir()
    root = [] if source == "sklearn-digits" else ["--root", tmp_path / "root"]  # scikit-learn ships the digits: --root is refused there
    res = fm_in_process("prepare-data", source, *root, "--out", tmp_path / "o", "--text-encoder", tiny_t5, "--cache-text")
    assert res.returncode == 2 and f"the {source} source has no captions" in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_encoder_weights_that_do_not_fit_their_config_are_a_one_line_usage_error(tmp_path, tiny_vae, tiny_t5):
    """A VAE or text-encoder directory whose weights do not fit its config.json (a config edited or copied from
    another model) failed with transformers' / diffusers' RuntimeError: exit 1 and a message of one line per
    mismatched tensor (~90 lines for the tiny VAE). It is now the one-line "could not load" usage error (exit 2)."""
    import shutil

    vae = shutil.copytree(tiny_vae, tmp_path / "vae")
    config = json.loads((vae / "config.json").read_text())
    (vae / "config.json").write_text(json.dumps({**config, "block_out_channels": [8, 32]}))
    with pytest.raises(UsageError, match="could not load the VAE") as err:
        FrozenVAE(vae)
    assert "\n" not in str(err.value)
    t5 = shutil.copytree(tiny_t5, tmp_path / "t5")
    config = json.loads((t5 / "config.json").read_text())
    (t5 / "config.json").write_text(json.dumps({**config, "d_ff": 2 * config["d_ff"]}))
    with pytest.raises(UsageError, match="could not load the text encoder") as err:
        FrozenTextEncoder(t5, max_tokens=8)
    assert "\n" not in str(err.value)


def _diffusers_latents(vae_dir, images: torch.Tensor, shift: float = 0.1, scale: float = 0.5) -> np.ndarray:
    """The reference latents, computed with diffusers directly: (posterior mean - shift) * scale."""
    from diffusers import AutoencoderKL

    with torch.no_grad():
        return ((AutoencoderKL.from_pretrained(vae_dir).eval().encode(images).latent_dist.mean - shift) * scale).numpy()


def test_flip_on_latents_trains_on_the_mirrored_images_own_latents(tmp_path, tiny_vae):
    """data.flip flipped the cached latents, which is not the latent of the flipped image (a VAE is not
    flip-equivariant: 59% off for this tiny one). `prepare-data --vae --flip` now also stores enc(flip(x)) and a
    flipped row trains on it; checked against diffusers' encoding of the mirrored pixels."""
    from fmcli.config import load_config
    from fmcli.data.dataset import PreparedDataset
    from fmcli.data.shapes import prepare_shapes
    from fmcli.distributed import DistContext
    from fmcli.step import TrainingStep

    data = tmp_path / "latents"
    res = fm_in_process("prepare-data", "shapes", "--out", data, "--size", 16, "--count", 6, "--vae", tiny_vae, "--flip", "--encode-batch-size", 4)
    assert res.returncode == 0, res.stderr
    assert json.loads((data / "manifest.json").read_text())["mirrored"] is True
    pixels = torch.from_numpy(np.load(prepare_shapes(tmp_path / "pixels", size=16, count=6, seed=0) / "x.npy")).float() / 127.5 - 1
    direct, mirrored = _diffusers_latents(tiny_vae, pixels), _diffusers_latents(tiny_vae, pixels.flip(-1))
    stored = np.load(data / "x_flip.npy").astype(np.float32)
    assert np.abs(np.flip(direct, -1) - mirrored).max() > 0.1  # flipping the latent would be wrong here
    np.testing.assert_allclose(stored, mirrored, atol=2e-3)

    cfg = load_config("debug", [f"data.path='{data}'", "data.flip=true", "model.in_channels=4", "model.image_size=8", "model.num_classes=0",
                                "model.hidden_size=32", "model.depth=1", "model.heads=2", "train.global_batch_size=6"])  # fmt: skip
    step = TrainingStep(cfg, DistContext(), micro=6, accum=1, shape=(4, 8, 8))
    batch = PreparedDataset(data).__getitems__(list(range(6)))
    draws = next(d for d in map(step._draws, range(100)) if 0 < int(d["flip"][:6].sum()) < 6)  # some rows flipped, some not
    _, x1, _ = step._pair(batch, draws, slice(0, 6), [])
    expected = np.where(draws["flip"][:6].numpy()[:, None, None, None], mirrored, direct)
    np.testing.assert_allclose(x1.numpy(), expected, atol=2e-3)


def test_flip_on_latents_without_their_mirrors_is_refused_and_old_latent_data_still_loads(tmp_path, tiny_vae, monkeypatch):
    """A latent dataset prepared without --flip (an older one has no `mirrored` field at all) still trains, but
    not with data.flip: one line (exit 2) saying how to prepare the mirrors; with them the run trains."""
    monkeypatch.delenv("FM_VAE", raising=False)
    old = tmp_path / "old"
    assert fm_in_process("prepare-data", "shapes", "--out", old, "--size", 16, "--count", 8, "--vae", tiny_vae).returncode == 0
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest.pop("mirrored") is False and not (old / "x_flip.npy").exists()
    (old / "manifest.json").write_text(json.dumps(manifest))  # as an older fm wrote it
    settings = ["model.hidden_size=32", "model.depth=1", "model.heads=2", "train.steps=1", "train.global_batch_size=4", "train.precision=fp32",
                "data.num_workers=0", "train.budget_minutes=null", "eval.every=0", "sample.grid_size=2", "sample.steps=1", f"encoders.vae={tiny_vae}"]  # fmt: skip
    args = ["train", "--preset", "debug", "--set", "train.sample_every=0", *[a for s in settings for a in ("--set", s)]]
    res = fm_in_process(*args, "--data", old, "--run-dir", tmp_path / "run-flip", "--set", "data.flip=true")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "no mirrored copies" in res.stderr and f"--vae DIR --flip --out {old} --force" in res.stderr, res.stderr
    assert not (tmp_path / "run-flip" / "checkpoints").exists()
    res = fm_in_process(*args, "--data", old, "--run-dir", tmp_path / "run-plain", "--set", "data.flip=false")
    assert res.returncode == 0, res.stderr
    mirrored = tmp_path / "mirrored"
    assert fm_in_process("prepare-data", "shapes", "--out", mirrored, "--size", 16, "--count", 8, "--vae", tiny_vae, "--flip").returncode == 0
    res = fm_in_process(*args, "--data", mirrored, "--run-dir", tmp_path / "run-mirrored", "--set", "data.flip=true")
    assert res.returncode == 0, res.stderr
    res = fm_in_process("prepare-data", "shapes", "--out", tmp_path / "pixels", "--size", 16, "--count", 8, "--flip")
    assert res.returncode == 2 and "--flip" in res.stderr and "--vae" in res.stderr and not (tmp_path / "pixels").exists(), res.stderr


@pytest.mark.parametrize("damage", ["missing", "truncated", "not-a-bool", "on-pixels"])
def test_a_damaged_mirror_cache_is_refused(tmp_path, tiny_vae, damage):
    from fmcli.data.dataset import validate_prepared
    from fmcli.data.latents import encode_prepared
    from fmcli.data.shapes import prepare_shapes

    src = prepare_shapes(tmp_path / "shapes", size=16, count=4, seed=0)
    data = src if damage == "on-pixels" else encode_prepared(src, tmp_path / "latents", vae=str(tiny_vae), flip=True)
    manifest = json.loads((data / "manifest.json").read_text())
    if damage == "missing":
        (data / "x_flip.npy").unlink()
    elif damage == "truncated":
        with open(data / "x_flip.npy", "r+b") as f:
            f.truncate((data / "x_flip.npy").stat().st_size - 10)
    else:
        manifest["mirrored"] = "yes" if damage == "not-a-bool" else True
        (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="x_flip.npy|mirrored"):
        validate_prepared(data)


def test_a_vae_with_per_channel_latent_normalisation_is_refused_for_encoding(tmp_path, monkeypatch):
    """A VAE config with latents_mean / latents_std (SDXL-style) means z = (mean - latents_mean) * scaling_factor /
    latents_std (diffusers' pipelines); fm ignored them and stored (mean - shift) * scaling_factor, latents on the
    wrong scale, silently. `prepare-data --vae` now refuses such a VAE in one line, before the pixel pass."""
    from diffusers import AutoencoderKL

    from fmcli.data import latents

    torch.manual_seed(0)
    path = tmp_path / "vae"
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16,
                  scaling_factor=0.5, latents_mean=[0.3, -0.2, 0.1, 0.5], latents_std=[2.0, 3.0, 0.5, 4.0]).save_pretrained(path)  # fmt: skip
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():  # diffusers' own convention for this VAE, which fm's (mean - 0) * 0.5 is far from
        mean = AutoencoderKL.from_pretrained(path).eval().encode(images).latent_dist.mean
    normalised = (mean - torch.tensor([0.3, -0.2, 0.1, 0.5]).view(1, 4, 1, 1)) * 0.5 / torch.tensor([2.0, 3.0, 0.5, 4.0]).view(1, 4, 1, 1)
    assert (mean * 0.5 - normalised).abs().max() > 0.1
    passes = []
    monkeypatch.setattr(latents, "encode_prepared", lambda *a, **k: passes.append(a))
    res = fm_in_process("prepare-data", "shapes", "--out", tmp_path / "out", "--size", 16, "--count", 4, "--vae", path)
    assert res.returncode == 2 and "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "latents_mean/latents_std" in res.stderr and not passes and sorted(p.name for p in tmp_path.iterdir()) == ["vae"]
    vae = FrozenVAE(path)
    with pytest.raises(UsageError, match="latents_mean/latents_std"):
        vae.encode(images)
    assert vae.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 16, 16)  # latents an older fm encoded still decode


def test_a_directory_that_is_not_a_vae_is_one_line_before_the_pixel_pass(tmp_path, tiny_vae, tiny_t5, monkeypatch):
    """`--vae` naming a text encoder's directory (config.json + model.safetensors passed the file check) ran the whole
    pixel pass, then printed diffusers' "An error occurred while trying to fetch" line and a second one about a missing
    diffusion_pytorch_model.bin; `fm sample --vae` said the T5 "has scaling_factor 0.18215, downsample 1". Now one
    line saying what the directory is, before any work; a diffusers model of another class is refused the same way."""
    from diffusers import UNet2DModel

    from fmcli.data import latents

    unet = tmp_path / "unet"
    UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=[8], down_block_types=["DownBlock2D"],
                up_block_types=["UpBlock2D"], layers_per_block=1, norm_num_groups=4).save_pretrained(unet)  # fmt: skip
    import shutil

    unweighted = shutil.copytree(tiny_t5, tmp_path / "t5-no-weights", ignore=shutil.ignore_patterns("*.safetensors"))  # "lacks weights: download a VAE into it"
    passes = []
    monkeypatch.setattr(latents, "encode_prepared", lambda *a, **k: passes.append(a))
    for wrong, what in ((tiny_t5, "a transformers model (t5)"), (unet, "a diffusers UNet2DModel"), (unweighted, "a transformers model (t5)")):
        res = fm_in_process("prepare-data", "shapes", "--out", tmp_path / "out", "--size", 16, "--count", 4, "--vae", wrong)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert f"{wrong} is not a VAE: its config.json describes {what}" in res.stderr and "--local-dir weights/" in res.stderr
        assert not passes and not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="is not a VAE.*; pass --vae DIR") as err:
        from fmcli.generate import _sampling_encoders

        cfg = load_config("text-debug").with_section("model", text_dim=32).with_section("encoders", text_encoder=str(tiny_t5))
        info = {"kind": "latents", "vae": FrozenVAE(tiny_vae).info()}
        _sampling_encoders(cfg, info, torch.device("cpu"), str(tiny_t5), None, vae_option="--vae")
    assert "\n" not in str(err.value) and "scaling_factor" not in str(err.value)


def test_a_vae_with_bin_weights_loads_without_an_error_line(tmp_path):
    """A VAE saved as diffusion_pytorch_model.bin (older downloads) loaded, but diffusers first logged "An error
    occurred while trying to fetch ...: no file named diffusion_pytorch_model.safetensors" on stderr, on a run that
    worked. Now nothing is printed, and its latents are diffusers' own."""
    from diffusers import AutoencoderKL

    AutoencoderKL.from_pretrained(_save_tiny_vae(tmp_path / "st", shift_factor=0.1)).save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["config.json", "diffusion_pytorch_model.bin"]
    # A fresh process: diffusers' log handler holds the stderr of the process that first imported it.
    code = f"from fmcli.encoders import FrozenVAE; FrozenVAE({str(tmp_path / 'bin')!r})"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert res.returncode == 0 and res.stderr == "", res.stderr
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    np.testing.assert_allclose(FrozenVAE(tmp_path / "bin").encode(images).numpy(), _diffusers_latents(tmp_path / "st", images), atol=1e-5)


def test_a_text_model_whose_encoder_moved_is_told_to_give_that_encoder_not_to_download_t5_small(tmp_path, tiny_t5):
    """Sampling a text model whose recorded encoder was gone said `huggingface-cli download google-t5/t5-small
    --local-dir <the recorded path>`: a 512-wide encoder for a model trained on 32-wide states, put where the old one
    was. It now says to give the encoder the model was trained with, naming its kind and width (as for a moved VAE)."""
    from fmcli.config import apply_overrides
    from fmcli.generate import _sampling_encoders

    gone = tmp_path / "t5-gone"
    cfg = apply_overrides(load_config("text-debug"), [f"encoders.text_encoder={gone}", "model.text_dim=32"])
    info = {"kind": "pixels", "text_encoder": {"path": str(gone), "model_type": "t5", "hidden_size": 32, "max_tokens": 8}}
    with pytest.raises(UsageError) as err:
        _sampling_encoders(cfg, info, torch.device("cpu"), None, None)
    message = str(err.value)
    assert "\n" not in message and "t5-small" not in message and "huggingface-cli" not in message
    assert message.endswith(f"pass --text-encoder DIR or set FM_TEXT_ENCODER to the text encoder the model was trained with (a t5 of width 32, at {gone})")
    (tmp_path / "broken").mkdir()  # present but unloadable: the same advice after diffusers'/transformers' reason
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / "broken" / name).write_text("{}" if name != "model.safetensors" else "not weights")
    with pytest.raises(UsageError, match=r"could not load the text encoder .*; pass --text-encoder DIR .*width 32"):
        _sampling_encoders(cfg, info, torch.device("cpu"), None, str(tmp_path / "broken"))
    assert set(_sampling_encoders(cfg, info, torch.device("cpu"), None, str(tiny_t5))) == {"text"}  # the right one loads


@pytest.mark.parametrize("stdin_flag", [("--prompts", "-"), ("--prompts=-",)])
def test_prompts_from_stdin_reach_the_ranks_in_the_launchers_order(tmp_path, tiny_t5, monkeypatch, stdin_flag):
    """`fm sample|reflow --prompt A --prompts - --nproc 2` (stdin B, C): the ranks were handed every prompt again
    beside the command's own --prompt A, so theirs were [A, A, B, C] and sample 1 was drawn for A, not B (seen as
    different PNGs from the same command in one process); with `--prompts=-` the ranks read an empty stdin and failed.
    The ranks' argv (torchrun's relaunch stubbed) must now give exactly the launcher's prompts, [A, B, C]."""
    from fmcli import distributed
    from fmcli.checkpoint import save_atomic
    from fmcli.config import config_to_dict
    from fmcli.models import build_model

    cfg = load_config("text-debug").with_section("model", text_dim=32, image_size=8, in_channels=3, num_classes=0)
    cfg = cfg.with_section("encoders", text_encoder=str(tiny_t5), max_tokens=8)
    sd = build_model(cfg.model).state_dict()
    save_atomic({"model": sd, "ema": sd, "config": config_to_dict(cfg), "step": 1, "data_info": {"kind": "pixels", "shape": [3, 8, 8]}}, tmp_path / "t.pt")
    ranks = []
    monkeypatch.setattr(distributed, "relaunch", lambda nproc, argv, **kw: ranks.append(list(argv)) or 0)
    for command, outputs in (("sample", ("--out", tmp_path / "s")), ("reflow", ("-n", 4, "--out", tmp_path / "pairs"))):
        args = [command, "--ckpt", tmp_path / "t.pt", "--prompt", "a red circle", *stdin_flag, *outputs, "--nproc", 2, "--device", "cpu"]
        monkeypatch.setattr(sys, "argv", ["fm", *map(str, args)])
        res = fm_in_process(*args, input="a blue star\n\na green square on a black background\n")
        assert res.returncode == 0, res.stderr
        argv = ranks.pop()
        prompts = [argv[k + 1] for k, a in enumerate(argv) if a == "--prompt"]
        assert prompts == ["a red circle", "a blue star", "a green square on a black background"], (command, argv)
        assert not any(a.startswith("--prompts") for a in argv) and "--nproc" not in argv
        if command == "sample":  # -n defaults to one sample per prompt: 3
            assert argv[argv.index("--num-samples") + 1] == "3"


def test_resuming_a_text_run_with_a_text_encoder_of_another_width_names_the_encoder_not_a_setting(tmp_path, tiny_t5):
    """A run that encodes its captions while training, resumed with `--set encoders.text_encoder=WIDER`, was told
    "model.text_dim=32 does not match the text encoder's width 64; remove the setting": a setting the user never gave,
    whose removal cannot fit 32-wide weights to 64-wide states. The line now names the encoder and what to do."""
    from fmcli.config import apply_overrides
    from fmcli.data.dataset import PreparedDataset
    from fmcli.data.shapes import prepare_shapes
    from fmcli.encoders import setup_training_encoders

    data = PreparedDataset(prepare_shapes(tmp_path / "shapes", size=8, count=4, seed=0), text=True)
    wider = build_tiny_text_encoder(tmp_path / "t5-64", seed=0, words=WORDS, d_model=64, layers=1, heads=4)
    resumed = apply_overrides(load_config("text-debug"), ["model.text_dim=32", f"encoders.text_encoder={wider}", "encoders.max_tokens=8"])
    with pytest.raises(UsageError) as err:
        setup_training_encoders(resumed, data, "cpu")
    message = str(err.value)
    assert "\n" not in message and "remove the setting" not in message
    assert f"model.text_dim=32 does not match the width 64 of the text encoder {wider}" in message and "the encoder it was trained with" in message
    text, cfg = setup_training_encoders(resumed.with_section("encoders", text_encoder=str(tiny_t5)), data, "cpu")
    assert text.text_dim == 32 and cfg.model.text_dim == 32  # the encoder it was trained with


def test_a_vae_given_as_the_text_encoder_is_named_as_such_not_sent_to_download_into_it(tmp_path, tiny_vae, monkeypatch):
    """`--text-encoder VAE_DIR` said the VAE "lacks tokenizer files" and to `huggingface-cli download google-t5/t5-small
    --local-dir VAE_DIR`, which would write a T5's config.json over the VAE's. Now one line saying what it is, before
    the pixel pass, with an example path of its own; the VAE is untouched."""
    from fmcli.data import latents

    before = (tiny_vae / "config.json").read_text()
    monkeypatch.setattr(latents, "encode_prepared", lambda *a, **k: pytest.fail("the pixel pass ran"))
    res = fm_in_process("prepare-data", "shapes", "--out", tmp_path / "out", "--size", 16, "--count", 4, "--text-encoder", tiny_vae)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"{tiny_vae} is not a text encoder: its config.json describes a diffusers AutoencoderKL" in res.stderr
    assert f"--local-dir {tiny_vae}" not in res.stderr and "--local-dir weights/t5-small" in res.stderr
    assert (tiny_vae / "config.json").read_text() == before and not (tmp_path / "out").exists()
