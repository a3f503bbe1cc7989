"""Which prior a ComfyUI MODEL is, whether our samplers can use it, and the per-family restoration defaults.

Our samplers need only ComfyUI's denoiser call (x0 in model space), the model's latent format and a VAE
decoder, so any rectified-flow model works: ComfyUI's ``CONST`` sampling type (``x_sigma = (1 - sigma) x0 +
sigma noise``). Which family a model is matters only for defaults (time shift, CFG vs Flux guidance) and for
clear errors. Everything here reads ComfyUI's own objects (ComfyUI 0.3.75):

* ``BaseModel.model_config`` is the matched ``comfy.supported_models`` class: ``SD3`` for SD3 medium and both
  SD3.5 models (told apart by the detected MMDiT config: SD3.5 has q/k RMS norm, SD3.5 medium also the
  MMDiT-X ``x_block_self_attn_layers``), ``Flux`` (dev, guidance-distilled) and ``FluxSchnell``;
* the sampling object is ``model_patcher.get_model_object("model_sampling")`` (object patches such as
  ModelSamplingSD3 included): ``ModelSamplingDiscreteFlow`` (SD3, SD3.5, Flux schnell; timestep = sigma x
  multiplier) or ``ModelSamplingFlux`` (Flux dev; timestep = sigma, shift stored as ``mu = ln(s)``).

One "shift" for all families: the time-shift factor ``s`` of ``sigma = s t / (1 + (s - 1) t)`` (what
ModelSamplingSD3 and ModelSamplingAuraFlow call shift). ModelSamplingFlux's ``shift`` is ``mu`` with
``sigma = e^mu / (e^mu + 1/t - 1)``, the same curve for ``s = e^mu``; :func:`with_shift` converts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import comfy.model_sampling
import comfy.supported_models

from . import messages

logger = logging.getLogger(__name__)

SD3 = "sd3"
SD35_MEDIUM = "sd3.5-medium"
SD35_LARGE = "sd3.5-large"
FLUX_DEV = "flux-dev"
FLUX_SCHNELL = "flux-schnell"
OTHER = "other"


@dataclass(frozen=True)
class FluxShiftRule:
    """Flux dev's resolution-dependent shift: ``mu`` linear in the number of 2x2 latent patches, from
    ``base_shift`` at ``min_tokens`` to ``max_shift`` at ``max_tokens`` (black-forest-labs/flux
    ``sampling.get_schedule``; ComfyUI's ModelSamplingFlux node defaults, comfy_extras/nodes_model_advanced.py).
    The time-shift factor is ``s = e^mu``: 1.65 at 256 px, 3.16 at 1024 px."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    min_tokens: int = 256
    max_tokens: int = 4096
    pixels_per_token: int = 16 * 16  # 8x VAE, 2x2 patches

    def shift(self, height: int, width: int) -> float:
        tokens = height * width / self.pixels_per_token
        slope = (self.max_shift - self.base_shift) / (self.max_tokens - self.min_tokens)
        return math.exp(self.base_shift + slope * (tokens - self.min_tokens))


FLUX_SHIFT = FluxShiftRule()


@dataclass(frozen=True)
class FamilyDefaults:
    """Restoration defaults of one model family (what a 0 in the Restore nodes' shift / cfg widgets means).

    shift: time-shift factor ``s`` (see the module docstring); ``None``: from the image size
    (:data:`FLUX_SHIFT`). cfg: classifier-free guidance scale; 1 means no negative pass (the negative prompt
    is ignored). guidance: Flux's distilled guidance, read from the conditioning (FluxGuidance node;
    ComfyUI uses 3.5 when it is absent); ``None``: the model has no guidance input.
    """

    family: str
    display_name: str
    latent_channels: int
    shift: float | None
    cfg: float
    guidance: float | None
    source: str


FAMILY_DEFAULTS: Mapping[str, FamilyDefaults] = MappingProxyType({
    SD3: FamilyDefaults(
        SD3, "SD3 medium", 16, shift=4.0, cfg=2.0, guidance=None,
        source="FlowDPS paper (arXiv 2503.08136) restoration settings for SD3 medium: shift 4, CFG 2 "
               "(ComfyUI's own SD3 default shift is 3.0, comfy/supported_models.py SD3.sampling_settings)"),
    SD35_MEDIUM: FamilyDefaults(
        SD35_MEDIUM, "SD3.5 medium", 16, shift=3.0, cfg=2.0, guidance=None,
        source="shift 3.0: the model's own default (comfy/supported_models.py SD3.sampling_settings; Stability's "
               "scheduler config); CFG 2: the FlowDPS paper's SD3 value (no published restoration setting)"),
    SD35_LARGE: FamilyDefaults(
        SD35_LARGE, "SD3.5 large", 16, shift=3.0, cfg=2.0, guidance=None,
        source="shift 3.0: the model's own default (comfy/supported_models.py SD3.sampling_settings; Stability's "
               "scheduler config); CFG 2: the FlowDPS paper's SD3 value (no published restoration setting)"),
    FLUX_DEV: FamilyDefaults(
        FLUX_DEV, "Flux.1 dev", 16, shift=None, cfg=1.0, guidance=3.5,
        source="guidance-distilled: CFG 1 with the guidance in the conditioning (FluxGuidance default 3.5, "
               "comfy/model_base.py Flux.extra_conds); resolution-dependent shift (ModelSamplingFlux, BFL's "
               "flux sampling.get_schedule)"),
    FLUX_SCHNELL: FamilyDefaults(
        FLUX_SCHNELL, "Flux.1 schnell", 16, shift=1.0, cfg=1.0, guidance=None,
        source="timestep-distilled: shift 1.0 and CFG 1 (comfy/supported_models.py FluxSchnell.sampling_settings; "
               "BFL's flux: no shift for schnell), no guidance input"),
    OTHER: FamilyDefaults(
        OTHER, "other rectified-flow model", 0, shift=None, cfg=2.0, guidance=None,
        source="unknown family: the MODEL's own sampling shift is kept; CFG 2 as for SD3"),
})
"""Per-family defaults, frozen. ``latent_channels`` 0 for ``other``: read from the model's latent format."""


def base_model(model: Any) -> Any:
    """ComfyUI's ``BaseModel`` from a ``ModelPatcher`` (MODEL socket) or a ``BaseModel`` itself."""
    if hasattr(model, "model_config"):
        return model
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "model_config"):
        raise ValueError(f"expected a ComfyUI MODEL, got {type(model).__name__}")
    return inner


