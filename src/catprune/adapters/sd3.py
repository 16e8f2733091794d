"""Stable Diffusion 3 / 3.5 adapter: diffusers ``SD3Transformer2DModel`` and its ``JointTransformerBlock``s."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_sd3 import SD3Transformer2DModel

from ..algorithm import gather_tokens, scatter_tokens_
from ..runtime.contract import Adapter, BufferStore, CallInfo
from .ops import gated_add, linear_macs, lora_scale, modulate


@torch.compiler.disable
def cached_attention(kv, idx, m: int, q, key, value, text=None) -> torch.Tensor:
    """Write the selected tokens' fresh keys / values (and this step's text K/V) into the cache ``kv`` in place,
    then attend with all of it: queries (B, k [+ T], H, hd) over (B, M [+ T]) keys. Returns (B, H, k [+ T], hd).

    Kept out of torch.compile's graphs on purpose: inductor functionalises in-place writes into a captured buffer
    and then copies the whole buffer back (measured on H200: 2.7 ms of a 18 ms SD3-medium pruned step). Eager, the
    writes are two small scatters; the compiled regions before and after still fuse the elementwise work. Under a
    CUDA graph of the whole step the graph break costs nothing.
    """
    scatter_tokens_(kv[0, :, :m], idx, key)  # (B, M, H, hd) fresh keys of the selected tokens
    scatter_tokens_(kv[1, :, :m], idx, value)
    if text is not None:
        kv[0, :, m:].copy_(text[0])  # (B, T, H, hd)
        kv[1, :, m:].copy_(text[1])
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), kv[0].transpose(1, 2), kv[1].transpose(1, 2), dropout_p=0.0, is_causal=False
    )  # (B, H, k + T, hd)


class SD3Adapter(Adapter):
    """CAT Pruning for SD3-family MMDiT transformers (SD3-medium, SD3.5-medium with dual attention, SD3.5-large).

    A pruned step keeps only the k selected image tokens as a compact stream through all blocks: unselected tokens
    are needed only through their keys/values (read from the per-block cache) and their final output (the runtime's
    output cache), so their hidden states are never materialised. This is exactly the semantics of method.md step 3
    (cached attention / feed-forward outputs of unselected tokens would only feed values nobody reads).
    """

    model_classes = (SD3Transformer2DModel,)
    family = "SD3 / SD3.5 (SD3Transformer2DModel)"

    # ---------------------------------------------------------------- checks
    def validate_model(self) -> None:
        for name, proc in self.model.attn_processors.items():
            if type(proc) is not JointAttnProcessor2_0:
                raise ValueError(
                    f"catprune.apply: attention processor {name!r} is {type(proc).__name__}; CAT Pruning on "
                    "SD3Transformer2DModel supports only diffusers' default JointAttnProcessor2_0. Undo fused QKV "
                    "projections (transformer.unfuse_qkv_projections()) or custom processors "
                    "(transformer.set_default_attn_processor()) before catprune.apply()."
                )

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

    # ---------------------------------------------------------------- output <-> tokens
    def output_tokens(self, output, info: CallInfo) -> torch.Tensor:
        sample = output.sample if isinstance(output, Transformer2DModelOutput) else output[0]  # (B, C, H, W)
        b, c = sample.shape[:2]
        h, w = info.grid
        p = self.model.config.patch_size
        tokens = sample.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
        return tokens.reshape(b, h * w, p * p * c)  # (B, M, P)

    def unpatchify(self, tokens: torch.Tensor, info: CallInfo) -> torch.Tensor:
        # the same unpatchify as SD3Transformer2DModel.forward
        b = tokens.shape[0]
        h, w = info.grid
        p = self.model.config.patch_size
        c = self.model.out_channels
        x = tokens.reshape(b, h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(b, c, h * p, w * p)  # (B, C, H, W)

    # ---------------------------------------------------------------- dense step that fills the caches
    @contextlib.contextmanager
    def capture(self, caches: list[BufferStore], info: CallInfo):
        handles = []
        b, m, t = info.batch, info.num_tokens, info.text_tokens

        def attach(attn, cache: BufferStore, name: str, extra: int):
            heads = attn.heads
            head_dim = attn.to_k.out_features // heads
            w = attn.to_k.weight
            buf = cache.buffer(name, (2, b, m + extra, heads, head_dim), info.dtype, w.device)

            def store_k(_mod, _inp, out):
                if out.dim() == 4:  # norm_k output: (B, H, M, hd)
                    buf[0, :, :m].copy_(out.transpose(1, 2))
                else:  # to_k output: (B, M, D)
                    buf[0, :, :m].copy_(out.view(b, m, heads, head_dim))

            def store_v(_mod, _inp, out):
                buf[1, :, :m].copy_(out.view(b, m, heads, head_dim))  # (B, M, H, hd)

            key_module = attn.norm_k if attn.norm_k is not None else attn.to_k
            handles.append(key_module.register_forward_hook(store_k))
            handles.append(attn.to_v.register_forward_hook(store_v))

        try:
            for block, cache in zip(self.model.transformer_blocks, caches, strict=True):
                attach(block.attn, cache, "attn", t)
                if block.attn2 is not None:
                    attach(block.attn2, cache, "attn2", 0)
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ---------------------------------------------------------------- pruned step
    def pruned_forward(self, caches: list[BufferStore], idx: torch.Tensor, info: CallInfo) -> torch.Tensor:
        a = info.arguments
        with lora_scale(self.model, a.get("joint_attention_kwargs")):
            return self._pruned(
                caches,
                idx,
                a["hidden_states"],
                a["encoder_hidden_states"],
                a["pooled_projections"],
                a["timestep"],
                info.num_tokens,
                a.get("block_controlnet_hidden_states"),
            )

    def _pruned(self, caches, idx, hidden_states, encoder_hidden_states, pooled, timestep, m, controlnet=None):
        model = self.model
        x = model.pos_embed(hidden_states)  # (B, M, D)
        x = gather_tokens(x, idx)  # (B, k, D) compact stream of the selected tokens
        temb = model.time_text_embed(timestep, pooled)  # (B, D)
        ctx = model.context_embedder(encoder_hidden_states)  # (B, T, D)
        blocks = model.transformer_blocks
        for index, (block, cache) in enumerate(zip(blocks, caches, strict=True)):
            ctx, x = self._block(block, cache["attn"], cache.get("attn2"), x, ctx, temb, idx, m)
            if controlnet is not None and block.context_pre_only is False:
                interval = len(blocks) / len(controlnet)
                x = x + gather_tokens(controlnet[int(index / interval)], idx)  # (B, k, D)
        x = model.norm_out(x, temb)  # (B, k, D)
        return model.proj_out(x)  # (B, k, P)

    # ---------------------------------------------------------------- static-shape functions for compile / graphs
    def fast_inputs(self, info: CallInfo) -> dict[str, torch.Tensor] | None:
        a = info.arguments
        if a.get("joint_attention_kwargs") or a.get("block_controlnet_hidden_states") is not None:
            return None  # LoRA scale / ControlNet: eager path
        t = a["timestep"]
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            t = torch.as_tensor(t, device=info.device).reshape(1)
        return dict(
            hidden_states=a["hidden_states"],
            encoder_hidden_states=a["encoder_hidden_states"],
            pooled_projections=a["pooled_projections"],
            timestep=t.expand(info.batch),
        )

    def dense_fn(self, original):
        def dense(hidden_states, encoder_hidden_states, pooled_projections, timestep):
            return original(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                return_dict=False,
            )[0]  # (B, C, H, W)

        return dense

    def pruned_fn(self, caches: list[BufferStore], info: CallInfo):
        m = info.num_tokens

        def pruned(idx, hidden_states, encoder_hidden_states, pooled_projections, timestep):
            return self._pruned(caches, idx, hidden_states, encoder_hidden_states, pooled_projections, timestep, m)

        return pruned

    def wrap_sample(self, sample: torch.Tensor, info: CallInfo):
        if not info.arguments.get("return_dict", True):
            return (sample,)
        return Transformer2DModelOutput(sample=sample)

    def _block(self, block, kv, kv2, x, ctx, temb, idx, m):
        # JointTransformerBlock.forward with the image stream restricted to the selected tokens. Same math, fewer
        # memory passes: every `a * (1 + s) + b` modulation and `x + g * y` gated residual is one addcmul kernel (one
        # rounding instead of two in bf16), which matters in a pruned step where these passes are ~20% of the time.
        emb = block.norm1.linear(block.norm1.silu(temb))  # (B, 6D) or (B, 9D) with dual attention
        if block.use_dual_attention:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift2, scale2, gate_msa2 = emb.chunk(9, 1)
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)  # (B, D) each
        normed = block.norm1.norm(x)  # (B, k, D)
        nx = modulate(normed, shift_msa, scale_msa)
        nctx, c_gates = self._norm1_context(block, ctx, temb)

        img_out, ctx_out = self._attention(block.attn, kv, nx, nctx, idx, m)
        x = gated_add(x, gate_msa, img_out)  # (B, k, D)
        if block.use_dual_attention:
            img_out2, _ = self._attention(block.attn2, kv2, modulate(normed, shift2, scale2), None, idx, m)
            x = gated_add(x, gate_msa2, img_out2)

        x = gated_add(x, gate_mlp, block.ff(modulate(block.norm2(x), shift_mlp, scale_mlp)))  # (B, k, D)

        if block.context_pre_only:
            return None, x
        c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_gates
        ctx = gated_add(ctx, c_gate_msa, ctx_out)  # (B, T, D) text stream stays dense
        ctx = gated_add(
            ctx, c_gate_mlp, block.ff_context(modulate(block.norm2_context(ctx), c_shift_mlp, c_scale_mlp))
        )
        return ctx, x

    @staticmethod
    def _norm1_context(block, ctx, temb):
        """The text stream's first norm and modulation (AdaLayerNormZero, or AdaLayerNormContinuous in the last
        block): the modulated text and the remaining gates / shifts / scales (None in the last block)."""
        norm = block.norm1_context
        if block.context_pre_only:  # AdaLayerNormContinuous: (scale, shift) order, silu output cast to x's dtype
            scale, shift = norm.linear(norm.silu(temb).to(ctx.dtype)).chunk(2, dim=1)
            return modulate(norm.norm(ctx), shift, scale), None
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = norm.linear(norm.silu(temb)).chunk(6, dim=1)
        return modulate(norm.norm(ctx), shift, scale), (gate, shift_mlp, scale_mlp, gate_mlp)

    @staticmethod
    def _attention(attn, kv: torch.Tensor, x, ctx, idx, m):
        """Selected queries (+ text queries) over all image keys (fresh at idx, cached elsewhere) + text keys.

        ``kv``: (2, B, M + T, H, hd) cache; this writes the fresh K/V of the selected tokens and this step's text
        K/V into it in place, so attention reads one buffer without concatenation.
        """
        b, k, _ = x.shape
        heads = attn.heads
        q = attn.to_q(x)  # (B, k, D)
        head_dim = q.shape[-1] // heads
        q = q.view(b, k, heads, head_dim)  # (B, k, H, hd)
        key = attn.to_k(x).view(b, k, heads, head_dim)
        value = attn.to_v(x).view(b, k, heads, head_dim)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = None
        if ctx is not None:
            t = ctx.shape[1]
            qc = attn.add_q_proj(ctx).view(b, t, heads, head_dim)  # (B, T, H, hd)
            kc = attn.add_k_proj(ctx).view(b, t, heads, head_dim)
            vc = attn.add_v_proj(ctx).view(b, t, heads, head_dim)
            if attn.norm_added_q is not None:
                qc = attn.norm_added_q(qc)
            if attn.norm_added_k is not None:
                kc = attn.norm_added_k(kc)
            text = (kc, vc)
            q = torch.cat([q, qc], dim=1)  # (B, k + T, H, hd)
        out = cached_attention(kv, idx, m, q, key, value, text)  # (B, H, k + T, hd)
        out = out.transpose(1, 2).reshape(b, -1, heads * head_dim).to(q.dtype)  # (B, k + T, D)
        img, txt = out[:, :k], out[:, k:]
        if ctx is not None and not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        img = attn.to_out[1](attn.to_out[0](img))  # (B, k, D)
        return img, txt

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
