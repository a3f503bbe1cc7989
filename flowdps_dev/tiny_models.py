"""Tiny random-weight SD3-architecture models that ComfyUI's own loader nodes accept.

Built at set-up (never committed), seeded and deterministic, in a few seconds on CPU::

    COMFYUI_PATH=.cache/ComfyUI python -m flowdps_dev.tiny_models --out .cache/models

Layout of ``--out`` (it is added to ComfyUI's model search paths by the harness and the server fixture):

================================================  =====================================================
``diffusion_models/tiny_sd3_diffusers.safetensors``  ``SD3Transformer2DModel`` built by diffusers from a
                                                   config (no download), diffusers key format
``diffusion_models/tiny_sd3.safetensors``            the same weights in ComfyUI's MMDiT key format
``vae/tiny_sd3_taesd.safetensors``                   16-channel TAESD ("taesd3" layout, SD3 scale/shift)
``vae/tiny_sd3_vae_full.safetensors``                full-size SD3 VAE architecture (random, fp16), for
                                                   memory and speed benchmarks
``text_encoders/tiny_clip_l.safetensors``            CLIP-L-shaped random text encoder (fp16) for
                                                   ``CLIPLoader(type="sd3")``
``checkpoints/tiny_sd3_ckpt.safetensors``            MMDiT + TAESD + CLIP-L in one file for
                                                   ``CheckpointLoaderSimple``
================================================  =====================================================

Shape rules that ComfyUI's detection imposes (comfy/model_detection.py, comfy/sd.py of 0.3.75):

* MMDiT: ``depth = x_embedder.proj.weight.shape[0] // 64``, hidden = 64 * depth, heads = depth; so in
  diffusers terms ``num_attention_heads == num_layers`` and ``attention_head_dim == 64``;
  ``pos_embed_max_size = sqrt(pos_embed.shape[1])`` bounds the latent side (32 -> 64x64 latents, 512 px).
* The conditioning widths are SD3's: context 4096 (CLIP-L padded), pooled 2048 (CLIP-L 768 + CLIP-G 1280,
  zeros when absent), so the tiny model accepts conditioning from the real SD3 CLIP pipeline.
* TAESD channel widths are fixed at 64; the KL VAE's ddconfig is fixed in comfy/sd.py (only ``z_channels``
  is read), so the "full" VAE is the real SD3 size (84 M parameters).
* CLIP-L is always built from ``comfy/sd1_clip_config.json`` (12 x 768), so a loadable one is full size.

The ComfyUI-format transformer is produced by ComfyUI's own diffusers converter from the diffusers
model; ``tests/test_tiny_models.py`` checks independently that diffusers' forward pass and ComfyUI's
agree on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .comfy_env import add_comfy_to_path

logger = logging.getLogger(__name__)

SD3_CONTEXT_DIM = 4096
SD3_POOLED_DIM = 2048
SD3_LATENT_CHANNELS = 16
SD3_SCALE_FACTOR = 1.5305
SD3_SHIFT_FACTOR = 0.0609


@dataclass(frozen=True)
class TinyMMDiTConfig:
    """Size of the tiny SD3 transformer (hidden = 64 * depth, heads = depth, patch 2)."""

    depth: int = 2
    pos_embed_max_size: int = 32
    seed: int = 0

    def diffusers_kwargs(self) -> dict:
        return {
            "sample_size": self.pos_embed_max_size,
            "patch_size": 2,
            "in_channels": SD3_LATENT_CHANNELS,
            "out_channels": SD3_LATENT_CHANNELS,
            "num_layers": self.depth,
            "attention_head_dim": 64,
            "num_attention_heads": self.depth,
            "joint_attention_dim": SD3_CONTEXT_DIM,
            "caption_projection_dim": 64 * self.depth,
            "pooled_projection_dim": SD3_POOLED_DIM,
            "pos_embed_max_size": self.pos_embed_max_size,
        }


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for module initialisation without leaking the state to the caller."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _contiguous(sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype is not None else v).detach().contiguous() for k, v in sd.items()}


def _reset_uninitialised(module: torch.nn.Module) -> None:
    """Layers built with ``comfy.ops.disable_weight_init`` hold ``torch.empty`` garbage: run torch's init."""
    for m in module.modules():
        for base in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.Embedding):
            if isinstance(m, base):
                base.reset_parameters(m)
                break


def build_diffusers_transformer(config: TinyMMDiTConfig) -> torch.nn.Module:
    """A randomly initialised diffusers ``SD3Transformer2DModel`` (float32, eval mode)."""
    from diffusers import SD3Transformer2DModel

    with seeded(config.seed):
        model = SD3Transformer2DModel(**config.diffusers_kwargs())
        # diffusers zero-initialises nothing here, but make the output projection non-trivial on purpose
        # so that a wrong key mapping cannot hide behind zeros.
        with torch.no_grad():
            model.proj_out.weight.normal_(0.0, 0.05)
            model.proj_out.bias.normal_(0.0, 0.05)
    return model.eval()


