"""fm's class-conditional DiT <-> diffusers' DiTTransformer2DModel: configuration and exact weight mapping.

The two compute the same network up to three conventions, each mapped exactly (copies, permutations and
sign flips only, so an export read back into fm is bit-identical):
- output: fm predicts dx/dt (t = 0 noise, towards data); diffusers' flow-matching schedulers step with
  dx/dsigma, sigma = 1 - t the noise level, which is -dx/dt: the output layer is negated.
- positions: fm's 2D sin-cos table puts rows in the first half of the channels, diffusers' columns; the whole
  residual stream is kept in a channel order with the halves swapped (a permutation of every weight that
  reads or writes it; layer norms without affine parameters do not care).
- conditioning: fm shares one time + class embedding across the blocks; diffusers gives every block's
  AdaLayerNormZero its own copy (the final layer uses block 0's), so the shared weights are replicated.
The time input stays fm's: timestep = 1000 t = 1000 - (the scheduler's timestep 1000 sigma). Folding the
reversal into the first time-MLP weight (a rotation of each cos/sin pair) is exact in real arithmetic but
not in float32 (phases up to 1000 rad carry ~3e-5 rad of rounding), about 10x the error of this mapping.

One thing no weight can express: diffusers' DiT time features use frequencies 10000^(-i/127)
(`downscale_freq_shift=1`), fm's (like the original DiT's) 10000^(-i/128). `load_exported_dit` sets the
attribute to 0 after `from_pretrained`; the exported README shows the same one-line fix.
Also here: `DiffusersDiT`, the diffusers model behind fm's contract, the speed baseline of `fm bench --compare`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import UsageError

TIMESTEP_SCALE = 1000  # the exported model takes timestep = 1000 t (fm's t; FlowMatchEulerDiscreteScheduler's num_train_timesteps)


def check_exportable(model_cfg) -> None:
    """Refuse (one line) the fm models that DiTTransformer2DModel cannot represent exactly."""
    m = model_cfg
    if m.arch != "dit":
        raise UsageError(f"--format diffusers exports class-conditional DiTs; this model is model.arch={m.arch!r} (use --format fm)")
    if m.cross_attention:
        raise UsageError("--format diffusers exports class-conditional DiTs; diffusers' DiTTransformer2DModel has no text cross-attention (use --format fm)")
    if m.end_time:
        # FlowMapEulerDiscreteScheduler's step, z_r = z_t - (sigma_t - sigma_r) u, is fm's mean-flow step (with u
        # negated), but it needs a network of two times; DiTTransformer2DModel embeds one timestep only.
        raise UsageError("--format diffusers: a mean-flow DiT takes two times (t, t_end) and diffusers' DiTTransformer2DModel embeds one, so FlowMapEulerDiscreteScheduler cannot drive it; use --format fm")
    if m.prediction == "data":
        raise UsageError("--format diffusers: this DiT predicts the data (model.prediction='data') and its velocity needs the input x_t, which DiTTransformer2DModel's output has no path to; FlowMatchEulerDiscreteScheduler expects a velocity (use --format fm)")
    if m.mlp_ratio != 4.0:
        raise UsageError(f"--format diffusers needs model.mlp_ratio = 4 (DiTTransformer2DModel's MLP is fixed at 4x), this model has {m.mlp_ratio} (use --format fm)")


def diffusers_dit_config(model_cfg) -> dict:
    """DiTTransformer2DModel keyword arguments for fm's model settings (resolved: image size, channels, classes)."""
    m = model_cfg
    return dict(
        num_attention_heads=m.heads,
        attention_head_dim=m.hidden_size // m.heads,
        in_channels=m.in_channels,
        out_channels=m.in_channels,  # velocity only: no learned sigma channels
        num_layers=m.depth,
        sample_size=m.image_size,
        patch_size=m.patch_size,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=m.num_classes,  # its label table gets the extra null-class row (class_dropout_prob > 0)
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=1e-6,  # fm's LayerNorms; diffusers' default 1e-5 would change the MLP branch
        attention_bias=True,
        dropout=0.0,
    )


