"""Stable Diffusion 3 / 3.5 adapter: diffusers ``SD3Transformer2DModel`` and its ``JointTransformerBlock``s."""

from __future__ import annotations

import contextlib
import functools

import torch
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from ..algorithm import gather_tokens
from ..runtime.contract import BufferStore, CallInfo
from .common import PatchGridAdapter, cached_attention, capture_kv, removing, require_processors
from .lanes import Lanes
from .modulation import Conditioning, Modulations
from .ops import feed_forward, gated_add, linear_macs, modulate


def _modulation(block, cond: Conditioning):
    """A JointTransformerBlock's image-stream modulation: its 6 (9 with dual attention) (B, D) shifts, scales and
    gates, from the step's `Conditioning`."""
    emb = cond(block.norm1.linear)  # (B, 6D) or (B, 9D)
    return emb.chunk(9 if block.use_dual_attention else 6, dim=1)


def _qkv(x, heads: int, head_dim: int, to_q, to_k, to_v, norm_q, norm_k):
    """Queries, keys and values of tokens ``x`` (B, N, D) as (B, N, H, hd), with the optional QK norms."""
    b, n, _ = x.shape
    q = to_q(x).view(b, n, heads, head_dim)  # (B, N, H, hd)
    key = to_k(x).view(b, n, heads, head_dim)
    value = to_v(x).view(b, n, heads, head_dim)
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        key = norm_k(key)
    return q, key, value


