"""Operator nodes: one per degradation, each returning a FLOWDPS_OPERATOR (an ``operators.LinearOperator``).

Operators are cheap descriptions (a factor, a kernel, a mask); the image size is only known when a
measurement or image arrives, so size rules (factor divides the size, kernel fits, mask matches) are checked
by the nodes that receive an image (Simulate measurement, Pseudo-inverse preview, the samplers), before any
expensive work. Parameter rules (odd kernel size, sigma > 0, ...) are the operators' own, checked when a node
builds its operator; their messages name the node's widgets.
"""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..operators import (
    BT601_WEIGHTS,
    GAUSSIAN_KERNEL_SIZE,
    GAUSSIAN_SIGMA,
    MEAN_WEIGHTS,
    MOTION_INTENSITY,
    MOTION_KERNEL_SIZE,
    PAPER_GAUSSIAN_KERNEL_SIZE,
    PAPER_GAUSSIAN_SIGMA,
    PAPER_SR_FACTOR,
    AvgPoolSR,
    BicubicSR,
    Blur,
    Composed,
    Grayscale,
    Identity,
    Inpainting,
    PaperGaussianBlur,
    gaussian_blur,
    lazy_box_mask,
    lazy_random_mask,
    motion_blur,
    validate_kernel,
)
from . import messages
from .common import CATEGORY_OPERATORS, Operator
from .convert import comfy_mask_from_keep_mask, keep_mask_from_comfy_mask, mask_to_batch
from .inputs import check_links, inputs_named

BOUNDARY_TOOLTIP = ("What the blur saw beyond the photo's edges: keep 'reflect' (a mirror image, right for photos); "
                    "'circular' wraps around (fast exact pseudo-inverse), 'zero' is black.")
KERNEL_SIZE_TOOLTIP = ("Size of the blur in pixels (odd; paper: 61). At most the photo's smaller side.")
GREY_WEIGHTS = {"mean": MEAN_WEIGHTS, "bt601": BT601_WEIGHTS}
BOX_DEFAULT_SIZE = 768  # the paper's image size (SD3 at 768 x 768)
KERNEL_CONVENTIONS = ("point-spread function", "correlation kernel")
RANDOM_MISSING_RATIO = 0.7  # not from FlowDPS (its inpainting is not exposed); a common choice in the DPS family


KERNEL_SIZE_INPUT = {"kernel size": "kernel_size", "motion kernel size": "kernel_size"}
"""Operator parameter -> the blur nodes' widget (the operators check the size and its parity)."""


def _operator_output() -> io.Output:
    return Operator.Output(display_name="operator", tooltip="The degradation, for Simulate measurement, the "
                                                            "pseudo-inverse preview and the FlowDPS nodes.")


def kernel_to_image(kernel: torch.Tensor) -> torch.Tensor:
    """A ``(kh, kw)`` kernel as a ComfyUI IMAGE ``(1, kh, kw, 3)`` scaled to peak 1 (for display)."""
    k = kernel.float()
    k = k / k.max().clamp_min(torch.finfo(torch.float32).tiny)
    return k[None, :, :, None].expand(1, -1, -1, 3).contiguous()


