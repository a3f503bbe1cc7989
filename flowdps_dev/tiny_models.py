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
``diffusion_models/tiny_sd35_medium.safetensors``    SD3.5-medium architecture (MMDiT-X: q/k RMS norm and
                                                   the extra image self-attention in layer 0), UNETLoader
``diffusion_models/tiny_sd35_large.safetensors``     SD3.5-large architecture (MMDiT with q/k RMS norm)
``diffusion_models/tiny_flux_dev.safetensors``       Flux.1-dev architecture (guidance embedding), config in
                                                   its metadata: test-only loader (:class:`TinyModelLoader`)
``diffusion_models/tiny_flux_schnell.safetensors``   Flux.1-schnell architecture (no guidance), same loader
``diffusion_models/tiny_sd15.safetensors``           SD1.5-class UNet (EPS, 4 channels), same loader: for the
                                                   "not a rectified-flow model" error
``vae/tiny_flux_taesd.safetensors``                  16-channel TAESD with Flux's scale/shift ("taef1")
``vae/tiny_sd15_taesd.safetensors``                  4-channel TAESD with SD1.5's scale ("taesd")
================================================  =====================================================

``--only-missing`` builds just the files that are not there yet (about 6 s for the family models).

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
FLUX_SCALE_FACTOR = 0.3611  # comfy/latent_formats.py Flux
FLUX_SHIFT_FACTOR = 0.1159
SD15_LATENT_CHANNELS = 4
SD15_SCALE_FACTOR = 0.18215  # comfy/latent_formats.py SD15
TINY_MODEL_METADATA = "flowdps.tiny_model"  # safetensors metadata key holding an explicit ComfyUI config


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


def taesd_state_dict(seed: int, scale: float, shift: float, *, channels: int = SD3_LATENT_CHANNELS
                     ) -> dict[str, torch.Tensor]:
    """TAESD in the layout ``VAELoader`` detects (``taesd_decoder.1.weight``) with a family's latent
    scale/shift stored in it, as ComfyUI sets them for "taesd3" (SD3), "taef1" (Flux) and "taesd" (SD1.5)."""
    from comfy.taesd.taesd import TAESD

    with seeded(seed):
        m = TAESD(latent_channels=channels)
        _reset_uninitialised(m)
    with torch.no_grad():
        m.vae_scale.fill_(scale)
        m.vae_shift.fill_(shift)
        # Default init shrinks the signal at every stage and the images come out black: scale the last
        # conv so decoded images are mid-grey with visible texture (useful when looking at test outputs).
        last = m.taesd_decoder[-1]
        last.weight.mul_(12.0)
        last.bias.fill_(0.5)
    return _contiguous(m.state_dict())


def taesd3_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """16-channel TAESD with SD3's scale/shift."""
    return taesd_state_dict(seed, SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR)


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


# ------------------------------------------------------------------------------------------------------
# The other families. SD3.5 goes through ComfyUI's own detection (UNETLoader); Flux cannot: detection
# hard-codes 24 heads of width 128 (hidden 3072, ~0.5 B parameters even at depth 1 + 1), and the SD1.5 UNet
# needs 320 base channels. Those files carry their ComfyUI config (supported-model class + unet_config) in
# their safetensors metadata and are loaded by the test-only node of :func:`dev_nodes`, which builds the
# model with ComfyUI's own classes, exactly as the loaders do after detection.

TINY_FLUX_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": SD3_POOLED_DIM,
    "context_in_dim": SD3_CONTEXT_DIM, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True,
}
"""Flux architecture at width 64: 2 heads of 32 (rope axes 8 + 12 + 12), one double and one single block.
Real Flux: hidden 3072, 24 heads, 19 + 38 blocks, context 4096 (T5-XXL), pooled 768 (CLIP-L). The tiny one
takes SD3-CLIP-shaped conditioning (context 4096, pooled 2048) so the tiny CLIP-L text path conditions it."""

TINY_SD15_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "in_channels": SD15_LATENT_CHANNELS,
    "out_channels": SD15_LATENT_CHANNELS, "model_channels": 32, "num_res_blocks": [1], "channel_mult": [1],
    "transformer_depth": [1], "transformer_depth_output": [1, 1], "transformer_depth_middle": 1,
    "use_spatial_transformer": True, "legacy": False, "context_dim": 768, "use_linear_in_transformer": False,
    "adm_in_channels": None, "use_temporal_resblock": False, "use_temporal_attention": False,
}
"""An SD1.5-class UNet (EPS prediction, 4 latent channels, context 768) at 32 base channels."""


def _randomise(module: torch.nn.Module) -> None:
    """Default torch init for standard layers; RMS-norm scales (comfy's own classes, ``torch.empty``) -> 1."""
    _reset_uninitialised(module)
    with torch.no_grad():
        for m in module.modules():
            if "RMSNorm" in type(m).__name__:
                for name in ("weight", "scale"):
                    p = getattr(m, name, None)
                    if isinstance(p, torch.nn.Parameter):
                        p.fill_(1.0)


