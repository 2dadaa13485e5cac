"""Channel pruning of our CNN encoders, the hook MAC counter, and `ips prune`: exact properties against
hand counts and independent constructions."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from ips.cli.main import main
from ips.config import ConfigError, ModelConfig
from ips.model.checkpoint import load_model
from ips.model.encoders import build_encoder
from ips.model.ips_model import build_model
from ips.model.macs import count_macs
from ips.model.pruning import (
    LAYOUTS,
    channel_importance,
    encoder_blocks,
    kept_count,
    plan_pruning,
    prune_model,
    stream_importance,
)

# (encoder, dims, patch): every block type (basic, SE, inverted, Fire) in 2D and 3D
CASES = [
    ("ips_cnn_tiny", 2, 16),
    ("ips_cnn_tiny", 3, 8),
    ("ips_se_resnet10", 2, 32),
    ("ips_mobile10", 3, 32),
    ("ips_fire10", 2, 32),
]


def _cfg(encoder: str, dims: int, patch: int, norm: str = "batch") -> ModelConfig:
    return ModelConfig(
        encoder=encoder,
        encoder_norm=norm,
        in_chans=2,
        spatial_dims=dims,
        patch_size=patch,
        d_model=16,
        n_heads=2,
        d_mlp=16,
    )


def _trained_looking(model: nn.Module, seed: int) -> None:
    """Random norm scales, shifts and running statistics: importance then differs between channels."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 - 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                if getattr(m, "running_var", None) is not None:
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)


def _inputs(cfg: ModelConfig, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shape = (1, n, cfg.in_chans, *([cfg.patch_size] * cfg.spatial_dims))
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g), torch.zeros(1, n, cfg.spatial_dims)


@pytest.mark.parametrize("encoder,dims,patch", CASES)
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_ratio_zero_is_the_same_model(encoder, dims, patch, norm):
    torch.manual_seed(0)
    cfg = _cfg(encoder, dims, patch, norm)
    model = build_model(cfg).eval()
    _trained_looking(model, 0)
    pruned, new_cfg = prune_model(model, cfg, ratio=0.0)
    x, pos = _inputs(cfg)
    with torch.no_grad():
        (a, la), (b, lb) = model(x, pos), pruned(x, pos)
    assert torch.equal(a["label"], b["label"]) and torch.equal(la, lb)
    assert new_cfg.encoder_inner == tuple(
        blk.get_submodule(LAYOUTS[type(blk)].score[0]).out_channels for blk in encoder_blocks(model.encoder)
    )


@pytest.mark.parametrize("encoder,dims,patch", CASES)
def test_pruning_equals_silencing_the_dropped_channels(encoder, dims, patch):
    """Oracle built another way: in eval mode a BatchNorm channel with scale 0 and shift 0 outputs 0, the
    ReLU keeps 0, so the next convolution reads nothing from it: the unpruned model with the dropped
    channels silenced must compute what the pruned model computes. The dropped ones must be the least
    important by the hand formula |gamma| / sqrt(var + eps) * L1(filter)."""
    torch.manual_seed(0)
    cfg = _cfg(encoder, dims, patch)
    model = build_model(cfg).eval()
    _trained_looking(model, 1)
    pruned, new_cfg = prune_model(model, cfg, ratio=0.5)
    silenced = build_model(cfg).eval()
    silenced.load_state_dict(model.state_dict())
    for blk, kept_n in zip(encoder_blocks(silenced.encoder), new_cfg.encoder_inner):
        conv_name, norm_name = LAYOUTS[type(blk)].score
        conv, norm = blk.get_submodule(conv_name), blk.get_submodule(norm_name)
        w, g, var = conv.weight.detach(), norm.weight.detach(), norm.running_var
        by_hand = [
            float(w[c].abs().sum() * g[c].abs() / torch.sqrt(var[c] + norm.eps))
            for c in range(conv.out_channels)
        ]
        assert torch.allclose(channel_importance(blk), torch.tensor(by_hand), rtol=1e-5)
        assert kept_n == kept_count(conv.out_channels, 0.5, group_norm=False) < conv.out_channels
        dropped = sorted(range(len(by_hand)), key=lambda c: by_hand[c])[: conv.out_channels - kept_n]
        with torch.no_grad():
            norm.weight[dropped] = 0.0
            norm.bias[dropped] = 0.0
    x, pos = _inputs(cfg)
    with torch.no_grad():
        (a, _), (b, _) = silenced(x, pos), pruned(x, pos)
    assert torch.allclose(a["label"], b["label"], rtol=1e-4, atol=1e-5)
    assert count_macs(pruned.encoder, x[0].float()) < count_macs(model.encoder, x[0].float())