class SD3Adapter(PatchGridAdapter):
    """CAT Pruning for SD3-family MMDiT transformers (SD3-medium, SD3.5-medium with dual attention, SD3.5-large).

    A pruned step keeps only the k selected image tokens as a compact stream through all blocks: unselected tokens
    are needed only through their keys/values (read from the per-block cache) and their final output (the runtime's
    output cache), so their hidden states are never materialised. This is exactly the semantics of docs/method.md
    step 3 (cached attention / feed-forward outputs of unselected tokens would only feed values nobody reads).
    """

    model_classes = (SD3Transformer2DModel,)
    family = "SD3 / SD3.5 (SD3Transformer2DModel)"
    lora_argument = "joint_attention_kwargs"
    #: run the text stream of a pruned step on a second CUDA stream (`Lanes`); no effect on a CPU
    two_lanes = True
    modulation_inputs = ("timestep", "pooled_projections")

    @functools.cached_property
    def modulations(self) -> Modulations:
        """Every block's norm1 / norm1_context linear and norm_out's, after ``time_text_embed``."""
        model = self.model
        linears = [lin for b in model.transformer_blocks for lin in (b.norm1.linear, b.norm1_context.linear)]
        return Modulations([*linears, model.norm_out.linear], model.time_text_embed, self.modulation_inputs)

    def scheduled_timesteps(self, timesteps: torch.Tensor, info: CallInfo) -> torch.Tensor:
        return timesteps.reshape(-1, 1).expand(-1, info.batch)  # StableDiffusion3Pipeline: t.expand(batch)

    # ---------------------------------------------------------------- checks
    def validate_model(self) -> None:
        require_processors(self.model, JointAttnProcessor2_0, "transformer.set_default_attn_processor()")

    def inspect_call(self, args, kwargs, memo: dict | None = None) -> CallInfo:
        a = self.bind(args, kwargs)
        hs, ehs = a["hidden_states"], a["encoder_hidden_states"]
        if not isinstance(hs, torch.Tensor) or hs.dim() != 4:
            got = tuple(hs.shape) if isinstance(hs, torch.Tensor) else type(hs).__name__
            raise ValueError(
                f"SD3Transformer2DModel.forward: hidden_states: expected a (batch, channels, height, width) tensor, "
                f"got {got}. Pass the latents as produced by the pipeline."
            )
        if not isinstance(ehs, torch.Tensor) or ehs.dim() != 3:
            raise ValueError(
                "SD3Transformer2DModel.forward: encoder_hidden_states: expected a (batch, text_tokens, dim) tensor, "
                f"got {type(ehs).__name__}. catprune keeps the text stream dense and needs it."
            )
        p = self.model.config.patch_size
        height, width = hs.shape[-2:]
        max_size = self.model.config.pos_embed_max_size
        if height % p or width % p:
            raise ValueError(
                f"hidden_states: expected latent height and width divisible by the patch size {p}, got "
                f"{height}x{width}. Choose an image size whose latents are multiples of {p} (e.g. pixels multiple "
                f"of {p * 8} for an 8x VAE)."
            )
        if max_size is not None and (height // p > max_size or width // p > max_size):
            raise ValueError(
                f"hidden_states: latent grid {height // p}x{width // p} exceeds this model's pos_embed_max_size "
                f"{max_size}. Use a smaller image (latents at most {max_size * p} per side)."
            )
        jak = a.get("joint_attention_kwargs") or {}
        if "ip_adapter_image_embeds" in jak:
            raise NotImplementedError(
                "catprune: IP-Adapter inputs (joint_attention_kwargs['ip_adapter_image_embeds']) are not supported "
                "by the SD3 adapter yet. Call catprune.remove(pipe) for IP-Adapter generations."
            )
        return CallInfo(
            arguments=a,
            batch=hs.shape[0],
            grid=(height // p, width // p),
            text_tokens=ehs.shape[1],
            timestep=a["timestep"],
            device=hs.device,
            dtype=hs.dtype,
        )

    def is_auxiliary(self, info: CallInfo) -> bool:
        # SD3 pipelines make a second call per step for skip-layer guidance: run it dense and leave the state alone
        return bool(info.arguments.get("skip_layers"))

    # ---------------------------------------------------------------- dense step that fills the caches
    @contextlib.contextmanager
    def capture(self, caches: list[BufferStore], info: CallInfo):
        b, m, t = info.batch, info.num_tokens, info.text_tokens
        with removing([]) as handles:
            for block, cache in zip(self.model.transformer_blocks, caches, strict=True):
                for name, attn, tail in (("attn", block.attn, t), ("attn2", block.attn2, 0)):
                    if attn is None:
                        continue
                    head_dim = attn.to_k.out_features // attn.heads
                    shape = (2, b, m + tail, attn.heads, head_dim)  # joint attention: text K/V in the tail
                    buf = cache.kv_buffer(name, shape, info.dtype, attn.to_k.weight.device, image_tokens=m)
                    key_module = attn.norm_k if attn.norm_k is not None else attn.to_k
                    handles += capture_kv(buf, key_module, attn.to_v, attn.heads)
            yield

    # ---------------------------------------------------------------- pruned step
    def read_inputs(self, info: CallInfo) -> dict[str, torch.Tensor]:
        a = info.arguments
        t = a["timestep"]
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            t = torch.as_tensor(t, device=info.device).reshape(1)
        return dict(
            hidden_states=a["hidden_states"],
            encoder_hidden_states=a["encoder_hidden_states"],
            pooled_projections=a["pooled_projections"],
            timestep=t.expand(info.batch),  # (B,)
        )

    def needs_eager(self, info: CallInfo) -> bool:
        a = info.arguments
        return bool(a.get("joint_attention_kwargs")) or a.get("block_controlnet_hidden_states") is not None

    def eager_extras(self, info: CallInfo) -> dict:
        return dict(controlnet=info.arguments.get("block_controlnet_hidden_states"))

    def pruned_core(
        self,
        caches,
        idx,
        m,
        hidden_states,
        encoder_hidden_states,
        pooled_projections,
        timestep,
        controlnet=None,
        modulation=None,
    ):
        """SD3Transformer2DModel.forward over the (B, k) selected tokens ``idx``; returns their outputs (B, k, P).
        ``modulation``: this step's precomputed modulation row (B, W) of `modulations`, or None to compute it.

        The text stream runs on its own CUDA stream between the joint attentions (`Lanes`, when ``self.two_lanes``
        and the inputs are on a GPU): the same kernels in the same order within each stream."""
        model = self.model
        x = model.pos_embed(hidden_states)  # (B, M, D)
        x = gather_tokens(x, idx)  # (B, k, D)  # CAT: gather the selected tokens
        cond = self.modulations.conditioning(modulation, timestep=timestep, pooled_projections=pooled_projections)
        ctx = model.context_embedder(encoder_hidden_states)  # (B, T, D)
        blocks = model.transformer_blocks
        lanes = Lanes.for_device(x.device, self.two_lanes)
        lanes.fork(*cond.handed(), ctx)
        text = self._text_in(blocks[0], ctx, cond)
        mods = [None, _modulation(blocks[1], cond) if len(blocks) > 1 else None]  # this block's and the next's
        lanes.back()
        for index, (block, cache) in enumerate(zip(blocks, caches, strict=True)):
            after, later = (blocks[i] if i < len(blocks) else None for i in (index + 1, index + 2))
            x, ctx, text, ahead = self._block(block, after, later, cache, x, ctx, cond, text, mods[0], idx, lanes)
            mods = [mods[1], ahead]
            if controlnet is not None and block.context_pre_only is False:
                interval = len(blocks) / len(controlnet)
                x = x + gather_tokens(controlnet[int(index / interval)], idx)  # (B, k, D)  # CAT: gather
        lanes.finish()
        x = cond.continuous_norm(model.norm_out, x)  # (B, k, D)
        return model.proj_out(x)  # (B, k, P)

    def _block(self, block, after, later, cache, x, ctx, cond, text, mod, idx, lanes):
        """JointTransformerBlock.forward with the image stream restricted to the selected tokens; on the text lane,
        the text stream's half after the attention, the text Q/K/V of the block ``after`` and the image modulation
        of the block ``later`` (the one after that). ``mod``: this block's image modulation if computed early. Same
        math, fewer memory passes: every `a * (1 + s) + b` modulation and `x + g * y` gated residual is one addcmul
        kernel (docs/design.md decision 15). Returns the image tokens, the text tokens, ``after``'s text inputs and
        ``later``'s modulation. (Blocks, not their indices, are the arguments: torch.compile would compile the
        function again for every index.)"""
        if mod is None:
            mod = _modulation(block, cond)
        if block.use_dual_attention:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift2, scale2, gate_msa2 = mod
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod  # (B, D) each
        normed = block.norm1.norm(x)  # (B, k, D)
        nx = modulate(normed, shift_msa, scale_msa)  # CAT: fused modulation
        attn = block.attn
        b, k, _ = x.shape
        heads = attn.heads
        head_dim = attn.to_q.out_features // heads
        q, key, value = _qkv(nx, heads, head_dim, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        (qc, kc, vc), c_gates = text
        lanes.meet(qc, kc, vc)
        q = torch.cat([q, qc], dim=1)  # (B, k + T, H, hd)
        out = cached_attention(cache.slot("attn"), idx, q, (key, value), (kc, vc))  # CAT: cached attention
        out = out.reshape(b, -1, heads * head_dim).to(q.dtype)  # (B, k + T, D)
        img, txt = out[:, :k], out[:, k:]
        ahead = None
        if block.context_pre_only:
            ctx, text = None, None
        else:
            lanes.fork(txt)
            ctx = self._text_out(block, ctx, attn.to_add_out(txt), c_gates)  # (B, T, D) text stream stays dense
            text = self._text_in(after, ctx, cond) if after is not None else None
            if later is not None:  # read by the image lane after the next meet, held until the block after that
                ahead = _modulation(later, cond)
            lanes.back()
        x = gated_add(x, gate_msa, attn.to_out[1](attn.to_out[0](img)))  # (B, k, D)  # CAT: fused residual
        if block.use_dual_attention:
            kv2 = cache.slot("attn2")
            img_out2 = self._attention(block.attn2, kv2, modulate(normed, shift2, scale2), idx)  # CAT: cached
            x = gated_add(x, gate_msa2, img_out2)  # CAT: fused residual
        x = gated_add(x, gate_mlp, feed_forward(block.ff, modulate(block.norm2(x), shift_mlp, scale_mlp)))  # CAT: fused
        return x, ctx, text, ahead

    @classmethod
    def _text_in(cls, block, ctx, cond):
        """The text stream up to the attention: its (B, T, H, hd) queries, keys and values and its later gates."""
        attn = block.attn
        heads = attn.heads
        nctx, c_gates = cls._norm1_context(block, ctx, cond)
        qkv = _qkv(
            nctx, heads, attn.add_q_proj.out_features // heads, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
            attn.norm_added_q, attn.norm_added_k,
        )
        return qkv, c_gates

    @staticmethod
    def _text_out(block, ctx, ctx_out, c_gates):
        """The text stream after the attention (``ctx_out``: its projected attention output)."""
        c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_gates
        ctx = gated_add(ctx, c_gate_msa, ctx_out)  # (B, T, D)  # CAT: fused residual
        return gated_add(  # CAT: fused modulation and residual
            ctx, c_gate_mlp, feed_forward(block.ff_context, modulate(block.norm2_context(ctx), c_shift_mlp, c_scale_mlp))
        )

    @staticmethod
    def _norm1_context(block, ctx, cond):
        """The text stream's first norm and modulation (AdaLayerNormZero, or AdaLayerNormContinuous in the last
        block): the modulated text and the remaining gates / shifts / scales (None in the last block)."""
        norm = block.norm1_context
        if block.context_pre_only:  # AdaLayerNormContinuous
            return cond.continuous_norm(norm, ctx), None
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = cond(norm.linear).chunk(6, dim=1)
        return modulate(norm.norm(ctx), shift, scale), (gate, shift_mlp, scale_mlp, gate_mlp)  # CAT: fused

    @staticmethod
    def _attention(attn, kv, x, idx):
        """Selected queries over all image keys (fresh at idx, cached elsewhere): the image-only second attention
        of SD3.5's dual-attention blocks, projected out: (B, k, D). ``kv``: the block's `KVSlot` over its
        (2, B, M, H, hd) cache."""
        b, k, _ = x.shape
        heads = attn.heads
        head_dim = attn.to_q.out_features // heads
        q, key, value = _qkv(x, heads, head_dim, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        out = cached_attention(kv, idx, q, (key, value))  # (B, k, H, hd)  # CAT: cached attention
        out = out.reshape(b, -1, heads * head_dim).to(q.dtype)  # (B, k, D)
        return attn.to_out[1](attn.to_out[0](out))

    # ---------------------------------------------------------------- cost model
    def macs(self, info: CallInfo, computed_tokens: int) -> int:
        model = self.model
        m, t, n = info.num_tokens, info.text_tokens, computed_tokens
        d = model.inner_dim
        conv = model.pos_embed.proj
        per_row = m * conv.weight.numel()  # patch embedding runs on every token
        per_row += linear_macs(model.time_text_embed)
        per_row += t * linear_macs(model.context_embedder)
        per_row += linear_macs(model.norm_out) + n * linear_macs(model.proj_out)
        for block in model.transformer_blocks:
            attn = block.attn
            per_row += linear_macs(block.norm1) + linear_macs(block.norm1_context)
            per_row += n * (linear_macs(attn.to_q) + linear_macs(attn.to_k) + linear_macs(attn.to_v))
            per_row += n * (linear_macs(attn.to_out) + linear_macs(block.ff))
            per_row += t * (linear_macs(attn.add_q_proj) + linear_macs(attn.add_k_proj))
            per_row += t * linear_macs(attn.add_v_proj)
            if not block.context_pre_only:
                per_row += t * (linear_macs(attn.to_add_out) + linear_macs(block.ff_context))
            per_row += 2 * (n + t) * (m + t) * d  # QK^T and AV
            if block.attn2 is not None:
                per_row += n * linear_macs(block.attn2) + 2 * n * m * d
        return info.batch * per_row
