"""A diagnostic node: the pack version, the torch build and the devices ComfyUI will use."""

from __future__ import annotations

import platform

import comfy.model_management as mm
import torch
from comfy_api.latest import io, ui

from .. import __version__
from .common import CATEGORY_ROOT


def describe_environment() -> str:
    """One line per fact: pack version, Python, torch, ComfyUI's torch device, VAE device, CUDA devices."""
    lines = [
        f"comfyui-flowdps {__version__}",
        f"python {platform.python_version()}",
        f"torch {torch.__version__}",
        f"comfy torch device: {mm.get_torch_device_name(mm.get_torch_device())}",
        f"comfy vae device: {mm.vae_device()}",
        f"comfy intermediate device: {mm.intermediate_device()}",
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.1f} GiB")
    else:
        lines.append("cuda: not available")
    return "\n".join(lines)


class FlowDPSInfo(io.ComfyNode):
    """Shows which pack version is loaded and which devices it will run on."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlowDPSInfo",
            display_name="FlowDPS Info",
            category=CATEGORY_ROOT,
            description=(
                "Reports the comfyui-flowdps version, the torch build and the devices ComfyUI uses. "
                "Attach it to check an installation; it needs no inputs."
            ),
            inputs=[],
            outputs=[io.String.Output(display_name="info", tooltip="The report as text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        text = describe_environment()
        return io.NodeOutput(text, ui=ui.PreviewText(text))
