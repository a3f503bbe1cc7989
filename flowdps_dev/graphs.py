"""API-format graphs (what ``/prompt`` and ``PromptExecutor`` take) built from core nodes and ours.

A tiny builder keeps the graphs readable: ``g.add("UNETLoader", unet_name=...)`` returns a handle whose
``out(i)`` is the ``[node_id, i]`` link ComfyUI expects; ``g.add_node_with_defaults(...)`` fills every required
widget the caller leaves out with its schema default, so a graph spells only what it changes. The test
problems share :func:`simulated_measurement`, :func:`restore_graph` and :func:`residual`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .workflow_convert import widget_defaults

TINY_UNET = "tiny_sd3.safetensors"
TINY_UNET_DIFFUSERS = "tiny_sd3_diffusers.safetensors"
TINY_VAE = "tiny_sd3_taesd.safetensors"
TINY_VAE_FULL = "tiny_sd3_vae_full.safetensors"
TINY_CLIP_L = "tiny_clip_l.safetensors"
TINY_CHECKPOINT = "tiny_sd3_ckpt.safetensors"
# Other families (flowdps_dev/tiny_models.py). SD3.5 loads with UNETLoader; Flux and SD1.5 need their config
# set explicitly, with the test-only node TINY_MODEL_LOADER (registered by the tests, never shipped).
TINY_SD35_MEDIUM_UNET = "tiny_sd35_medium.safetensors"
TINY_SD35_LARGE_UNET = "tiny_sd35_large.safetensors"
TINY_FLUX_DEV_UNET = "tiny_flux_dev.safetensors"
TINY_FLUX_SCHNELL_UNET = "tiny_flux_schnell.safetensors"
TINY_FLUX_VAE = "tiny_flux_taesd.safetensors"
TINY_SD15_UNET = "tiny_sd15.safetensors"
TINY_SD15_VAE = "tiny_sd15_taesd.safetensors"
TINY_MODEL_LOADER = "FlowDPSDevTinyModelLoader"


@dataclass(frozen=True)
class Node:
    node_id: str

    def out(self, index: int = 0) -> list:
        return [self.node_id, index]


@dataclass
class GraphBuilder:
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    node_info: Callable[[str], Mapping[str, Any]] | None = None
    """``node_info(class_type)``, the node's ``/object_info`` entry, which :meth:`add_node_with_defaults` reads;
    ``None``: from the ComfyUI loaded in this process (``comfy_env.node_info``)."""

    def add(self, class_type: str, node_id: str | None = None, **inputs: Any) -> Node:
        nid = node_id or str(len(self.nodes) + 1)
        if nid in self.nodes:
            raise ValueError(f"node id {nid!r} is already used")
        self.nodes[nid] = {"class_type": class_type, "inputs": dict(inputs)}
        return Node(nid)

    def add_node_with_defaults(self, class_type: str, node_id: str | None = None, **inputs: Any) -> Node:
        """:meth:`add` with every required widget that ``inputs`` does not give set to its schema default
        (what a new node in the editor starts with). ``inputs`` hold the links and the values that differ
        (or that a test pins on purpose); optional widgets are sent only when given. An input name the node
        does not have is a ValueError."""
        if self.node_info is None:
            from . import comfy_env

            info = comfy_env.node_info(class_type)
        else:
            info = self.node_info(class_type)
        names = {name for section in ("required", "optional") for name in info["input"].get(section, {})}
        unknown = sorted(set(inputs) - names)
        if unknown:
            raise ValueError(f"{class_type} has no input named {unknown}; its inputs: {sorted(names)}")
        return self.add(class_type, node_id, **{**widget_defaults(info), **inputs})

    def build(self) -> dict[str, dict[str, Any]]:
        return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in self.nodes.items()}


def sd3_text_to_image(
    *,
    width: int = 64,
    height: int = 64,
    steps: int = 4,
    cfg: float = 2.0,
    seed: int = 0,
    shift: float = 3.0,
    loader: str = "unet",
    unet_name: str = TINY_UNET,
    vae_name: str = TINY_VAE,
    prompt: str = "a photo of a cat",
    filename_prefix: str = "flowdps_t2i",
) -> dict:
    """Core SD3 text-to-image: loaders -> ModelSamplingSD3 -> SamplerCustomAdvanced -> VAEDecode -> SaveImage.

    ``loader="unet"`` uses UNETLoader + CLIPLoader(type sd3) + VAELoader; ``loader="checkpoint"`` uses
    CheckpointLoaderSimple for all three. Node "sampler" outputs the latent, "decode" the image.
    """
    g = GraphBuilder()
    if loader == "checkpoint":
        ckpt = g.add("CheckpointLoaderSimple", "loader", ckpt_name=TINY_CHECKPOINT)
        model, clip, vae = ckpt.out(0), ckpt.out(1), ckpt.out(2)
    elif loader == "unet":
        model = g.add("UNETLoader", "loader", unet_name=unet_name, weight_dtype="default").out()
        clip = g.add("CLIPLoader", "clip", clip_name=TINY_CLIP_L, type="sd3", device="default").out()
        vae = g.add("VAELoader", "vae", vae_name=vae_name).out()
    else:
        raise ValueError(f"loader must be 'unet' or 'checkpoint', got {loader!r}")
    model = g.add("ModelSamplingSD3", "shift", model=model, shift=shift).out()
    pos = g.add("CLIPTextEncode", "positive", clip=clip, text=prompt).out()
    neg = g.add("ConditioningZeroOut", "negative", conditioning=pos).out()
    guider = g.add("CFGGuider", "guider", model=model, positive=pos, negative=neg, cfg=cfg).out()
    sampler = g.add("KSamplerSelect", "sampler_select", sampler_name="euler").out()
    sigmas = g.add("BasicScheduler", "sigmas", model=model, scheduler="simple", steps=steps, denoise=1.0).out()
    noise = g.add("RandomNoise", "noise", noise_seed=seed).out()
    latent = g.add("EmptySD3LatentImage", "latent", width=width, height=height, batch_size=1).out()
    sample = g.add("SamplerCustomAdvanced", "sampler", noise=noise, guider=guider, sampler=sampler,
                   sigmas=sigmas, latent_image=latent)
    image = g.add("VAEDecode", "decode", samples=sample.out(0), vae=vae).out()
    g.add("SaveImage", "save", images=image, filename_prefix=filename_prefix)
    return g.build()


@dataclass(frozen=True)
class TinyPrior:
    """How a graph loads one family's tiny model: the file, its loader node, its VAE and Flux guidance."""

    family: str
    unet: str
    vae: str
    loader: str = "UNETLoader"
    flux_guidance: float | None = None