def test_mac_counter_against_hand_counts():
    conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # 16x16 -> 8x8
    assert count_macs(conv, torch.zeros(2, 3, 16, 16)) == 8 * 8 * 8 * 3 * 9
    dw = nn.Conv3d(6, 6, 3, padding=1, groups=3)  # two input channels per group
    assert count_macs(dw, torch.zeros(1, 6, 4, 4, 4)) == 6 * 4**3 * 2 * 27
    lin = nn.Linear(10, 7)
    assert count_macs(lin, torch.zeros(5, 4, 10)) == 4 * 7 * 10  # per item of the batch of 5
    from timm.layers import Attention

    attn = Attention(8, num_heads=2)  # 5 tokens: qkv 5*24*8, q@k and attn@v 2*5*5*8, proj 5*8*8
    assert count_macs(attn, torch.zeros(1, 5, 8)) == 5 * 24 * 8 + 2 * 5 * 5 * 8 + 5 * 8 * 8
    relu = nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3))
    assert count_macs(relu, torch.zeros(1, 3, 4, 4)) == 0


def test_pruned_tiny_encoder_macs_by_hand():
    """ips_cnn_tiny at 16 px: stem 3x3/2 (3 -> 8, 8x8 out); block 1 8 -> i1 -> 8 at 8x8; block 2 8 -> i2
    -> 16 at 4x4 with a 1x1/2 skip. MACs = 64*8*3*9 + 2*64*9*8*i1 + 16*9*(8 + 16)*i2 + 16*16*8."""
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="ips_cnn_tiny", in_chans=3, patch_size=16, d_model=16, n_heads=2, d_mlp=16)
    model = build_model(cfg).eval()
    pruned, new_cfg = prune_model(model, cfg, ratio=0.5)
    assert new_cfg.encoder_inner == (4, 8)

    def by_hand(i1: int, i2: int) -> int:
        return 64 * 8 * 3 * 9 + 2 * 64 * 9 * 8 * i1 + 16 * 9 * (8 + 16) * i2 + 16 * 16 * 8

    x = torch.zeros(1, 3, 16, 16)
    assert count_macs(model.encoder, x) == by_hand(8, 16)
    assert count_macs(pruned.encoder, x) == by_hand(4, 8)


def test_kept_count_rounds_for_group_norm():
    assert kept_count(64, 0.5, group_norm=False) == 32
    assert kept_count(40, 0.5, group_norm=True) == 24  # 20 -> a multiple of 8
    assert kept_count(16, 0.6, group_norm=True) == 6  # below 8: one channel per group
    assert kept_count(3, 0.99, group_norm=False) == 1  # never none
    assert kept_count(16, 0.0, group_norm=True) == 16


