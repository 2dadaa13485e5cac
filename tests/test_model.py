import pytest
import torch

from ips.config import ConfigError, ModelConfig, TaskConfig
from ips.model.encoders import build_encoder, list_encoders
from ips.model.ips_model import build_model

TASKS = (
    TaskConfig(name="bin", kind="binary"),
    TaskConfig(name="multi", kind="multiclass", num_classes=4),
    TaskConfig(name="ml", kind="multilabel", num_classes=3),
)

CASES = [
    # encoder, spatial_dims, in_chans, patch_size
    ("ips_cnn_tiny", 2, 3, 16),
    ("ips_cnn_tiny", 3, 1, 8),
    ("ips_se_resnet10", 3, 1, 32),
    ("ips_mobile10", 2, 3, 32),
    ("ips_fire10", 3, 2, 32),
    ("resnet18", 2, 3, 32),  # a timm model
]


@pytest.mark.parametrize(("encoder", "dims", "chans", "patch"), CASES)
def test_forward_backward(encoder, dims, chans, patch):
    torch.manual_seed(0)
    cfg = ModelConfig(
        encoder=encoder,
        spatial_dims=dims,
        in_chans=chans,
        patch_size=patch,
        d_model=48,
        n_heads=4,
        d_mlp=32,
        tasks=TASKS,
    )
    model = build_model(cfg)
    b, m = 2, 3
    patches = torch.randint(0, 256, (b, m, chans, *([patch] * dims)), dtype=torch.uint8)
    positions = torch.rand(b, m, dims) * 10
    logits, attn = model(patches, positions)
    assert logits["bin"].shape == (b, 1) and logits["multi"].shape == (b, 4) and logits["ml"].shape == (b, 3)
    assert attn.shape == (b, len(TASKS), 4, m)
    loss = sum(v.float().pow(2).mean() for v in logits.values())
    loss.backward()
    assert all(torch.isfinite(v).all() for v in logits.values())
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing}"
    # timm ResNets zero-initialise the last norm of each block, so their inner convs start with zero grads
    zero = [n for n, p in model.named_parameters() if p.grad.abs().sum() == 0 and encoder.startswith("ips_")]
    assert not zero, f"parameters with an all-zero gradient: {zero}"


def test_features_mode():
    cfg = ModelConfig(encoder="features", feature_dim=20, d_model=16, n_heads=2, d_mlp=16, tasks=TASKS[:1])
    model = build_model(cfg)
    logits, attn = model(torch.randn(3, 5, 20), torch.rand(3, 5, 2))
    assert logits["bin"].shape == (3, 1) and attn.shape == (3, 1, 2, 5)


def test_padding_mask_matches_unpadded_bag():
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="features", feature_dim=8, d_model=16, n_heads=2, d_mlp=16))
    model.eval()
    x, pos = torch.randn(1, 3, 8), torch.rand(1, 3, 2)
    ref, _ = model(x, pos)
    padded = torch.cat([x, torch.randn(1, 2, 8) * 100], dim=1)
    pos_p = torch.cat([pos, torch.rand(1, 2, 2)], dim=1)
    mask = torch.tensor([[True, True, True, False, False]])
    out, _ = model(padded, pos_p, mask)
    torch.testing.assert_close(out["label"], ref["label"])