def tiny_mmdit_x_state_dict(seed: int, *, depth: int = 2, x_block_self_attn_layers: tuple[int, ...] = (0,),
                            pos_embed_max_size: int = 32) -> dict[str, torch.Tensor]:
    """SD3.5-architecture MMDiT(-X): q/k RMS norm in every attention (SD3.5 medium and large) and, for the
    layers in ``x_block_self_attn_layers``, the extra image self-attention of MMDiT-X (SD3.5 medium).
    ComfyUI detects it as SD3 (comfy/model_detection.py) and reads both features back from the keys."""
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT, get_2d_sincos_pos_embed

    hidden = 64 * depth
    with seeded(seed):
        m = MMDiT(
            input_size=None, patch_size=2, in_channels=SD3_LATENT_CHANNELS, out_channels=SD3_LATENT_CHANNELS,
            depth=depth, adm_in_channels=SD3_POOLED_DIM,
            context_embedder_config={"target": "torch.nn.Linear",
                                     "params": {"in_features": SD3_CONTEXT_DIM, "out_features": hidden}},
            pos_embed_max_size=pos_embed_max_size, num_patches=pos_embed_max_size**2, pos_embed_scaling_factor=None,
            qk_norm="rms", x_block_self_attn_layers=list(x_block_self_attn_layers),
            dtype=torch.float32, device="cpu", operations=torch.nn,
        )
        _randomise(m)
        with torch.no_grad():
            m.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(hidden, pos_embed_max_size)).float()[None])
            for name, p in m.named_parameters():
                if name.endswith(("ln_q.weight", "ln_k.weight")):
                    p.add_(0.1 * torch.randn_like(p))
    return _contiguous(m.state_dict())