def kernel_from_inputs(image: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
    """The user's kernel from exactly one of an IMAGE (channel mean of the first image) or a MASK; validated."""
    if (image is None) == (mask is None):
        raise ValueError("connect exactly one kernel: kernel_image (an IMAGE) or kernel_mask (a MASK)"
                         + (", not both" if image is not None else ""))
    if image is not None:
        if image.ndim != 4:
            raise ValueError(f"kernel_image must be an IMAGE (B, H, W, C), got shape {tuple(image.shape)}")
        kernel = image[0, :, :, : min(image.shape[-1], 3)].float().mean(dim=-1)
    else:
        kernel = mask_to_batch(mask, name="kernel_mask")[0]
    return validate_kernel(kernel.clone())


def _factor_input() -> io.Int.Input:
    return io.Int.Input("factor", default=PAPER_SR_FACTOR, min=1, max=64,
                        tooltip="How many times larger the result is than your photo (4: 64x64 -> 256x256). The "
                                "paper uses 12 (64 -> 768 pixels).")


class SuperResolutionAvgPool(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorSRAvgPool",
            display_name="Upscale operator (super-resolution, average pool)",
            category=CATEGORY_OPERATORS,
            description="For upscaling (super-resolution): says the photo is the result shrunk by 'factor', each "
                        "pixel the mean of a factor x factor block (the paper's sr_avgpool). The result is factor "
                        "times the photo's size.",
            inputs=[_factor_input()],
            outputs=[_operator_output()],
        )

    @classmethod
    def execute(cls, factor) -> io.NodeOutput:
        return io.NodeOutput(AvgPoolSR(factor))


class SuperResolutionBicubic(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorSRBicubic",
            display_name="Upscale operator (super-resolution, bicubic)",
            category=CATEGORY_OPERATORS,
            description="For upscaling (super-resolution), the usual choice: says the photo is the result shrunk "
                        "by 'factor' with antialiased bicubic downscaling (a = -0.5, symmetric boundary; the paper's "
                        "sr_bicubic), as most software shrinks photos. The result is factor times the photo's "
                        "size.",
            inputs=[_factor_input()],
            outputs=[_operator_output()],
        )

    @classmethod
    def execute(cls, factor) -> io.NodeOutput:
        return io.NodeOutput(BicubicSR(factor))


class GaussianBlurOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorGaussianBlur",
            display_name="Gaussian blur operator (deblur)",
            category=CATEGORY_OPERATORS,
            description="For deblurring a soft, out-of-focus photo: says the photo was blurred by a round "
                        "(Gaussian) blur of radius 'sigma'. The result has the photo's size. (An exact, centred "
                        "Gaussian with a true adjoint; the paper's size 61, sigma 3.)",
            inputs=[
                io.Int.Input("kernel_size", default=GAUSSIAN_KERNEL_SIZE, min=1, max=255, step=2,
                             tooltip=KERNEL_SIZE_TOOLTIP),
                io.Float.Input("sigma", default=GAUSSIAN_SIGMA, min=0.01, max=100.0, step=0.1,
                               tooltip="How blurred the photo is: the blur's radius in pixels (paper: 3; standard "
                                       "deviation of the Gaussian)."),
                io.Combo.Input("boundary", options=["reflect", "circular", "zero"], default="reflect",
                               tooltip=BOUNDARY_TOOLTIP),
            ],
            outputs=[_operator_output()],
        )

    @classmethod
    def execute(cls, kernel_size, sigma, boundary) -> io.NodeOutput:
        with inputs_named(KERNEL_SIZE_INPUT):
            return io.NodeOutput(gaussian_blur(kernel_size, sigma, boundary))


class PaperGaussianBlurOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorPaperGaussianBlur",
            display_name="Gaussian blur operator (paper-compatible)",
            category=CATEGORY_OPERATORS,
            description="Reproduces what the official FlowDPS code computes for its Gaussian deblurring task "
                        "(deblur_gauss), mistakes included; it exists only to reproduce the paper's "
                        "Gaussian-deblurring numbers. It is not a true Gaussian blur: off-centre taps (a "
                        "one-pixel shift), zero boundary, 1-D singular values below 0.03 set to zero, and each "
                        "colour channel blurred with its own, mismatched spectrum (at the paper's settings two "
                        "thirds of the blur's spectrum are dropped and as many fine-detail components, which a "
                        "blur removes, are let through; only a grey image gets the plain truncated blur). For "
                        "restoring photos use the exact Gaussian blur operator (recommended).",
            inputs=[
                io.Int.Input("kernel_size", default=PAPER_GAUSSIAN_KERNEL_SIZE, min=1, max=255, step=2,
                             tooltip=KERNEL_SIZE_TOOLTIP),
                io.Float.Input("sigma", default=PAPER_GAUSSIAN_SIGMA, min=0.01, max=100.0, step=0.1,
                               tooltip="Standard deviation in pixels (> 0; paper: 3.0)."),
            ],
            outputs=[_operator_output()],
        )

    @classmethod
    def execute(cls, kernel_size, sigma) -> io.NodeOutput:
        with inputs_named(KERNEL_SIZE_INPUT):
            return io.NodeOutput(PaperGaussianBlur(kernel_size, sigma))


class MotionBlurOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorMotionBlur",
            display_name="Motion blur operator (deblur)",
            category=CATEGORY_OPERATORS,
            description="Blur by a random camera-shake kernel (our own generator of the DPS/FlowDPS kind: size "
                        "61, intensity 0.5 in the paper). The same seed gives the same kernel. Applied as the "
                        "official code applies its motion kernels: by correlation with the generated kernel, so "
                        "the 'kernel' output (the point-spread function, which gives the same blur in 'Blur "
                        "operator (custom kernel)') is the generated kernel turned by 180 degrees. With residual "
                        "'auto' the samplers compare the photo with the blurred estimate directly, as the "
                        "official code does for motion blur.",
            inputs=[
                io.Int.Input("kernel_size", default=MOTION_KERNEL_SIZE, min=3, max=255, step=2,
                             tooltip=KERNEL_SIZE_TOOLTIP),
                io.Float.Input("intensity", default=MOTION_INTENSITY, min=0.0, max=1.0, step=0.05,
                               tooltip="How much the camera path wanders, 0 (a straight streak) to 1 (shaky); "
                                       "paper: 0.5."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Which random camera-shake path (the same seed gives the same blur)."),
                io.Combo.Input("boundary", options=["reflect", "circular", "zero"], default="reflect",
                               tooltip=BOUNDARY_TOOLTIP),
            ],
            outputs=[_operator_output(),
                     io.Image.Output(display_name="kernel",
                                     tooltip="The point-spread function (the blur of a single bright pixel), "
                                             "scaled to peak white.")],
        )

    @classmethod
    def execute(cls, kernel_size, intensity, seed, boundary) -> io.NodeOutput:
        with inputs_named(KERNEL_SIZE_INPUT):
            blur = motion_blur(kernel_size, intensity, torch.Generator().manual_seed(seed), boundary)
        return io.NodeOutput(blur, kernel_to_image(blur.kernel))


class KernelBlurOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorKernelBlur",
            display_name="Blur operator (deblur, custom kernel)",
            category=CATEGORY_OPERATORS,
            description="Blur by your own kernel, given as an IMAGE (channels averaged, first image of a batch) "
                        "or a MASK. Sizes must be odd; values must be >= 0; the kernel is normalised to sum 1. "
                        "With residual 'auto' the samplers compare the photo with the blurred estimate directly "
                        "(the official code's choice for its kernel blurs).",
            inputs=[
                io.Image.Input("kernel_image", optional=True, tooltip="The kernel as an image (e.g. LoadImage)."),
                io.Mask.Input("kernel_mask", optional=True, tooltip="The kernel as a MASK."),
                io.Combo.Input("boundary", options=["reflect", "circular", "zero"], default="reflect",
                               tooltip=BOUNDARY_TOOLTIP),
                io.Combo.Input("kernel_is", options=list(KERNEL_CONVENTIONS), default=KERNEL_CONVENTIONS[0],
                               optional=True,
                               tooltip="How the kernel is applied. 'point-spread function': convolution, the "
                                       "image of one bright pixel after blurring (what cameras and most tools "
                                       "mean). 'correlation kernel': correlation, as the official FlowDPS and "
                                       "DPS code apply their kernel files (the same blur turned by 180 "
                                       "degrees)."),
            ],
            outputs=[_operator_output(),
                     io.Image.Output(display_name="kernel",
                                     tooltip="The normalised point-spread function, scaled to peak white.")],
        )

    @classmethod
    def execute(cls, boundary, kernel_image=None, kernel_mask=None,
                kernel_is=KERNEL_CONVENTIONS[0]) -> io.NodeOutput:
        check_links(cls, kernel_image=kernel_image, kernel_mask=kernel_mask)
        if kernel_is not in KERNEL_CONVENTIONS:
            raise ValueError(f"kernel_is must be one of {KERNEL_CONVENTIONS}, got {kernel_is!r}")
        kernel = kernel_from_inputs(kernel_image, kernel_mask)
        if kernel_is == "correlation kernel":
            kernel = kernel.flip(-2, -1)
        return io.NodeOutput(Blur(kernel, boundary), kernel_to_image(kernel))


class BoxInpaintOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorBoxInpaint",
            display_name="Inpainting operator (box)",
            category=CATEGORY_OPERATORS,
            description="Fill a rectangle given in pixels, on a photo of exactly width x height pixels. "
                        "'Inpainting operator (box, relative)' places the box as fractions of any photo instead, "
                        "with nothing to retype. Outputs the MASK too (white = to fill), in ComfyUI's convention.",
            inputs=[
                io.Int.Input("width", default=BOX_DEFAULT_SIZE, min=1, max=16384,
                             tooltip="Your photo's width in pixels (must match it exactly)."),
                io.Int.Input("height", default=BOX_DEFAULT_SIZE, min=1, max=16384,
                             tooltip="Your photo's height in pixels (must match it exactly)."),
                io.Int.Input("box_left", default=BOX_DEFAULT_SIZE // 4, min=0, max=16384,
                             tooltip="Left edge of the box to fill, in pixels from the left."),
                io.Int.Input("box_top", default=BOX_DEFAULT_SIZE // 4, min=0, max=16384,
                             tooltip="Top edge of the box to fill, in pixels from the top."),
                io.Int.Input("box_width", default=BOX_DEFAULT_SIZE // 2, min=1, max=16384,
                             tooltip="Width of the box to fill, in pixels."),
                io.Int.Input("box_height", default=BOX_DEFAULT_SIZE // 2, min=1, max=16384,
                             tooltip="Height of the box to fill, in pixels."),
            ],
            outputs=[_operator_output(),
                     io.Mask.Output(display_name="mask", tooltip="1 = missing (to be filled), 0 = known.")],
        )

    @classmethod
    def execute(cls, width, height, box_left, box_top, box_width, box_height) -> io.NodeOutput:
        recipe = lazy_box_mask(height, width, box_top, box_left, box_height, box_width)
        check_mask_memory(cls, height, width, MASK_BYTES_PER_PIXEL)
        return io.NodeOutput(Inpainting.lazy(recipe), comfy_box_mask(height, width, box_top, box_left,
                                                                     box_height, box_width))


MASK_BYTES_PER_PIXEL = 4
"""Bytes per pixel of a node's MASK output (float32)."""
RANDOM_MASK_BYTES_PER_PIXEL = 4 + 8 + 4
"""Bytes per pixel while a random mask is drawn: the keep-mask, the permutation (int64) and the MASK output."""


def check_mask_memory(node: type[io.ComfyNode], height: int, width: int, bytes_per_pixel: int) -> None:
    """Refuse, before any allocation, a mask output larger than the memory ComfyUI reports free on the CPU."""
    need = height * width * bytes_per_pixel
    free = int(mm.get_free_memory(torch.device("cpu")))
    if need > free:
        raise ValueError(f"{node.define_schema().display_name}: a {width}x{height} mask needs about "
                         f"{need / 2**30:.1f} GiB but only {free / 2**30:.1f} GiB is free; set 'width' and "
                         "'height' to your photo's size")


def comfy_box_mask(height: int, width: int, top: int, left: int, box_height: int, box_width: int) -> torch.Tensor:
    """ComfyUI MASK ``(1, height, width)`` of a box: 1 inside (to fill), 0 elsewhere (one allocation)."""
    mask = torch.zeros(1, height, width)
    mask[:, top: top + box_height, left: left + box_width] = 1.0
    return mask


