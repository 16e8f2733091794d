"""Flux adapter: diffusers ``FluxTransformer2DModel`` (FLUX.1-dev / -schnell and friends, as used by FluxPipeline).

Flux runs two kinds of blocks over ``[text; image]`` tokens with rotary position embeddings (RoPE) from
``txt_ids`` / ``img_ids``: double-stream ``transformer_blocks`` (separate image / text weights, joint attention, like
SD3) and single-stream ``single_transformer_blocks`` (one stream over the concatenated tokens, attention and MLP in
parallel, shared weights). A pruned step keeps only the k selected image tokens as a compact stream through both
kinds; the text stream stays dense. Every block has its own K/V cache of all M image tokens.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxTransformer2DModel

from ..algorithm import gather_tokens
from ..runtime.contract import BufferStore, CallInfo
from .common import DiffusersAdapter, cached_attention, capture_kv, removing, sample_of
from .modulation import Conditioning, Modulations
from .ops import describe, feed_forward, gated_add, gelu_linear, linear_macs, modulate

_NAME = "FluxTransformer2DModel.forward"


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Flux's rotary embedding (interleaved pairs) with per-row positions.

    The same arithmetic as diffusers' ``apply_rotary_emb(..., use_real=True, use_real_unbind_dim=-1)``, but ``cos`` /
    ``sin`` may carry a batch dimension, since every sample selects its own tokens.

    Args:
        x: (B, S, H, hd) queries or keys.
        cos, sin: (B, S, hd) or (S, hd) float32 rotary tables of the tokens in ``x``.
    """
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]  # (1, S, hd)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, S, 1, hd)
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)  # (B, S, H, hd / 2) each
    rotated = torch.stack([-imag, real], dim=-1).flatten(3)  # (B, S, H, hd)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def _mlp_in(block, x: torch.Tensor) -> torch.Tensor:
    """A FluxSingleTransformerBlock's MLP input ``act_mlp(proj_mlp(x))``: one GEMM with a GELU epilogue where
    `gelu_linear` fuses (the block's activation is ``nn.GELU(approximate="tanh")``)."""
    act = block.act_mlp
    if type(act) is not torch.nn.GELU:
        return act(block.proj_mlp(x))
    return gelu_linear(block.proj_mlp, x, act.approximate)


def _ids_2d(ids: torch.Tensor) -> torch.Tensor:
    """Position ids as (S, 3): diffusers still accepts a deprecated (1, S, 3) form and reads its first row."""
    return ids[0] if ids.dim() == 3 else ids


