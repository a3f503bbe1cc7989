"""ComfyUI nodes of the pack: the only layer that imports ComfyUI (``comfy``, ``comfy_api``, ...).

The one list of nodes lives in :class:`FlowDPSExtension`. Node ids are stable API: saved workflows
refer to them, so an id never changes once shipped.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import memory_hooks
from .afdps_nodes import AFDPSRestore, AFDPSSampler
from .info import FlowDPSInfo
from .measurement_nodes import MEASUREMENT_NODES
from .operator_nodes import OPERATOR_NODES
from .restore_node import FlowDPSRestore
from .sampler_nodes import FlowChefSampler, FlowDPSSampler, FlowDPSSigmas, PSLDSampler


class FlowDPSExtension(ComfyExtension):
    """Registers every node of the pack with ComfyUI."""

    async def on_load(self) -> None:
        memory_hooks.install()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        memory_hooks.install()  # ComfyUI 0.3.75's loader calls get_node_list but not on_load
        return [FlowDPSInfo, *OPERATOR_NODES, *MEASUREMENT_NODES, FlowDPSSampler, FlowChefSampler, PSLDSampler,
                FlowDPSSigmas, FlowDPSRestore, AFDPSSampler, AFDPSRestore]


__all__ = ["FlowDPSExtension"]
