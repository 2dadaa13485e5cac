"""The catalog of pathology foundation encoders: what each one is, as data (no torch, no timm).

Each entry names the timm architecture and the keyword arguments that make it that model (SwiGLU, register
tokens, layer-scale init values, ...), how its tokens become one vector, the magnification and input size
it was trained at, its pixel normalisation, its output dimension, and its licence and gating. `ips prep
--encoder NAME` reads the magnification from here (so it stays light: no torch import), the model layer
builds the network from it (`ips.model.foundation`), and `ips embed` records it in the feature store.

Layer names in `timm_kwargs` are strings ('SwiGLUPacked', 'SiLU'): the builder resolves them, so this
module never imports torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from ips.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# the H&E statistics Bioptimus normalises with (their model card and timm config)
_BIOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
_BIOPTIMUS_STD = (0.211883, 0.230117, 0.177517)

Pool = Literal["token", "token+mean", "attentional"]
_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's statistics, which CONCH normalises with
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class FoundationSpec:
    """One foundation encoder.

    Args:
        name: the registry name (`model.encoder`, `ips embed --encoder`, `ips prep --encoder`).
        arch: the timm architecture the weights fit; `timm_kwargs` complete it (given explicitly, so the
            entry says what the model is whatever timm's defaults for `arch` are).
        pool: 'token' = the class token; 'token+mean' = class token and the mean of the patch tokens
            (register tokens left out), concatenated; 'attentional' = CoCa's contrastive pooler (one
            learned query attending over all tokens with `pool_heads` heads, then a LayerNorm), as
            CONCH's `encode_image(proj_contrast=False)`.
        dim: the output dimension (`embed_dim`, `2 * embed_dim` for 'token+mean', the pooler's width
            for 'attentional').
        mpp: micrometers per pixel of the patches it was trained on; input_size: their side in pixels.
        mean, std: normalisation of [0, 1] RGB pixels.
        licence, gated: the weights' licence, and whether the hub asks for an access request first.
        hub: the Hugging Face repository; hub_file: the weights file in it (name the local copy in
            `model.pretrained`); hub_format: 'timm' (keys fit the timm model), 'transformers' (a
            Hugging Face Dinov2Model, converted on loading) or 'open_clip' (a whole CoCa model, whose
            image tower is taken).
    """

    name: str
    title: str
    arch: str
    timm_kwargs: Mapping[str, Any]
    pool: Pool
    dim: int
    mpp: float
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    licence: str
    gated: bool
    hub: str
    hub_file: str = "pytorch_model.bin"
    hub_format: Literal["timm", "transformers", "open_clip"] = "timm"
    aliases: tuple[str, ...] = field(default=())
    pool_heads: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "timm_kwargs", MappingProxyType(dict(self.timm_kwargs)))  # read-only
        width = int(self.timm_kwargs["embed_dim"])
        want = {"token": width, "token+mean": 2 * width}.get(self.pool, self.dim)
        if self.dim != want or self.dim % self.pool_heads:
            raise ValueError(
                f"{self.name}: dim {self.dim} does not follow from embed_dim {width} and {self.pool}"
            )
        if self.input_size % int(self.timm_kwargs["patch_size"]):
            raise ValueError(f"{self.name}: input_size {self.input_size} is not a multiple of the ViT patch")

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.hub}"


def _vit(patch: int, width: int, depth: int, heads: int, **extra: Any) -> dict[str, Any]:
    """The keyword arguments every entry spells out; `extra` adds the model's own."""
    return {
        "img_size": 224,
        "patch_size": patch,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "num_classes": 0,
        "dynamic_img_size": True,
        **extra,
    }


_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

