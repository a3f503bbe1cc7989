"""Image-quality metrics in pure NumPy (float64): PSNR and SSIM, plus detection of LPIPS / FID weights.

Conventions: images are arrays ``(H, W)`` or ``(H, W, C)`` with values in ``[0, data_range]``
(``data_range`` 1.0 for float images in [0, 1], 255 for uint8 arrays converted with :func:`to_unit`).

SSIM follows Wang et al. (2004) as the paper tables and scikit-image's
``structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` compute it: an
11x11 Gaussian window (sigma 1.5, truncated at 3.5 sigma), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, population
(co)variances, the SSIM map averaged over the positions where the window lies inside the image and over
the channels.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W[, C])`` in [0, 255] -> float64 in [0, 1]; float arrays are returned as float64 unchanged."""
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"image dtype {image.dtype} is neither uint8 nor floating point")
    return image.astype(np.float64)


def _check_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim not in (2, 3):
        raise ValueError(f"images must be (H, W) or (H, W, C), got shape {a.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10 log10(L^2 / mean((a - b)^2))``; ``inf`` for identical images."""
    a, b = _check_pair(a, b)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0.0 else float(10.0 * np.log10(data_range**2 / mse))


def gaussian_kernel(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    """Normalised 1-D Gaussian taps, radius ``int(truncate * sigma + 0.5)`` (11 taps for sigma 1.5)."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _filter_valid(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable correlation with ``kernel`` along axes 0 and 1, only where the window fits (no padding).

    x: (H, W, C) -> (H - n + 1, W - n + 1, C) for a kernel of n taps.
    """
    n = kernel.size
    rows = np.lib.stride_tricks.sliding_window_view(x, n, axis=0) @ kernel          # (H-n+1, W, C)
    return np.lib.stride_tricks.sliding_window_view(rows, n, axis=1) @ kernel      # (H-n+1, W-n+1, C)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity of two images (see the module docstring), in [-1, 1]; 1 iff identical."""
    a, b = _check_pair(a, b)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    kernel = gaussian_kernel()
    if min(a.shape[:2]) < kernel.size:
        raise ValueError(f"SSIM needs images of at least {kernel.size}x{kernel.size} px, got {a.shape[:2]}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    mu_a, mu_b = _filter_valid(a, kernel), _filter_valid(b, kernel)
    var_a = _filter_valid(a * a, kernel) - mu_a**2
    var_b = _filter_valid(b * b, kernel) - mu_b**2
    cov = _filter_valid(a * b, kernel) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(index.mean())


# ------------------------------------------------------------------------------ optional learned metrics


LPIPS_ALEX_WEIGHTS = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet, LPIPS' backbone
FID_INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's Inception v3


@dataclass(frozen=True)
class Availability:
    """Whether a learned metric can run offline, and why not when it cannot."""

    name: str
    available: bool
    reason: str


def torch_hub_checkpoints() -> Path:
    """Where torch.hub keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``), without importing torch."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch")
    return Path(home) / "hub" / "checkpoints"


def _available(name: str, package: str, weights: str) -> Availability:
    if importlib.util.find_spec(package) is None:
        return Availability(name, False, f"skipped: Python package {package!r} is not installed")
    path = torch_hub_checkpoints() / weights
    if not path.is_file():
        return Availability(name, False, f"skipped: weights {path} not present (never downloaded here)")
    return Availability(name, True, f"{package} with {path}")


def lpips_availability() -> Availability:
    """LPIPS (AlexNet) runs only with the ``lpips`` package and AlexNet's weights already on disk."""
    return _available("LPIPS", "lpips", LPIPS_ALEX_WEIGHTS)


def fid_availability() -> Availability:
    """FID runs only with ``pytorch_fid`` and its Inception weights already on disk."""
    return _available("FID", "pytorch_fid", FID_INCEPTION_WEIGHTS)


def _to_tensor(image: np.ndarray):
    """uint8 ``(H, W, 3)`` -> float32 tensor ``(1, 3, H, W)`` in [-1, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def lpips_scores(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
    """LPIPS (AlexNet) of (restored, truth) uint8 pairs; call only when :func:`lpips_availability` says so
    (torchvision then finds AlexNet's weights in the hub cache and downloads nothing). Lower is better."""
    import lpips
    import torch

    net = lpips.LPIPS(net="alex", verbose=False).eval()
    with torch.no_grad():
        return [float(net(_to_tensor(a), _to_tensor(b))) for a, b in pairs]


def fid_score(restored: list[np.ndarray], truth: list[np.ndarray]) -> float:
    """FID between the restored and the ground-truth sets (Inception pool3, 2048-d), with pytorch-fid's model;
    call only when :func:`fid_availability` says so. Needs at least 2 images per set. Lower is better."""
    import torch
    from pytorch_fid.fid_score import calculate_frechet_distance
    from pytorch_fid.inception import InceptionV3

    if min(len(restored), len(truth)) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(restored)} and {len(truth)}")
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    def stats(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            feats = np.concatenate([model((_to_tensor(x) + 1) / 2)[0].flatten(1).numpy() for x in images])
        return feats.mean(0), np.cov(feats, rowvar=False)

    (mu1, s1), (mu2, s2) = stats(restored), stats(truth)
    return float(calculate_frechet_distance(mu1, s1, mu2, s2))