def _explicit_model_state_dict(supported_model: str, unet_config: dict, seed: int
                               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Random weights of ``comfy.supported_models.<supported_model>(unet_config)`` and the metadata that
    lets :class:`TinyModelLoader` rebuild it."""
    model = _explicit_base_model(supported_model, unet_config)
    with seeded(seed):
        _randomise(model.diffusion_model)
    sd = _contiguous(model.diffusion_model.state_dict())
    metadata = {TINY_MODEL_METADATA: json.dumps({"supported_model": supported_model, "unet_config": unet_config})}
    return sd, metadata


def _explicit_base_model(supported_model: str, unet_config: dict):
    import comfy.supported_models

    config_class = getattr(comfy.supported_models, supported_model, None)
    if config_class is None:
        raise ValueError(f"comfy.supported_models has no {supported_model!r}")
    model_config = config_class(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    return model_config.get_model({}, "")


@dataclass(frozen=True)
class FamilyModel:
    """One tiny model file of another family: its name (key of :func:`build_all`'s result), file, builder."""

    name: str
    file: str
    seed_offset: int
    builder: str
    options: tuple = ()

    def build(self, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
        kw = dict(self.options)
        if self.builder == "mmdit_x":
            return tiny_mmdit_x_state_dict(seed, **kw), None
        return _explicit_model_state_dict(kw["supported_model"], kw["unet_config"], seed)


FAMILY_MODELS = (
    FamilyModel("sd35_medium", "tiny_sd35_medium.safetensors", 11, "mmdit_x",
                (("x_block_self_attn_layers", (0,)),)),
    FamilyModel("sd35_large", "tiny_sd35_large.safetensors", 12, "mmdit_x", (("x_block_self_attn_layers", ()),)),
    FamilyModel("flux_dev", "tiny_flux_dev.safetensors", 13, "explicit",
                (("supported_model", "Flux"), ("unet_config", {**TINY_FLUX_CONFIG, "guidance_embed": True}))),
    FamilyModel("flux_schnell", "tiny_flux_schnell.safetensors", 14, "explicit",
                (("supported_model", "FluxSchnell"), ("unet_config", {**TINY_FLUX_CONFIG, "guidance_embed": False}))),
    FamilyModel("sd15", "tiny_sd15.safetensors", 15, "explicit",
                (("supported_model", "SD15"), ("unet_config", TINY_SD15_CONFIG))),
)


class TinyModelLoader:
    """Test-only node (never shipped): loads a tiny model whose ComfyUI config is in its metadata."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802  (ComfyUI's V1 node API)
        import folder_paths

        return {"required": {"unet_name": (folder_paths.get_filename_list("diffusion_models"),)}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "FlowDPS/dev"

    def load(self, unet_name: str):
        import comfy.model_management as mm
        import comfy.model_patcher
        import comfy.utils
        import folder_paths

        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        sd, metadata = comfy.utils.load_torch_file(path, return_metadata=True)
        if not metadata or TINY_MODEL_METADATA not in metadata:
            raise ValueError(f"{unet_name} has no {TINY_MODEL_METADATA} metadata: load it with UNETLoader")
        spec = json.loads(metadata[TINY_MODEL_METADATA])
        model = _explicit_base_model(spec["supported_model"], spec["unet_config"])
        model.load_model_weights(sd, "")
        return (comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device()),)


DEV_NODE_ID = "FlowDPSDevTinyModelLoader"


def register_dev_nodes() -> None:
    """Add the test-only loader to ComfyUI's node table (call after ComfyUI started, in tests only)."""
    import nodes

    nodes.NODE_CLASS_MAPPINGS.setdefault(DEV_NODE_ID, TinyModelLoader)
    nodes.NODE_DISPLAY_NAME_MAPPINGS.setdefault(DEV_NODE_ID, "Tiny model loader (FlowDPS tests)")


def build_all(out: Path, comfy_dir: Path, config: TinyMMDiTConfig = TinyMMDiTConfig(), *,
              only_missing: bool = False) -> dict[str, Path]:
    """Write every tiny model under ``out`` (see the module docstring) and return their paths.

    ``only_missing``: keep files that already exist (and skip building them), e.g. to add the other
    families' models to a folder that other processes are reading.
    """
    from safetensors.torch import save_file

    written: dict[str, Path] = {}
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def wanted(name: str, rel: str) -> bool:
        path = out / rel
        if only_missing and path.is_file():
            written[name] = path
            return False
        return True

    def save(name: str, rel: str, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(sd, str(tmp), metadata=metadata)
        tmp.replace(path)  # readers never see a half-written file
        written[name] = path
        n = sum(v.numel() for v in sd.values())
        logger.info("%s: %.2f M params, %.1f MB", path, n / 1e6, path.stat().st_size / 1e6)

    def diffusers_sd() -> dict[str, torch.Tensor]:
        if "diffusers" not in cache:
            cache["diffusers"] = _contiguous(build_diffusers_transformer(config).state_dict())
        return cache["diffusers"]

    def mmdit() -> dict[str, torch.Tensor]:
        if "mmdit" not in cache:
            cache["mmdit"] = comfy_mmdit_state_dict(diffusers_sd())
        return cache["mmdit"]

    def taesd() -> dict[str, torch.Tensor]:
        if "taesd" not in cache:
            cache["taesd"] = taesd_state_dict(config.seed + 1, SD3_SCALE_FACTOR, SD3_SHIFT_FACTOR)
        return cache["taesd"]

    def clip() -> dict[str, torch.Tensor]:
        if "clip" not in cache:
            cache["clip"] = clip_l_state_dict(comfy_dir, config.seed + 3)
        return cache["clip"]

    if wanted("unet_diffusers", rel := "diffusion_models/tiny_sd3_diffusers.safetensors"):
        save("unet_diffusers", rel, diffusers_sd())
    if wanted("unet", rel := "diffusion_models/tiny_sd3.safetensors"):
        save("unet", rel, mmdit())
    if wanted("vae", rel := "vae/tiny_sd3_taesd.safetensors"):
        save("vae", rel, taesd())
    if wanted("vae_full", rel := "vae/tiny_sd3_vae_full.safetensors"):
        save("vae_full", rel, full_sd3_vae_state_dict(config.seed + 2))
    if wanted("clip_l", rel := "text_encoders/tiny_clip_l.safetensors"):
        save("clip_l", rel, clip())
    if wanted("checkpoint", rel := "checkpoints/tiny_sd3_ckpt.safetensors"):
        ckpt = {"model.diffusion_model." + k: v for k, v in mmdit().items()}
        ckpt.update({"first_stage_model." + k: v for k, v in taesd().items()})
        ckpt.update({"text_encoders.clip_l.transformer." + k: v for k, v in clip().items()})
        save("checkpoint", rel, ckpt)
    build_families(out, config.seed, wanted, save)
    return written


def build_families(out: Path, seed: int, wanted, save) -> None:
    """The other priors (SD3.5 medium/large, Flux dev/schnell) and the SD1.5 model of the negative tests."""
    for spec in FAMILY_MODELS:
        if wanted(spec.name, rel := f"diffusion_models/{spec.file}"):
            sd, metadata = spec.build(seed + spec.seed_offset)
            save(spec.name, rel, sd, metadata)
    if wanted("flux_vae", rel := "vae/tiny_flux_taesd.safetensors"):
        save("flux_vae", rel, taesd_state_dict(seed + 21, FLUX_SCALE_FACTOR, FLUX_SHIFT_FACTOR))
    if wanted("sd15_vae", rel := "vae/tiny_sd15_taesd.safetensors"):
        save("sd15_vae", rel, taesd_state_dict(seed + 22, SD15_SCALE_FACTOR, 0.0, channels=SD15_LATENT_CHANNELS))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="models folder to write")
    parser.add_argument("--comfy", type=Path, default=None, help="ComfyUI tree (default: $COMFYUI_PATH)")
    parser.add_argument("--depth", type=int, default=TinyMMDiTConfig.depth)
    parser.add_argument("--seed", type=int, default=TinyMMDiTConfig.seed)
    parser.add_argument("--only-missing", action="store_true",
                        help="build only the models whose files are missing (keeps existing files)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[tiny_models] %(message)s")
    comfy_dir = add_comfy_to_path(args.comfy or os.environ.get("COMFYUI_PATH"), cpu=True)
    t0 = time.perf_counter()
    build_all(args.out, comfy_dir, TinyMMDiTConfig(depth=args.depth, seed=args.seed), only_missing=args.only_missing)
    logger.info("done in %.1f s", time.perf_counter() - t0)


if __name__ == "__main__":
    main()