TINY_PRIORS = {
    "sd3": TinyPrior("sd3", TINY_UNET, TINY_VAE),
    "sd3.5-medium": TinyPrior("sd3.5-medium", TINY_SD35_MEDIUM_UNET, TINY_VAE),
    "sd3.5-large": TinyPrior("sd3.5-large", TINY_SD35_LARGE_UNET, TINY_VAE),
    "flux-dev": TinyPrior("flux-dev", TINY_FLUX_DEV_UNET, TINY_FLUX_VAE, TINY_MODEL_LOADER, flux_guidance=3.5),
    "flux-schnell": TinyPrior("flux-schnell", TINY_FLUX_SCHNELL_UNET, TINY_FLUX_VAE, TINY_MODEL_LOADER),
    "sd1.5": TinyPrior("sd1.5", TINY_SD15_UNET, TINY_SD15_VAE, TINY_MODEL_LOADER),
}


def prior_loaders(g: GraphBuilder, prior: TinyPrior, *, vae_name: str | None = None,
                  prompt: str = "a photo") -> tuple[list, list, list, list]:
    """Model, VAE, positive and negative conditioning of a tiny prior (nodes "loader", "clip", "vae", "text",
    "negative", and "positive" = FluxGuidance for Flux dev, as a Flux workflow has it). Text goes through the
    tiny CLIP-L in the SD3 CLIP pipeline (context 4096, pooled 2048): the tiny Flux is built for those widths."""
    if prior.loader == "UNETLoader":
        model = g.add("UNETLoader", "loader", unet_name=prior.unet, weight_dtype="default").out()
    else:
        model = g.add(prior.loader, "loader", unet_name=prior.unet).out()
    clip = g.add("CLIPLoader", "clip", clip_name=TINY_CLIP_L, type="sd3", device="default").out()
    vae = g.add("VAELoader", "vae", vae_name=vae_name or prior.vae).out()
    pos = g.add("CLIPTextEncode", "text", clip=clip, text=prompt).out()
    if prior.flux_guidance is not None:
        pos = g.add("FluxGuidance", "positive", conditioning=pos, guidance=prior.flux_guidance).out()
    neg = g.add("ConditioningZeroOut", "negative", conditioning=pos).out()
    return model, vae, pos, neg


