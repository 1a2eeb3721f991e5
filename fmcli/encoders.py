"""Frozen encoders loaded from local directories: the VAE (diffusers AutoencoderKL) and the text encoder
(transformers T5EncoderModel by default, CLIPTextModel too) with its tokenizer.

Nothing is downloaded: every load uses local_files_only=True, and a missing directory is a UsageError that
names the files expected and how to get them. Paths come from a flag, the config (`encoders.vae`,
`encoders.text_encoder`), the environment (FM_VAE, FM_TEXT_ENCODER) or the path recorded at preparation
or training time, in that order.

Latent convention (as SD3 / diffusers): z = (mean(posterior) - shift_factor) * scaling_factor, with both
factors read from the VAE's own config (shift_factor None -> 0); decoding inverts it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .errors import UsageError
from .fsutil import commit, commit_new, temp_path
from .shapes_vocab import caption_words

ENV_VAE = "FM_VAE"
ENV_TEXT_ENCODER = "FM_TEXT_ENCODER"
BUILTIN_TINY_T5 = "builtin:tiny-t5"
BUILTIN_DIR = Path("data") / "builtin-tiny-t5"
VAE_PRECISIONS = ("fp32", "bf16")  # FrozenVAE's decoding precision (bf16 only on CUDA)
VaePrecision = Literal[VAE_PRECISIONS]  # type: ignore[valid-type]  (encoders.vae_precision)

_VAE_HINT = "huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir {path}"
_TEXT_HINT = "huggingface-cli download google-t5/t5-small --local-dir {path}"


def resolve_path(flag: str | None, configured: str | None, env: str, recorded: str | None) -> str | None:
    """The first of: command-line flag, config value, environment variable, path recorded earlier."""
    for value in (flag, configured, os.environ.get(env) or None, recorded):
        if value:
            return str(value)
    return None


# ------------------------------------------------------------------------------------------------ VAE


class FrozenVAE:
    """A frozen AutoencoderKL: `encode` images in [-1, 1] to scaled latents, `decode` them back."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", precision: str = "fp32", remedy: str | None = None):
        """`remedy`: what to do when the VAE is missing or does not load (default: download it, then --vae or FM_VAE)."""
        from diffusers import AutoencoderKL

        _quiet_hf()
        self.path = check_vae_dir(path, remedy)
        self.device = torch.device(device)
        # bf16 decoding only where it is fast (CUDA); CPU stays fp32.
        self.dtype = torch.bfloat16 if precision == "bf16" and self.device.type == "cuda" else torch.float32
        try:
            # Weights as .bin only: asked for directly, or diffusers logs an "error" line for the missing .safetensors first.
            safetensors = None if any(self.path.glob("*.safetensors")) else False
            vae = AutoencoderKL.from_pretrained(self.path, local_files_only=True, use_safetensors=safetensors)
        except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: weights that do not fit config.json
            raise UsageError(f"could not load the VAE from {self.path}: {str(err).splitlines()[0]}" + (f"; {remedy}" if remedy else "")) from None
        self.vae = vae.to(self.device, self.dtype).eval().requires_grad_(False)
        cfg = self.vae.config
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor) if getattr(cfg, "shift_factor", None) is not None else 0.0
        self.latent_channels = int(cfg.latent_channels)
        self.in_channels = int(cfg.in_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.normalisation = {k: getattr(cfg, k, None) for k in ("latents_mean", "latents_std")}  # not applied: encode refuses it

    def latent_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = shape
        if c != self.in_channels:
            raise UsageError(f"the VAE at {self.path} encodes {self.in_channels}-channel images, these have {c} channel(s) "
                             "(mnist and sklearn-digits are grayscale): prepare them without --vae, in pixel space")
        if h % self.downsample or w % self.downsample:
            raise UsageError(f"image size {h}x{w} is not divisible by the VAE's downsampling factor {self.downsample}")
        return (self.latent_channels, h // self.downsample, w // self.downsample)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,H,W] in [-1, 1] -> [B,C,h,w] float32: the posterior mean, shifted and scaled."""
        refuse_latent_normalisation(self.path, self.normalisation)
        posterior = self.vae.encode(images.to(self.device, self.dtype)).latent_dist
        return ((posterior.mean.float() - self.shift_factor) * self.scaling_factor)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B,C,h,w] scaled latents -> [B,3,H,W] float32 images clamped to [-1, 1]."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.dtype)).sample.float().clamp(-1, 1)

    def info(self) -> dict:
        """What a latent dataset records of its VAE; the path absolute, so that it still names the VAE from
        another working directory (training, sampling)."""
        return {
            "path": os.path.abspath(self.path),
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "latent_channels": self.latent_channels,
            "downsample": self.downsample,
        }


# --------------------------------------------------------------------------------------- text encoder


class FrozenTextEncoder:
    """A frozen transformers text encoder + tokenizer; `encode(prompts)` -> (states [B,L,D], mask [B,L]).

    Prompts are padded to `max_tokens` (so cached and on-the-fly states have one shape) and the attention
    mask is kept: padding positions are masked in the encoder and in the model's cross-attention. The
    encoder runs in fp32 (T5 overflows in fp16).
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", max_tokens: int = 128, remedy: str | None = None):
        """`remedy`: what to do when the encoder is missing or does not load (default: download one, then --text-encoder)."""
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, T5EncoderModel

        _quiet_hf()
        if str(path) == BUILTIN_TINY_T5:
            path = ensure_builtin_text_encoder()
        self.path = check_text_encoder_dir(path, remedy)
        self.device = torch.device(device)
        try:
            config = AutoConfig.from_pretrained(self.path, local_files_only=True)
            cls = CLIPTextModel if config.model_type.startswith("clip") else T5EncoderModel
            self.model = cls.from_pretrained(self.path, local_files_only=True, torch_dtype=torch.float32)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: weights that do not fit config.json
            raise UsageError(f"could not load the text encoder from {self.path}: {str(err).splitlines()[0]}" + (f"; {remedy}" if remedy else "")) from None
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_tokens = min(max_tokens, limit) if limit else max_tokens
        self.hidden_size = int(self.model.config.hidden_size)
        self.model_type = config.model_type

    @torch.no_grad()
    def encode(self, prompts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        states, masks = [], []
        for start in range(0, len(prompts), batch_size):
            tok = self.tokenizer(
                list(prompts[start : start + batch_size]), padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
            )
            ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            states.append(out * mask[..., None])  # padding rows are zero: masked anyway, and caches compress
            masks.append(mask.bool())
        return torch.cat(states), torch.cat(masks)

    def info(self) -> dict:
        """What a dataset records of its text encoder (the path absolute, as `FrozenVAE.info`)."""
        return {"path": os.path.abspath(self.path), "model_type": self.model_type, "hidden_size": self.hidden_size, "max_tokens": self.max_tokens}


@dataclass
class TextConditioning:
    """Text conditions for the model: prompts -> {"text", "text_mask"}, and the empty prompt's states.

    The unconditional branch (CFG and condition dropout) is the encoder's output for the empty prompt
    with its own mask. `encoder` may be None when the dataset holds cached states (training only).
    """

    encoder: FrozenTextEncoder | None
    empty_states: torch.Tensor  # [1, L, D]
    empty_mask: torch.Tensor  # [1, L] bool

    @classmethod
    def from_encoder(cls, encoder: FrozenTextEncoder) -> "TextConditioning":
        states, mask = encoder.encode([""])
        return cls(encoder, states, mask)

    @property
    def text_dim(self) -> int:
        return int(self.empty_states.shape[-1])

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder is None:
            raise UsageError("captions need a text encoder: set encoders.text_encoder or FM_TEXT_ENCODER")
        return self.encoder.encode(list(prompts))

    def uncond(self, n: int, device) -> dict:
        return {"text": self.empty_states.to(device).expand(n, -1, -1), "text_mask": self.empty_mask.to(device).expand(n, -1)}

    def conditions(self, prompts: list[str], device) -> tuple[dict, dict]:
        """(cond, uncond) keyword dicts for sampling with classifier-free guidance."""
        states, mask = self.encode(prompts)
        return {"text": states.to(device), "text_mask": mask.to(device)}, self.uncond(len(prompts), device)

    def for_batch(self, batch: dict, drop: torch.Tensor, device) -> dict:
        """Training conditions: cached states or captions encoded now; dropped rows get the empty prompt."""
        if "text" in batch:
            states, mask = batch["text"].to(device).float(), batch["text_mask"].to(device).bool()
        else:
            states, mask = self.encode(batch["caption"])
            states, mask = states.to(device), mask.to(device)
        empty = self.uncond(states.shape[0], device)
        drop = drop.to(device)
        return {
            "text": torch.where(drop[:, None, None], empty["text"], states),
            "text_mask": torch.where(drop[:, None], empty["text_mask"], mask),
        }


# --------------------------------------------------------------------------------- training and grids


def setup_training_encoders(cfg, dataset, device):
    """(TextConditioning or None, cfg with the encoder paths and model.text_dim resolved).

    Paths: config, then FM_VAE / FM_TEXT_ENCODER, then what `fm prepare-data` recorded in the manifest;
    they are stored in the run's config (absolute, when they exist) so that `fm sample --ckpt` needs nothing else. `dataset` is a
    data.dataset.PreparedDataset, read through its own methods (this module sits below data/).
    """
    manifest = dataset.manifest
    recorded_vae = (manifest.get("vae") or {}).get("path")
    encoders = {"vae": resolve_path(None, cfg.encoders.vae, ENV_VAE, recorded_vae) if dataset.space == "latents" else cfg.encoders.vae}
    if dataset.space == "latents" and manifest.get("vae"):
        check_same_vae(encoders["vae"], manifest["vae"])
    text = None
    if cfg.model.cross_attention:
        recorded = manifest.get("text_encoder") or {}
        encoders["text_encoder"] = resolve_path(None, cfg.encoders.text_encoder, ENV_TEXT_ENCODER, recorded.get("path"))
        if dataset.has_cached_text:
            empty, empty_mask = dataset.empty_text()
            text = TextConditioning(None, torch.from_numpy(empty).float(), torch.from_numpy(empty_mask).bool())
            check_same_text_encoder(encoders["text_encoder"], recorded, text.text_dim)
            if recorded.get("max_tokens"):
                encoders["max_tokens"] = int(recorded["max_tokens"])
        else:
            text = TextConditioning.from_encoder(load_text_encoder(encoders["text_encoder"], device, cfg.encoders.max_tokens))
        if cfg.model.text_dim not in (None, text.text_dim):  # a resumed run's model, or a new run's setting
            raise UsageError(f"model.text_dim={cfg.model.text_dim} does not match the width {text.text_dim} of the text encoder "
                             f"{encoders['text_encoder']} (encoders.text_encoder or {ENV_TEXT_ENCODER}): a resumed run needs the encoder "
                             "it was trained with (--set encoders.text_encoder=DIR); a new run can drop model.text_dim")
        cfg = cfg.with_section("model", text_dim=text.text_dim)
    return text, cfg.with_section("encoders", **{k: _absolute_if_here(v) if k != "max_tokens" else v for k, v in encoders.items()})


def _absolute_if_here(path: str | None) -> str | None:
    """A relative encoder path that names a directory here, made absolute: the run records it, and `fm sample`
    or a resume from another working directory reads it (a missing one is kept as given: training may not need it)."""
    if path and path != BUILTIN_TINY_T5 and not os.path.isabs(path) and os.path.isdir(path):
        return os.path.abspath(path)
    return path


def check_same_vae(path: str | None, recorded: dict, *, used_by: str = "the dataset's latents were encoded with", setting: str = "encoders.vae") -> None:
    """A latent dataset is decoded (sample grids, `fm sample`) with the VAE the run records: refuse one whose
    latent space (channels, downsampling, scaling and shift factors) is not the one the dataset was encoded in.
    A VAE that is not there (or has no readable config.json) is not checked: training does not need it."""
    facts = _vae_facts(path) if path else None
    if facts is None:
        return
    differ = [k for k, v in facts.items() if recorded.get(k) is not None and not math.isclose(float(recorded[k]), v, rel_tol=1e-6)]
    if differ:
        theirs = ", ".join(f"{k} {facts[k]:g}" for k in differ)
        mine = ", ".join(f"{k} {float(recorded[k]):g}" for k in differ)
        raise UsageError(
            f"the VAE {path} ({setting} or {ENV_VAE}) has {theirs}, but {used_by} {mine} "
            f"(the VAE at {recorded.get('path')}): set {setting} to that VAE"
        )


def check_same_text_encoder(path: str | None, recorded: dict, width: int, *, used_by: str = "the dataset's cached text states come from",
                            setting: str = "encoders.text_encoder") -> None:
    """Cached text states are used in training, the encoder the run records at sampling: refuse an encoder of
    another kind or width than the one that wrote the cache. One that is not there is not checked."""
    facts = _text_encoder_facts(path) if path else None
    if facts is None:
        return
    model_type, hidden = facts
    cached_type = recorded.get("model_type")
    if hidden != width or (cached_type and model_type and model_type != cached_type):
        raise UsageError(
            f"the text encoder {path} ({setting} or {ENV_TEXT_ENCODER}) is a {model_type} of width {hidden}, but {used_by} "
            f"a {cached_type or 'text encoder'} of width {width} (at {recorded.get('path')}): set {setting} to that encoder"
        )


def _vae_facts(path) -> dict | None:
    """The latent space an AutoencoderKL directory's config.json describes (diffusers' defaults where a key is
    absent), as `FrozenVAE.info` reports it; None when it cannot be read."""
    try:
        cfg = json.loads((Path(path).expanduser() / "config.json").read_text())
        if _not_autoencoder_kl(cfg):  # not a VAE at all: check_vae_dir says so, not a comparison of defaults
            return None
        shift = cfg.get("shift_factor")
        return {
            "scaling_factor": float(cfg.get("scaling_factor", 0.18215)),
            "shift_factor": float(shift) if shift is not None else 0.0,
            "latent_channels": float(cfg.get("latent_channels", 4)),
            "downsample": float(2 ** (len(cfg.get("block_out_channels", [64])) - 1)),
        }
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _text_encoder_facts(path) -> tuple[str | None, int] | None:
    """(model_type, hidden width) of a text-encoder directory's config.json (T5: d_model; CLIP: hidden_size, or its
    text_config's); None when it cannot be read."""
    if str(path) == BUILTIN_TINY_T5:
        path = BUILTIN_DIR
    try:
        cfg = json.loads((Path(path).expanduser() / "config.json").read_text())
        text_cfg = cfg.get("text_config") or {}
        hidden = cfg.get("d_model") or cfg.get("hidden_size") or text_cfg.get("hidden_size")
        return (cfg.get("model_type"), int(hidden)) if hidden else None
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def grid_conditions(text: TextConditioning, dataset, n: int, device) -> tuple[tuple[dict, dict], list[str]]:
    """((cond, uncond), prompts) for a training sample grid: the dataset's first n captions (cycled)."""
    rows = [i % len(dataset) for i in range(n)]
    captions = dataset.captions()
    prompts = [captions[i] for i in rows] if captions else []
    if dataset.has_cached_text:
        states, mask = (torch.from_numpy(a) for a in dataset.text_rows(rows))
        return ({"text": states.to(device), "text_mask": mask.to(device)}, text.uncond(n, device)), prompts
    return text.conditions(prompts, device), prompts


