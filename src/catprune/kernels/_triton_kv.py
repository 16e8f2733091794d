"""The Triton kernels behind `catprune.kernels.kv` (imported only when a CUDA tensor, or Triton's interpreter,
asks for them). Rows are (heads * head dim) elements with unit stride; offsets are 64-bit."""

import triton
import triton.language as tl


@triton.jit
def extrapolate_rows(k1, k0, out, ratio, skip, B, M, D, s1j, s1b, s1m, s0j, s0b, s0m, soj, sob, som, srb, skb,
                     SKIP: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """``out = k1 + (k1 - k0) * ratio`` per (2, B, M) row in float32; ``k1`` unchanged where ``ratio == 0``. With
    ``SKIP``, rows where the (B, M) ``skip`` is non-zero are neither read nor written (predicated off)."""
    row = tl.program_id(0).to(tl.int64)  # over 2 * B * M rows (keys, then values)
    m, b, j = row % M, (row // M) % B, row // (M * B)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = d < D
    if SKIP:  # a row the step computes: the scatter writes its fresh value into `out` after this kernel
        mask = mask & (tl.load(skip + b * skb + m) == 0)
    w = tl.load(ratio + b * srb + m)
    x1 = tl.load(k1 + j * s1j + b * s1b + m * s1m + d, mask=mask)
    x0 = tl.load(k0 + j * s0j + b * s0b + m * s0m + d, mask=mask).to(tl.float32)
    x1f = x1.to(tl.float32)
    y = tl.where(w == 0.0, x1, (x1f + (x1f - x0) * w).to(x1.dtype))
    tl.store(out + j * soj + b * sob + m * som + d, y, mask=mask)


@triton.jit
def scatter_rows(idx, src, dst, prev, work, K, D, sib, sii, ssb, ssi, sdb, sdm, spb, spm, swb, swm,
                 ROLL: tl.constexpr, WORK: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """``dst[b, idx[b, i]] = src[b, i]`` per (B, K) row; first ``prev[b, m] = dst[b, m]`` (``ROLL``), and the
    same row also into ``work`` (``WORK``)."""
    row = tl.program_id(0).to(tl.int64)  # over B * K selected rows
    b, i = row // K, row % K
    m = tl.load(idx + b * sib + i * sii).to(tl.int64)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = d < D
    if ROLL:  # K0 <- K1 before K1 <- fresh
        tl.store(prev + b * spb + m * spm + d, tl.load(dst + b * sdb + m * sdm + d, mask=mask), mask=mask)
    x = tl.load(src + b * ssb + i * ssi + d, mask=mask).to(dst.dtype.element_ty)
    tl.store(dst + b * sdb + m * sdm + d, x, mask=mask)
    if WORK:
        tl.store(work + b * swb + m * swm + d, x, mask=mask)


@triton.jit
def write_step_rows(idx, ik, iv, tk, tv, kv, B, K, T, M, D, sib, sii, sikb, siki, sivb, sivi, stkb, stkt, stvb, stvt,
                    skj, skb, skm, BLOCK: tl.constexpr):  # fmt: skip
    """A reuse step's cache writes in one launch: ``kv[j, b, idx[b, i]] = image_j[b, i]`` (image keys ``ik`` /
    values ``iv``, (B, K) rows) and ``kv[j, b, M + t] = text_j[b, t]`` (text ``tk`` / ``tv``, (B, T) rows), per
    (2, B, K + T) row."""
    row = tl.program_id(0).to(tl.int64)  # over 2 * B * (K + T) rows: keys, then values; per batch row K then T
    per = K + T
    r, b, j = row % per, (row // per) % B, row // (per * B)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = d < D
    if r < K:
        m = tl.load(idx + b * sib + r * sii).to(tl.int64)
        if j == 0:
            x = tl.load(ik + b * sikb + r * siki + d, mask=mask)
        else:
            x = tl.load(iv + b * sivb + r * sivi + d, mask=mask)
    else:
        m = M + r - K
        if j == 0:
            x = tl.load(tk + b * stkb + (r - K) * stkt + d, mask=mask)
        else:
            x = tl.load(tv + b * stvb + (r - K) * stvt + d, mask=mask)
    tl.store(kv + j * skj + b * skb + m * skm + d, x.to(kv.dtype.element_ty), mask=mask)


@triton.jit
def quantize_scatter_rows(idx, src, dst, scale, K, D, sib, sii, ssb, ssi, sdb, sdm, scb, scm, BLOCK: tl.constexpr):
    """``dst[b, idx[b, i]], scale[b, idx[b, i]] = quantise(src[b, i])`` per (B, K) row: an 8-bit float row scaled
    by its absmax / 448 (the smallest normal float32 at least), as `catprune.algorithm.quantize_rows`. One program
    holds a whole row (``BLOCK >= D``)."""
    row = tl.program_id(0).to(tl.int64)  # over B * K selected rows
    b, i = row // K, row % K
    m = tl.load(idx + b * sib + i * sii).to(tl.int64)
    d = tl.arange(0, BLOCK)
    mask = d < D
    x = tl.load(src + b * ssb + i * ssi + d, mask=mask, other=0.0).to(tl.float32)
    s = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1.1754943508222875e-38)
    q = tl.clamp(x / s, -448.0, 448.0).to(dst.dtype.element_ty)
    tl.store(dst + b * sdb + m * sdm + d, q, mask=mask)
    tl.store(scale + b * scb + m * scm, s)


@triton.jit
def dequantize_rows(q, scale, out, B, N, D, sqj, sqb, sqn, ssj, ssb, ssn, soj, sob, son, BLOCK: tl.constexpr):
    """``out = q * scale`` per (2, B, N) row, rounded once to ``out``'s dtype."""
    row = tl.program_id(0).to(tl.int64)  # over 2 * B * N rows (keys, then values)
    n, b, j = row % N, (row // N) % B, row // (N * B)
    d = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = d < D
    x = tl.load(q + j * sqj + b * sqb + n * sqn + d, mask=mask).to(tl.float32)
    s = tl.load(scale + j * ssj + b * ssb + n * ssn)
    tl.store(out + j * soj + b * sob + n * son + d, (x * s).to(out.dtype.element_ty), mask=mask)