def simulated_measurement(g: GraphBuilder, photo: str, operator: str, **operator_inputs: Any) -> tuple[list, list]:
    """The test problem's nodes: ``photo`` (LoadImage of a file in ComfyUI's input folder), ``op`` (the
    ``operator`` node with ``operator_inputs``) and ``sim`` (its simulated measurement, sigma_y 0.01, seed 0).
    Returns the operator and measurement links."""
    image = g.add("LoadImage", "photo", image=photo).out()
    op = g.add(operator, "op", **operator_inputs).out()
    y = g.add("FlowDPSSimulateMeasurement", "sim", image=image, operator=op, sigma_y=0.01, seed=0).out()
    return op, y


def restore_graph(restore: str, photo: str, operator: tuple[str, Mapping[str, Any]], *,
                  prior: TinyPrior | None = None, vae_name: str | None = None, save_prefix: str | None = None,
                  **widgets: Any) -> dict:
    """A Restore node (``restore``: ``"FlowDPSRestore"`` / ``"AFDPSRestore"``, node id ``restore``) on a tiny
    prior (default SD3) and :func:`simulated_measurement` of ``photo`` through ``operator`` = (node, inputs).
    ``widgets`` are the Restore node's values that differ from its schema defaults (the rest are filled in).
    Its first output goes to PreviewImage (``preview``), or to SaveImage (``save``) with ``save_prefix``. The
    schema defaults come from the ComfyUI loaded in this process."""
    g = GraphBuilder()
    model, vae, pos, neg = prior_loaders(g, prior or TINY_PRIORS["sd3"], vae_name=vae_name)
    op, y = simulated_measurement(g, photo, operator[0], **operator[1])
    g.add_node_with_defaults(restore, "restore", model=model, positive=pos, negative=neg, vae=vae, measurement=y,
                             operator=op, **widgets)
    if save_prefix is None:
        g.add("PreviewImage", "preview", images=["restore", 0])
    else:
        g.add("SaveImage", "save", images=["restore", 0], filename_prefix=save_prefix)
    return g.build()


def residual(result: Any, node: str = "restore", index: int = 0) -> float:
    """``||A x - y||`` of the IMAGE output ``index`` of ``node`` (per image, averaged over its batch), with the
    graph's operator (node ``op``) and simulated measurement (node ``sim``) of :func:`simulated_measurement`;
    ComfyUI's [0, 1] images are mapped to the operators' [-1, 1]."""
    import torch

    op = result.output("op")
    x = result.output(node, index).movedim(-1, 1) * 2 - 1
    y = result.output("sim").movedim(-1, 1) * 2 - 1
    r = (op.forward(x) - y).flatten(1)
    return float(torch.linalg.vector_norm(r, dim=1).mean())
