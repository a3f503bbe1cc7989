"""comfyui-flowdps: posterior-sampling image restoration for ComfyUI with SD3-family flow models.

Importing this module is cheap and has no side effects: it defines the pack version and the V3
entry point. ComfyUI calls :func:`comfy_entrypoint` when it loads this folder from ``custom_nodes``;
only then are the node classes (and ComfyUI's own modules) imported. This module deliberately has no
V1 node-class mapping: ComfyUI would then ignore the V3 entry point.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """Return the pack's ``ComfyExtension`` (called by ComfyUI's custom-node loader)."""
    from .nodes import FlowDPSExtension

    return FlowDPSExtension()