def test_bad_inner_channels_and_ratios():
    with pytest.raises(ConfigError, match="model.encoder_inner.*2 blocks"):
        build_encoder("ips_cnn_tiny", in_chans=1, spatial_dims=2, patch_size=16, inner=(4,))
    with pytest.raises(ConfigError, match="model.encoder_inner.*GroupNorm"):
        build_encoder("ips_cnn_tiny", in_chans=1, spatial_dims=2, patch_size=16, norm="group", inner=(4, 12))
    with pytest.raises(ConfigError, match="model.encoder_inner.*ips_\\* CNNs"):
        build_encoder("resnet18", in_chans=3, spatial_dims=2, patch_size=32, inner=(4,))
    with pytest.raises(ConfigError, match="model.encoder_inner"):
        ModelConfig(encoder="ips_cnn_tiny", encoder_inner=(0, 4))
    cfg = _cfg("ips_cnn_tiny", 2, 16)
    with pytest.raises(ConfigError, match="--ratio"):
        prune_model(build_model(cfg), cfg, ratio=1.0)
    feats = ModelConfig(encoder="features", feature_dim=8, d_model=16, n_heads=2)
    with pytest.raises(ConfigError, match="only our ips_\\* CNN"):
        prune_model(build_model(feats), feats, ratio=0.5)


def test_cli_prune_writes_a_checkpoint_that_loads_and_predicts(tmp_path):
    from inference_fixtures import make_store, tiny_cfg, write_checkpoint

    cfg = tiny_cfg(encoder_norm="batch")
    ckpt = write_checkpoint(tmp_path / "c.pt", cfg)
    out = tmp_path / "pruned"
    assert (
        main(["prune", "--checkpoint", str(ckpt), "--ratio", "0.5", "--out", str(out), "--threads", "1"]) == 0
    )
    report = json.loads((out / "prune.json").read_text())
    model, loaded_cfg = load_model(out / "pruned.pt")
    assert loaded_cfg.model.encoder_inner == tuple(report["encoder_inner"]) == (4, 8)
    assert report["after"]["macs_per_patch"] < report["before"]["macs_per_patch"]
    assert report["after"]["params"] == sum(p.numel() for p in model.parameters())
    original, _ = load_model(ckpt)
    expected, _ = prune_model(original, cfg.model, ratio=0.5)
    x, pos = _inputs(cfg.model)
    with torch.no_grad():
        assert torch.equal(model(x, pos)[0]["a"], expected(x, pos)[0]["a"])  # the round trip is exact
    store = make_store(tmp_path / "stores", "s1", size=(64, 64))
    rc = main(["predict", "--checkpoint", str(out / "pruned.pt"), str(store), "--out", str(tmp_path / "p")])
    assert rc == 0 and (tmp_path / "p" / "predictions.csv").is_file()


def test_cli_prune_bad_usage(tmp_path, capsys):
    from inference_fixtures import tiny_cfg, write_checkpoint

    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_cfg())
    argv = ["prune", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]
    assert main([*argv, "--ratio", "1.5"]) == 2
    assert main([*argv, "--keep", "0.5"]) == 2  # a CNN has no tokens
    assert "--keep" in capsys.readouterr().err
    assert main([*argv, "--ratio", "0.5", "--epochs", "1"]) == 2  # no manifest to fine-tune on


