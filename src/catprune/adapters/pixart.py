"""PixArt-Sigma (and PixArt-Alpha) adapter: diffusers ``PixArtTransformer2DModel`` and its ``BasicTransformerBlock``s.

A PixArt block (norm_type ``"ada_norm_single"``) is: modulated LayerNorm -> self-attention over the image tokens ->
cross-attention from the image tokens to the text tokens (no norm before it) -> modulated LayerNorm -> feed-forward,
with shift/scale/gate taken from the block's ``scale_shift_table`` plus the shared ``adaln_single`` timestep table.
There is no text stream: the text tokens enter every block only as cross-attention keys/values.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.transformers.pixart_transformer_2d import PixArtTransformer2DModel

from ..algorithm import gather_tokens
from ..runtime.contract import BufferStore, CallInfo
from .common import PatchGridAdapter, cached_attention, capture_kv, removing, require_processors, sdpa
from .ops import describe, feed_forward, gated_add, linear_macs, modulate

_NAME = "PixArtTransformer2DModel.forward"


def _mask_to_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A (B, S) keep-mask (1 keep, 0 discard) as the (B, 1, S) additive bias diffusers' forward makes of it; a
    (B, 1, S) bias is returned as is (the same conversion as PixArtTransformer2DModel.forward)."""
    if mask is None or mask.dim() == 3:
        return mask
    return ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)  # (B, 1, S)


@dataclass
class PixArtCallInfo(CallInfo):
    """`CallInfo` whose shape signature also records which optional mask inputs the call has.

    The compiled / CUDA-graph backends key their static functions by the signature; a mask that appears or
    disappears changes the function's inputs, so it must also change the signature (and start a new generation).
    """

    masks: tuple[bool, bool] = (False, False)  # (encoder_attention_mask given, attention_mask given)

    @property
    def signature(self) -> tuple:
        return super().signature + self.masks


