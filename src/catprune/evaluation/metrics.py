"""Image-quality metrics of the evaluation harness.

Fidelity to the dense image of the same seed (PSNR, SSIM) is implemented here in plain torch, so it needs nothing
beyond catprune's own dependencies; `psnr` is catprune's one PSNR (the CLI uses it too). Learned metrics (CLIP
score, FID) need pretrained networks: they are used only when their weights are already on this machine, and
otherwise reported as skipped with the reason (they never download anything). LPIPS is not computed at all: see
`lpips_status`.

Example:
    >>> import torch
    >>> a = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    >>> psnr(a, a).tolist()
    [inf, inf]
    >>> [round(v, 4) for v in ssim(a, a).tolist()]
    [1.0, 1.0]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11  # Gaussian window of Wang et al. (2004)
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(a: torch.Tensor, b: torch.Tensor, fn: str, dims=(4,)) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(
            f"{fn}: a, b: expected two tensors (B, C, H, W) with values in [0, 1], got {type(a).__name__} and "
            f"{type(b).__name__}. Convert images with catprune.evaluation.adherence.to_image_tensor first."
        )
    if a.shape != b.shape or a.dim() not in dims:
        shape = " or ".join({3: "(C, H, W)", 4: "(B, C, H, W)"}[d] for d in dims)
        raise ValueError(
            f"{fn}: a, b: expected two tensors of the same shape {shape}, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}. Compare images of the same size, one reference per image."
        )
    return a.double(), b.double()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image, between two batches (B, C, H, W) or two single images
    (C, H, W); ``inf`` where identical.

    Args:
        a, b: images of the same shape, values in ``[0, data_range]``.
        data_range: the largest possible pixel value (1.0 for images in [0, 1]).

    Returns:
        (B,) float64 tensor for batches, a 0-d float64 tensor for single images (``float(psnr(a, b))``).

    Example:
        >>> import torch
        >>> [round(v, 4) for v in psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)).tolist()]
        [20.0]
        >>> round(float(psnr(torch.zeros(3, 2, 2), torch.full((3, 2, 2), 0.1))), 4)
        20.0
    """
    a, b = _check_pair(a, b, "psnr", dims=(3, 4))
    single = a.dim() == 3
    if single:
        a, b = a[None], b[None]
    mse = ((a - b) ** 2).flatten(1).mean(dim=1)  # (B,)
    out = 10.0 * torch.log10(data_range**2 / mse)  # (B,), inf where mse == 0
    return out[0] if single else out