class FluxAdapter(DiffusersAdapter):
    """CAT Pruning for Flux transformers (``FluxTransformer2DModel``: FLUX.1-dev, FLUX.1-schnell, Fill / Canny /
    Depth variants whose extra conditioning is concatenated along channels).

    Pruned step (docs/method.md step 3 on Flux's two kinds of blocks):

    - double-stream blocks: queries are the k selected image tokens plus all T text tokens; keys / values are all M
      image tokens (fresh at the selection, cached elsewhere) plus the text;
    - single-stream blocks: the stream is ``[text (T); selected image tokens (k)]``; attention of those T + k queries
      runs over the text and all M image keys / values (cached + fresh); the MLP runs on the T + k tokens;
    - the caches hold keys after ``norm_k`` *and* after the rotary embedding, so cached keys are valid as they are;
      fresh queries / keys of the selected tokens are rotated with their own positions, gathered per sample.

    The image-token grid ``(h, w)`` that clustering needs is read from ``img_ids``, which must list the tokens in
    raster order (as FluxPipeline builds them); anything else is refused with a clear error.
    """

    model_classes = (FluxTransformer2DModel,)
    family = "Flux (FluxTransformer2DModel)"
    lora_argument = "joint_attention_kwargs"
    modulation_inputs = ("timestep", "pooled_projections", "guidance")

    @functools.cached_property
    def modulations(self) -> Modulations:
        """Every double block's norm1 / norm1_context linear, every single block's norm linear, norm_out's."""
        model = self.model
        linears = [lin for b in model.transformer_blocks for lin in (b.norm1.linear, b.norm1_context.linear)]
        linears += [b.norm.linear for b in model.single_transformer_blocks]
        return Modulations([*linears, model.norm_out.linear], self._embed, self.modulation_inputs)

    def _embed(self, timestep, pooled_projections, guidance=None):
        """FluxTransformer2DModel.forward's temb (N, D) from its timestep / guidance inputs (both divided by 1000)."""
        model = self.model
        dtype = model.x_embedder.weight.dtype
        if guidance is None:
            return model.time_text_embed(timestep.to(dtype) * 1000, pooled_projections)
        return model.time_text_embed(timestep.to(dtype) * 1000, guidance.to(dtype) * 1000, pooled_projections)

    def scheduled_timesteps(self, timesteps: torch.Tensor, info: CallInfo) -> torch.Tensor:
        # FluxPipeline: t.expand(batch).to(latents.dtype), passed as timestep / 1000
        return (timesteps.to(info.dtype) / 1000).reshape(-1, 1).expand(-1, info.batch)

    # ---------------------------------------------------------------- checks
    def num_caches(self) -> int:
        """One K/V cache per double-stream block and per single-stream block."""
        return len(self.model.transformer_blocks) + len(self.model.single_transformer_blocks)

    def _attentions(self):
        blocks = list(self.model.transformer_blocks) + list(self.model.single_transformer_blocks)
        return [(name, block.attn) for name, block in zip(self._block_names(), blocks, strict=True)]

    def _block_names(self) -> list[str]:
        return [f"transformer_blocks.{i}.attn" for i in range(len(self.model.transformer_blocks))] + [
            f"single_transformer_blocks.{i}.attn" for i in range(len(self.model.single_transformer_blocks))
        ]

    def validate_model(self) -> None:
        """Raise ValueError unless every attention uses diffusers' default FluxAttnProcessor with unfused Q/K/V."""
        for name, attn in self._attentions():
            proc = attn.processor
            if type(proc) is not FluxAttnProcessor:
                raise ValueError(
                    f"catprune.apply: attention processor of {name!r} is {type(proc).__name__}; CAT Pruning on "
                    "FluxTransformer2DModel supports only diffusers' default FluxAttnProcessor (IP-Adapter and "
                    "custom processors are not supported). Call transformer.set_default_attn_processor() (or unload "
                    "the IP-Adapter) before catprune.apply()."
                )
            if getattr(attn, "fused_projections", False):
                raise ValueError(
                    f"catprune.apply: {name!r} has fused QKV projections; CAT Pruning on FluxTransformer2DModel "
                    "needs the separate to_q / to_k / to_v. Call transformer.unfuse_qkv_projections() before "
                    "catprune.apply()."
                )
            if getattr(proc, "_parallel_config", None) is not None:
                raise ValueError(
                    f"catprune.apply: {name!r} runs with context parallelism (a parallel_config is set); CAT "
                    "Pruning gathers image tokens per sample and does not support sharded sequences. Disable "
                    "context parallelism before catprune.apply()."
                )

    @staticmethod
    def _grid(img_ids: torch.Tensor, m: int, memo: dict) -> tuple[int, int]:
        """The (h, w) grid of ``img_ids`` (S, 3), checked to be raster order; memoised per ids tensor in ``memo``
        (``memo["grid"]``: weakref to img_ids, its version, the grid), since the check costs one host sync."""
        try:
            version = img_ids._version
        except RuntimeError:  # inference-mode tensors track no version
            version = None
        known = memo.get("grid")
        if known is not None and known[0]() is img_ids and known[1] == version and version is not None:
            return known[2]
        ids = img_ids.detach().to("cpu", torch.float64)  # (M, 3): one host sync per ids tensor
        rows, cols = ids[:, 1], ids[:, 2]
        h = int(rows.max() - rows.min()) + 1 if m else 0
        w = int(cols.max() - cols.min()) + 1 if m else 0
        j = torch.arange(m, dtype=torch.float64)
        raster = (
            h * w == m
            and torch.equal(rows, rows.min() + torch.div(j, max(w, 1), rounding_mode="floor"))
            and torch.equal(cols, cols.min() + j % max(w, 1))
            and torch.equal(ids[:, 0], ids[:1, 0].expand(m))
        )
        if not raster:
            raise ValueError(
                f"{_NAME}: img_ids: expected the {m} image tokens in raster order of one h x w grid, as FluxPipeline "
                "builds them (img_ids[j] = (0, j // w, j % w)), got ids that are not (e.g. extra reference-image "
                "tokens as in Kontext, or a shuffled order). CAT Pruning clusters tokens on a raster grid; call "
                "catprune.remove(pipe) for this pipeline."
            )
        memo["grid"] = (weakref.ref(img_ids), version, (h, w))
        return h, w

    @staticmethod
    def _check_single_call_per_step(hs: torch.Tensor, ehs: torch.Tensor, memo: dict) -> None:
        """Refuse a second transformer call on the same latents with other text (FluxPipeline's true CFG).

        FluxPipeline with ``true_cfg_scale > 1`` and a negative prompt calls the transformer twice per step, on the
        same ``latents`` tensor: positive prompt, then negative prompt. catprune counts one call per step, so the
        negative call would be taken for a new generation (and its K/V for the positive prompt's). Detected without
        a host sync: the latents tensor is the very one of the previous call, unmodified (same version counter), and
        the previous call's text embeddings are still alive but another tensor (``memo["last_call"]``: weakref to
        hidden_states, its version, weakref to encoder_hidden_states).
        """
        try:
            version = hs._version
        except RuntimeError:
            version = None
        last = memo.get("last_call")
        memo["last_call"] = (weakref.ref(hs), version, weakref.ref(ehs))
        if last is None or version is None or last[0]() is not hs or last[1] != version:
            return
        previous_text = last[2]()
        if previous_text is not None and previous_text is not ehs:
            memo.pop("last_call")  # the next generation starts clean
            raise NotImplementedError(
                "catprune: the transformer was called twice on the same latents with different text embeddings "
                "(FluxPipeline's true classifier-free guidance: true_cfg_scale > 1 with a negative prompt makes a "
                "positive and a negative call per denoising step). CAT Pruning counts one transformer call per step "
                "and does not support this yet. Use true_cfg_scale=1 (FLUX.1-dev is guidance-distilled: use "
                "guidance_scale), or call catprune.remove(pipe) for true-CFG generations."
            )

    def inspect_call(self, args, kwargs, memo: dict | None = None) -> CallInfo:
        a = self.bind(args, kwargs)
        cfg = self.model.config
        hs, ehs, pooled = a["hidden_states"], a["encoder_hidden_states"], a["pooled_projections"]
        if not isinstance(hs, torch.Tensor) or hs.dim() != 3 or hs.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"{_NAME}: hidden_states: expected packed latents of shape (batch, image_tokens, "
                f"{cfg.in_channels}), got {describe(hs)}. Pass the latents as FluxPipeline packs them."
            )
        b, m = hs.shape[:2]
        if not isinstance(ehs, torch.Tensor) or ehs.dim() != 3 or ehs.shape[0] != b:
            raise ValueError(
                f"{_NAME}: encoder_hidden_states: expected a ({b}, text_tokens, {cfg.joint_attention_dim}) tensor, "
                f"got {describe(ehs)}. catprune keeps the text stream dense and needs it."
            )
        t = ehs.shape[1]
        if not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != (b, cfg.pooled_projection_dim):
            raise ValueError(
                f"{_NAME}: pooled_projections: expected a ({b}, {cfg.pooled_projection_dim}) tensor, got "
                f"{describe(pooled)}."
            )
        timestep = a["timestep"]
        if not isinstance(timestep, torch.Tensor) or timestep.dim() > 1 or timestep.numel() not in (1, b):
            raise ValueError(
                f"{_NAME}: timestep: expected a tensor of shape () or ({b},) (FluxPipeline passes t / 1000), got "
                f"{describe(timestep)}."
            )
        guidance = a.get("guidance")
        if cfg.guidance_embeds and not (
            isinstance(guidance, torch.Tensor) and guidance.dim() <= 1 and guidance.numel() in (1, b)
        ):
            raise ValueError(
                f"{_NAME}: guidance: this model embeds the guidance scale (guidance_embeds=True, e.g. FLUX.1-dev) "
                f"and needs a tensor of shape () or ({b},), got {describe(guidance)}."
            )
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError(
                f"{_NAME}: guidance: this model has no guidance embedding (guidance_embeds=False, e.g. "
                f"FLUX.1-schnell), expected None, got {describe(guidance)}."
            )
        for name, ids, rows in (("img_ids", a["img_ids"], m), ("txt_ids", a["txt_ids"], t)):
            ok = isinstance(ids, torch.Tensor) and ids.dim() in (2, 3) and (ids.dim() == 2 or ids.shape[0] >= 1)
            if not ok or tuple(_ids_2d(ids).shape) != (rows, len(cfg.axes_dims_rope)):
                raise ValueError(
                    f"{_NAME}: {name}: expected position ids of shape ({rows}, {len(cfg.axes_dims_rope)}) (one row "
                    f"per {'image' if name == 'img_ids' else 'text'} token), got {describe(ids)}."
                )
        jak = a.get("joint_attention_kwargs") or {}
        if "ip_adapter_image_embeds" in jak or "ip_hidden_states" in jak:
            raise NotImplementedError(
                "catprune: IP-Adapter inputs (joint_attention_kwargs['ip_adapter_image_embeds']) are not supported "
                "by the Flux adapter. Call catprune.remove(pipe) for IP-Adapter generations."
            )
        unknown = sorted(set(jak) - {"scale"})
        if unknown:
            raise ValueError(
                f"{_NAME}: joint_attention_kwargs: CAT Pruning supports only the LoRA 'scale' entry, got "
                f"{unknown}. Call catprune.remove(pipe) to use other attention arguments."
            )
        memo = {} if memo is None else memo
        grid = self._grid(_ids_2d(a["img_ids"]), m, memo)
        self._check_single_call_per_step(hs, ehs, memo)
        return CallInfo(
            arguments=a, batch=b, grid=grid, text_tokens=t, timestep=timestep, device=hs.device, dtype=hs.dtype
        )

    # ---------------------------------------------------------------- output <-> tokens
    def output_tokens(self, output, info: CallInfo) -> torch.Tensor:
        return sample_of(output)  # (B, M, P): Flux's output is already per token, raster order checked on img_ids

    def unpatchify(self, tokens: torch.Tensor, info: CallInfo) -> torch.Tensor:
        # identity up to a copy: the caller must never receive the runtime's persistent output buffer itself
        return tokens.clone()  # (B, M, P)

    # ---------------------------------------------------------------- dense step that fills the caches
    @contextlib.contextmanager
    def capture(self, caches: list[BufferStore], info: CallInfo):
        """Fill every block's K/V cache during the model's own dense forward (temporary forward hooks).

        Keys are stored after ``norm_k`` and after the rotary embedding. The hooks read the rotary table the model
        itself computes (a hook on ``pos_embed``) and rotate the image keys with diffusers' own ``apply_rotary_emb``,
        so the cached keys are exactly the ones the dense attention used. Processors are not touched; every hook is
        removed on exit, also on error.
        """
        self.validate_model()  # a processor swapped / QKV fused after apply would leave the caches unfilled
        model = self.model
        b, m, t = info.batch, info.num_tokens, info.text_tokens
        rope: dict[str, torch.Tensor] = {}

        def store_rope(_mod, _inp, out):
            rope["cos"], rope["sin"] = out[0][t:], out[1][t:]  # (M, hd) rows of the image tokens

        def rotate(key):  # (B, M, H, hd) keys after norm_k, before RoPE
            return apply_rotary_emb(key, (rope["cos"], rope["sin"]), sequence_dim=1)

        blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
        double = len(model.transformer_blocks)
        with removing([model.pos_embed.register_forward_hook(store_rope)]) as handles:
            for i, (block, cache) in enumerate(zip(blocks, caches, strict=True)):
                attn = block.attn
                shape = (2, b, m + t, attn.heads, attn.head_dim)
                buf = cache.kv_buffer("attn", shape, info.dtype, attn.to_k.weight.device, image_tokens=m)
                offset = 0 if i < double else t  # single blocks: text tokens in front of the image tokens
                hooks = capture_kv(buf, attn.norm_k, attn.to_v, attn.heads, offset, heads_first=False, rotate=rotate)
                handles += hooks
            yield

    # ---------------------------------------------------------------- pruned step
    def read_inputs(self, info: CallInfo) -> dict[str, torch.Tensor]:
        a, b = info.arguments, info.batch
        inputs = dict(
            hidden_states=a["hidden_states"],
            encoder_hidden_states=a["encoder_hidden_states"],
            pooled_projections=a["pooled_projections"],
            timestep=a["timestep"].reshape(-1).expand(b),  # (B,)
            img_ids=_ids_2d(a["img_ids"]),  # (M, 3)
            txt_ids=_ids_2d(a["txt_ids"]),  # (T, 3)
        )
        if a.get("guidance") is not None:  # present exactly when the model embeds guidance (checked)
            inputs["guidance"] = a["guidance"].reshape(-1).expand(b)  # (B,)
        return inputs

    def needs_eager(self, info: CallInfo) -> bool:
        a = info.arguments
        controlnet = ("controlnet_block_samples", "controlnet_single_block_samples")
        return bool(a.get("joint_attention_kwargs")) or any(a.get(name) is not None for name in controlnet)

    def eager_extras(self, info: CallInfo) -> dict:
        a = info.arguments
        return dict(
            controlnet=a.get("controlnet_block_samples"),
            controlnet_single=a.get("controlnet_single_block_samples"),
            controlnet_repeat=bool(a.get("controlnet_blocks_repeat")),
        )

    def pruned_core(
        self,
        caches,
        idx,
        m,
        hidden_states,
        encoder_hidden_states,
        pooled_projections,
        timestep,
        img_ids,
        txt_ids,
        guidance=None,
        controlnet=None,
        controlnet_single=None,
        controlnet_repeat=False,
        modulation=None,
    ):
        """FluxTransformer2DModel.forward over the (B, k) selected tokens ``idx``; returns their outputs (B, k, P).
        ``modulation``: this step's precomputed modulation row (B, W) of `modulations`, or None to compute it."""
        model = self.model
        t = encoder_hidden_states.shape[1]
        # the x_embedder is per token: embedding only the selected tokens gives the same rows
        x = model.x_embedder(gather_tokens(hidden_states, idx))  # (B, k, D)  # CAT: gather the selected tokens
        step = dict(timestep=timestep, pooled_projections=pooled_projections, guidance=guidance)
        cond = self.modulations.conditioning(modulation, **step)
        ctx = model.context_embedder(encoder_hidden_states)  # (B, T, D)
        cos, sin = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))  # (T + M, hd) each, float32
        rope_txt = (cos[:t], sin[:t])  # (T, hd)
        rope_sel = (cos[t:][idx], sin[t:][idx])  # (B, k, hd)  # CAT: every sample its own positions

        double = len(model.transformer_blocks)
        for i, (block, cache) in enumerate(zip(model.transformer_blocks, caches[:double], strict=True)):
            ctx, x = self._double_block(block, cache.slot("attn"), x, ctx, cond, rope_txt, rope_sel, idx)
            if controlnet is not None:
                if controlnet_repeat:
                    residual = controlnet[i % len(controlnet)]
                else:
                    residual = controlnet[i // -(-len(model.transformer_blocks) // len(controlnet))]
                x = x + gather_tokens(residual, idx)  # (B, k, D)  # CAT: gather

        b = x.shape[0]
        rope_joint = tuple(
            torch.cat([txt.expand(b, *txt.shape), sel], dim=1) for txt, sel in zip(rope_txt, rope_sel, strict=True)
        )  # (B, T + k, hd) each
        stream = torch.cat([ctx, x], dim=1)  # (B, T + k, D) = [text; selected image tokens]
        singles = model.single_transformer_blocks
        for i, (block, cache) in enumerate(zip(singles, caches[double:], strict=True)):
            stream = self._single_block(block, cache.slot("attn"), stream, cond, rope_joint, idx, t)
            if controlnet_single is not None:
                residual = controlnet_single[i // -(-len(singles) // len(controlnet_single))]
                stream[:, t:] += gather_tokens(residual, idx)  # (B, k, D)  # CAT: gather
        x = cond.continuous_norm(model.norm_out, stream[:, t:])  # (B, k, D)
        return model.proj_out(x)  # (B, k, P)

    def _double_block(self, block, kv, x, ctx, cond: Conditioning, rope_txt, rope_sel, idx):
        # FluxTransformerBlock.forward with the image stream restricted to the selected tokens. Same math as the
        # block, fewer memory passes (docs/design.md decision 15).
        norm = block.norm1  # AdaLayerNormZero: modulation from temb, once per row
        shift, scale, gate_msa, shift_mlp, scale_mlp, gate_mlp = cond(norm.linear).chunk(6, dim=1)
        nx = modulate(norm.norm(x), shift, scale)  # (B, k, D); shift etc.: (B, D)  # CAT: fused modulation
        norm = block.norm1_context
        c_shift, c_scale, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = cond(norm.linear).chunk(6, dim=1)
        nctx = modulate(norm.norm(ctx), c_shift, c_scale)  # (B, T, D)  # CAT: fused modulation

        attn = block.attn
        hd = attn.head_dim
        q = attn.norm_q(attn.to_q(nx).unflatten(-1, (-1, hd)))  # (B, k, H, hd)
        key = attn.norm_k(attn.to_k(nx).unflatten(-1, (-1, hd)))
        value = attn.to_v(nx).unflatten(-1, (-1, hd))
        qc = attn.norm_added_q(attn.add_q_proj(nctx).unflatten(-1, (-1, hd)))  # (B, T, H, hd)
        kc = attn.norm_added_k(attn.add_k_proj(nctx).unflatten(-1, (-1, hd)))
        vc = attn.add_v_proj(nctx).unflatten(-1, (-1, hd))
        q, key = _rotate(q, *rope_sel), _rotate(key, *rope_sel)  # each token at its own position
        qc, kc = _rotate(qc, *rope_txt), _rotate(kc, *rope_txt)
        queries = torch.cat([qc, q], dim=1)  # (B, T + k, H, hd) [text; selected], as Flux orders its sequence
        backend = attn.processor._attention_backend
        out = cached_attention(kv, idx, queries, (key, value), (kc, vc), dispatch_attention_fn, backend=backend)
        # CAT: cached attention (above): selected + text queries over all image K/V (cached + fresh) and the text
        out = out.flatten(2, 3).to(queries.dtype)  # (B, T + k, D)
        t = ctx.shape[1]
        img_out = attn.to_out[1](attn.to_out[0](out[:, t:].contiguous()))  # (B, k, D)
        txt_out = attn.to_add_out(out[:, :t].contiguous())  # (B, T, D)

        x = gated_add(x, gate_msa, img_out)  # (B, k, D)  # CAT: fused residual
        x = gated_add(x, gate_mlp, feed_forward(block.ff, modulate(block.norm2(x), shift_mlp, scale_mlp)))  # CAT: fused

        ctx = gated_add(ctx, c_gate_msa, txt_out)  # (B, T, D) text stream stays dense  # CAT: fused residual
        ctx = gated_add(  # CAT: fused modulation and residual
            ctx, c_gate_mlp, feed_forward(block.ff_context, modulate(block.norm2_context(ctx), c_shift_mlp, c_scale_mlp))
        )
        if ctx.dtype == torch.float16:
            ctx = ctx.clip(-65504, 65504)
        return ctx, x

    def _single_block(self, block, kv, stream, cond: Conditioning, rope_joint, idx, t):
        # FluxSingleTransformerBlock.forward on the stream [text (T); selected image tokens (k)]
        attn = block.attn
        hd = attn.head_dim
        shift, scale, gate = cond(block.norm.linear).chunk(3, dim=1)  # (B, D) each
        ns = modulate(block.norm.norm(stream), shift, scale)  # (B, T + k, D)  # CAT: fused modulation
        mlp = _mlp_in(block, ns)  # (B, T + k, F)
        q = attn.norm_q(attn.to_q(ns).unflatten(-1, (-1, hd)))  # (B, T + k, H, hd)
        key = attn.norm_k(attn.to_k(ns).unflatten(-1, (-1, hd)))
        value = attn.to_v(ns).unflatten(-1, (-1, hd))
        q, key = _rotate(q, *rope_joint), _rotate(key, *rope_joint)
        image, text = (key[:, t:], value[:, t:]), (key[:, :t], value[:, :t])  # (B, k | T, H, hd)
        backend = attn.processor._attention_backend
        out = cached_attention(kv, idx, q, image, text, dispatch_attention_fn, backend=backend)  # (B, T + k, H, hd)
        # CAT: cached attention (above): text + selected queries over all image K/V (cached + fresh) and the text
        out = out.flatten(2, 3).to(q.dtype)  # (B, T + k, D)
        stream = gated_add(stream, gate, block.proj_out(torch.cat([out, mlp], dim=2)))  # (B, T + k, D)  # CAT: fused
        if stream.dtype == torch.float16:
            stream = stream.clip(-65504, 65504)
        return stream

    # ---------------------------------------------------------------- cost model
    def macs(self, info: CallInfo, computed_tokens: int) -> int:
        model = self.model
        m, t, n = info.num_tokens, info.text_tokens, computed_tokens
        d = model.inner_dim
        per_row = n * linear_macs(model.x_embedder)  # the pruned step embeds only the selected tokens
        per_row += linear_macs(model.time_text_embed)
        per_row += t * linear_macs(model.context_embedder)
        per_row += linear_macs(model.norm_out) + n * linear_macs(model.proj_out)
        for block in model.transformer_blocks:
            attn = block.attn
            per_row += linear_macs(block.norm1) + linear_macs(block.norm1_context)  # modulation, once per row
            per_row += n * (linear_macs(attn.to_q) + linear_macs(attn.to_k) + linear_macs(attn.to_v))
            per_row += n * (linear_macs(attn.to_out) + linear_macs(block.ff))
            per_row += t * (linear_macs(attn.add_q_proj) + linear_macs(attn.add_k_proj))
            per_row += t * (linear_macs(attn.add_v_proj) + linear_macs(attn.to_add_out))
            per_row += t * linear_macs(block.ff_context)
            per_row += 2 * (n + t) * (m + t) * d  # QK^T and AV
        for block in model.single_transformer_blocks:
            modulation = linear_macs(block.norm)
            per_row += modulation + (n + t) * (linear_macs(block) - modulation)  # Q/K/V, MLP in, proj_out
            per_row += 2 * (n + t) * (m + t) * d
        return info.batch * per_row