class PixArtAdapter(PatchGridAdapter):
    """CAT Pruning for PixArt transformers (PixArt-Sigma; PixArt-Alpha's additional conditions are supported too).

    A pruned step keeps only the k selected image tokens as a compact (B, k, D) stream through all blocks (gathered
    right after the patch + position embedding). Per block: Q/K/V of the selected tokens; their fresh K/V are
    scattered in place into the block's (2, B, M, H, hd) self-attention cache, and the selected queries attend over
    all M image keys/values (fresh at the selection, cached elsewhere). Cross-attention: the selected queries attend
    to the text tokens, whose K/V are recomputed every step from ``encoder_hidden_states`` (2 T D^2 MACs per block,
    about 3% of a pruned PixArt-Sigma step at 1024px and keep ratio 0.3; recomputing keeps the pruned step a pure
    function of its inputs, correct whatever text the caller passes). Feed-forward and the final norm / modulation /
    ``proj_out`` run on the selected tokens only.

    The per-token output is the whole ``proj_out`` row, P = patch^2 * out_channels. PixArt-Sigma predicts a learned
    sigma (out_channels = 2 x latent channels: noise, then variance), so the runtime caches, reuses and scores both
    halves: the output cache must hold both (the returned sample has all channels), and the runtime scores the same
    tensor, so ||n_i - n_ref|| includes the variance half (the SD3 reference never had this choice; scoring the noise
    half alone would need the runtime to ask the adapter which channels to score; not measured yet).
    """

    model_classes = (PixArtTransformer2DModel,)
    family = "PixArt-Sigma / PixArt-Alpha (PixArtTransformer2DModel)"

    # ---------------------------------------------------------------- checks
    def validate_model(self) -> None:
        model = self.model
        cfg = model.config
        if cfg.norm_type != "ada_norm_single":
            raise ValueError(
                f"catprune.apply: PixArtTransformer2DModel with norm_type={cfg.norm_type!r}; CAT Pruning supports "
                "only norm_type='ada_norm_single' (PixArt-Alpha / PixArt-Sigma)."
            )
        if cfg.attention_type not in (None, "default"):
            raise ValueError(
                f"catprune.apply: PixArtTransformer2DModel with attention_type={cfg.attention_type!r} (GLIGEN "
                "fuser); CAT Pruning supports only attention_type='default'."
            )
        for index, block in enumerate(model.transformer_blocks):
            if not isinstance(block, BasicTransformerBlock) or block.norm_type != "ada_norm_single":
                raise ValueError(
                    f"catprune.apply: transformer_blocks[{index}] is {type(block).__name__} with norm_type "
                    f"{getattr(block, 'norm_type', None)!r}; expected diffusers' BasicTransformerBlock with "
                    "norm_type='ada_norm_single'."
                )
            if block.attn2 is None or block.only_cross_attention or block.pos_embed is not None:
                raise ValueError(
                    f"catprune.apply: transformer_blocks[{index}] is not a PixArt block (it needs cross-attention "
                    "to the text, self-attention over the image and no per-block positional embedding); set "
                    "cross_attention_dim in the model config."
                )
            for attn_name in ("attn1", "attn2"):
                attn = getattr(block, attn_name)
                odd = [
                    name
                    for name, bad in (
                        ("spatial_norm", attn.spatial_norm is not None),
                        ("group_norm", attn.group_norm is not None),
                        ("norm_cross", attn.norm_cross is not None),
                        ("residual_connection", attn.residual_connection),
                        ("rescale_output_factor", attn.rescale_output_factor != 1.0),
                    )
                    if bad
                ]
                if odd:
                    raise ValueError(
                        f"catprune.apply: transformer_blocks[{index}].{attn_name} uses {', '.join(odd)}, which the "
                        "PixArt adapter does not implement; use a stock PixArt-Sigma transformer."
                    )
        require_processors(model, AttnProcessor2_0, "transformer.set_attn_processor(AttnProcessor2_0())")

    def inspect_call(self, args, kwargs, memo: dict | None = None) -> PixArtCallInfo:
        a = self.bind(args, kwargs)
        cfg = self.model.config
        hs, ehs, t = a["hidden_states"], a["encoder_hidden_states"], a["timestep"]
        if not isinstance(hs, torch.Tensor) or hs.dim() != 4 or hs.shape[1] != cfg.in_channels:
            raise ValueError(
                f"{_NAME}: hidden_states: expected a (batch, {cfg.in_channels}, height, width) latent tensor, got "
                f"{describe(hs)}. Pass the latents as produced by the pipeline."
            )
        b = hs.shape[0]
        text_dim = cfg.caption_channels if self.model.caption_projection is not None else cfg.cross_attention_dim
        if not isinstance(ehs, torch.Tensor) or ehs.dim() != 3 or ehs.shape[0] != b or ehs.shape[2] != text_dim:
            raise ValueError(
                f"{_NAME}: encoder_hidden_states: expected a ({b}, text_tokens, {text_dim}) tensor, got "
                f"{describe(ehs)}. catprune needs the text embeddings for cross-attention; pass the prompt "
                "embeddings (batch matching hidden_states)."
            )
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b,):
            raise ValueError(
                f"{_NAME}: timestep: expected a tensor of shape ({b},) (one timestep per batch row), got "
                f"{describe(t) if isinstance(t, torch.Tensor) else repr(t)}. Use t.expand(batch) as diffusers' "
                "PixArt pipelines do."
            )
        p = cfg.patch_size
        height, width = hs.shape[-2:]
        if height % p or width % p:
            raise ValueError(
                f"{_NAME}: hidden_states: expected latent height and width divisible by the patch size {p}, got "
                f"{height}x{width}. Choose an image size whose latents are multiples of {p}."
            )
        grid = (height // p, width // p)
        m, text = grid[0] * grid[1], ehs.shape[1]
        self._check_mask(a["encoder_attention_mask"], "encoder_attention_mask", b, text, "text tokens")
        self._check_mask(a["attention_mask"], "attention_mask", b, m, "image tokens")
        if self.model.use_additional_conditions:
            self._check_added_conds(a["added_cond_kwargs"], b)
        cak = a["cross_attention_kwargs"]
        if cak is not None and not isinstance(cak, dict):
            raise ValueError(f"{_NAME}: cross_attention_kwargs: expected a dict or None, got {type(cak).__name__}.")
        unsupported = sorted(set(cak or {}) - {"scale"})
        if unsupported:
            raise NotImplementedError(
                f"catprune: cross_attention_kwargs keys {unsupported} are not supported by the PixArt adapter (only "
                "'scale', which diffusers' PixArt blocks ignore, is accepted). Call catprune.remove(pipe) for these "
                "generations."
            )
        return PixArtCallInfo(
            arguments=a,
            batch=b,
            grid=grid,
            text_tokens=text,
            timestep=t,
            device=hs.device,
            dtype=hs.dtype,
            masks=(a["encoder_attention_mask"] is not None, a["attention_mask"] is not None),
        )

    @staticmethod
    def _check_mask(mask, name: str, batch: int, length: int, what: str) -> None:
        if mask is None:
            return
        ok = isinstance(mask, torch.Tensor) and (
            tuple(mask.shape) == (batch, length) or tuple(mask.shape) == (batch, 1, length)
        )
        if not ok:
            raise ValueError(
                f"{_NAME}: {name}: expected None, a ({batch}, {length}) keep-mask (1 keep, 0 discard) or a "
                f"({batch}, 1, {length}) additive bias over the {length} {what}, got {describe(mask)}. catprune "
                "supports key masks only (the same for every query)."
            )

    @staticmethod
    def _check_added_conds(added, batch: int) -> None:
        need = {"resolution": 2 * batch, "aspect_ratio": batch}
        for key, numel in need.items():
            value = added.get(key) if isinstance(added, dict) else None
            if not isinstance(value, torch.Tensor) or value.numel() != numel:
                raise ValueError(
                    f"{_NAME}: added_cond_kwargs[{key!r}]: this model uses additional conditions "
                    f"(use_additional_conditions=True) and needs a tensor of {numel} values ({batch} rows), got "
                    f"{describe(value)}. Pass added_cond_kwargs as PixArtAlphaPipeline does."
                )

    # ---------------------------------------------------------------- dense step that fills the caches
    @contextlib.contextmanager
    def capture(self, caches: list[BufferStore], info: CallInfo):
        """Temporary forward hooks on every block's self-attention ``to_k`` (or ``norm_k``) and ``to_v`` copy the
        dense step's image K/V into the (2, B, M, H, hd) caches; every hook is removed on exit."""
        b, m = info.batch, info.num_tokens
        with removing([]) as handles:
            for block, cache in zip(self.model.transformer_blocks, caches, strict=True):
                attn = block.attn1
                head_dim = attn.to_k.out_features // attn.heads
                buf = cache.kv_buffer("attn", (2, b, m, attn.heads, head_dim), info.dtype, attn.to_k.weight.device)
                key_module = attn.norm_k if attn.norm_k is not None else attn.to_k
                handles += capture_kv(buf, key_module, attn.to_v, attn.heads)
            yield

    # ---------------------------------------------------------------- pruned step
    def read_inputs(self, info: CallInfo) -> dict[str, torch.Tensor]:
        a = info.arguments
        inputs = dict(
            hidden_states=a["hidden_states"],
            encoder_hidden_states=a["encoder_hidden_states"],
            timestep=a["timestep"],  # (B,), checked by inspect_call
        )
        # masks as the (B, 1, S) biases the model's forward would make of them (converted here, outside the graph)
        for name in ("encoder_attention_mask", "attention_mask"):
            if a[name] is not None:
                inputs[name] = _mask_to_bias(a[name], info.dtype)
        if self.model.use_additional_conditions:
            inputs["resolution"] = a["added_cond_kwargs"]["resolution"]
            inputs["aspect_ratio"] = a["added_cond_kwargs"]["aspect_ratio"]
        return inputs

    def forward_kwargs(self, inputs: dict[str, torch.Tensor]) -> dict:
        inputs = dict(inputs)
        added = {"resolution": inputs.pop("resolution", None), "aspect_ratio": inputs.pop("aspect_ratio", None)}
        return dict(inputs, added_cond_kwargs=added)

    def pruned_core(
        self,
        caches,
        idx,
        m,
        hidden_states,
        encoder_hidden_states,
        timestep,
        encoder_attention_mask=None,
        attention_mask=None,
        resolution=None,
        aspect_ratio=None,
    ):
        """PixArtTransformer2DModel.forward over the (B, k) selected tokens ``idx``; masks are (B, 1, S) additive
        biases. Returns the selected tokens' outputs (B, k, P)."""
        model = self.model
        b = hidden_states.shape[0]
        x = model.pos_embed(hidden_states)  # (B, M, D)
        x = gather_tokens(x, idx)  # (B, k, D)  # CAT: gather the selected tokens
        added = {"resolution": resolution, "aspect_ratio": aspect_ratio}
        temb, embedded = model.adaln_single(timestep, added, batch_size=b, hidden_dtype=x.dtype)  # (B, 6D), (B, D)
        ctx = encoder_hidden_states
        if model.caption_projection is not None:
            ctx = model.caption_projection(ctx).view(b, -1, x.shape[-1])  # (B, T, D)
        self_bias = attention_mask.unsqueeze(1) if attention_mask is not None else None  # (B, 1, 1, M)
        cross_bias = encoder_attention_mask.unsqueeze(1) if encoder_attention_mask is not None else None  # (B,1,1,T)
        for block, cache in zip(model.transformer_blocks, caches, strict=True):
            x = self._block(block, cache.slot("attn"), x, ctx, temb, idx, self_bias, cross_bias)
        shift, scale = (model.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        x = modulate(model.norm_out(x), shift, scale)  # (B, k, D)  # CAT: fused modulation
        return model.proj_out(x)  # (B, k, P)

    def _block(self, block, kv, x, ctx, temb, idx, self_bias, cross_bias):
        """BasicTransformerBlock.forward (ada_norm_single) with the image stream restricted to the selected tokens."""
        # Same math as diffusers, fewer memory passes (docs/design.md decision 15)
        b = x.shape[0]
        table = block.scale_shift_table[None] + temb.reshape(b, 6, -1)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = table.chunk(6, dim=1)  # (B, 1, D) each
        nx = modulate(block.norm1(x), shift_msa, scale_msa)  # (B, k, D)  # CAT: fused modulation
        attn_out = self._self_attention(block.attn1, kv, nx, idx, self_bias)  # (B, k, D)  # CAT: cached attention
        x = gated_add(x, gate_msa, attn_out)  # (B, k, D)  # CAT: fused residual
        x = gated_add(x, None, self._cross_attention(block.attn2, x, ctx, cross_bias))  # no norm, no gate: PixArt
        ff_out = feed_forward(block.ff, modulate(block.norm2(x), shift_mlp, scale_mlp))  # (B, k, D)  # CAT: fused
        return gated_add(x, gate_mlp, ff_out)  # (B, k, D)  # CAT: fused residual

    @staticmethod
    def _self_attention(attn, kv, x, idx, bias):
        """Selected queries over all M image keys/values: fresh at ``idx`` (written into ``kv`` in place), cached
        elsewhere. ``kv``: the block's `KVSlot` over its (2, B, M, H, hd) cache; ``bias``: None or a (B, 1, 1, M) additive key bias."""
        b, k, _ = x.shape
        heads = attn.heads
        q = attn.to_q(x)  # (B, k, D)
        head_dim = q.shape[-1] // heads
        q = q.view(b, k, heads, head_dim).transpose(1, 2)  # (B, H, k, hd)
        key = attn.to_k(x).view(b, k, heads, head_dim)  # (B, k, H, hd)
        value = attn.to_v(x).view(b, k, heads, head_dim)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            key = attn.norm_k(key.transpose(1, 2)).transpose(1, 2)  # normalised in the processor's (B, H, k, hd)
        out = cached_attention(kv, idx, q.transpose(1, 2), (key, value), bias=bias)  # (B, k, H, hd)  # CAT: cached
        out = out.reshape(b, k, heads * head_dim).to(q.dtype)  # (B, k, D)
        return attn.to_out[1](attn.to_out[0](out))  # (B, k, D)

    @staticmethod
    def _cross_attention(attn, x, ctx, bias):
        """Selected queries over the T text tokens (K/V recomputed from ``ctx``); ``bias``: None or (B, 1, 1, T)."""
        b, k, _ = x.shape
        t = ctx.shape[1]
        heads = attn.heads
        q = attn.to_q(x)  # (B, k, D)
        head_dim = q.shape[-1] // heads
        q = q.view(b, k, heads, head_dim).transpose(1, 2)  # (B, H, k, hd)
        key = attn.to_k(ctx).view(b, t, heads, head_dim).transpose(1, 2)  # (B, H, T, hd)
        value = attn.to_v(ctx).view(b, t, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = sdpa(q.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), bias)  # (B, k, H, hd)
        out = out.reshape(b, k, heads * head_dim).to(q.dtype)  # (B, k, D)
        return attn.to_out[1](attn.to_out[0](out))  # (B, k, D)

    # ---------------------------------------------------------------- cost model
    def macs(self, info: CallInfo, computed_tokens: int) -> int:
        model = self.model
        m, t, n = info.num_tokens, info.text_tokens, computed_tokens
        d = model.inner_dim
        per_row = m * model.pos_embed.proj.weight.numel()  # patch embedding runs on every token
        emb = model.adaln_single.emb
        per_row += linear_macs(emb.timestep_embedder) + linear_macs(model.adaln_single.linear)
        if model.use_additional_conditions:  # two resolution values and one aspect ratio per row
            per_row += 2 * linear_macs(emb.resolution_embedder) + linear_macs(emb.aspect_ratio_embedder)
        if model.caption_projection is not None:
            per_row += t * linear_macs(model.caption_projection)
        per_row += n * linear_macs(model.proj_out)
        for block in model.transformer_blocks:
            a1, a2 = block.attn1, block.attn2
            per_row += n * (linear_macs(a1.to_q) + linear_macs(a1.to_k) + linear_macs(a1.to_v))
            per_row += n * (linear_macs(a1.to_out) + linear_macs(block.ff))
            per_row += 2 * n * m * d  # self-attention QK^T and AV: selected queries over all image keys
            per_row += n * (linear_macs(a2.to_q) + linear_macs(a2.to_out))
            per_row += t * (linear_macs(a2.to_k) + linear_macs(a2.to_v))  # text K/V, recomputed every step
            per_row += 2 * n * t * d  # cross-attention QK^T and AV
        return info.batch * per_row