def _gaussian_1d(size: int, sigma: float, dtype, device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2  # (S,)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()  # (S,)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image: 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
    K2 = 0.03, computed per channel over the valid region (no padding) and averaged over channels and pixels.

    Args:
        a, b: images (B, C, H, W) of the same shape with H, W >= 11, values in ``[0, data_range]``.

    Returns:
        (B,) float64 tensor; 1.0 for identical images.

    Example:
        >>> import torch
        >>> x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        >>> bool(ssim(x, x.flip(-1))[0] < 0.5)
        True
    """
    a, b = _check_pair(a, b, "ssim")
    _, c, h, w = a.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(
            f"ssim: a, b: expected images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {h}x{w}. Use PSNR "
            "for smaller images."
        )
    g = _gaussian_1d(SSIM_WINDOW, SSIM_SIGMA, a.dtype, a.device)  # (S,)
    rows = g.view(1, 1, -1, 1).expand(c, 1, -1, 1)  # (C, 1, S, 1) depthwise
    cols = g.view(1, 1, 1, -1).expand(c, 1, 1, -1)  # (C, 1, 1, S)

    def blur(x):  # the 2-D Gaussian is separable: two 1-D passes
        return F.conv2d(F.conv2d(x, rows, groups=c), cols, groups=c)  # (B, C, H-S+1, W-S+1)

    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(dim=1)  # (B,)


def finite_mean(values) -> float | None:
    """Mean of the finite values (PSNR of identical images is inf); None if there is none.

    Example:
        >>> finite_mean([10.0, float("inf"), 20.0])
        15.0
    """
    vals = [float(v) for v in values if math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def paired_difference(a, b) -> dict[str, float] | None:
    """Mean of the per-image differences ``a - b`` with a normal-approximation 95% confidence interval, over the
    images where both values are finite. None with fewer than two such images.

    Example:
        >>> d = paired_difference([1.0, 2.0, 3.0], [0.0, 1.0, 1.0])
        >>> round(d["mean"], 3), d["n"]
        (1.333, 3)
    """
    pairs = [(float(x), float(y)) for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 2:
        return None
    diffs = torch.tensor([x - y for x, y in pairs], dtype=torch.float64)
    mean = float(diffs.mean())
    half = 1.96 * float(diffs.std(unbiased=True)) / math.sqrt(len(pairs))
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(pairs)}


# ---------------------------------------------------------------------------------------------- learned metrics
@dataclass
class MetricStatus:
    """Whether an optional metric can run here, and why not."""

    name: str
    available: bool
    reason: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "available": self.available, "reason": self.reason}


def _torch_hub_checkpoint(prefix: str) -> Path | None:
    directory = Path(torch.hub.get_dir()) / "checkpoints"
    if not directory.is_dir():
        return None
    return next(iter(sorted(directory.glob(f"{prefix}*"))), None)


def _hf_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str) and os.path.isfile(found)


#: Why LPIPS is not computed (written into scores.json and the report's notes).
LPIPS_NOT_COMPUTED = (
    "not computed: LPIPS needs a pretrained backbone (AlexNet or VGG) that no PyPI package ships; the `lpips` "
    "package carries only its small linear heads and downloads the backbone through torchvision at run time, and "
    "an evaluation never downloads"
)


def lpips_status() -> MetricStatus:
    """LPIPS is not part of the evaluation: its backbone weights would have to be downloaded at run time.

    Example:
        >>> status = lpips_status()
        >>> status.name, status.available, "torchvision" in status.reason
        ('lpips', False, True)
    """
    return MetricStatus("lpips", False, LPIPS_NOT_COMPUTED)


CLIP_MODEL = "openai/clip-vit-base-patch16"


def clip_status() -> MetricStatus:
    """CLIP score runs only with torchmetrics + transformers and ``openai/clip-vit-base-patch16`` in the Hugging
    Face cache (it is never downloaded during an evaluation)."""
    try:
        import torchmetrics.multimodal.clip_score  # noqa: F401
    except ImportError:
        return MetricStatus("clip_score", False, "skipped: torchmetrics/transformers are not installed")
    if not _hf_cached(CLIP_MODEL):
        return MetricStatus(
            "clip_score", False, f"skipped: {CLIP_MODEL} is not in the Hugging Face cache (offline evaluation)"
        )
    return MetricStatus("clip_score", True)


def clip_score(images: torch.Tensor, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """CLIP score (torchmetrics' definition, 100 * cosine) per image. Check `clip_status` first."""
    status = clip_status()
    if not status.available:
        raise RuntimeError(f"clip_score: {status.reason}")
    from torchmetrics.multimodal.clip_score import CLIPScore

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    metric = CLIPScore(model_name_or_path=CLIP_MODEL)
    out = []
    for i in range(0, images.shape[0], batch_size):
        chunk = (images[i : i + batch_size].clamp(0, 1) * 255).to(torch.uint8)
        for image, prompt in zip(chunk, prompts[i : i + batch_size], strict=True):
            metric.reset()
            out.append(float(metric(image, prompt)))
    return torch.tensor(out, dtype=torch.float64)


def fid_status() -> MetricStatus:
    """FID runs only with torchmetrics + torch-fidelity and the FID Inception weights in torch's hub cache."""
    try:
        import torch_fidelity  # noqa: F401
        import torchmetrics.image.fid  # noqa: F401
    except ImportError:
        return MetricStatus("fid", False, "skipped: torchmetrics[image] / torch-fidelity are not installed")
    if _torch_hub_checkpoint("weights-inception-2015-12-05") is None:
        return MetricStatus("fid", False, "skipped: the FID Inception weights are not in torch's hub cache")
    return MetricStatus("fid", True)


def fid(reference: torch.Tensor, images: torch.Tensor) -> float:
    """FID between two image sets (N, 3, H, W) in [0, 1] (a set-level number). Check `fid_status` first."""
    status = fid_status()
    if not status.available:
        raise RuntimeError(f"fid: {status.reason}")
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(normalize=True)
    metric.update(reference.float(), real=True)
    metric.update(images.float(), real=False)
    return float(metric.compute())
