"""ComfyUI nodes of the pack: the only layer that imports ComfyUI (``comfy``, ``comfy_api``, ...).

The one list of nodes lives in :class:`FlowDPSExtension`. Node ids are stable API: saved workflows
refer to them, so an id never changes once shipped.
"""

from __future__ import annotations

import comfy.model_management as mm
from comfy_api.latest import ComfyExtension, io

from ..operators.interrupt import set_interrupt_check
from . import memory_hooks
from .afdps_nodes import AFDPSRestore, AFDPSSampler
from .info import FlowDPSInfo
from .measurement_nodes import MEASUREMENT_NODES
from .operator_nodes import OPERATOR_NODES
from .restore_node import FlowDPSRestore
from .sampler_nodes import FlowChefSampler, FlowDPSSampler, FlowDPSSigmas, PSLDSampler


def install_hooks() -> None:
    """What the pack hooks into ComfyUI when ComfyUI loads it (idempotent): the operators' matrix caches are
    dropped when ComfyUI frees memory, and their dense SVDs and large matrices are not started once ComfyUI's
    interrupt flag is raised."""
    memory_hooks.install()
    set_interrupt_check(mm.throw_exception_if_processing_interrupted)


class FlowDPSExtension(ComfyExtension):
    """Registers every node of the pack with ComfyUI."""

    async def on_load(self) -> None:
        install_hooks()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        install_hooks()  # ComfyUI 0.3.75's loader calls get_node_list but not on_load
        return [FlowDPSInfo, *OPERATOR_NODES, *MEASUREMENT_NODES, FlowDPSSampler, FlowChefSampler, PSLDSampler,
                FlowDPSSigmas, FlowDPSRestore, AFDPSSampler, AFDPSRestore]


__all__ = ["FlowDPSExtension"]
