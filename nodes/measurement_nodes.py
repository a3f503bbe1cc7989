"""Measurement nodes: simulate a degraded photo from a clean one, preview its pseudo-inverse, size the latent of
the SAMPLER route from the photo and crop its result back."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..operators import CG_MAX_ITER
from . import messages, padding
from .common import CATEGORY_MEASUREMENT, Operator
from .convert import (
    PAPER_SIGMA_Y,
    fix_hint,
    image_to_pixels,
    measurement_noise,
    measurement_pixels,
    pixels_to_image,
    unknown_mask,
)
from .inputs import check_links

PREVIEW_CG_ITERATIONS = 50  # default cap for operators without a closed-form pseudo-inverse (blurs)


class SimulateMeasurement(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSSimulateMeasurement",
            display_name="Simulate measurement (degrade a clean photo)",
            category=CATEGORY_MEASUREMENT,
            description="Degrades a clean image with an operator and adds Gaussian noise: y = A x + noise, to try "
                        "a restoration on a known ground truth. The output has the operator's output size (SR "
                        "x4 of 256x256 gives 64x64). An alpha channel is dropped; a grey image is used as RGB.",
            inputs=[
                io.Image.Input("image", tooltip="The clean image (ground truth)."),
                Operator.Input("operator", tooltip="The degradation to apply."),
                io.Float.Input("sigma_y", default=PAPER_SIGMA_Y, min=0.0, max=1.0, step=0.001,
                               tooltip="Noise standard deviation on the [0, 1] image scale (paper: 0.015, i.e. "
                                       "0.03 on the [-1, 1] scale)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of the noise."),
                io.Boolean.Input("clip", default=True, optional=True,
                                 tooltip="Clip the measurement to the image range [0, 1] (on: what a saved photo "
                                         "would hold). Off: y = A x + noise exactly, values outside [0, 1] kept, "
                                         "as the paper's simulation (and the evaluation runner) uses; the "
                                         "restore nodes take it as it is, while saving or previewing clips it."),
            ],
            outputs=[
                io.Image.Output(display_name="measurement",
                                tooltip="The degraded image (clipped to [0, 1] unless 'clip' is off)."),
                io.Mask.Output(display_name="mask", tooltip="1 where the measurement carries no information (the "
                                                            "holes of an inpainting operator), else 0."),
            ],
        )

    @classmethod
    def execute(cls, image, operator, sigma_y, seed, clip=True) -> io.NodeOutput:
        check_links(cls, image=image, operator=operator)
        x = image_to_pixels(image, name="image")
        try:
            operator.output_shape(x.shape)  # checks the size rules (factor, kernel, mask) before any work
        except ValueError as e:
            raise ValueError(f"{e}{fix_hint(operator, x.shape)}") from None
        noise = measurement_noise(sigma_y)  # checks sigma_y
        y = operator.forward(x.to(mm.get_torch_device())).cpu()
        y = noise.apply(y, torch.Generator().manual_seed(seed))  # CPU noise: the same seed on every machine
        return io.NodeOutput(pixels_to_image(y, clamp=bool(clip)), unknown_mask(operator, tuple(x.shape)))


class PseudoInversePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSPseudoInverse",
            display_name="Pseudo-inverse preview (naive restore)",
            category=CATEGORY_MEASUREMENT,
            description="The plain, model-free undoing of the degradation, for comparison: a blocky enlargement "
                        "for upscaling, the holes left grey for inpainting, a sharpened (noisy) image for blurs. "
                        "Also a quick check that the operator matches your photo. (A+ y, the least-squares image "
                        "behind the measurement: exact for SR, inpainting, colour and circular blurs; other blurs "
                        "use conjugate gradients capped at max_iterations.)",
            inputs=[
                io.Image.Input("measurement", tooltip="Your degraded photo."),
                Operator.Input("operator", tooltip="What happened to the photo (an operator node)."),
                io.Int.Input("max_iterations", default=PREVIEW_CG_ITERATIONS, min=1, max=CG_MAX_ITER * 10,
                             tooltip="Conjugate-gradient iterations for blurs without a closed form (more is "
                                     "sharper and slower: about 0.4 s each for a 61-pixel kernel at 768x768 on "
                                     "a CPU; few iterations also act as a regulariser)."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The pseudo-inverse, in the image's size.")],
        )

    @classmethod
    def execute(cls, measurement, operator, max_iterations) -> io.NodeOutput:
        check_links(cls, measurement=measurement, operator=operator)
        y = measurement_pixels(operator, measurement)
        y = y.to(mm.get_torch_device())
        x = operator.pinv(y) if operator.closed_form_pinv else operator.pinv_cg(
            y, max_iter=max_iterations, interrupt=mm.throw_exception_if_processing_interrupted)
        return io.NodeOutput(pixels_to_image(x))


def result_padding(measurement, operator) -> padding.Padding:
    """The padding of a measurement IMAGE for an operator (:mod:`.padding`): the exact and the sampled size of
    the restored image."""
    y = measurement_pixels(operator, measurement)
    return padding.plan(operator, tuple(y.shape))


class LatentForMeasurement(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSLatentForMeasurement",
            display_name="Latent for measurement",
            category=CATEGORY_MEASUREMENT,
            description="An empty LATENT of the size the restoration of this photo needs, for SamplerCustomAdvanced "
                        "with a FlowDPS / AFDPS / FlowChef / PSLD Sampler: nothing to work out by hand (SR x4 of a "
                        "64x64 photo gives a 256x256 latent). When that size is not a multiple of 16 px the latent "
                        "is a little larger (the samplers pad the photo to match): crop the decoded image with "
                        "'Crop to result size'. Also outputs the result's width and height.",
            inputs=[
                io.Image.Input("measurement", tooltip="The degraded photo, as given to the sampler."),
                Operator.Input("operator", tooltip="The degradation, as given to the sampler."),
                io.Vae.Input("vae", tooltip="The model's VAE (its latent channels and scale set the latent's shape)."),
            ],
            outputs=[
                io.Latent.Output(display_name="latent", tooltip="Zeros of the restored image's latent size."),
                io.Int.Output(display_name="width", tooltip="Width of the result in pixels (before any padding)."),
                io.Int.Output(display_name="height", tooltip="Height of the result in pixels (before any padding)."),
            ],
        )

    @classmethod
    def execute(cls, measurement, operator, vae) -> io.NodeOutput:
        check_links(cls, measurement=measurement, operator=operator, vae=vae)
        plan = result_padding(measurement, operator)
        ratio, channels = getattr(vae, "upscale_ratio", 8), getattr(vae, "latent_channels", None)
        if not isinstance(ratio, int) or not isinstance(channels, int):
            raise ValueError(f"vae must be an image VAE (upscale ratio {ratio!r}, latent channels {channels!r})")
        if plan.needed:
            messages.note(cls.define_schema().display_name,
                          plan.describe().replace("so it restored", "so the latent is") + "; crop the decoded image "
                          "with 'Crop to result size'")
        height, width = plan.padded_image
        latent = torch.zeros(measurement.shape[0], channels, height // ratio, width // ratio)
        return io.NodeOutput({"samples": latent}, plan.image[1], plan.image[0])


class CropToResult(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSCropToResult",
            display_name="Crop to result size",
            category=CATEGORY_MEASUREMENT,
            description="Crops a restored image to exactly the size the photo implies (SR x4 of 250x250 gives "
                        "1000x1000), removing the few pixels of padding that 'Latent for measurement' added to reach "
                        "a multiple of 16 px. An image of that size already passes unchanged. (The Restore nodes "
                        "crop by themselves.)",
            inputs=[
                io.Image.Input("image", tooltip="The decoded result (VAE Decode)."),
                io.Image.Input("measurement", tooltip="The degraded photo the result was restored from."),
                Operator.Input("operator", tooltip="The degradation, as given to the sampler."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The result at its exact size.")],
        )

    @classmethod
    def execute(cls, image, measurement, operator) -> io.NodeOutput:
        check_links(cls, image=image, measurement=measurement, operator=operator)
        height, width = result_padding(measurement, operator).image
        if image.shape[1] < height or image.shape[2] < width:
            raise ValueError(f"image is {image.shape[2]}x{image.shape[1]} px, smaller than the result size "
                             f"{width}x{height} of this photo and operator: connect the decoded result of this "
                             "photo's restoration")
        return io.NodeOutput(padding.crop_image(image, (height, width)))


MEASUREMENT_NODES = [SimulateMeasurement, PseudoInversePreview, LatentForMeasurement, CropToResult]
