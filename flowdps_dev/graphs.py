"""API-format graphs (what ``/prompt`` and ``PromptExecutor`` take) built from core nodes and ours.

A tiny builder keeps the graphs readable: ``g.add("UNETLoader", unet_name=...)`` returns a handle whose
``out(i)`` is the ``[node_id, i]`` link ComfyUI expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TINY_UNET = "tiny_sd3.safetensors"
TINY_UNET_DIFFUSERS = "tiny_sd3_diffusers.safetensors"
TINY_VAE = "tiny_sd3_taesd.safetensors"
TINY_VAE_FULL = "tiny_sd3_vae_full.safetensors"
TINY_CLIP_L = "tiny_clip_l.safetensors"
TINY_CHECKPOINT = "tiny_sd3_ckpt.safetensors"


@dataclass(frozen=True)
class Node:
    node_id: str

    def out(self, index: int = 0) -> list:
        return [self.node_id, index]


@dataclass
class GraphBuilder:
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, class_type: str, node_id: str | None = None, **inputs: Any) -> Node:
        nid = node_id or str(len(self.nodes) + 1)
        if nid in self.nodes:
            raise ValueError(f"node id {nid!r} is already used")
        self.nodes[nid] = {"class_type": class_type, "inputs": dict(inputs)}
        return Node(nid)

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
