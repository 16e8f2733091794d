"""Triton kernels for a pruned step's K/V cache writes: the fresh rows scattered into a block's cache (with the
text tail, keys and values in one launch: `write_step_kv_`), the context forecast's advance (K0 <- K1, K1 <- fresh)
with its extrapolation into the working buffer, and for an 8-bit cache (`CATConfig.cache_dtype="fp8"`) the fresh
rows quantised and scattered in one launch and the cache dequantised in one pass.

Why: the torch versions (`catprune.algorithm.scatter_tokens_`, `advance_kv_`, `extrapolate_`) run as generic
element-wise kernels that read an index or a broadcast weight per element (a lerp with a per-token weight ran at a
third of the H200's bandwidth) and take seven launches per block where these take three. Results equal the torch
versions bit for bit for the scatters and the advance; the extrapolation is computed in float32 as
``k1 + (k1 - k0) * r`` (``k1`` exactly where ``r == 0``) where torch's lerp rounds differently (within one unit in
the last place of the cache dtype).

Used for CUDA tensors whose last two dims (heads, head dim) are contiguous, when Triton imports and the environment
variable ``CATPRUNE_TRITON`` is not ``0``; everything else takes the torch path, and so does everything after a
kernel failed to compile or launch (one ``RuntimeWarning`` says why). With ``TRITON_INTERPRET=1`` (and
``CATPRUNE_TRITON=1``) the kernels also run on CPU tensors through Triton's interpreter, which is how the tests
check them without a GPU.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch

from ..algorithm import advance_kv_, dequantize_rows_, extrapolate_, scatter_tokens_


@functools.cache
def _triton():
    """The module of compiled kernels, or None when Triton is missing (a CPU-only torch build)."""
    try:
        from . import _triton_kv
    except ImportError:
        return None
    return _triton_kv


_FAILED: list[str] = []  # why a kernel launch failed (e.g. a GPU Triton cannot compile for): the torch path from then


def _launched(launch) -> bool:
    """Run ``launch()``; False (with one warning, and the torch path for the rest of the process) if it raises."""
    try:
        launch()
    except Exception as e:  # noqa: BLE001  a compile or launch error of Triton's, whatever its type
        _FAILED.append(f"{type(e).__name__}: {e}")
        warnings.warn(
            f"catprune.kernels: a Triton kernel failed ({_FAILED[-1][:300]}); using the torch path from now on. "
            "Set CATPRUNE_TRITON=0 to skip the kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _rows_ok(*tensors: torch.Tensor) -> bool:
    """Every tensor is (B, N, H, hd) with contiguous (H, hd) rows."""
    return all(t.dim() == 4 and t.stride(3) == 1 and t.stride(2) == t.shape[3] for t in tensors)


def available(*tensors: torch.Tensor) -> bool:
    """True when the kernels run for these (B, N, H, hd) tensors: Triton imports, ``CATPRUNE_TRITON`` is not
    ``0``, no kernel failed before, every tensor has contiguous (H, hd) rows and is on a CUDA device (or on the CPU
    under ``TRITON_INTERPRET=1`` with ``CATPRUNE_TRITON=1``).

    Example:
        >>> available(torch.zeros(1, 2, 2, 4))  # a CPU tensor: the torch path
        False
    """
    flag = os.environ.get("CATPRUNE_TRITON", "")
    if flag == "0" or _FAILED or not _rows_ok(*tensors):
        return False
    cpu_ok = flag == "1" and os.environ.get("TRITON_INTERPRET") == "1"
    if not all(t.is_cuda or (cpu_ok and t.device.type == "cpu") for t in tensors):
        return False
    return _triton() is not None


MAX_BLOCK = 4096  # elements of a row one program handles; a quantised row must fit whole (wider: the torch path)


def _launch_shape(rows: int, width: int) -> tuple[tuple[int, int], int]:
    block = min(MAX_BLOCK, 1 << max(0, (width - 1).bit_length()))  # the next power of two, at most MAX_BLOCK
    return (rows, -(-width // block)), block


def _scatter(idx, src, dst, prev=None, work=None) -> None:
    kernel = _triton().scatter_rows
    b, k, heads, hd = src.shape
    grid, block = _launch_shape(b * k, heads * hd)
    prev_ = prev if prev is not None else dst
    work_ = work if work is not None else dst
    kernel[grid](
        idx, src, dst, prev_, work_, k, heads * hd, idx.stride(0), idx.stride(1), src.stride(0), src.stride(1),
        dst.stride(0), dst.stride(1), prev_.stride(0), prev_.stride(1), work_.stride(0), work_.stride(1),
        ROLL=prev is not None, WORK=work is not None, BLOCK=block,
    )  # fmt: skip


def scatter_rows_(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """In place ``dst[b, idx[b, j]] = src[b, j]`` for a (B, M, H, hd) ``dst`` and (B, k, H, hd) ``src``: the
    kernel where `available`, else `catprune.algorithm.scatter_tokens_`. Returns ``dst``.

    Example:
        >>> dst = torch.zeros(1, 3, 1, 2)
        >>> scatter_rows_(dst, torch.tensor([[2]]), torch.ones(1, 1, 1, 2))[0, :, 0, 0].tolist()
        [0.0, 0.0, 1.0]
    """
    if not available(dst, src) or not _launched(lambda: _scatter(idx, src, dst)):
        return scatter_tokens_(dst, idx, src)
    return dst


def write_step_kv_(kv: torch.Tensor, idx: torch.Tensor, image, text=None) -> bool:
    """A reuse step's writes into a block's cache ``kv`` (2, B, M [+ T], H, hd), in place and in one launch: the
    fresh (B, k, H, hd) image keys / values ``image`` at ``idx`` (B, k) and the (B, T, H, hd) text keys / values
    ``text`` into the tail (None: no tail), the bytes of `scatter_rows_` and `catprune.algorithm.copy_tokens_`.
    Returns False, with nothing written, where the kernel does not run (the caller takes those paths).

    Why one launch: on the CUDA-graph backends a pruned step runs ~40 kernels per block, and these four small row
    copies sat on the image stream's path to the attention as four launches (SD3-medium's pruned step, same-process
    A/B on an H200: 14.71 -> 14.58 ms at 1024 px, 6.31 -> 6.20 ms at 512 px, bit-identical)."""
    tensors = [kv[0], kv[1], *image, *(text or ())]
    heads, hd = kv.shape[3:]
    if not available(*tensors) or any(t.dtype != image[0].dtype for t in tensors[2:]):
        return False

    def launch():
        b, k = idx.shape
        t = text[0].shape[1] if text is not None else 0
        tk, tv = text if text is not None else image  # T == 0: never read
        grid, block = _launch_shape(2 * b * (k + t), heads * hd)
        _triton().write_step_rows[grid](
            idx, image[0], image[1], tk, tv, kv, b, k, t, kv.shape[2] - t, heads * hd, idx.stride(0), idx.stride(1),
            image[0].stride(0), image[0].stride(1), image[1].stride(0), image[1].stride(1), tk.stride(0),
            tk.stride(1), tv.stride(0), tv.stride(1), *kv.stride()[:3], BLOCK=block,
        )  # fmt: skip

    return _launched(launch)


def forecast_kv_(
    kv: torch.Tensor,
    prev: torch.Tensor,
    out: torch.Tensor,
    ratio: torch.Tensor,
    idx: torch.Tensor,
    fresh: tuple[torch.Tensor, torch.Tensor],
    computed: torch.Tensor | None = None,
) -> torch.Tensor:
    """One block's context forecast for a pruned step, in place: at the (B, k) computed tokens ``idx``, K0 <- K1
    and K1 <- ``fresh`` (keys, values, each (B, k, H, hd)); ``out`` (2, B, M, H, hd) receives the fresh values
    there and ``K1 + (K1 - K0) * ratio`` for every other token (``ratio`` (B, M), 0 at ``idx``). ``kv`` (K1) and
    ``prev`` (K0) are (2, B, M, H, hd) image rows. Equals `catprune.algorithm.advance_kv_` followed by
    `extrapolate_` (which run where the kernels do not). Returns ``out``.

    ``computed`` (optional, (B, M) uint8, non-zero exactly at ``idx``): the extrapolation kernel then neither reads
    nor writes those rows (the fresh values land there anyway), so its memory traffic falls with the keep ratio
    (to nothing at full selection). The result is the same.

    Example:
        >>> k1, k0 = torch.full((2, 1, 2, 1, 1), 2.0), torch.ones(2, 1, 2, 1, 1)
        >>> fresh = (torch.full((1, 1, 1, 1), 5.0),) * 2
        >>> out = forecast_kv_(k1, k0, torch.empty_like(k1), torch.tensor([[0.0, 0.5]]), torch.tensor([[0]]), fresh)
        >>> out[0].flatten().tolist(), k0[0].flatten().tolist()
        ([5.0, 2.5], [2.0, 1.0])
    """
    parts = [t[j] for t in (kv, prev, out) for j in range(2)]
    skip_ok = computed is None or computed.stride(1) == 1
    if not available(*parts, *fresh) or ratio.stride(1) != 1 or not skip_ok:
        advance_kv_(kv, prev, idx, fresh)
        return extrapolate_(out, kv, prev, ratio)

    def launch():
        _, b, m, heads, hd = kv.shape
        grid, block = _launch_shape(2 * b * m, heads * hd)
        skip = computed if computed is not None else ratio  # an unused pointer when not skipping
        _triton().extrapolate_rows[grid](
            kv, prev, out, ratio, skip, b, m, heads * hd, *kv.stride()[:3], *prev.stride()[:3], *out.stride()[:3],
            ratio.stride(0), skip.stride(0), SKIP=computed is not None, BLOCK=block,
        )  # fmt: skip  # before the advance: it reads the old K0 / K1 (at idx the ratio is 0: old K1, overwritten)
        for j in range(2):
            _scatter(idx, fresh[j], kv[j], prev=prev[j], work=out[j])

    if not _launched(launch):  # nothing was written but maybe `out`, which the torch path rewrites
        advance_kv_(kv, prev, idx, fresh)
        extrapolate_(out, kv, prev, ratio)
    return out


def advance_kv_rows_(kv: torch.Tensor, prev: torch.Tensor, idx: torch.Tensor, fresh) -> torch.Tensor:
    """In place, at the (B, k) tokens ``idx``: K0 <- K1, then K1 <- ``fresh`` (keys, values, each (B, k, H, hd));
    ``kv`` (K1) and ``prev`` (K0) are (2, B, M, H, hd) image rows. One row kernel per keys / values where
    `available`, else `catprune.algorithm.advance_kv_`. Returns ``kv``. (A full-selection step of the forecast
    attends to K1 itself: no working buffer, no extrapolation.)

    Example:
        >>> k1, k0 = torch.full((2, 1, 2, 1, 1), 2.0), torch.ones(2, 1, 2, 1, 1)
        >>> fresh = (torch.full((1, 2, 1, 1), 5.0),) * 2
        >>> out = advance_kv_rows_(k1, k0, torch.tensor([[0, 1]]), fresh)
        >>> out[0].flatten().tolist(), k0[0].flatten().tolist()
        ([5.0, 5.0], [2.0, 2.0])
    """
    def launch():
        for j in range(2):
            _scatter(idx, fresh[j], kv[j], prev=prev[j])

    parts = [t[j] for t in (kv, prev) for j in range(2)]
    if not available(*parts, *fresh) or not _launched(launch):  # a failure is the first compile: nothing written
        advance_kv_(kv, prev, idx, fresh)
    return kv


def quantize_scatter_(data: torch.Tensor, scale: torch.Tensor, idx: torch.Tensor, fresh) -> bool:
    """For a scaled 8-bit cache, in place: ``data[j, b, idx[b, i]]`` <- ``fresh[j][b, i]`` quantised per token row
    and ``scale[j, b, idx[b, i]]`` <- its scale (``data`` (2, B, M, H, hd), ``scale`` (2, B, M, 1, 1) float32,
    ``fresh`` keys and values (B, k, H, hd)), as `catprune.algorithm.quantize_rows` and a scatter. Returns False,
    with nothing written, where the kernel does not run (the caller takes the torch path): no Triton, not CUDA, a
    row wider than `MAX_BLOCK`. The 8-bit rounding is the GPU's conversion instruction (round to nearest even, as
    torch's cast on the GPU)."""
    heads, hd = data.shape[3:]
    if heads * hd > MAX_BLOCK or not available(data[0], data[1], *fresh):
        return False

    def launch():
        b, k = idx.shape
        grid, block = _launch_shape(b * k, heads * hd)  # one program per row: (B * k, 1)
        for j in range(2):
            src, dst, sc = fresh[j], data[j], scale[j]
            _triton().quantize_scatter_rows[grid](
                idx, src, dst, sc, k, heads * hd, idx.stride(0), idx.stride(1), src.stride(0), src.stride(1),
                dst.stride(0), dst.stride(1), sc.stride(0), sc.stride(1), BLOCK=block,
            )  # fmt: skip

    return _launched(launch)


def dequantize_kv_(out: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``out`` (2, B, M, H, hd) <- ``data * scale`` (``data`` in the storage dtype, ``scale`` (2, B, M, 1, 1) or
    None for a 16-bit cache), one pass and one rounding per element: the kernel where `available`, else
    `catprune.algorithm.dequantize_rows_`. Returns ``out``.

    Example:
        >>> q = torch.ones(2, 1, 2, 1, 2, dtype=torch.float8_e4m3fn)
        >>> dequantize_kv_(torch.empty(2, 1, 2, 1, 2), q, torch.full((2, 1, 2, 1, 1), 0.5))[0, 0, :, 0].tolist()
        [[0.5, 0.5], [0.5, 0.5]]
    """
    if scale is None or not available(out[0], out[1], data[0], data[1]):
        return dequantize_rows_(out, data, scale)

    def launch():
        _, b, m, heads, hd = data.shape
        grid, block = _launch_shape(2 * b * m, heads * hd)
        _triton().dequantize_rows[grid](
            data, scale, out, b, m, heads * hd, *data.stride()[:3], *scale.stride()[:3], *out.stride()[:3],
            BLOCK=block,
        )  # fmt: skip

    if not _launched(launch):
        dequantize_rows_(out, data, scale)
    return out