@pytest.mark.slow
@pytest.mark.parametrize("stem", ["0", "0.5"])
def test_cli_prune_fine_tunes_from_the_pruned_weights(tmp_path, stem):
    from inference_fixtures import make_store, tiny_cfg, write_checkpoint

    rows = ["slide_id,path,a,split"]
    for i in range(4):
        store = make_store(tmp_path / "stores", f"s{i}", size=(64, 64), seed=i)
        rows.append(f"s{i},{store},{i % 2},{'train' if i < 3 else 'val'}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    ckpt = write_checkpoint(tmp_path / "c.pt", tiny_cfg(encoder_norm="batch"))
    out = tmp_path / "ft"
    argv = ["prune", "--checkpoint", str(ckpt), "--ratio", "0.5", "--out", str(out), "--epochs", "1"]
    argv += ["--stem", stem]
    rc = main([*argv, "--manifest", str(manifest), "--quiet", "--threads", "1", "train.batch_size=2"])
    assert rc == 0
    tuned, tuned_cfg = load_model(out / "checkpoints" / "best.pt")
    start, _ = load_model(out / "pruned.pt")
    assert tuned_cfg.model.encoder_inner == (4, 8) and tuned_cfg.train.epochs == 1
    assert tuned_cfg.model.encoder_widths == (None if stem == "0" else (4, 16))
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert any(k.startswith("encoder.") for k in changed)  # trained from the pruned weights


def test_bench_encoders_reports_pruned_variants(tmp_path):
    out = tmp_path / "e.json"
    argv = ["bench", "encoders", "--encoders-2d", "ips_cnn_tiny,ips_cnn_tiny@prune=0.5", "--encoders-3d", ""]
    small = ["--patch-2d", "16", "--batch-2d", "2", "--repeats", "1", "--threads", "1", "--json", str(out)]
    assert main([*argv, *small]) == 0
    base, pruned = json.loads(out.read_text())["encoders"]["rows"]
    assert pruned["base"] == "ips_cnn_tiny" and "base" not in base
    assert pruned["macs_vs_base"] == round(pruned["macs_per_patch"] / base["macs_per_patch"], 3) < 1
    assert pruned["params"] < base["params"] and pruned["infer_cpu_ms_per_patch"] > 0
    assert main([*argv[:3], "ips_cnn_tiny@shrink=0.5", *argv[4:], *small]) == 2


# the stem's channels with stage 1's stream: every block kind that can carry it, in 2D and 3D
STEM_CASES = [
    ("ips_cnn_tiny", 2, 16),
    ("ips_resnet10", 3, 32),
    ("ips_mobile10", 3, 32),
    ("ips_fire10", 2, 32),
]


def _writer_norms(encoder: nn.Module) -> list[nn.Module]:
    """The norms whose outputs are the stage-1 stream, found by walking the encoder (not through the
    pruning module's tables): the stem's norm, then each stage-1 block's last norm before its output."""
    depth1 = encoder.arch["depths"][0]
    norms = [encoder.net[1]]
    for k in range(depth1):
        block = encoder.net[encoder.first_block + k]
        last = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)][-1]
        norms.append(last)
    return norms


