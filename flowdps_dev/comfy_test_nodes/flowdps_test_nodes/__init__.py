"""Test-only ComfyUI nodes, loaded by the test server (``ComfyServer(test_nodes=True)``), never shipped.

The tiny Flux and SD1.5 models carry their ComfyUI config in their metadata, because ComfyUI's own loaders
cannot detect configs that small; this loader reads it (see ``flowdps_dev/tiny_models.py``).
"""

from flowdps_dev.tiny_models import DEV_NODE_ID, TinyModelLoader

NODE_CLASS_MAPPINGS = {DEV_NODE_ID: TinyModelLoader}
NODE_DISPLAY_NAME_MAPPINGS = {DEV_NODE_ID: "Tiny model loader (FlowDPS tests)"}