# --------------------------------------------------------------------------- built-in tiny text encoder


def ensure_builtin_text_encoder(root: Path = BUILTIN_DIR) -> Path:
    """The built-in tiny T5 under data/ (built once, seeded: every build gives the same weights)."""
    root = Path(root)
    if not (root / "model.safetensors").is_file():
        build_tiny_text_encoder(root)
    return root


def build_tiny_text_encoder(out: str | Path, *, seed: int = 0, words: list[str] | None = None, d_model: int = 64, layers: int = 2, heads: int = 4) -> Path:
    """A randomly initialised (seeded) T5 encoder with a word-level tokenizer, saved in save_pretrained's layout.

    A pipeline check, not a language model: each known word is one token with its own random embedding,
    so distinct captions give distinct states. Unknown words map to <unk>; every prompt ends with </s>,
    so even the empty prompt has one real token.
    """
    from safetensors.torch import save_model
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    specials = ["<pad>", "</s>", "<unk>"]
    vocab_words = sorted(set(words if words is not None else caption_words()) - set(specials))
    vocab = {w: i for i, w in enumerate(specials + vocab_words)}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    config = T5Config(
        vocab_size=len(vocab), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model, num_layers=layers, num_heads=heads,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
    )
    _quiet_hf()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(out)
    try:
        # Not model.save_pretrained: under torch.distributed it writes the weights and config.json on rank 0 only,
        # so another rank building this at the same time made a directory of tokenizer files alone.
        model.config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        # Never replace a built directory, which another DDP rank may be reading right now: that rank built it at
        # the same moment and theirs is identical. Only a partial one (no weights) is replaced.
        if not commit_new(tmp, out) and not (out / "model.safetensors").is_file():
            commit(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# -------------------------------------------------------------------------------------------- helpers


def _quiet_hf() -> None:
    """No download progress bars or info logs from transformers / diffusers on our stderr."""
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


# What a local directory must hold: a name shown in messages -> the file patterns that satisfy it.
_ALTERNATIVES = {
    "diffusion_pytorch_model.safetensors": ["*.safetensors", "*.bin"],  # older .bin, sharded weights
    "model.safetensors": ["*.safetensors", "*.bin"],
    "tokenizer files": ["tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json"],
}


def _config_json(path) -> dict | None:
    """A model directory's config.json as a dict; None when it is missing, unreadable or not an object (the file
    checks, or loading, say why)."""
    try:
        config = json.loads((Path(path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def check_vae_dir(path, remedy: str | None = None) -> Path:
    """`path` if it holds a VAE's files and its config.json is an AutoencoderKL's (a text encoder's or another diffusers
    model's directory also has a config.json and safetensors weights: said here, in one line, before any work)."""
    config = _config_json(path)  # first: the file check's advice would be to download a VAE into this other model's directory
    if config is not None and (kind := _not_autoencoder_kl(config)):
        raise UsageError(f"{path} is not a VAE: its config.json describes {kind}, and fm needs a diffusers AutoencoderKL "
                         f"(e.g. `{_VAE_HINT.format(path='weights/sd-vae-ft-mse')}`)" + (f"; {remedy}" if remedy else ""))
    return _check_dir(path, "VAE", ["config.json", "diffusion_pytorch_model.safetensors"], _VAE_HINT, ENV_VAE, "--vae", remedy)


def _not_autoencoder_kl(config: dict) -> str | None:
    """What a model config.json describes when it is not a diffusers AutoencoderKL's (None when it is one, or says nothing)."""
    name = config.get("_class_name")
    if name is not None:
        return None if name == "AutoencoderKL" else f"a diffusers {name}"
    if config.get("model_type") or config.get("architectures"):  # a transformers model (a text encoder, a CLIP, ...)
        return f"a transformers model ({config.get('model_type') or config.get('architectures')})"
    return None


def check_vae_image_size(path, size: int) -> None:
    """`fm prepare-data --size` against the VAE's downsampling factor (config.json), before the pixel pass rather
    than after it (`FrozenVAE.latent_shape` checks again); a config that cannot be read is left to loading."""
    facts = _vae_facts(path)
    factor = int(facts["downsample"]) if facts else 1
    if size % factor:
        raise UsageError(f"--size {size} is not divisible by the VAE's downsampling factor {factor}: use a multiple of {factor} "
                         f"(e.g. {max(factor, size - size % factor)})")


def refuse_latent_normalisation(path, config: dict) -> None:
    """fm's latents are (mean - shift_factor) * scaling_factor; a VAE whose config also sets a per-channel
    `latents_mean` / `latents_std` (SDXL-style, e.g. Playground v2.5's) means its scaling_factor for latents
    normalised by them first, so fm's would be on the wrong scale: such a VAE is refused for encoding. (Decoding
    stays: latents fm encoded with one earlier were encoded without them, which decoding inverts exactly.)"""
    if any(config.get(k) is not None for k in ("latents_mean", "latents_std")):
        raise UsageError(f"the VAE {path} sets latents_mean/latents_std (per-channel normalisation) in its config.json, which fm does not "
                         "apply (its latents would be on the wrong scale): encode with a VAE without them, e.g. stabilityai/sd-vae-ft-mse")


def check_vae_encodes(path) -> None:
    """`refuse_latent_normalisation` from the VAE's config.json, before `fm prepare-data`'s pixel pass (FrozenVAE.encode
    checks again); a config that cannot be read is left to loading."""
    if (config := _config_json(path)) is not None:
        refuse_latent_normalisation(path, config)


# The config.json model types FrozenTextEncoder loads: T5 (T5EncoderModel; mT5 is the same network) and CLIP (CLIPTextModel).
TEXT_ENCODER_TYPES = ("t5", "mt5", "clip", "clip_text_model")


def check_text_encoder_dir(path, remedy: str | None = None) -> Path:
    if str(path) == BUILTIN_TINY_T5:
        return Path(path)
    # A diffusers model's directory (a VAE's): said as such, not "lacks tokenizer files; download t5-small into it".
    if diffusers_class := (_config_json(path) or {}).get("_class_name"):
        raise UsageError(f"{path} is not a text encoder: its config.json describes a diffusers {diffusers_class}, and fm needs a T5 or "
                         f"CLIP text encoder (e.g. `{_TEXT_HINT.format(path='weights/t5-small')}`)" + (f"; {remedy}" if remedy else ""))
    path = _check_dir(path, "text encoder", ["config.json", "model.safetensors", "tokenizer files"], _TEXT_HINT, ENV_TEXT_ENCODER, "--text-encoder", remedy)
    facts = _text_encoder_facts(path)  # None when config.json cannot be read: loading says why
    if facts is not None and facts[0] is not None and facts[0] not in TEXT_ENCODER_TYPES:
        raise UsageError(f"the text encoder {path} is a {facts[0]} (config.json model_type); fm loads T5 or CLIP text encoders "
                         f"(model_type {', '.join(TEXT_ENCODER_TYPES)}), e.g. google-t5/t5-small")
    return path


def _check_dir(path, what: str, expected: list[str], hint: str, env: str, flag: str, remedy: str | None = None) -> Path:
    """`path` if it holds `expected`; else a UsageError saying what is missing, then `remedy` (default: get one with
    `hint`, then `flag` or `env`)."""
    path = Path(path).expanduser()
    missing = [f for f in expected if not any(any(path.glob(p)) for p in _ALTERNATIVES.get(f, [f]))]
    if not path.is_dir() or missing:
        where = f"{path} does not exist" if not path.is_dir() else f"{path} lacks {', '.join(missing)}"
        remedy = remedy or f"get one with `{hint.format(path=path)}` and pass {flag} {path} or set {env}"
        raise UsageError(f"{what} not found: {where} (expected a local directory with {', '.join(expected)}); {remedy}")
    return path


def require(path: str | None, what: str, flag: str, env: str, hint: str) -> str:
    if not path:
        raise UsageError(f"this needs a {what}: pass {flag} PATH, set it in the preset's [encoders] or {env} (e.g. `{hint.format(path='weights/' + what.replace(' ', '-'))}`)")
    return path


def load_vae(path: str | None, device, precision: str = "fp32") -> FrozenVAE:
    return FrozenVAE(require(path, "VAE", "--vae", ENV_VAE, _VAE_HINT), device, precision)


def load_text_encoder(path: str | None, device, max_tokens: int, remedy: str | None = None) -> FrozenTextEncoder:
    return FrozenTextEncoder(require(path, "text encoder", "--text-encoder", ENV_TEXT_ENCODER, _TEXT_HINT), device, max_tokens, remedy)