@pytest.mark.parametrize("encoder,dims,patch", STEM_CASES)
def test_stem_pruning_equals_silencing_the_dropped_stream_channels(encoder, dims, patch):
    """Oracle: in eval mode, a stream channel whose every writer's BatchNorm has scale 0 and shift 0 is 0
    from the stem through stage 1 (identity skips add 0 to 0), so every reader reads nothing from it.
    The unpruned model so silenced (inner and stream channels alike) computes what the narrow model
    computes."""
    torch.manual_seed(0)
    cfg = _cfg(encoder, dims, patch)
    model = build_model(cfg).eval()
    _trained_looking(model, 2)
    pruned, new_cfg = prune_model(model, cfg, ratio=0.5, stem=0.5)
    plan = plan_pruning(model.encoder, ratio=0.5, stem=0.5)
    width = model.encoder.arch["widths"][0]
    assert new_cfg.encoder_widths == (width // 2, *model.encoder.arch["widths"][1:])
    assert pruned.encoder.net[0].out_channels == len(plan.stream) == width // 2
    silenced = build_model(cfg).eval()
    silenced.load_state_dict(model.state_dict())
    dropped = sorted(set(range(width)) - set(plan.stream.tolist()))
    with torch.no_grad():
        for norm in _writer_norms(silenced.encoder):
            norm.weight[dropped] = 0.0
            norm.bias[dropped] = 0.0
        for blk, kept in zip(encoder_blocks(silenced.encoder), plan.inner):
            norm = blk.get_submodule(LAYOUTS[type(blk)].score[1])
            gone = sorted(set(range(norm.num_features)) - set(kept.tolist()))
            norm.weight[gone] = 0.0
            norm.bias[gone] = 0.0
    x, pos = _inputs(cfg)
    with torch.no_grad():
        (a, _), (b, _) = silenced(x, pos), pruned(x, pos)
        (c, _) = model(x, pos)
    assert torch.allclose(a["label"], b["label"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a["label"], c["label"], rtol=1e-4, atol=1e-5)  # the silencing mattered


def test_stem_channels_ranked_by_every_writer():
    """Stream importance by hand on ips_cnn_tiny (stem norm net.1, the stage-1 block's output norm
    body.4): sum over the two writers of |gamma| / sqrt(var + eps) * L1(filter), each over its mean.
    Channel 2 is made negligible in the stem only and channel 5 in the block only (each then ranks by
    the other writer); the 4 kept are the top 4 of the hand sum."""
    torch.manual_seed(0)
    cfg = _cfg("ips_cnn_tiny", 2, 16)
    model = build_model(cfg).eval()
    _trained_looking(model, 3)
    enc = model.encoder
    stem_conv, stem_norm = enc.net[0], enc.net[1]
    block = enc.net[enc.first_block]
    conv2, norm2 = block.body[3], block.body[4]
    with torch.no_grad():
        stem_conv.weight[2] *= 1e-4
        conv2.weight[5] *= 1e-4

    def part(conv: nn.Module, norm: nn.Module) -> torch.Tensor:
        w = conv.weight.detach()
        s = torch.stack([w[c].abs().sum() for c in range(w.shape[0])])
        s = s * norm.weight.detach().abs() / torch.sqrt(norm.running_var + norm.eps)
        return s / s.mean()

    by_hand = part(stem_conv, stem_norm) + part(conv2, norm2)
    assert torch.allclose(stream_importance(enc), by_hand, rtol=1e-5)
    plan = plan_pruning(enc, ratio=0.0, stem=0.5)
    expected = sorted(sorted(range(8), key=lambda c: -float(by_hand[c]))[:4])
    assert plan.stream.tolist() == expected


def test_fire_stream_keeps_half_of_each_expand():
    """A Fire block's output is [1^d expand | 3^d expand]; a narrower one splits K channels K // 2 and
    the rest, so the kept stream must take K // 2 from the first half."""
    torch.manual_seed(0)
    cfg = _cfg("ips_fire10", 2, 32)
    model = build_model(cfg).eval()
    _trained_looking(model, 4)
    for stem in (0.5, 0.6, 0.7):
        kept = plan_pruning(model.encoder, ratio=0.0, stem=stem).stream
        k = kept_count(32, stem, group_norm=False)
        assert len(kept) == k and int((kept < 16).sum()) == k // 2


def test_stem_pruned_resnet10_3d_macs_by_hand():
    """ips_resnet10 in 3D at 32^3, one channel: stem 7^3/2 (1 -> w, 16^3 out), max pool (8^3); stage 1
    w -> i1 -> w at 8^3; stage 2 w -> i2 -> 64 at 4^3 plus a 1^3/2 skip w -> 64; stage 3 64 -> i3 -> 128
    at 2^3 plus skip; stage 4 128 -> i4 -> 256 at 1^3 plus skip."""

    def by_hand(w: int, i1: int, i2: int, i3: int, i4: int) -> int:
        stem = 16**3 * w * 343
        s1 = 8**3 * 27 * (w * i1 + i1 * w)
        s2 = 4**3 * (27 * w * i2 + 27 * i2 * 64 + w * 64)
        s3 = 2**3 * (27 * 64 * i3 + 27 * i3 * 128 + 64 * 128)
        s4 = 1 * (27 * 128 * i4 + 27 * i4 * 256 + 128 * 256)
        return stem + s1 + s2 + s3 + s4

    torch.manual_seed(0)
    cfg = dataclasses.replace(_cfg("ips_resnet10", 3, 32), in_chans=1)
    model = build_model(cfg).eval()
    x = torch.zeros(1, 1, 32, 32, 32)
    assert count_macs(model.encoder, x) == by_hand(32, 32, 64, 128, 256)
    pruned, new_cfg = prune_model(model, cfg, ratio=0.5, stem=0.5)
    assert new_cfg.encoder_inner == (16, 32, 64, 128) and new_cfg.encoder_widths == (16, 64, 128, 256)
    assert count_macs(pruned.encoder, x) == by_hand(16, 16, 32, 64, 128)
    assert by_hand(16, 16, 32, 64, 128) * 2 <= by_hand(32, 32, 64, 128, 256)  # 2x fewer or more


def test_stem_pruning_refuses_what_it_cannot_narrow():
    se = _cfg("ips_se_resnet10", 2, 32)
    with pytest.raises(ConfigError, match="--stem.*squeeze-excitation"):
        prune_model(build_model(se), se, ratio=0.5, stem=0.5)
    tiny = _cfg("ips_cnn_tiny", 2, 16)
    with pytest.raises(ConfigError, match="--stem"):
        prune_model(build_model(tiny), tiny, ratio=0.5, stem=1.0)
    with pytest.raises(ConfigError, match="model.encoder_widths.*2 stages"):
        build_encoder("ips_cnn_tiny", in_chans=1, spatial_dims=2, patch_size=16, widths=(4,))
    with pytest.raises(ConfigError, match="model.encoder_widths.*GroupNorm"):
        build_encoder(
            "ips_cnn_tiny", in_chans=1, spatial_dims=2, patch_size=16, norm="group", widths=(12, 16)
        )
    with pytest.raises(ConfigError, match="model.encoder_widths"):
        ModelConfig(encoder="ips_cnn_tiny", encoder_widths=(0, 4))
    with pytest.raises(ConfigError, match="model.encoder_widths.*ips_\\* CNNs"):
        build_encoder("resnet18", in_chans=3, spatial_dims=2, patch_size=32, widths=(4,))


def test_cli_prune_stem_round_trips_through_the_checkpoint(tmp_path, capsys):
    from inference_fixtures import tiny_cfg, write_checkpoint

    cfg = tiny_cfg(encoder_norm="batch")
    ckpt = write_checkpoint(tmp_path / "c.pt", cfg)
    out = tmp_path / "pruned"
    argv = ["prune", "--checkpoint", str(ckpt), "--ratio", "0.5", "--stem", "0.5", "--out", str(out)]
    assert main([*argv, "--threads", "1"]) == 0
    report = json.loads((out / "prune.json").read_text())
    model, loaded_cfg = load_model(out / "pruned.pt")
    assert loaded_cfg.model.encoder_widths == tuple(report["encoder_widths"]) == (4, 16)
    assert report["stem"] == 0.5 and model.encoder.net[0].out_channels == 4
    original, _ = load_model(ckpt)
    expected, _ = prune_model(original, cfg.model, ratio=0.5, stem=0.5)
    x, pos = _inputs(cfg.model)
    with torch.no_grad():
        assert torch.equal(model(x, pos)[0]["a"], expected(x, pos)[0]["a"])
    keep = [
        "prune",
        "--checkpoint",
        str(ckpt),
        "--keep",
        "0.5",
        "--stem",
        "0.5",
        "--out",
        str(tmp_path / "k"),
    ]
    assert main(keep) == 2
    assert "--stem" in capsys.readouterr().err


def test_bench_encoders_builds_stem_pruned_variants():
    from ips.bench.encoders import build_variant

    enc = build_variant("ips_cnn_tiny@prune=0.5@stem=0.5", spatial_dims=2, patch_size=16, in_chans=3)
    assert enc.net[0].out_channels == 4 and enc.arch["inner"] == (4, 8)
    stem_only = build_variant("ips_cnn_tiny@stem=0.5", spatial_dims=2, patch_size=16, in_chans=3)
    assert stem_only.net[0].out_channels == 4 and stem_only.arch["inner"] == (8, 16)
    for bad in ("ips_cnn_tiny@keep=0.5@stem=0.5", "ips_cnn_tiny@stem=0.5@stem=0.4", "ips_cnn_tiny@stem=x"):
        with pytest.raises(ConfigError, match="--encoders"):
            build_variant(bad, spatial_dims=2, patch_size=16, in_chans=3)
