"""ComfyUI's conventions against the pack's, converted in nodes/convert.py only: the MASK polarity (ComfyUI: 1 =
area to inpaint; operators: 1 = known pixel) and the [0, 1] scale of the sigma_y widgets (operators: [-1, 1])."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture
def convert(comfy):
    from flowdps.nodes import convert

    return convert


def test_comfy_mask_conversion(convert):
    from flowdps.operators import Inpainting

    comfy = torch.zeros(1, 4, 4)
    comfy[:, :2] = 1.0  # ComfyUI: 1 = area to inpaint
    keep = convert.keep_mask_from_comfy_mask(comfy)
    y = Inpainting(keep).forward(torch.ones(1, 3, 4, 4))
    assert float(y[..., :2, :].abs().sum()) == 0
    assert float(y[..., 2:, :].min()) == 1
    torch.testing.assert_close(convert.comfy_mask_from_keep_mask(Inpainting(keep).mask), comfy)


def test_comfy_mask_value_one_half_is_known(convert):
    """A ComfyUI MASK is missing above 0.5 and known at exactly 0.5 (as ComfyUI's inpainting nodes round it)."""
    from flowdps.operators import Inpainting

    comfy = torch.tensor([[0.4, 0.5, 0.5001, 1.0]])
    op = Inpainting(convert.keep_mask_from_comfy_mask(comfy))
    assert op.mask.tolist() == [[[[1.0, 1.0, 0.0, 0.0]]]]


def test_scale_conversion_and_paper_value(comfy, convert):
    assert convert.measurement_noise(0.05).sigma == 0.1
    assert convert.PAPER_SIGMA_Y == 0.015
    assert convert.measurement_noise(convert.PAPER_SIGMA_Y).sigma == 0.03  # solve.py's 0.03 on the [-1, 1] scale
    (sigma_y,) = [i for i in comfy.node_classes["FlowDPSSimulateMeasurement"].define_schema().inputs
                  if i.id == "sigma_y"]
    assert sigma_y.default == convert.PAPER_SIGMA_Y


def test_noise_errors_name_the_widget(convert):
    with pytest.raises(ValueError, match=r"^sigma_y must be finite, got nan$"):
        convert.measurement_noise(math.nan)


def test_grey_measurements_of_colour_to_grey(convert):
    from flowdps.operators import AvgPoolSR, Grayscale

    image = torch.rand(1, 8, 6, 3)
    grey = convert.measurement_pixels(AvgPoolSR(2) @ Grayscale(), image)
    assert grey.shape == (1, 1, 8, 6)
    torch.testing.assert_close(grey, convert.image_to_pixels(image).mean(dim=1, keepdim=True))
    assert convert.measurement_pixels(AvgPoolSR(2), image).shape == (1, 3, 8, 6)


def test_unknown_mask_is_a_comfy_mask_in_the_measurement_size(convert):
    from flowdps.operators import Inpainting, box_mask

    keep = box_mask(6, 8, 1, 2, 3, 4)
    mask = convert.unknown_mask(Inpainting(keep), (1, 3, 6, 8))
    assert mask.shape == (1, 6, 8)
    assert mask.dtype == torch.float32
    torch.testing.assert_close(mask, convert.comfy_mask_from_keep_mask(keep))