def model_sampling(model: Any) -> Any:
    """The sampling object in effect (a ModelPatcher's object patches included)."""
    if hasattr(model, "get_model_object"):
        return model.get_model_object("model_sampling")
    return getattr(base_model(model), "model_sampling", None)


def detect_family(model: Any) -> str:
    """One of ``sd3``, ``sd3.5-medium``, ``sd3.5-large``, ``flux-dev``, ``flux-schnell``, ``other``."""
    config = base_model(model).model_config
    if isinstance(config, comfy.supported_models.SD3):
        unet = getattr(config, "unet_config", {}) or {}
        if unet.get("x_block_self_attn_layers"):
            return SD35_MEDIUM
        if unet.get("qk_norm") is not None:
            return SD35_LARGE
        return SD3
    if type(config) is comfy.supported_models.FluxSchnell:
        return FLUX_SCHNELL
    if type(config) is comfy.supported_models.Flux:  # not Fill/Kontext/Flux 2 etc.: other inputs, other defaults
        return FLUX_DEV
    return OTHER


def family_defaults(model: Any) -> FamilyDefaults:
    return FAMILY_DEFAULTS[detect_family(model)]


def describe(model: Any) -> str:
    """E.g. ``"SD3.5 medium (SD3, sampling ModelSamplingDiscreteFlow + CONST)"``."""
    base = base_model(model)
    family = detect_family(model)
    name = FAMILY_DEFAULTS[family].display_name if family != OTHER else type(base.model_config).__name__
    return f"{name} ({type(base).__name__}, {sampling_kind(model_sampling(model))})"


