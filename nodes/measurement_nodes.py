"""Measurement nodes: simulate a degraded photo from a clean one, and preview the pseudo-inverse of one."""

from __future__ import annotations

import comfy.model_management as mm
import torch
from comfy_api.latest import io

from ..operators import CG_MAX_ITER
from .common import CATEGORY_MEASUREMENT, Operator
from .convert import (
    PAPER_SIGMA_Y,
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
            display_name="Simulate measurement",
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
        operator.output_shape(x.shape)  # checks the size rules (factor, kernel, mask) before any work
        noise = measurement_noise(sigma_y)  # checks sigma_y
        y = operator.forward(x.to(mm.get_torch_device())).cpu()
        y = noise.apply(y, torch.Generator().manual_seed(seed))  # CPU noise: the same seed on every machine
        return io.NodeOutput(pixels_to_image(y, clamp=bool(clip)), unknown_mask(operator, tuple(x.shape)))


class PseudoInversePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSPseudoInverse",
            display_name="Pseudo-inverse preview",
            category=CATEGORY_MEASUREMENT,
            description="A+ y: the least-squares image behind a measurement, in the image's size (what the "
                        "'pinv' residual compares with). Exact and fast for SR, inpainting, colour and circular "
                        "blurs; other blurs use conjugate gradients capped at max_iterations.",
            inputs=[
                io.Image.Input("measurement", tooltip="The degraded photo (the operator's output size)."),
                Operator.Input("operator", tooltip="The degradation that produced it."),
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


MEASUREMENT_NODES = [SimulateMeasurement, PseudoInversePreview]
