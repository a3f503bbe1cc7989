"""The template browser's pictures: ``example_workflows/<name>.jpg`` for every listed workflow.

Each card shows the task on a real photo (Chelsea the cat, CC0, from the scikit-image wheel that ``make setup``
installs): the degraded photo beside the plain, model-free undoing of the degradation (the pseudo-inverse, the
same thing the workflow's comparison preview shows), made with the pack's own operators. It is honest about what
it is: no picture here is a restoration (that needs the real model weights; the tiny test models only give noise),
and every card says so in its bottom line.

``python -m flowdps_dev.thumbnails`` rewrites them and the pack's icon (``docs/icon.png``; about a second);
``--check`` exits 1 when one is missing or too large. They are committed (JPEG, 400 x 400, under 100 kB each).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from flowdps_dev import demo, make_workflows
from flowdps_dev.pack import import_pack

SIZE = 400
PANEL = 184  # side of each picture panel
MAX_BYTES = 100_000
BACKGROUND = (24, 24, 28)
COLORS = {"sd3": (63, 120, 158), "SD3.5": (138, 170, 136), "Flux": (181, 139, 42)}
HONEST = "pictures: test photo + plain undo, not a restoration"


@dataclass(frozen=True)
class Card:
    headline: str  # big, top
    model: str  # the model tag, top right
    left: str  # caption of the left panel
    right: str  # caption of the right panel
    pictures: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # photo (H, W, 3) uint8 -> (left, right)


def _ops():
    import importlib

    import_pack("flowdps")
    return importlib.import_module("flowdps.operators")


def _to_pixels(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).float().permute(2, 0, 1)[None] / 127.5 - 1.0


PREVIEW_ITERATIONS = 50  # what the workflows' Pseudo-inverse preview does for a blur (its default)
NOISE = 0.03  # the paper's measurement noise on the [-1, 1] scale: what a real degraded photo also carries


def _degrade(op, photo: np.ndarray) -> torch.Tensor:
    """``A x + noise`` of the photo (seeded), on the operators' [-1, 1] scale."""
    y = op.forward(_to_pixels(photo))
    return y + NOISE * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))


