"""The paper's evaluation protocol (FlowDPS paper, Section 4) as a frozen config, and the ground-truth preparation."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})


@dataclass(frozen=True)
class Protocol:
    """Settings of one evaluation; the defaults are the paper's (FlowDPS, SD3-medium, 768 px, NFE 28).

    Attributes:
        size: side of the square ground truth: shorter side resized to ``size`` (bicubic), then centre-cropped.
        sigma_y: measurement noise std on the [0, 1] image scale (0.015 = the paper's 0.03 on [-1, 1]).
        seed: seed of the measurement noise and of the sampler.
        steps: sampling steps (NFE 28).
        cfg: classifier-free guidance scale.
        shift: SD3 time shift (ModelSamplingSD3).
    """

    size: int = 768
    sigma_y: float = 0.015
    seed: int = 0
    steps: int = 28
    cfg: float = 2.0
    shift: float = 4.0

    def __post_init__(self) -> None:
        if self.size < 16 or self.size % 16:
            raise ValueError(f"size must be a multiple of 16 (SD3) and >= 16, got {self.size}")
        if not 0.0 <= self.sigma_y <= 1.0:
            raise ValueError(f"sigma_y must be in [0, 1] (the [0, 1] image scale), got {self.sigma_y}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def fingerprint(*parts: object) -> str:
    """A short stable hash of JSON-able parts (the protocol, workflow, model): finished results are reused
    only when it matches."""
    text = json.dumps([asdict(p) if isinstance(p, Protocol) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (sorted by name); clear errors for a missing or empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {str(folder)!r} does not exist or is not a folder")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"data folder {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def resize_center_crop(image, size: int):
    """PIL image -> RGB ``size`` x ``size``: shorter side resized to ``size`` (bicubic), centre crop."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_ground_truth(path: str | Path, size: int) -> np.ndarray:
    """The prepared ground truth of an image file: uint8 ``(size, size, 3)``."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(resize_center_crop(image, size), dtype=np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 ``(H, W, 3)`` -> PNG file bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    """Image file bytes -> uint8 ``(H, W, 3)`` RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