def sampling_kind(sampling: Any) -> str:
    """The sampling classes ComfyUI combined, e.g. ``ModelSamplingDiscrete + EPS``."""
    if sampling is None:
        return "no model_sampling"
    names = [c.__name__ for c in type(sampling).__mro__[1:]
             if c.__module__ == comfy.model_sampling.__name__]
    return " + ".join(names) if names else type(sampling).__name__


def check_rectified_flow(model: Any, node: str = "FlowDPS") -> None:
    """Raise ValueError unless the model's sampling type is rectified flow (ComfyUI's CONST).

    An SD1.5/SDXL (EPS or V-prediction) model would otherwise give a wrong result silently: our data term and
    renoising assume ``x_sigma = (1 - sigma) x0 + sigma noise``.
    """
    sampling = model_sampling(model)
    if isinstance(sampling, comfy.model_sampling.CONST):
        return
    base = base_model(model)
    model_type = getattr(getattr(base, "model_type", None), "name", "unknown")
    raise ValueError(
        f"{node} needs a rectified-flow model (ComfyUI sampling type CONST: SD3, SD3.5, Flux), but this MODEL is "
        f"{type(base.model_config).__name__} with model type {model_type} (sampling {sampling_kind(sampling)}): "
        f"SD1.5/SDXL-style {model_type} models are not supported")


def check_vae_matches(model: Any, vae: Any, node: str = "FlowDPS") -> None:
    """Raise ValueError when the VAE's latent channels differ from the model's latent format's.

    A 16-channel TAESD whose stored latent scale belongs to another family (e.g. SD3's 1.5305 with Flux's
    0.3611) decodes the wrong colours: that is logged as a warning (full VAEs carry no scale to compare).
    """
    latent_format = base_model(model).latent_format
    model_channels = int(latent_format.latent_channels)
    vae_channels = getattr(vae, "latent_channels", None)
    if vae_channels is None:
        raise ValueError(f"{node}: the VAE input is not a ComfyUI VAE ({type(vae).__name__})")
    if int(vae_channels) != model_channels:
        raise ValueError(
            f"{node}: the VAE has {vae_channels} latent channels but the model {describe(model)} uses "
            f"{model_channels} ({type(latent_format).__name__} latent format): load the VAE that belongs to the "
            f"model (SD3/SD3.5: the SD3 VAE; Flux: ae.safetensors)")
    stage = getattr(vae, "first_stage_model", None)
    scale = getattr(stage, "vae_scale", None)
    expected = getattr(latent_format, "scale_factor", None)
    if scale is not None and expected is not None and not math.isclose(float(scale), float(expected), rel_tol=1e-3):
        messages.warn(node, f"the VAE's latent scale {float(scale):.4f} differs from the model's latent format "
                            f"{type(latent_format).__name__} ({float(expected):.4f}): it looks like another model "
                            "family's VAE, which gives wrong "
                            "colours; load the model's own VAE (SD3/SD3.5: the SD3 VAE; Flux: ae.safetensors)")


def check_model_and_vae(model: Any, vae: Any, node: str = "FlowDPS") -> str:
    """Both checks above, before any expensive work; returns the family."""
    check_rectified_flow(model, node)
    check_vae_matches(model, vae, node)
    return detect_family(model)


def current_shift(model: Any) -> float | None:
    """The time-shift factor ``s`` the model samples with now (``e^mu`` for ModelSamplingFlux)."""
    sampling = model_sampling(model)
    if isinstance(sampling, comfy.model_sampling.ModelSamplingFlux):
        return math.exp(float(sampling.shift))
    if isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow):
        return float(sampling.shift)
    return None