def _to_image(x: torch.Tensor) -> np.ndarray:
    return ((x[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def upscale(factor: int):
    def pictures(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        op = _ops().BicubicSR(factor)
        y = _degrade(op, photo)
        return _to_image(y), _to_image(op.pinv(y))
    return pictures


def deblur(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    op = _ops().gaussian_blur(15, 2.5, "reflect")
    y = _degrade(op, photo)
    return _to_image(y), _to_image(op.pinv_cg(y, max_iter=PREVIEW_ITERATIONS))


def box(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = photo.shape[:2]
    ops = _ops()
    op = ops.Inpainting(ops.box_mask(h, w, h // 4, w // 4, h // 2, w // 2))
    outlined = Image.fromarray(photo)
    ImageDraw.Draw(outlined).rectangle((w // 4, h // 4, 3 * w // 4, 3 * h // 4), outline=(255, 220, 60), width=4)
    return np.asarray(outlined), _to_image(op.pinv(op.forward(_to_pixels(photo))))


def painted(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = photo.shape[:2]
    mask = Image.new("L", (w, h), 255)
    ImageDraw.Draw(mask).ellipse((w * 0.55, h * 0.15, w * 0.92, h * 0.62), fill=0)  # the area to fill
    keep = torch.from_numpy(np.asarray(mask) / 255.0).float()
    op = _ops().Inpainting(keep)
    shown = photo.copy()
    shown[np.asarray(mask) == 0] = (shown[np.asarray(mask) == 0] * 0.4 + np.array([255, 60, 60]) * 0.6).astype(np.uint8)
    return shown, _to_image(op.pinv(op.forward(_to_pixels(photo))))


def simulate(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return photo, upscale(4)(photo)[0]


CARDS = {
    make_workflows.FIRST_WORKFLOW: Card("UPSCALE 4x", "SD3", "your photo", "4x larger (plain)", upscale(4)),
    "2 - Sharpen a blurry photo (SD3)": Card("SHARPEN", "SD3", "blurry photo", "plain sharpening", deblur),
    "3 - Fill a box in a photo (SD3)": Card("FILL A BOX", "SD3", "photo + box", "box to fill", box),
    "4 - Fill a painted area (SD3)": Card("FILL PAINTED AREA", "SD3", "painted area", "area to fill", painted),
    "5 - Try it on a clean photo (SD3)": Card("TRY IT", "SD3", "clean photo", "shrunk 4x: restore it", simulate),
    "6 - Upscale a photo 4x (SD3.5)": Card("UPSCALE 4x", "SD3.5", "your photo", "4x larger (plain)", upscale(4)),
    "7 - Upscale a photo 4x (Flux)": Card("UPSCALE 4x", "Flux", "your photo", "4x larger (plain)", upscale(4)),
    "8 - Upscale 4x with your own sampler (SD3)": Card("UPSCALE 4x", "SD3", "your photo",
                                                        "your own sampler nodes", upscale(4)),
}


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def panel(image: np.ndarray) -> Image.Image:
    """A picture scaled to the panel (nearest neighbour when enlarging, so a small photo looks small and blocky)."""
    im = Image.fromarray(image)
    resample = Image.Resampling.NEAREST if im.width < PANEL else Image.Resampling.LANCZOS
    return im.resize((PANEL, PANEL), resample)


def render(card: Card, number: str, photo: np.ndarray) -> Image.Image:
    """One card: number and headline, the model tag, two captioned panels, the honesty line."""
    left, right = card.pictures(photo)
    canvas = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((14, 14), number, font=font(44), fill=(255, 255, 255))
    draw.text((62, 24), card.headline, font=font(28), fill=(255, 255, 255))
    tag = card.model
    color = COLORS.get(tag, COLORS["sd3"])
    width = draw.textlength(tag, font=font(20)) + 16
    draw.rounded_rectangle((SIZE - 14 - width, 72, SIZE - 14, 100), radius=6, fill=color)
    draw.text((SIZE - 6 - width, 75), tag, font=font(20), fill=(255, 255, 255))
    draw.text((14, 76), "FlowDPS", font=font(20), fill=(170, 170, 170))
    top = 118
    for i, (image, caption) in enumerate(((left, card.left), (right, card.right))):
        x = 12 + i * (PANEL + 8)
        canvas.paste(panel(image), (x, top))
        draw.text((x, top + PANEL + 8), caption, font=font(17), fill=(230, 230, 230))
    arrow_y = top + PANEL // 2
    draw.polygon([(SIZE // 2 - 8, arrow_y - 12), (SIZE // 2 + 8, arrow_y), (SIZE // 2 - 8, arrow_y + 12)],
                 fill=(255, 220, 60))
    draw.text((12, SIZE - 30), HONEST, font=font(14), fill=(150, 150, 150))
    return canvas


def thumbnails(photo_name: str = "chelsea") -> dict[Path, bytes]:
    """``{path: JPEG bytes}`` of every listed workflow's card."""
    import io

    photo = demo.ground_truth(demo.photo_path(photo_name), 256)
    out = {}
    for name, card in CARDS.items():
        buffer = io.BytesIO()
        render(card, name.split(" ")[0], photo).save(buffer, "JPEG", quality=85, optimize=True)
        out[make_workflows.WORKFLOW_DIR / f"{name}.jpg"] = buffer.getvalue()
    return out


ICON = make_workflows.ROOT / "docs" / "icon.png"
"""The pack's icon in the Comfy Registry and ComfyUI-Manager ([tool.comfy] Icon, by its raw GitHub URL)."""
ICON_SIZE = 256


def icon(photo_name: str = "chelsea") -> bytes:
    """PNG bytes of the icon: the test photo, its left part blocky (a small photo), its right part sharp, split
    by a diagonal line: the idea of the pack (a picture, not a result of it)."""
    import io

    photo = Image.fromarray(demo.ground_truth(demo.photo_path(photo_name), 256)).resize((ICON_SIZE, ICON_SIZE))
    blocky = photo.resize((ICON_SIZE // 16, ICON_SIZE // 16), Image.Resampling.BOX).resize(
        (ICON_SIZE, ICON_SIZE), Image.Resampling.NEAREST)
    mask = Image.new("L", (ICON_SIZE, ICON_SIZE), 0)
    ImageDraw.Draw(mask).polygon([(0, 0), (ICON_SIZE * 0.62, 0), (ICON_SIZE * 0.38, ICON_SIZE), (0, ICON_SIZE)],
                                 fill=255)
    canvas = Image.composite(blocky, photo, mask)
    ImageDraw.Draw(canvas).line([(ICON_SIZE * 0.62, 0), (ICON_SIZE * 0.38, ICON_SIZE)], fill=(255, 220, 60),
                                width=5)
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def listed() -> list[str]:
    """The workflows the template browser lists (the top folder)."""
    return [w.name for w in make_workflows.all_workflows() if not w.folder]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a card or the icon is missing or over 100 kB")
    args = parser.parse_args(argv)
    missing = sorted(set(listed()) - set(CARDS))
    if missing:
        print(f"no card for: {missing}", file=sys.stderr)
        return 1
    if args.check:
        bad = [f"{n}.jpg" for n in listed() if not (make_workflows.WORKFLOW_DIR / f"{n}.jpg").is_file()
               or (make_workflows.WORKFLOW_DIR / f"{n}.jpg").stat().st_size > MAX_BYTES]
        if not ICON.is_file() or ICON.stat().st_size > MAX_BYTES:
            bad.append("docs/icon.png")
        for name in bad:
            print(f"missing or too large: {name}", file=sys.stderr)
        return 1 if bad else 0
    for path, data in thumbnails().items():
        path.write_bytes(data)
        print(f"wrote {path.relative_to(make_workflows.ROOT)} ({len(data) // 1000} kB)")
    ICON.write_bytes(icon())
    print(f"wrote {ICON.relative_to(make_workflows.ROOT)} ({ICON.stat().st_size // 1000} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
