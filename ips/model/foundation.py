"""Pathology foundation encoders built from the catalog (`ips.foundation`): the timm architecture with the
model's own keyword arguments, its pooling, its normalisation, and its weights.

Weights come from a local file (`model.pretrained: PATH`, a `.bin`/`.pt` torch file or `.safetensors`),
or from the Hugging Face hub when `model.pretrained: true` and a token and a network exist. Without
weights (`pretrained: false`) the architecture is built with random weights and no network access.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ips.errors import CheckpointError, ConfigError
from ips.foundation import FoundationSpec, foundation_spec


class ContrastPooler(nn.Module):
    """CoCa's attentional pooler: `n_queries` learned queries attend over the tokens.

    `(n, L, context_dim)` tokens -> `(n, n_queries, d_model)`. Names follow CONCH's weights (`query`,
    `attn`, `ln_q`, `ln_k`), so its file loads as it is.
    """

    def __init__(self, *, d_model: int, context_dim: int, n_head: int, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(x).transpose(0, 1)  # (L, n, C): sequence first, as the weights were trained
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, x.shape[0], -1)  # (Q, n, d)
        out = self.attn(q, keys, keys, need_weights=False)[0]  # (Q, n, d)
        return out.transpose(0, 1)  # (n, Q, d)


class FoundationEncoder(nn.Module):
    """A foundation ViT as a patch encoder: `(n, 3, H, W)` normalised pixels -> `(n, dim)`.

    Patches of another size than the model's `input_size` are resized to it first (bilinear with
    antialiasing; the normalisation is per channel and affine, so resizing after it equals resizing
    before). `pretrained_cfg` carries the model's mean and std, which `pixel_stats` reads, so training,
    inference and `ips embed` normalise as the model was trained.
    """

    def __init__(self, trunk: nn.Module, spec: FoundationSpec) -> None:
        super().__init__()
        self.trunk = trunk
        self.spec = spec
        self.pool = spec.pool
        self.input_size = spec.input_size
        self.out_dim = spec.dim
        self.pretrained_cfg = {
            "mean": spec.mean,
            "std": spec.std,
            "input_size": (3, spec.input_size, spec.input_size),
        }
        self.weights_path: Path | None = None  # the file the weights came from (None: random weights)
        if spec.pool == "attentional":
            width = int(trunk.num_features)
            self.attn_pool_contrast = ContrastPooler(
                d_model=spec.dim, context_dim=width, n_head=spec.pool_heads
            )
            self.ln_contrast = nn.LayerNorm(spec.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (self.input_size, self.input_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        tokens = self.trunk.forward_features(x)  # (n, prefix + patches, D): class, registers, patches
        if self.pool == "attentional":
            return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])  # (n, dim)
        cls = tokens[:, 0]
        if self.pool == "token":
            return cls
        patches = tokens[:, self.trunk.num_prefix_tokens :]  # (n, P, D)
        return torch.cat([cls, patches.mean(dim=1)], dim=1)  # (n, 2D)


def _layers() -> dict[str, Any]:
    from timm.layers import SwiGLUPacked

    return {"SwiGLUPacked": SwiGLUPacked, "SiLU": nn.SiLU, "GELU": nn.GELU}


def timm_kwargs(spec: FoundationSpec, **overrides: Any) -> dict[str, Any]:
    """The spec's timm keyword arguments with layer names resolved; `overrides` replace some (tests build
    a shallow, narrow copy of each architecture this way)."""
    layers = _layers()
    kwargs = {**spec.timm_kwargs, "num_classes": 0, **overrides}  # an encoder: never a classifier head
    return {k: layers[v] if k in ("mlp_layer", "act_layer") else v for k, v in kwargs.items()}


def build_trunk(spec: FoundationSpec, **overrides: Any) -> nn.Module:
    """The timm ViT of `spec` with random weights (no download, whatever timm's defaults)."""
    import timm

    return timm.create_model(spec.arch, pretrained=False, **timm_kwargs(spec, **overrides))


def build_foundation(name: str, *, pretrained: bool | str = False) -> FoundationEncoder:
    """The encoder `name` of the catalog; weights from the file `pretrained`, from the hub (`True`), or
    random (`False`, no network). ConfigError, one line naming `model.pretrained`, when weights are asked
    for and cannot be had."""
    spec = foundation_spec(name)
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.pretrained: weights file {path} does not exist ({_where(spec)})")
    elif pretrained:
        path = _hub_file(spec)
    else:
        path = None
    encoder = FoundationEncoder(build_trunk(spec), spec)
    if path is not None:
        load_foundation_weights(encoder, path)
    return encoder


def _where(spec: FoundationSpec) -> str:
    gate = ", gated: request access first" if spec.gated else ""
    return f"{spec.name} weights are {spec.hub_file} from {spec.url}{gate}"


def _hub_file(spec: FoundationSpec) -> Path:
    """The weights file from the hub's cache or a download; needs a token (gated models) and a network."""
    missing = (
        f"model.pretrained: no local weights for {spec.name!r} and no hub access ({{why}}); download "
        f"{spec.hub_file} from {spec.url}{' (gated: request access)' if spec.gated else ''} and set "
        "model.pretrained to its path"
    )
    try:
        from huggingface_hub import get_token, hf_hub_download
    except ImportError:
        raise ConfigError(missing.format(why="huggingface_hub is not installed")) from None
    token = get_token()
    if spec.gated and not token:
        raise ConfigError(missing.format(why="no Hugging Face token: set HF_TOKEN or run `hf auth login`"))
    local_only = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
    # the catalog's file first; repositories also publish the same weights under the other usual name
    names = dict.fromkeys([spec.hub_file, "model.safetensors", "pytorch_model.bin"])
    for name in names:
        try:
            return Path(hf_hub_download(spec.hub, name, token=token, local_files_only=local_only))
        except Exception as e:  # noqa: BLE001 - offline, refused, missing: each is the same advice
            if type(e).__name__ == "EntryNotFoundError" and name != list(names)[-1]:
                continue  # not under this name: try the next
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(missing.format(why=f"{type(e).__name__}: {first[:160]}")) from None
    raise AssertionError("unreachable: the last name returns or raises")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch file (data only, never code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
            raise ConfigError(f"model.pretrained: {path} is not a readable safetensors file ({e})") from None
    from ips.model.torchfile import read_torch_file

    try:
        state = read_torch_file(path, what="weights file")
    except CheckpointError as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    for key in ("state_dict", "model"):  # training checkpoints often wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.pretrained: {path} holds no state dict of tensors")
    return state


# what a CoCa checkpoint's image encoding needs; the text towers, the captioning pooler and the contrastive
# projection (not used by `encode_image(proj_contrast=False)`) are left out
_COCA_KEEP = ("visual.trunk.", "visual.attn_pool_contrast.", "visual.ln_contrast.")


def _strip_ddp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without the `module.` prefix DistributedDataParallel adds."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return state


def dinov2_hf_to_timm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face `Dinov2Model` state dict (Phikon-v2's published file) in timm ViT names: separate
    query/key/value projections become one `qkv`, `layer_scale{1,2}.lambda1` become `ls{1,2}.gamma`; the
    mask token (used in pretraining only) is dropped."""
    out: dict[str, torch.Tensor] = {}
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}
    renames = {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    block_renames = {
        "norm1": "norm1",
        "norm2": "norm2",
        "attention.output.dense": "attn.proj",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in renames:
            out[renames[key]] = value
            continue
        if key == "embeddings.mask_token" or not key.startswith("encoder.layer."):
            continue
        index, rest = key[len("encoder.layer.") :].split(".", 1)
        block = f"blocks.{index}"
        module, leaf = rest.rsplit(".", 1)
        if module.startswith("attention.attention."):  # query / key / value
            qkv.setdefault((block, leaf), {})[module.rsplit(".", 1)[1]] = value
        elif module in ("layer_scale1", "layer_scale2"):
            out[f"{block}.ls{module[-1]}.gamma"] = value
        elif module in block_renames:
            out[f"{block}.{block_renames[module]}.{leaf}"] = value
        else:
            raise ConfigError(f"model.pretrained: unexpected Dinov2 weight {key!r}")
    for (block, leaf), parts in qkv.items():
        out[f"{block}.attn.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def load_foundation_weights(encoder: FoundationEncoder, path: Path) -> None:
    """Load the weights file `path` into `encoder` strictly (every weight, every shape) and record it in
    `encoder.weights_path`. ConfigError, one line naming the file, when it does not fit."""
    spec = encoder.spec
    state = _strip_ddp(read_state_dict(path))
    if "embeddings.cls_token" in state or "dinov2.embeddings.cls_token" in state:
        state = dinov2_hf_to_timm(state)
    if any(k.startswith("visual.trunk.") for k in state):  # a whole CoCa model (CONCH): its image tower
        state = {k[len("visual.") :]: v for k, v in state.items() if k.startswith(_COCA_KEEP)}
    elif not any(k.startswith("trunk.") for k in state):  # a timm ViT's weights (else: this class's own)
        state = {f"trunk.{k}": v for k, v in state.items()}
    own = encoder.state_dict()
    _fit_position_table(state, own, encoder.trunk)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ConfigError(
            f"model.pretrained: {path} does not fit encoder {spec.name!r}: {len(missing)} weights missing, "
            f"{len(unexpected)} unexpected (e.g. {example!r}); {_where(spec)}"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ConfigError(
            f"model.pretrained: {path} does not fit encoder {spec.name!r}: {bad[0]} has shape "
            f"{tuple(state[bad[0]].shape)} there, {tuple(own[bad[0]].shape)} here"
        )
    encoder.load_state_dict(state)
    encoder.weights_path = Path(path)


def _fit_position_table(
    state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], trunk: nn.Module
) -> None:
    """A position table saved for another input size (e.g. a Dinov2 file made at 518 px) resampled in place
    to this model's patch grid, bicubic, its class-token row kept: what timm does on loading DINOv2."""
    theirs, ours = state.get("trunk.pos_embed"), own.get("trunk.pos_embed")
    if theirs is None or ours is None or theirs.shape == ours.shape or theirs.shape[-1] != ours.shape[-1]:
        return
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(trunk, "no_embed_class", False) else int(trunk.num_prefix_tokens)
    grid = int(round((ours.shape[1] - prefix) ** 0.5))
    old = int(round((theirs.shape[1] - prefix) ** 0.5))
    if grid * grid + prefix != ours.shape[1] or old * old + prefix != theirs.shape[1]:
        return  # not square grids: the shape check reports it
    state["trunk.pos_embed"] = resample_abs_pos_embed(theirs, [grid, grid], num_prefix_tokens=prefix)