def default_shift(model: Any, height: int, width: int) -> float:
    """The family's restoration shift ``s`` for an image of ``height`` x ``width`` pixels."""
    defaults = family_defaults(model)
    if defaults.shift is not None:
        return defaults.shift
    if defaults.family == FLUX_DEV:
        return FLUX_SHIFT.shift(height, width)
    shift = current_shift(model)
    if shift is None:
        raise ValueError(f"cannot tell the time shift of {describe(model)}: set the shift explicitly")
    return shift


@dataclass(frozen=True)
class RestoreSettings:
    """The shift and CFG a Restore node runs with, and where they came from (for the log)."""

    family: str
    shift: float
    cfg: float
    shift_is_default: bool
    cfg_is_default: bool

    def describe(self) -> str:
        return (f"{FAMILY_DEFAULTS[self.family].display_name}: shift {self.shift:.3g}"
                f"{' (family default)' if self.shift_is_default else ''}, CFG {self.cfg:g}"
                f"{' (family default)' if self.cfg_is_default else ''}")


def restore_settings(model: Any, shift: float, cfg: float, height: int, width: int,
                     node: str = "FlowDPS") -> RestoreSettings:
    """Resolve the Restore nodes' widgets: ``shift`` 0 and ``cfg`` 0 mean the family default.

    Raises ValueError for a negative value. A CFG other than 1 on Flux is allowed (it doubles the cost and
    the model was not trained for it) but logged.
    """
    if not (math.isfinite(shift) and shift >= 0):
        raise ValueError(f"shift must be > 0, or 0 for the model family's default, got {shift}")
    if not (math.isfinite(cfg) and cfg >= 0):
        raise ValueError(f"cfg must be > 0, or 0 for the model family's default, got {cfg}")
    family = detect_family(model)
    defaults = FAMILY_DEFAULTS[family]
    settings = RestoreSettings(
        family=family,
        shift=default_shift(model, height, width) if shift == 0 else float(shift),
        cfg=defaults.cfg if cfg == 0 else float(cfg),
        shift_is_default=shift == 0, cfg_is_default=cfg == 0)
    if family in (FLUX_DEV, FLUX_SCHNELL) and settings.cfg != 1.0:
        messages.warn(node, f"{defaults.display_name} is guidance-distilled: CFG {settings.cfg:g} runs a second, "
                            "negative model pass at every step (twice the time) and is not what the model was trained "
                            "for; set cfg to 0 (the default, 1) and put FluxGuidance on the positive prompt")
    return settings


def with_shift(model: Any, shift: float) -> Any:
    """A clone of the ModelPatcher ``model`` whose flow schedule uses the time-shift factor ``shift``.

    Keeps the model's sampling class: ModelSamplingDiscreteFlow (SD3, SD3.5, Flux schnell, AuraFlow) with its
    own timestep multiplier (1000 for SD3, 1 for schnell), or ModelSamplingFlux (Flux dev) with ``mu = ln(s)``.
    """
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be > 0, got {shift}")
    current = model_sampling(model)
    config = base_model(model).model_config
    if isinstance(current, comfy.model_sampling.ModelSamplingFlux):
        class ModelSamplingShiftedFlux(comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST):
            pass

        sampling = ModelSamplingShiftedFlux(config)
        sampling.set_parameters(shift=math.log(shift))
    elif isinstance(current, comfy.model_sampling.ModelSamplingDiscreteFlow):
        class ModelSamplingShifted(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
            pass

        sampling = ModelSamplingShifted(config)
        sampling.set_parameters(shift=shift, multiplier=current.multiplier)
    else:
        raise ValueError(f"cannot set a flow time shift on {describe(model)}: its sampling is neither "
                         f"ModelSamplingDiscreteFlow nor ModelSamplingFlux")
    patched = model.clone()
    patched.add_object_patch("model_sampling", sampling)
    return patched
