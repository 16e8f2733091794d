"""What every adapter shares: cached attention, K/V capture hooks, the patch grid, output wrapping, and the shared
half of the step functions built from each family's declared inputs.

An adapter then holds only its family's block math (the pruned step), its input checks and its cost model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..runtime.contract import Adapter, BufferStore, CallInfo, KVSlot, KVWriter, write_image_kv
from .ops import lora_scale


def sdpa(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` in the (B, S, H, hd) layout of the adapters (transposed views, no copy).

    Example:
        >>> q = torch.zeros(1, 2, 1, 4); kv = torch.ones(1, 3, 1, 4)
        >>> sdpa(q, kv, kv).shape
        torch.Size([1, 2, 1, 4])
    """
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=bias, dropout_p=0.0, is_causal=False
    )  # (B, H, S, hd)
    return out.transpose(1, 2)  # (B, S, H, hd)


@torch.compiler.disable
def cached_attention(
    kv: KVSlot | torch.Tensor,
    idx: torch.Tensor,
    q: torch.Tensor,
    image: tuple[torch.Tensor, torch.Tensor],
    text: tuple[torch.Tensor, torch.Tensor] | None = None,
    attend: Callable[..., torch.Tensor] = sdpa,
    **attend_kwargs,
) -> torch.Tensor:
    """Write fresh K/V into a block's cache in place, then attend over all image tokens (and the text).

    ``kv``: the block's `KVSlot` (``cache.slot(name)``) or its bare (2, B, M [+ T], H, hd) cache tensor, image
    tokens first; ``image``: the (B, k, H, hd) keys and values of the selected tokens, scattered to ``idx`` (B, k);
    ``text``: this step's (B, T, H, hd) text keys and values, copied into the tail (None when the cache has no
    tail). Queries ``q`` (B, S, H, hd) then attend over all M [+ T] keys with ``attend(q, key, value,
    **attend_kwargs)``; returns (B, S, H, hd). The unselected tokens enter with their cached K/V
    (``Context.REUSE``) or their per-token forecast (``Context.EXTRAPOLATE``, `KVSlot.attend_kv`): one
    implementation for every family.

    Why outside torch.compile: inductor functionalises in-place writes into a persistent buffer and then copies the
    whole buffer back (measured on an H200: two ~55 us kernels per block, 2.7 ms of an 18 ms SD3-medium pruned step;
    docs/design.md decision 14). Eager, the writes are two small scatters; the compiled regions before and after
    still fuse the elementwise work, and under a CUDA graph of the whole step the graph break costs nothing.
    """
    slot = kv if isinstance(kv, KVSlot) else KVSlot(kv)
    keys_values = slot.attend_kv(idx, image, text)  # (2, B, M [+ T], H, hd)
    return attend(q, keys_values[0], keys_values[1], **attend_kwargs)  # (B, S, H, hd)


def require_processors(model: torch.nn.Module, processor: type, reset: str) -> None:
    """ValueError unless every attention processor of ``model`` is exactly ``processor`` (diffusers' default, the
    one the adapter's pruned block reimplements); ``reset`` is the call that restores it.

    Example:
        >>> from diffusers.models.attention_processor import JointAttnProcessor2_0
        >>> from catprune.models.testing import tiny_sd3_transformer
        >>> require_processors(tiny_sd3_transformer(), JointAttnProcessor2_0, "transformer.set_default_attn_processor()")
    """
    for name, proc in model.attn_processors.items():
        if type(proc) is not processor:
            raise ValueError(
                f"catprune.apply: attention processor {name!r} is {type(proc).__name__}; CAT Pruning on "
                f"{type(model).__name__} supports only diffusers' default {processor.__name__}. Undo fused QKV "
                f"projections (transformer.unfuse_qkv_projections()) or custom processors ({reset}) before "
                "catprune.apply()."
            )