def comfy_mmdit_state_dict(diffusers_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert a diffusers SD3 transformer state dict to ComfyUI's MMDiT keys with ComfyUI's own loader."""
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(dict(diffusers_sd))
    if patcher is None:
        raise RuntimeError("ComfyUI did not recognise the tiny diffusers SD3 transformer")
    return _contiguous(patcher.model.diffusion_model.state_dict())


def taesd3_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """16-channel TAESD in the layout ``VAELoader`` detects (``taesd_decoder.1.weight``), SD3 scale/shift."""
    from comfy.taesd.taesd import TAESD

    with seeded(seed):
        m = TAESD(latent_channels=SD3_LATENT_CHANNELS)
        _reset_uninitialised(m)
    with torch.no_grad():
        m.vae_scale.fill_(SD3_SCALE_FACTOR)
        m.vae_shift.fill_(SD3_SHIFT_FACTOR)
        # Default init shrinks the signal at every stage and the images come out black: scale the last
        # conv so decoded images are mid-grey with visible texture (useful when looking at test outputs).
        last = m.taesd_decoder[-1]
        last.weight.mul_(12.0)
        last.bias.fill_(0.5)
    return _contiguous(m.state_dict())


def full_sd3_vae_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """The real SD3 VAE architecture (ch 128, mult 1-2-4-4, z 16) with random weights, fp16 on disk."""
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    dd = {
        "double_z": True, "z_channels": SD3_LATENT_CHANNELS, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    }
    with seeded(seed):
        m = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dd},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dd},
        )
        _reset_uninitialised(m)
    return _contiguous(m.state_dict(), torch.float16)


def clip_l_state_dict(comfy_dir: Path, seed: int) -> dict[str, torch.Tensor]:
    """A CLIP-L-shaped random text encoder (123 M parameters), fp16 on disk."""
    from comfy.clip_model import CLIPTextModel

    config = json.loads((comfy_dir / "comfy" / "sd1_clip_config.json").read_text())
    with seeded(seed):
        m = CLIPTextModel(config, torch.float32, "cpu", torch.nn)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.Embedding):
                    mod.weight.normal_(0.0, 0.02)
    return _contiguous(m.state_dict(), torch.float16)


def build_all(out: Path, comfy_dir: Path, config: TinyMMDiTConfig = TinyMMDiTConfig()) -> dict[str, Path]:
    """Write every tiny model under ``out`` (see the module docstring) and return their paths."""
    from safetensors.torch import save_file

    written: dict[str, Path] = {}

    def save(name: str, rel: str, sd: dict[str, torch.Tensor]) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path))
        written[name] = path
        n = sum(v.numel() for v in sd.values())
        logger.info("%s: %.2f M params, %.1f MB", path, n / 1e6, path.stat().st_size / 1e6)

    diffusers_sd = _contiguous(build_diffusers_transformer(config).state_dict())
    save("unet_diffusers", "diffusion_models/tiny_sd3_diffusers.safetensors", diffusers_sd)
    mmdit = comfy_mmdit_state_dict(diffusers_sd)
    save("unet", "diffusion_models/tiny_sd3.safetensors", mmdit)
    taesd = taesd3_state_dict(config.seed + 1)
    save("vae", "vae/tiny_sd3_taesd.safetensors", taesd)
    save("vae_full", "vae/tiny_sd3_vae_full.safetensors", full_sd3_vae_state_dict(config.seed + 2))
    clip = clip_l_state_dict(comfy_dir, config.seed + 3)
    save("clip_l", "text_encoders/tiny_clip_l.safetensors", clip)
    ckpt = {"model.diffusion_model." + k: v for k, v in mmdit.items()}
    ckpt.update({"first_stage_model." + k: v for k, v in taesd.items()})
    ckpt.update({"text_encoders.clip_l.transformer." + k: v for k, v in clip.items()})
    save("checkpoint", "checkpoints/tiny_sd3_ckpt.safetensors", ckpt)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="models folder to write")
    parser.add_argument("--comfy", type=Path, default=None, help="ComfyUI tree (default: $COMFYUI_PATH)")
    parser.add_argument("--depth", type=int, default=TinyMMDiTConfig.depth)
    parser.add_argument("--seed", type=int, default=TinyMMDiTConfig.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[tiny_models] %(message)s")
    comfy_dir = add_comfy_to_path(args.comfy or os.environ.get("COMFYUI_PATH"), cpu=True)
    t0 = time.perf_counter()
    build_all(args.out, comfy_dir, TinyMMDiTConfig(depth=args.depth, seed=args.seed))
    logger.info("done in %.1f s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