def load_exported_dit(path, **kwargs):
    """`DiTTransformer2DModel.from_pretrained(path)` with fm's time frequencies (see the module docstring)."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel.from_pretrained(str(path), **kwargs)
    use_fm_time_frequencies(model)
    return model.eval()


def use_fm_time_frequencies(model) -> None:
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0


# Every tensor that is not an embedding copy or the packed qkv: (fm name, diffusers name, how). Each `how`
# is its own inverse (the half swap is an involution, and so is negation), so one table maps both ways.
_HOW = {
    "copy": lambda t, p: t,
    "rows": lambda t, p: t[p],  # writes the residual stream
    "cols": lambda t, p: t[:, p],  # reads the residual stream
    "rows6": lambda t, p: t[_chunk_perm(p, 6)],  # shift/scale/gate x (attn, mlp), each a residual vector
    "rows2": lambda t, p: t[_chunk_perm(p, 2)],
    "neg": lambda t, p: -t,  # dx/dt vs dx/dsigma
    "neg_cols": lambda t, p: -t[:, p],
}
_EMBEDDINGS = {  # fm's shared conditioning -> each diffusers block's AdaLayerNormZero (suffix of norm1.emb.)
    "t_embed.mlp.0.weight": "timestep_embedder.linear_1.weight",
    "t_embed.mlp.0.bias": "timestep_embedder.linear_1.bias",
    "t_embed.mlp.2.weight": "timestep_embedder.linear_2.weight",
    "t_embed.mlp.2.bias": "timestep_embedder.linear_2.bias",
    "y_embed.weight": "class_embedder.embedding_table.weight",
}
_QKV = ("to_q", "to_k", "to_v")


def _mapped(depth: int) -> list[tuple[str, str, str]]:
    table = [("x_embed.weight", "pos_embed.proj.weight", "rows"), ("x_embed.bias", "pos_embed.proj.bias", "rows")]
    for i in range(depth):
        f, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        table += [
            (f + "modulation.1.weight", d + "norm1.linear.weight", "rows6"),
            (f + "modulation.1.bias", d + "norm1.linear.bias", "rows6"),
            (f + "attn.proj.weight", d + "attn1.to_out.0.weight", "rows"),  # reads head space, writes the residual
            (f + "attn.proj.bias", d + "attn1.to_out.0.bias", "rows"),
            (f + "mlp.0.weight", d + "ff.net.0.proj.weight", "cols"),
            (f + "mlp.0.bias", d + "ff.net.0.proj.bias", "copy"),
            (f + "mlp.2.weight", d + "ff.net.2.weight", "rows"),
            (f + "mlp.2.bias", d + "ff.net.2.bias", "rows"),
        ]
    return table + [
        ("final.modulation.1.weight", "proj_out_1.weight", "rows2"),
        ("final.modulation.1.bias", "proj_out_1.bias", "rows2"),
        ("final.linear.weight", "proj_out_2.weight", "neg_cols"),
        ("final.linear.bias", "proj_out_2.bias", "neg"),
    ]


def fm_to_diffusers(state: dict[str, torch.Tensor], model_cfg) -> dict[str, torch.Tensor]:
    """fm DiT state_dict -> DiTTransformer2DModel state_dict (fp32, contiguous)."""
    check_exportable(model_cfg)
    s = {k: v.detach().float().cpu() for k, v in state.items()}
    width, p = model_cfg.hidden_size, _half_swap(model_cfg.hidden_size)
    out = {d: _HOW[how](s[f], p) for f, d, how in _mapped(model_cfg.depth)}
    for i in range(model_cfg.depth):
        d = f"transformer_blocks.{i}."
        out.update({d + "norm1.emb." + k: s[f].clone() for f, k in _EMBEDDINGS.items()})
        qkv_w, qkv_b = s[f"blocks.{i}.attn.qkv.weight"], s[f"blocks.{i}.attn.qkv.bias"]
        for j, name in enumerate(_QKV):
            out[d + f"attn1.{name}.weight"] = qkv_w[j * width : (j + 1) * width][:, p]
            out[d + f"attn1.{name}.bias"] = qkv_b[j * width : (j + 1) * width]
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_to_fm(state: dict[str, torch.Tensor], model_cfg) -> dict[str, torch.Tensor]:
    """The inverse of `fm_to_diffusers` (every step is a copy, permutation or negation: bit-exact)."""
    s = {k: v.detach().float().cpu() for k, v in state.items()}
    p = _half_swap(model_cfg.hidden_size)
    out = {f: _HOW[how](s[d], p) for f, d, how in _mapped(model_cfg.depth)}
    _check_shared_embeddings(s, model_cfg.depth)
    out.update({f: s["transformer_blocks.0.norm1.emb." + k] for f, k in _EMBEDDINGS.items()})
    for i in range(model_cfg.depth):
        f, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[f + "attn.qkv.weight"] = torch.cat([s[d + f"attn1.{n}.weight"][:, p] for n in _QKV])
        out[f + "attn.qkv.bias"] = torch.cat([s[d + f"attn1.{n}.bias"] for n in _QKV])
    return {k: v.contiguous() for k, v in out.items()}


def _check_shared_embeddings(s: dict[str, torch.Tensor], depth: int) -> None:
    """fm has one time + class embedding; diffusers keeps a copy per block (and conditions its final layer on
    block 0's). An export whose copies differ (e.g. fine-tuned in diffusers) computes something fm cannot:
    refused, not read as block 0's."""
    for i in range(1, depth):
        for k in _EMBEDDINGS.values():
            first, copy = s["transformer_blocks.0.norm1.emb." + k], s[f"transformer_blocks.{i}.norm1.emb." + k]
            if first.shape != copy.shape or not torch.equal(first, copy):
                raise UsageError(
                    f"this diffusers DiT's blocks have different time/class embeddings (transformer_blocks.{i}.norm1.emb.{k} "
                    "differs from block 0's), which fm's one shared embedding cannot represent; fm reads only unmodified exports"
                )


def _half_swap(width: int) -> torch.Tensor:
    """Channel j of diffusers' residual stream is channel perm[j] of fm's (row / column position halves swapped)."""
    half = width // 2
    return torch.cat([torch.arange(half, width), torch.arange(half)])


def _chunk_perm(perm: torch.Tensor, chunks: int) -> torch.Tensor:
    """`perm` applied inside each of `chunks` consecutive blocks of len(perm) rows (shift/scale/gate vectors)."""
    width = len(perm)
    return torch.cat([perm + k * width for k in range(chunks)])


def check_comparable(model_cfg) -> None:
    """Refuse (one line) the fm models that DiffusersDiT cannot match in size: `fm bench --compare diffusers` checks
    this before any measurement, DiffusersDiT again when built."""
    m = model_cfg
    if m.end_time:
        raise UsageError("--compare diffusers: diffusers' DiT has one time input, a mean-flow model two (t, t_end)")
    if m.mlp_ratio != 4.0:
        raise UsageError("--compare diffusers needs model.mlp_ratio=4 (diffusers' DiT has a fixed 4x MLP)")
    if m.cross_attention:
        raise UsageError("--compare diffusers supports class-conditional DiTs only (no cross-attention)")


class DiffusersDiT(nn.Module):
    """diffusers' class-conditional DiTTransformer2DModel behind fm's contract `model(x, t, y=None)`.

    Built from `diffusers_dit_config` (fm's width, depth, heads, patch, input; no learned sigma; a null-class
    row). Used as the speed baseline of `fm bench --compare diffusers`; with weights from `fm_to_diffusers`
    (and `use_fm_time_frequencies`) it returns fm's velocity: timestep 1000 t, output negated back.
    """

    def __init__(self, model_cfg):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        m = model_cfg
        check_comparable(m)
        self.num_classes = m.num_classes
        self.inner = DiTTransformer2DModel(**diffusers_dit_config(m))

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        return -self.inner(x, timestep=TIMESTEP_SCALE * t, class_labels=y).sample