_SPECS = (
    FoundationSpec(
        name="uni",
        title="UNI (Mahmood Lab), ViT-L/16, DINOv2 on 100k slides",
        arch="vit_large_patch16_224",
        timm_kwargs=_vit(16, 1024, 24, 16, init_values=1e-5),
        pool="token",
        dim=1024,
        mpp=0.5,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        hub="MahmoodLab/UNI",
        aliases=("uni_v1",),
    ),
    FoundationSpec(
        name="uni2-h",
        title="UNI2-h (Mahmood Lab), ViT-H/14 with SwiGLU and 8 registers",
        arch="vit_giant_patch14_224",
        timm_kwargs=_vit(
            14,
            1536,
            24,
            24,
            init_values=1e-5,
            mlp_ratio=2.66667 * 2,
            no_embed_class=True,
            reg_tokens=8,
            **_SWIGLU,
        ),
        pool="token",
        dim=1536,
        mpp=0.5,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        hub="MahmoodLab/UNI2-h",
        aliases=("uni_v2", "uni2"),
    ),
    FoundationSpec(
        name="virchow2",
        title="Virchow2 (Paige), ViT-H/14 with SwiGLU and 4 registers; class token + mean of patch tokens",
        arch="vit_huge_patch14_224",
        timm_kwargs=_vit(14, 1280, 32, 16, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4, **_SWIGLU),
        pool="token+mean",
        dim=2560,
        mpp=0.5,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        hub="paige-ai/Virchow2",
        aliases=("virchow_v2",),
    ),
    FoundationSpec(
        name="h-optimus-0",
        title="H-optimus-0 (Bioptimus), ViT-g/14 with SwiGLU and 4 registers",
        arch="vit_giant_patch14_reg4_dinov2",
        timm_kwargs=_vit(
            14,
            1536,
            40,
            24,
            init_values=1e-5,
            mlp_ratio=2.66667 * 2,
            no_embed_class=True,
            reg_tokens=4,
            **_SWIGLU,
        ),
        pool="token",
        dim=1536,
        mpp=0.5,
        input_size=224,
        mean=_BIOPTIMUS_MEAN,
        std=_BIOPTIMUS_STD,
        licence="Apache-2.0",
        gated=True,
        hub="bioptimus/H-optimus-0",
        aliases=("hoptimus0",),
    ),
    FoundationSpec(
        name="phikon-v2",
        title="Phikon-v2 (Owkin), ViT-L/16, DINOv2 on 460M tiles",
        arch="vit_large_patch16_224",
        timm_kwargs=_vit(16, 1024, 24, 16, init_values=1e-5),
        pool="token",
        dim=1024,
        mpp=0.5,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        licence="Owkin non-commercial",
        gated=False,
        hub="owkin/phikon-v2",
        hub_file="model.safetensors",
        hub_format="transformers",
        aliases=("phikon_v2",),
    ),
    FoundationSpec(
        name="prov-gigapath",
        title="Prov-GigaPath tile encoder (Providence / Microsoft), ViT-g/16 with SwiGLU",
        arch="vit_giant_patch14_dinov2",
        timm_kwargs=_vit(16, 1536, 40, 24, init_values=1e-5, mlp_ratio=5.33334, **_SWIGLU),
        pool="token",
        dim=1536,
        mpp=0.5,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        licence="Apache-2.0 (research use, per its model card)",
        gated=True,
        hub="prov-gigapath/prov-gigapath",
        aliases=("gigapath", "prov_gigapath"),
    ),
    FoundationSpec(
        name="conch",
        title="CONCH vision tower (Mahmood Lab), ViT-B/16 at 448 px with CoCa's attentional pooler",
        arch="vit_base_patch16_224",
        timm_kwargs={**_vit(16, 768, 12, 12), "img_size": 448},
        pool="attentional",
        dim=512,
        mpp=0.5,
        input_size=448,
        mean=_OPENAI_MEAN,
        std=_OPENAI_STD,
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        hub="MahmoodLab/conch",
        hub_format="open_clip",
        aliases=("conch_v1",),
    ),
)

FOUNDATION: dict[str, FoundationSpec] = {s.name: s for s in _SPECS}
_ALIASES = {a: s.name for s in _SPECS for a in s.aliases}


def list_foundation() -> list[str]:
    """The registry names, sorted."""
    return sorted(FOUNDATION)


def is_foundation(name: str) -> bool:
    return name.lower() in FOUNDATION or name.lower() in _ALIASES


def foundation_spec(name: str, *, key: str = "model.encoder") -> FoundationSpec:
    """The entry for `name` (a registry name or an alias such as TRIDENT's `uni_v2`, any case).

    Raises ConfigError naming `key` and the closest registry name when there is none."""
    low = name.lower()
    if low in FOUNDATION:
        return FOUNDATION[low]
    if low in _ALIASES:
        return FOUNDATION[_ALIASES[low]]
    close = difflib.get_close_matches(low, [*FOUNDATION, *_ALIASES], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"{key}: no foundation encoder {name!r}{hint}; known: {', '.join(list_foundation())}")