def test_registry_lists_tiny_variant():
    assert "ips_cnn_tiny" in list_encoders()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"name": "not_a_model", "spatial_dims": 2, "patch_size": 32},
            r"model.encoder: unknown encoder 'not_a_model'",
        ),
        ({"name": "resnet18", "spatial_dims": 3, "patch_size": 32}, r"not a 3D encoder"),
        ({"name": "ips_resnet10", "spatial_dims": 2, "patch_size": 8}, r"model.patch_size: 8 is smaller"),
        (
            {"name": "vit_tiny_patch16_224", "spatial_dims": 2, "patch_size": 64},
            r"model.patch_size: 64 does not fit encoder 'vit_tiny_patch16_224'",
        ),
        (
            {"name": "ips_cnn_tiny", "spatial_dims": 2, "patch_size": 32, "pretrained": "/no/such/file.pth"},
            r"model.pretrained: weights file",
        ),
        (
            {"name": "ips_cnn_tiny", "spatial_dims": 2, "patch_size": 32, "pretrained": True},
            r"no hub weights",
        ),
        (
            {"name": "resnet18", "spatial_dims": 2, "patch_size": 32, "pretrained": "/no/such/file.pth"},
            r"model.pretrained: weights file",
        ),
    ],
)
def test_bad_encoder_arguments(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_encoder(in_chans=3, **kwargs)


def test_local_weights_file(tmp_path):
    torch.manual_seed(1)
    enc = build_encoder("ips_cnn_tiny", in_chans=1, spatial_dims=3, patch_size=8)
    path = tmp_path / "w.pth"
    torch.save(enc.state_dict(), path)
    torch.manual_seed(2)
    loaded = build_encoder("ips_cnn_tiny", in_chans=1, spatial_dims=3, patch_size=8, pretrained=str(path))
    for (k, a), (_, b) in zip(enc.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_encoder_norm_option():
    """`model.encoder_norm` swaps the normalisation of our encoders, and is refused where it cannot apply."""
    from ips.config import ModelConfig
    from ips.model.ips_model import build_model

    def kinds(m):
        return {
            type(x).__name__
            for x in m.modules()
            if "Norm" in type(x).__name__ and "Layer" not in type(x).__name__
        }

    for spatial_dims in (2, 3):
        enc = build_encoder(
            "ips_resnet10", in_chans=1, spatial_dims=spatial_dims, patch_size=32, norm="batch"
        )
        assert kinds(enc) == {f"BatchNorm{spatial_dims}d"}
        # unset: BatchNorm, the recipe's default (ips.model.encoders.DEFAULT_NORM)
        assert kinds(build_encoder("ips_resnet10", in_chans=1, spatial_dims=spatial_dims, patch_size=32)) == {
            f"BatchNorm{spatial_dims}d"
        }
        group = build_encoder(
            "ips_resnet10", in_chans=1, spatial_dims=spatial_dims, patch_size=32, norm="group"
        )
        assert kinds(group) == {"GroupNorm"}
    model = build_model(
        ModelConfig(
            encoder="ips_cnn_tiny", encoder_norm="batch", patch_size=16, d_model=16, n_heads=2, d_mlp=16
        )
    )
    assert kinds(model) == {"BatchNorm2d"}
    with pytest.raises(
        ConfigError, match=r"model.encoder_norm: applies to the ips_\* encoders only, not 'resnet18'"
    ):
        build_encoder("resnet18", in_chans=3, spatial_dims=2, patch_size=32, norm="batch")
    with pytest.raises(
        ConfigError, match=r"model.encoder_norm: applies to the ips_\* encoders only, not 'features'"
    ):
        build_encoder("features", in_chans=3, spatial_dims=2, patch_size=32, feature_dim=8, norm="group")
    with pytest.raises(ConfigError, match=r"model.encoder_norm"):
        ModelConfig(encoder="ips_cnn_tiny", encoder_norm="layer")


@pytest.mark.parametrize(("dims", "chans", "norm"), [(2, 1, "batch"), (2, 3, "group"), (3, 1, "batch")])
def test_constant_patches_are_encoded_once_with_the_same_result(dims, chans, norm):
    """No grad + eval mode: each distinct constant patch is encoded once, and every embedding equals the
    one the plain encoder gives (Megapixel MNIST canvases are mostly blank)."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        encoder="ips_cnn_tiny",
        spatial_dims=dims,
        in_chans=chans,
        patch_size=8,
        encoder_norm=norm,
        tasks=TASKS,
    )
    model = build_model(cfg).eval()
    shape = (chans, *([8] * dims))
    x = torch.zeros(20, *shape, dtype=torch.uint8)  # 20 patches: blank unless set below
    x[2] = torch.randint(0, 256, shape, dtype=torch.uint8)
    x[11] = torch.randint(0, 256, shape, dtype=torch.uint8)
    x[5] = x[7] = x[17] = 255  # a second constant value
    x[9, 0] = 3  # a third colour: (3, 0, 0) in RGB, 3 in grey
    x[13] = 3 if chans == 1 else x[9]  # the same colour again
    x[15, ..., 0] = 7  # not constant
    seen: list[int] = []
    model.encoder.register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])))
    with torch.no_grad():
        plain = model.project(model.encoder(model.normalize(x)))
        once = model.embed_content(x)
    assert torch.allclose(once, plain, atol=1e-6, rtol=0)
    assert seen == [20, 6]  # 3 varied patches + 3 distinct colours (0, 255, the ninth's)
    # with gradients or in train mode (BatchNorm batch statistics) every patch goes through the encoder
    model.train()
    seen.clear()
    with torch.no_grad():
        model.embed_content(x)
    model.eval()
    model.embed_content(x)
    assert seen == [20, 20]
