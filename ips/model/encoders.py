"""Patch encoders: a registry of our own 2D/3D CNNs, any timm model (2D), and a feature projector.

Every encoder maps `(n, C, *spatial)` float patches to `(n, out_dim)` embeddings and has `out_dim`.
Our CNN family is written once for both 2D and 3D (parameterised by `spatial_dims`), with a tiny
variant for tests and efficient variants (squeeze-excitation, inverted bottleneck, Fire) for volumes,
where model complexity matters most.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ips.config import ConfigError
from ips.foundation import is_foundation, list_foundation

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_POOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
_MAXPOOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
DEFAULT_NORM = "batch"  # `model.encoder_norm` unset: BatchNorm for our encoders (the recipe's, ips.config)


def register_encoder(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register an encoder factory `fn(*, in_chans, spatial_dims, norm='group') -> module with out_dim`."""
    _REGISTRY[fn.__name__] = fn
    return fn


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def _norm(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    # GroupNorm by default: its output does not depend on the other patches of the batch, so micro-batched
    # training gives the same gradients as the full batch (BatchNorm does not).
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](channels)
    raise ValueError(f"unknown norm {kind!r}; use 'group' or 'batch'")


class SqueezeExcite(nn.Module):
    """Channel gating from global context (Hu et al. 2018): `(n, C, *S) -> (n, C, *S)`."""

    def __init__(self, channels: int, spatial_dims: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        conv = _CONV[spatial_dims]
        self.pool = _POOL[spatial_dims](1)
        self.fc = nn.Sequential(
            conv(channels, hidden, 1), nn.ReLU(inplace=True), conv(hidden, channels, 1), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(self.pool(x))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3^d convs), optionally with squeeze-excitation; `inner` channels between
    the convs (default `cout`; fewer after pruning)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        spatial_dims: int,
        norm: str,
        se: bool = False,
        inner: int | None = None,
    ) -> None:
        super().__init__()
        conv, mid = _CONV[spatial_dims], inner or cout
        self.body = nn.Sequential(
            conv(cin, mid, 3, stride, 1, bias=False),
            _norm(norm, mid, spatial_dims),
            nn.ReLU(inplace=True),
            conv(mid, cout, 3, 1, 1, bias=False),
            _norm(norm, cout, spatial_dims),
            SqueezeExcite(cout, spatial_dims) if se else nn.Identity(),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(conv(cin, cout, 1, stride, bias=False), _norm(norm, cout, spatial_dims))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class InvertedBottleneck(nn.Module):
    """MobileNetV2-style block: 1^d expand, depthwise 3^d, 1^d project (far fewer MACs than 3^d convs);
    `inner` hidden channels (default `cin * expand`)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        spatial_dims: int,
        norm: str,
        expand: int = 4,
        inner: int | None = None,
    ) -> None:
        super().__init__()
        conv, hidden = _CONV[spatial_dims], inner or cin * expand
        self.body = nn.Sequential(
            conv(cin, hidden, 1, bias=False),
            _norm(norm, hidden, spatial_dims),
            nn.ReLU6(inplace=True),
            conv(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            _norm(norm, hidden, spatial_dims),
            nn.ReLU6(inplace=True),
            conv(hidden, cout, 1, bias=False),
            _norm(norm, cout, spatial_dims),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class FireBlock(nn.Module):
    """SqueezeNet Fire module: 1^d squeeze (`inner` channels, default `max(4, cout // 8)`), then parallel
    1^d and 3^d expands, concatenated."""

    def __init__(
        self, cin: int, cout: int, stride: int, spatial_dims: int, norm: str, inner: int | None = None
    ) -> None:
        super().__init__()
        conv, squeeze = _CONV[spatial_dims], inner or max(4, cout // 8)
        self.squeeze = nn.Sequential(
            conv(cin, squeeze, 1, stride, bias=False),
            _norm(norm, squeeze, spatial_dims),
            nn.ReLU(inplace=True),
        )
        self.e1 = conv(squeeze, cout // 2, 1, bias=False)
        self.e3 = conv(squeeze, cout - cout // 2, 3, 1, 1, bias=False)
        self.post = nn.Sequential(_norm(norm, cout, spatial_dims), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        return self.post(torch.cat([self.e1(s), self.e3(s)], dim=1))


_BLOCKS = {"basic": BasicBlock, "se": BasicBlock, "inverted": InvertedBottleneck, "fire": FireBlock}


def spatial_shift(x: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Zero-MAC, zero-parameter spatial mixing (Wu et al. 2018, "Shift"): the channels are split into
    `2 * spatial_dims + 1` groups; group 2a moves one step forward along spatial axis a, group 2a + 1
    one step back, the last group stays; vacated places are zero. `(n, C, *S) -> (n, C, *S)`."""
    out = torch.zeros_like(x)
    groups = 2 * spatial_dims + 1
    size = x.shape[1] // groups
    for g in range(groups - 1):
        axis, step = 2 + g // 2, 1 if g % 2 == 0 else -1
        chans = slice(g * size, (g + 1) * size)
        n = x.shape[axis]
        src = [slice(None)] * x.dim()
        dst = [slice(None)] * x.dim()
        src[1] = dst[1] = chans
        src[axis], dst[axis] = (slice(0, n - 1), slice(1, n)) if step == 1 else (slice(1, n), slice(0, n - 1))
        out[tuple(dst)] = x[tuple(src)]
    rest = slice((groups - 1) * size, None)  # the unshifted group (and the channels left over)
    out[:, rest] = x[:, rest]
    return out


class ShiftBlock(nn.Module):
    """Shift-conv residual block: shift, 1^d conv (with the stride), norm, ReLU, shift, 1^d conv, norm;
    plus the skip. The spatial mixing costs no MACs: every multiply is in the 1^d convolutions."""

    def __init__(self, cin: int, cout: int, stride: int, spatial_dims: int, norm: str) -> None:
        super().__init__()
        conv = _CONV[spatial_dims]
        self.spatial_dims = spatial_dims
        self.conv1 = nn.Sequential(
            conv(cin, cout, 1, stride, bias=False), _norm(norm, cout, spatial_dims), nn.ReLU(inplace=True)
        )
        self.conv2 = nn.Sequential(conv(cout, cout, 1, bias=False), _norm(norm, cout, spatial_dims))
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(conv(cin, cout, 1, stride, bias=False), _norm(norm, cout, spatial_dims))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(spatial_shift(x, self.spatial_dims))
        y = self.conv2(spatial_shift(y, self.spatial_dims))
        return self.act(y + self.skip(x))


_BLOCKS["shift"] = ShiftBlock


class ConvEncoder(nn.Module):
    """A ResNet-like CNN for 2D or 3D patches: stem (stride 2), stages (each halves the size), global pool.

    Args:
        widths: channels per stage; depths: blocks per stage; block: 'basic' | 'se' | 'inverted' | 'fire' | 'shift'.
        inner: each block's inner channels in order (None: the block's default); `ips.model.pruning`
            narrows them, and `arch` holds every argument, so a pruned encoder rebuilds from it.
    Shapes: `(n, in_chans, *spatial) -> (n, widths[-1])`.
    """

    def __init__(
        self,
        *,
        in_chans: int,
        spatial_dims: int,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        block: str = "basic",
        norm: str = "group",
        stem_pool: bool = False,
        inner: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in _CONV:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        n_blocks = sum(depths)
        if inner is not None and len(inner) != n_blocks:
            raise ValueError(f"inner: {len(inner)} channel counts for {n_blocks} blocks")
        self.arch = {
            "in_chans": in_chans,
            "spatial_dims": spatial_dims,
            "widths": tuple(widths),
            "depths": tuple(depths),
            "block": block,
            "norm": norm,
            "stem_pool": stem_pool,
            "inner": None if inner is None else tuple(inner),
        }
        conv = _CONV[spatial_dims]
        layers: list[nn.Module] = [
            conv(in_chans, widths[0], 3 if not stem_pool else 7, 2, 1 if not stem_pool else 3, bias=False),
            _norm(norm, widths[0], spatial_dims),
            nn.ReLU(inplace=True),
        ]
        if stem_pool:
            layers.append(_MAXPOOL[spatial_dims](3, 2, 1))
        first_block = len(layers)  # net[first_block + k] is block k
        cin = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths)):
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                kwargs: dict = {"se": True} if block == "se" else {}
                if inner is not None:
                    kwargs["inner"] = inner[len(layers) - first_block]
                layers.append(_BLOCKS[block](cin, width, stride, spatial_dims, norm, **kwargs))
                cin = width
        layers += [_POOL[spatial_dims](1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.first_block = first_block
        self.out_dim = widths[-1]
        # total downsampling: a patch smaller than this has no spatial extent left in the last stage
        self.min_patch_size = 2 ** (len(widths) + (2 if stem_pool else 1) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@register_encoder
def ips_cnn_tiny(*, in_chans: int, spatial_dims: int, norm: str = "group") -> ConvEncoder:
    """A few thousand parameters: for tests and CPU demos."""
    return ConvEncoder(in_chans=in_chans, spatial_dims=spatial_dims, widths=(8, 16), depths=(1, 1), norm=norm)


@register_encoder
def ips_cnn_small(*, in_chans: int, spatial_dims: int, norm: str = "group") -> ConvEncoder:
    return ConvEncoder(
        in_chans=in_chans, spatial_dims=spatial_dims, widths=(16, 32, 64), depths=(1, 1, 1), norm=norm
    )


@register_encoder
def ips_resnet10(*, in_chans: int, spatial_dims: int, norm: str = "group") -> ConvEncoder:
    """ResNet-10 widths (MedicalNet-like): fit for 64^3-128^3 volume patches."""
    return ConvEncoder(
        in_chans=in_chans,
        spatial_dims=spatial_dims,
        widths=(32, 64, 128, 256),
        depths=(1, 1, 1, 1),
        stem_pool=True,
        norm=norm,
    )


@register_encoder
def ips_resnet18(*, in_chans: int, spatial_dims: int, norm: str = "group") -> ConvEncoder:
    return ConvEncoder(
        in_chans=in_chans,
        spatial_dims=spatial_dims,
        widths=(64, 128, 256, 512),
        depths=(2, 2, 2, 2),
        stem_pool=True,
        norm=norm,
    )


def _resnet10_variant(block: str, *, in_chans: int, spatial_dims: int, norm: str) -> ConvEncoder:
    """ips_resnet10's small widths (32-256, one block a stage) with another block kind."""
    return ConvEncoder(
        in_chans=in_chans,
        spatial_dims=spatial_dims,
        widths=(32, 64, 128, 256),
        depths=(1, 1, 1, 1),
        block=block,
        stem_pool=True,
        norm=norm,
    )


@register_encoder
def ips_se_resnet10(*, in_chans: int, spatial_dims: int, norm: str = "group") -> ConvEncoder:
    return _resnet10_variant("se", in_chans=in_chans, spatial_dims=spatial_dims, norm=norm)


@register_encoder
def ips_mobile10(*, in_chans: int, spatial_dims: int, norm: str = "group") -> ConvEncoder:
    """Inverted-bottleneck (depthwise) variant of ips_resnet10."""
    return _resnet10_variant("inverted", in_chans=in_chans, spatial_dims=spatial_dims, norm=norm)


@register_encoder
def ips_fire10(*, in_chans: int, spatial_dims: int, norm: str = "group") -> ConvEncoder:
    """Fire-module (SqueezeNet) variant of ips_resnet10."""
    return _resnet10_variant("fire", in_chans=in_chans, spatial_dims=spatial_dims, norm=norm)


@register_encoder
def ips_shift10(*, in_chans: int, spatial_dims: int, norm: str = "group") -> ConvEncoder:
    """Shift-conv variant of ips_resnet10: zero-MAC spatial shifts before 1^d convolutions."""
    return _resnet10_variant("shift", in_chans=in_chans, spatial_dims=spatial_dims, norm=norm)


class FeatureProjector(nn.Module):
    """Precomputed features `(n, F)` -> `(n, out_dim)`: the 'encoder' of the features mode."""

    def __init__(self, *, feature_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim, out_dim), nn.LayerNorm(out_dim), nn.GELU())
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_encoder_weights(
    encoder: nn.Module, path: Path, *, name: str, norm: str, in_chans: int, spatial_dims: int
) -> None:
    """Load a state_dict file (e.g. `ips pretrain`'s encoder.pt) into one of our encoders.

    A file that does not fit raises a one-line ConfigError naming `model.pretrained`: first from the
    `encoder.json` beside it (written by `ips pretrain`: encoder, encoder_norm, in_chans, spatial_dims),
    else from the state_dict's keys and shapes (BatchNorm files hold running statistics, GroupNorm ones not).
    """
    import json

    want = {"encoder": name, "encoder_norm": norm, "in_chans": in_chans, "spatial_dims": spatial_dims}
    meta_path = path.with_name("encoder.json") if path.name == "encoder.pt" else path.with_suffix(".json")
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        diff = [
            f"model.{k}={meta[k]!r} there, {v!r} here" for k, v in want.items() if k in meta and meta[k] != v
        ]
        if diff:
            raise ConfigError(
                f"model.pretrained: {path} was pretrained for another encoder ({'; '.join(diff)}); "
                "pretrain again with this config or set the same keys"
            )
    from ips.errors import CheckpointError
    from ips.model.torchfile import read_torch_file

    try:
        state = read_torch_file(path, what="weights file")
    except CheckpointError as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(
            f"model.pretrained: {path} is not an encoder state_dict (ips pretrain writes encoder.pt)"
        )
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        has_bn = any(k.endswith("running_mean") for k in state)
        hint = (
            f"the file holds {'BatchNorm' if has_bn else 'GroupNorm'} weights: set model.encoder_norm="
            f"{'batch' if has_bn else 'group'} or pretrain again"
            if has_bn != any(k.endswith("running_mean") for k in own)
            else f"{len(missing)} weights missing, {len(unexpected)} unexpected (e.g. "
            f"{(missing or unexpected)[0]!r}): another model.encoder?"
        )
        raise ConfigError(
            f"model.pretrained: {path} does not fit encoder {name!r} with encoder_norm {norm!r}; {hint}"
        )
    bad = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if bad:
        raise ConfigError(
            f"model.pretrained: {path} does not fit encoder {name!r}: {bad[0]} has shape "
            f"{tuple(state[bad[0]].shape)} there, {tuple(own[bad[0]].shape)} here "
            "(model.in_chans or model.encoder differ?)"
        )
    encoder.load_state_dict(state)


def _timm_encoder(name: str, *, in_chans: int, pretrained: bool | str) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise ConfigError(
            f"model.encoder: unknown encoder {name!r}; use one of ours ({', '.join(list_encoders())}), "
            f"a foundation encoder ({', '.join(list_foundation())}), 'features', or a timm model name "
            "(timm.list_models())"
        )
    kwargs: dict = {"num_classes": 0, "in_chans": in_chans}
    if isinstance(pretrained, str):
        path = Path(pretrained)
        if not path.is_file():
            raise ConfigError(f"model.pretrained: weights file {path} does not exist")
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
    else:
        kwargs["pretrained"] = bool(pretrained)
    model = timm.create_model(name, **kwargs)
    model.out_dim = model.num_features
    return model


def build_encoder(
    name: str,
    *,
    in_chans: int,
    spatial_dims: int,
    patch_size: int,
    pretrained: bool | str = False,
    feature_dim: int | None = None,
    d_model: int = 128,
    norm: str | None = None,
    inner: tuple[int, ...] | None = None,
    widths: tuple[int, ...] | None = None,
    token_keep: float = 1.0,
) -> nn.Module:
    """Build an encoder by name and check that it takes `patch_size` patches; the result has `out_dim`.

    `norm` ('group' | 'batch'; None = DEFAULT_NORM) applies to our `ips_*` encoders only: timm models keep their
    own normalisation. `inner`: our CNNs' per-block inner channels (`model.encoder_inner`, a pruned
    encoder); `widths`: their per-stage channels (`model.encoder_widths`, the first one also the stem's;
    a stem-pruned encoder). `token_keep`: the token-pruning ViTs' keep share (`ips.model.token_vit`). Raises ConfigError naming the key when the name is unknown, the norm does not
    apply, or the patch size does not fit.
    """
    if norm is not None and name not in _REGISTRY:
        raise ConfigError(
            f"model.encoder_norm: applies to the ips_* encoders only, not {name!r} (timm models keep their own)"
        )
    if inner is not None and name not in _REGISTRY:
        raise ConfigError(f"model.encoder_inner: applies to the ips_* CNNs only, not {name!r}")
    if widths is not None and name not in _REGISTRY:
        raise ConfigError(f"model.encoder_widths: applies to the ips_* CNNs only, not {name!r}")
    from ips.model.token_vit import TOKEN_VITS, build_token_vit

    if name in TOKEN_VITS:
        if norm is not None or pretrained is not False:
            raise ConfigError(f"model.encoder: {name!r} takes neither encoder_norm nor pretrained weights")
        if spatial_dims != 2:
            raise ConfigError(f"model.encoder: {name!r} is a 2D encoder, got spatial_dims={spatial_dims}")
        return build_token_vit(name, in_chans=in_chans, patch_size=patch_size, keep=token_keep)
    if is_foundation(name):
        return _foundation_encoder(name, in_chans=in_chans, spatial_dims=spatial_dims, pretrained=pretrained)
    if name == "features":
        if feature_dim is None:
            raise ConfigError("model.feature_dim: required for encoder 'features'")
        return FeatureProjector(feature_dim=feature_dim, out_dim=d_model)
    if name in _REGISTRY:
        if pretrained is not False:
            if not isinstance(pretrained, str):
                raise ConfigError(f"model.pretrained: encoder {name!r} has no hub weights; give a local file")
        encoder = _REGISTRY[name](in_chans=in_chans, spatial_dims=spatial_dims, norm=norm or DEFAULT_NORM)
        if inner is not None or widths is not None:
            encoder = _reshaped(encoder, name, inner=inner, widths=widths)
        if isinstance(pretrained, str):
            path = Path(pretrained)
            if not path.is_file():
                raise ConfigError(f"model.pretrained: weights file {path} does not exist")
            load_encoder_weights(
                encoder,
                path,
                name=name,
                norm=norm or DEFAULT_NORM,
                in_chans=in_chans,
                spatial_dims=spatial_dims,
            )
        min_size = getattr(encoder, "min_patch_size", 1)
        if patch_size < min_size:
            raise ConfigError(
                f"model.patch_size: {patch_size} is smaller than encoder {name!r} needs (>= {min_size})"
            )
        return encoder
    if spatial_dims == 3:
        raise ConfigError(
            f"model.encoder: {name!r} is not a 3D encoder; for spatial_dims 3 use one of {', '.join(list_encoders())}"
        )
    encoder = _timm_encoder(name, in_chans=in_chans, pretrained=pretrained)
    _check_patch_size(encoder, name, in_chans=in_chans, spatial_dims=spatial_dims, patch_size=patch_size)
    return encoder


def _reshaped(
    encoder: nn.Module, name: str, *, inner: tuple[int, ...] | None, widths: tuple[int, ...] | None
) -> ConvEncoder:
    """`encoder` rebuilt with `inner` channels per block and `widths` channels per stage (None: as
    built; fresh weights); ConfigError naming `model.encoder_inner` / `model.encoder_widths` when they
    do not fit."""
    arch = getattr(encoder, "arch", None)
    if not isinstance(encoder, ConvEncoder) or arch is None:
        key = "encoder_inner" if inner is not None else "encoder_widths"
        raise ConfigError(f"model.{key}: encoder {name!r} has no channels to set")
    counts = {"encoder_inner": (inner, sum(arch["depths"]), "blocks")}
    counts["encoder_widths"] = (widths, len(arch["widths"]), "stages")
    for key, (given, n, what) in counts.items():
        if given is None:
            continue
        if len(given) != n:
            raise ConfigError(f"model.{key}: {name!r} has {n} {what}, got {len(given)} channel counts")
        bad = [c for c in given if arch["norm"] == "group" and c % min(8, c)]
        if bad:
            raise ConfigError(
                f"model.{key}: {bad[0]} channels do not split into GroupNorm's {min(8, bad[0])} groups"
            )
    if widths is not None and arch["block"] == "se" and tuple(widths) != arch["widths"]:
        # the squeeze-excitation gate's width follows its block's: other widths would not load its weights
        raise ConfigError(f"model.encoder_widths: {name!r} (squeeze-excitation blocks) keeps its widths")
    new = {"inner": tuple(inner) if inner is not None else arch["inner"]}
    if widths is not None:
        new["widths"] = tuple(widths)
    return ConvEncoder(**{**arch, **new})


def _foundation_encoder(name: str, *, in_chans: int, spatial_dims: int, pretrained: bool | str) -> nn.Module:
    """A pathology foundation encoder of the catalog (`ips.foundation`): RGB 2D patches of any size (each
    is resized to the model's input size), so no patch-size probe is needed."""
    from ips.model.foundation import build_foundation

    if spatial_dims != 2 or in_chans != 3:
        raise ConfigError(
            f"model.encoder: {name!r} encodes RGB 2D patches; got in_chans={in_chans}, spatial_dims={spatial_dims}"
        )
    return build_foundation(name, pretrained=pretrained)


def _check_patch_size(
    encoder: nn.Module, name: str, *, in_chans: int, spatial_dims: int, patch_size: int
) -> None:
    """One dummy forward: the only check that fits every timm architecture (ViTs fix their input size)."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            out = encoder(torch.zeros(1, in_chans, *([patch_size] * spatial_dims)))
    except Exception as e:  # noqa: BLE001 - any failure means the size does not fit
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.patch_size: {patch_size} does not fit encoder {name!r}: {first_line}"
        ) from None
    finally:
        encoder.train(was_training)
    if out.ndim != 2:
        raise ConfigError(f"model.encoder: {name!r} returns shape {tuple(out.shape)}, expected (n, features)")