BOX_FRACTION_INPUTS = (("box_left", 0.25, "Left edge of the box, as a fraction of the photo's width (0 = left "
                                         "edge, 0.5 = middle)."),
                       ("box_top", 0.25, "Top edge of the box, as a fraction of the photo's height (0 = top edge)."),
                       ("box_width", 0.5, "Width of the box, as a fraction of the photo's width (0.5 = half)."),
                       ("box_height", 0.5, "Height of the box, as a fraction of the photo's height (0.5 = half)."))


def relative_box(height: int, width: int, left: float, top: float, box_width: float,
                 box_height: float) -> tuple[int, int, int, int, bool]:
    """Pixel box ``(top, left, height, width)`` of a box given as fractions of a ``height`` x ``width`` photo
    (rounded, at least one pixel, cut at the photo's edges), and whether it had to be cut."""
    x0, y0 = round(left * width), round(top * height)
    x1, y1 = x0 + max(1, round(box_width * width)), y0 + max(1, round(box_height * height))
    cx0, cy0 = min(max(x0, 0), width - 1), min(max(y0, 0), height - 1)
    cx1, cy1 = max(min(x1, width), cx0 + 1), max(min(y1, height), cy0 + 1)
    return cy0, cx0, cy1 - cy0, cx1 - cx0, (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1)


class RelativeBoxInpaintOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorBoxInpaintRelative",
            display_name="Inpainting operator (box, relative)",
            category=CATEGORY_OPERATORS,
            description="Fill a rectangle of the photo: the box is given as fractions of the photo (0.25, 0.25, "
                        "0.5, 0.5 = the middle quarter), so it fits any photo size with nothing to type. Connect the "
                        "photo to 'image'. Outputs the MASK too (white = to fill).",
            inputs=[
                io.Image.Input("image", tooltip="The photo the box is placed on (only its size is used)."),
                *(io.Float.Input(name, default=default, min=0.0, max=1.0, step=0.01, tooltip=tooltip)
                  for name, default, tooltip in BOX_FRACTION_INPUTS),
            ],
            outputs=[_operator_output(),
                     io.Mask.Output(display_name="mask", tooltip="1 = to fill (the box), 0 = kept.")],
        )

    @classmethod
    def execute(cls, image, box_left, box_top, box_width, box_height) -> io.NodeOutput:
        check_links(cls, image=image)
        if image.ndim != 4 or min(image.shape[1:3]) < 1:
            raise ValueError(f"image must be an IMAGE (B, H, W, C), got shape {tuple(image.shape)}")
        height, width = int(image.shape[1]), int(image.shape[2])
        top, left, box_h, box_w, cut = relative_box(height, width, box_left, box_top, box_width, box_height)
        if cut:
            messages.note(cls.define_schema().display_name,
                          f"the box reaches past the photo's edge; it was cut there (box {box_w}x{box_h} px at "
                          f"({left}, {top}) of a {width}x{height} photo)")
        recipe = lazy_box_mask(height, width, top, left, box_h, box_w)
        check_mask_memory(cls, height, width, MASK_BYTES_PER_PIXEL)
        return io.NodeOutput(Inpainting.lazy(recipe), comfy_box_mask(height, width, top, left, box_h, box_w))


class RandomInpaintOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorRandomInpaint",
            display_name="Inpainting operator (random pixels)",
            category=CATEGORY_OPERATORS,
            description="Hides a random set of pixels (exactly round(ratio x width x height)) of an image of the "
                        "given size, the same for every channel.",
            inputs=[
                io.Int.Input("width", default=BOX_DEFAULT_SIZE, min=1, max=16384, tooltip="Image width."),
                io.Int.Input("height", default=BOX_DEFAULT_SIZE, min=1, max=16384, tooltip="Image height."),
                io.Float.Input("missing_ratio", default=RANDOM_MISSING_RATIO, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of hidden pixels, 0 to 1."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the pixel choice."),
            ],
            outputs=[_operator_output(),
                     io.Mask.Output(display_name="mask", tooltip="1 = missing (to be filled), 0 = known.")],
        )

    @classmethod
    def execute(cls, width, height, missing_ratio, seed) -> io.NodeOutput:
        op = Inpainting.lazy(lazy_random_mask(height, width, missing_ratio, seed))
        check_mask_memory(cls, height, width, RANDOM_MASK_BYTES_PER_PIXEL)
        return io.NodeOutput(op, comfy_mask_from_keep_mask(op.mask))


class MaskInpaintOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorMaskInpaint",
            display_name="Inpainting operator (painted mask)",
            category=CATEGORY_OPERATORS,
            description="Fill the area you painted: connect Load Image's MASK after painting on the photo in "
                        "its mask editor (right-click the image > Open in MaskEditor). White (above 0.5) = to fill, "
                        "black = keep; exactly 0.5 counts as keep, as ComfyUI's VAE Encode (for Inpainting) rounds "
                        "it. The mask must have the photo's size.",
            inputs=[
                io.Mask.Input("mask", tooltip="1 = area to fill (ComfyUI's convention), 0 = keep; soft values are "
                                              "cut at 0.5 (above: fill; exactly 0.5: keep)."),
                io.Boolean.Input("invert", default=False,
                                 tooltip="Treat white as known instead (for masks drawn the other way): values "
                                         "below 0.5 are filled; exactly 0.5 still counts as known."),
            ],
            outputs=[_operator_output()],
        )

    @classmethod
    def execute(cls, mask, invert) -> io.NodeOutput:
        check_links(cls, mask=mask)
        m = mask_to_batch(mask, name="mask").clone()
        if m.numel() and (m.min() < 0 or m.max() > 1):
            raise ValueError(f"mask values must be in [0, 1], got range [{m.min().item()}, {m.max().item()}]")
        return io.NodeOutput(Inpainting(m if invert else keep_mask_from_comfy_mask(m)))


class IdentityOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorIdentity",
            display_name="Identity operator (denoising)",
            category=CATEGORY_OPERATORS,
            description="y = x: the photo is only noisy (denoising).",
            inputs=[],
            outputs=[_operator_output()],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(Identity())


class GrayscaleOperator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorGrayscale",
            display_name="Colour-to-grey operator (colourisation)",
            category=CATEGORY_OPERATORS,
            description="y = weighted sum of R, G, B: restoring colour to a grey photo. A grey measurement IMAGE "
                        "is read as the mean of its channels.",
            inputs=[io.Combo.Input("weights", options=list(GREY_WEIGHTS), default="mean",
                                   tooltip="'mean': (R+G+B)/3 as the official repository; 'bt601': luma "
                                           "0.299 R + 0.587 G + 0.114 B.")],
            outputs=[_operator_output()],
        )

    @classmethod
    def execute(cls, weights) -> io.NodeOutput:
        if weights not in GREY_WEIGHTS:
            raise ValueError(f"weights must be one of {list(GREY_WEIGHTS)}, got {weights!r}")
        return io.NodeOutput(Grayscale(GREY_WEIGHTS[weights]))


class ComposeOperators(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSOperatorCompose",
            display_name="Compose operators",
            category=CATEGORY_OPERATORS,
            description="Applies 'first', then 'then' (e.g. a Gaussian blur, then SR x4: a realistic camera).",
            inputs=[
                Operator.Input("first", tooltip="The degradation applied to the image first."),
                Operator.Input("then", tooltip="The degradation applied to the result."),
            ],
            outputs=[_operator_output()],
        )

    @classmethod
    def execute(cls, first, then) -> io.NodeOutput:
        check_links(cls, first=first, then=then)
        return io.NodeOutput(Composed(outer=then, inner=first, title="Compose operators", inner_name="'first'",
                                      outer_name="'then'"))


OPERATOR_NODES = [
    SuperResolutionAvgPool,
    SuperResolutionBicubic,
    GaussianBlurOperator,
    PaperGaussianBlurOperator,
    MotionBlurOperator,
    KernelBlurOperator,
    BoxInpaintOperator,
    RelativeBoxInpaintOperator,
    RandomInpaintOperator,
    MaskInpaintOperator,
    IdentityOperator,
    GrayscaleOperator,
    ComposeOperators,
]