def capture_kv(
    buf: torch.Tensor | KVWriter,
    key_module: torch.nn.Module,
    value_module: torch.nn.Module,
    heads: int,
    offset: int = 0,
    heads_first: bool = True,
    rotate: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list:
    """Forward hooks that copy a dense step's image keys / values into ``buf[:, :, :M]`` (2, B, M [+ T], H, hd),
    or quantise them into low-precision storage (``buf`` a `KVWriter`, from `BufferStore.kv_buffer`).

    ``key_module``'s output is (B, N, D), or (B, H, N, hd) when ``heads_first`` (diffusers' processors normalise
    keys after moving heads first), or (B, N, H, hd); ``value_module``'s is (B, N, D). The image tokens are rows
    ``offset: offset + M`` of N. ``rotate`` post-processes the keys (Flux: the rotary embedding). Returns the hook
    handles; the caller removes them.
    """

    def tokens(out: torch.Tensor) -> torch.Tensor:
        if out.dim() == 3:
            out = out.unflatten(-1, (heads, -1))  # (B, N, H, hd)
        elif heads_first:
            out = out.transpose(1, 2)  # (B, N, H, hd)
        return out[:, offset:]  # (B, M, H, hd)

    def store_k(_mod, _inp, out):
        key = tokens(out) if rotate is None else rotate(tokens(out))
        write_image_kv(buf, 0, key)  # (B, M, H, hd)

    def store_v(_mod, _inp, out):
        write_image_kv(buf, 1, tokens(out))  # (B, M, H, hd)

    return [key_module.register_forward_hook(store_k), value_module.register_forward_hook(store_v)]


@contextlib.contextmanager
def removing(handles: list):
    """Context manager: yield, then remove every hook in ``handles`` (also on error)."""
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


def patchify(sample: torch.Tensor, grid: tuple[int, int], p: int) -> torch.Tensor:
    """(B, C, H, W) sample -> (B, M, P) per-token rows, P = p * p * C in ``proj_out``'s channel order.

    Example:
        >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> torch.equal(unpatchify(patchify(x, (2, 2), 2), (2, 2), 2, 1), x)
        True
    """
    b, c = sample.shape[:2]
    h, w = grid
    tokens = sample.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, C)
    return tokens.reshape(b, h * w, p * p * c)  # (B, M, P)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], p: int, c: int) -> torch.Tensor:
    """(B, M, P) per-token rows -> (B, C, H, W): the unpatchify of diffusers' SD3 and PixArt forwards."""
    b = tokens.shape[0]
    h, w = grid
    x = tokens.reshape(b, h, w, p, p, c)  # (B, h, w, p, p, C)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, c, h * p, w * p)  # (B, C, H, W)


def sample_of(output) -> torch.Tensor:
    """The sample of a transformer's return value: ``output.sample`` or ``output[0]``."""
    return output.sample if hasattr(output, "sample") else output[0]


class DiffusersAdapter(Adapter):
    """Shared half of the adapters of diffusers transformers.

    A family declares its step inputs once: `read_inputs` returns them by name (the tensors the compiled / graphed
    functions take), `pruned_core` takes the same names as keywords and runs the block math, and `forward_kwargs`
    says how the model's own forward takes them. From these, this class builds `fast_inputs`, `dense_fn`,
    `pruned_fn` and `pruned_forward`; `eager_extras` adds what only the eager path handles (ControlNet residuals).
    """

    #: the ``joint_attention_kwargs``-style argument holding a LoRA scale, if the family has one
    lora_argument: str | None = None

    def read_inputs(self, info: CallInfo) -> dict[str, torch.Tensor]:
        """The step's tensor inputs by name, normalised to static shapes (e.g. a scalar timestep expanded to (B,))."""
        raise NotImplementedError

    def needs_eager(self, info: CallInfo) -> bool:
        """True when the call has inputs only the eager path handles (LoRA scale, ControlNet residuals)."""
        return False

    def eager_extras(self, info: CallInfo) -> dict:
        """Keyword arguments of `pruned_core` that only the eager path passes."""
        return {}

    def forward_kwargs(self, inputs: dict[str, torch.Tensor]) -> dict:
        """The model's forward keyword arguments for the tensors of `read_inputs` (identity by default)."""
        return inputs

    def pruned_core(self, caches: list[BufferStore], idx: torch.Tensor, m: int, **inputs) -> torch.Tensor:
        """The pruned step's block math over the (B, k) selected tokens; returns their outputs (B, k, P)."""
        raise NotImplementedError

    def fast_inputs(self, info: CallInfo) -> dict[str, torch.Tensor] | None:
        return None if self.needs_eager(info) else self.read_inputs(info)

    def modulation_rows(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.modulations.rows(**inputs)  # an adapter with `modulation_inputs` has `modulations`

    def dense_fn(self, original):
        def dense(**inputs):
            return original(**self.forward_kwargs(inputs), return_dict=False)[0]  # the dense output sample

        return dense

    def pruned_fn(self, caches: list[BufferStore], info: CallInfo):
        m = info.num_tokens

        def pruned(idx, **inputs):
            return self.pruned_core(caches, idx, m, **inputs)  # (B, k, P)

        return pruned

    def pruned_forward(self, caches: list[BufferStore], idx: torch.Tensor, info: CallInfo) -> torch.Tensor:
        scale_kwargs = info.arguments.get(self.lora_argument) if self.lora_argument else None
        with lora_scale(self.model, scale_kwargs) if self.lora_argument else contextlib.nullcontext():
            inputs = {**self.read_inputs(info), **self.eager_extras(info)}
            return self.pruned_core(caches, idx, info.num_tokens, **inputs)  # (B, k, P)

    def wrap_sample(self, sample: torch.Tensor, info: CallInfo):
        if not info.arguments.get("return_dict", True):
            return (sample,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)


class PatchGridAdapter(DiffusersAdapter):
    """Adapters of transformers whose sample is a (B, C, H, W) latent cut into ``patch_size`` patches (SD3, PixArt)."""

    def output_tokens(self, output, info: CallInfo) -> torch.Tensor:
        return patchify(sample_of(output), info.grid, self.model.config.patch_size)  # (B, M, P)

    def unpatchify(self, tokens: torch.Tensor, info: CallInfo) -> torch.Tensor:
        return unpatchify(tokens, info.grid, self.model.config.patch_size, self.model.out_channels)  # (B, C, H, W)
