"""Pathology foundation encoders: the catalog, the architectures timm builds from it, weights from a local
file (never the network in a test), the grid cut at the encoder's magnification, and the features path
(`ips embed` with provenance, then training on the features)."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from inference_fixtures import make_store

from data_prep.testing import tissue_image, write_pyramid_tiff
from ips.cli.main import main
from ips.config import ModelConfig
from ips.data.store import open_store, verify_store
from ips.data.zarr_source import FeatureSource, ZarrPatchSource
from ips.errors import ConfigError
from ips.foundation import FOUNDATION, FoundationSpec, foundation_spec, list_foundation
from ips.model import build_model, pixel_stats
from ips.model.encoders import build_encoder
from ips.model.foundation import FoundationEncoder, build_foundation, build_trunk

# What the model cards and papers publish, written down here independently of the catalog: output
# dimension, ViT patch side, register tokens, whether the MLP is SwiGLU, the parameter count of the ViT
# in millions (UNI: ViT-L/16 303M; UNI2-h 681M; Virchow2 632M; H-optimus-0 and Prov-GigaPath ViT-g 1.13B;
# Phikon-v2 ViT-L/16 ~303M; CONCH's image trunk ViT-B/16 86M), the input side, and layer scale.
PUBLISHED = {
    "uni": (1024, 16, 0, False, 303, 224, True),
    "uni2-h": (1536, 14, 8, True, 681, 224, True),
    "virchow2": (2560, 14, 4, True, 632, 224, True),
    "h-optimus-0": (1536, 14, 4, True, 1134, 224, True),
    "phikon-v2": (1024, 16, 0, False, 303, 224, True),
    "prov-gigapath": (1536, 16, 0, True, 1135, 224, True),
    "conch": (512, 16, 0, False, 86, 448, False),
}
FAST = {"uni"}  # one full-size architecture in the fast suite; the others carry `slow`


def _marked(names):
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in names]


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: building must stay offline."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- the catalog -------------------------------------------------------------------------------------


def test_catalog_has_the_encoders_labs_use():
    assert set(PUBLISHED) <= set(list_foundation())
    for name in list_foundation():
        spec = foundation_spec(name)
        assert spec.mpp == 0.5  # all were trained at 20x
        assert spec.dim == PUBLISHED[name][0] and spec.input_size == PUBLISHED[name][5]
        assert spec.licence and spec.hub.count("/") == 1 and spec.url.endswith(spec.hub)
        assert len(spec.mean) == len(spec.std) == 3 and all(0 < s < 1 for s in spec.std)


def test_the_results_page_table_says_what_the_catalog_holds():
    """docs/BENCHMARKS.md lists every entry with its dimension, mpp, input size, licence and gating."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md").read_text()
    section = text.split("## Foundation encoders", 1)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] in FOUNDATION:
            rows[cells[0]] = cells
    assert set(rows) == set(FOUNDATION)
    for name, (_, _, dim, _, mpp, size, _, licence, gated) in rows.items():
        spec = FOUNDATION[name]
        assert int(dim.split()[0]) == spec.dim and float(mpp) == spec.mpp and int(size) == spec.input_size
        assert licence == spec.licence and gated == ("yes" if spec.gated else "no")


def test_lookup_by_alias_and_case_and_a_helpful_error():
    assert foundation_spec("UNI_v2").name == "uni2-h" and foundation_spec("hoptimus0").name == "h-optimus-0"
    with pytest.raises(ConfigError, match=r"model.encoder: no foundation encoder 'virchow3' \(did you mean"):
        foundation_spec("virchow3")


def test_spec_refuses_a_dimension_that_does_not_follow_from_the_pooling():
    kwargs = dict(FOUNDATION["uni"].timm_kwargs)
    with pytest.raises(ValueError, match="dim 1024 does not follow"):
        FoundationSpec(**{**_fields(FOUNDATION["uni"]), "pool": "token+mean", "timm_kwargs": kwargs})


def _fields(spec: FoundationSpec) -> dict:
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}


# --- architectures -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_foundation())
def test_each_architecture_shallow_copy_has_the_models_own_parts(name):
    """The spec's own layers at small size (depth 1, width 96): register tokens, SwiGLU, layer scale, and
    the pooling, against the published description. Fast: every entry, every property."""
    spec = foundation_spec(name)
    dim, patch, regs, swiglu, _, size, layer_scale = PUBLISHED[name]
    torch.manual_seed(0)
    trunk = build_trunk(spec, depth=1, embed_dim=96, num_heads=2).eval()
    enc = FoundationEncoder(trunk, spec).eval()
    from timm.layers import GluMlp, LayerScale

    assert trunk.patch_embed.patch_size == (patch, patch)
    assert trunk.num_prefix_tokens == 1 + regs
    mlp = trunk.blocks[0].mlp  # SwiGLU: a gated MLP with SiLU (timm's SwiGLUPacked), else GELU
    assert (isinstance(mlp, GluMlp) and isinstance(mlp.act, torch.nn.SiLU)) == swiglu
    assert isinstance(mlp.act, torch.nn.GELU) != swiglu
    assert isinstance(trunk.blocks[0].ls1, LayerScale) == layer_scale
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        out = enc(x)
        tokens = trunk.forward_features(x)  # (2, 1 + regs + (size / patch)^2, 96)
    assert tokens.shape[1] == 1 + regs + (size // patch) ** 2
    if spec.pool == "attentional":
        want = _attentional_pool(enc, tokens)
    elif dim == 2560:  # Virchow2: class token and the mean of the patch tokens, registers left out
        want = torch.cat([tokens[:, 0], tokens[:, 1 + regs :].mean(1)], 1)
    else:
        want = tokens[:, 0]
    torch.testing.assert_close(out, want)
    width = {2560: 192, 512: 512}.get(dim, 96)  # 2 x width for Virchow2; CONCH's pooler keeps 512
    assert out.shape == (2, width) and torch.isfinite(out).all()


def _attentional_pool(enc: FoundationEncoder, tokens: torch.Tensor) -> torch.Tensor:
    """CoCa's contrastive pooling written out: one query, 8 heads over LayerNormed tokens, then a
    LayerNorm. `(n, L, C)` -> `(n, 512)`."""
    pool, ln = enc.attn_pool_contrast, enc.ln_contrast
    a = pool.attn
    q = torch.nn.functional.layer_norm(pool.query, (512,), pool.ln_q.weight, pool.ln_q.bias)  # (1, 512)
    k_in = torch.nn.functional.layer_norm(tokens, (tokens.shape[-1],), pool.ln_k.weight, pool.ln_k.bias)
    bq, bk, bv = a.in_proj_bias.chunk(3)
    q = q @ a.q_proj_weight.T + bq  # (1, 512)
    k = k_in @ a.k_proj_weight.T + bk  # (n, L, 512)
    v = k_in @ a.v_proj_weight.T + bv
    heads, dh = 8, 64
    qh = q.view(1, heads, dh).transpose(0, 1)  # (8, 1, 64)
    kh = k.view(len(k), -1, heads, dh).permute(0, 2, 1, 3)  # (n, 8, L, 64)
    vh = v.view(len(v), -1, heads, dh).permute(0, 2, 1, 3)
    att = torch.softmax((qh.unsqueeze(0) @ kh.transpose(-1, -2)) / dh**0.5, dim=-1)  # (n, 8, 1, L)
    pooled = (att @ vh).reshape(len(k), 512)  # heads concatenated
    pooled = pooled @ a.out_proj.weight.T + a.out_proj.bias
    return torch.nn.functional.layer_norm(pooled, (512,), ln.weight, ln.bias)


@pytest.mark.parametrize("name", _marked(list_foundation()))
def test_full_size_architecture_matches_the_published_size(name):
    """The whole architecture, built on the meta device (shapes only, no memory): the declared dimension
    comes out of a forward pass, and the parameter count is the published one (within 1%)."""
    spec = foundation_spec(name)
    size = PUBLISHED[name][5]
    with torch.device("meta"):
        enc = FoundationEncoder(build_trunk(spec), spec)
        out = enc(torch.zeros(2, 3, size, size))
    assert tuple(out.shape) == (2, spec.dim) == (2, PUBLISHED[name][0])
    millions = sum(p.numel() for p in enc.trunk.parameters()) / 1e6
    assert millions == pytest.approx(PUBLISHED[name][4], rel=0.01)


def test_config_name_builds_offline_with_the_models_normalisation(no_network):
    """Contract: `model.encoder: uni` builds with `model.pretrained` unset and no network."""
    with torch.device("meta"):  # the full ViT-L, shapes only: fast
        model = build_model(ModelConfig(encoder="uni", patch_size=224, d_model=32, n_heads=4, d_mlp=32))
    assert isinstance(model.encoder, FoundationEncoder) and model.encoder.out_dim == 1024
    assert model.project.in_features == 1024
    mean, std = pixel_stats(model.encoder, 3)
    assert mean == (0.485, 0.456, 0.406) and std == (0.229, 0.224, 0.225)
    with torch.device("meta"):
        hopt = build_encoder("h-optimus-0", in_chans=3, spatial_dims=2, patch_size=224, pretrained=False)
    assert pixel_stats(hopt, 3)[0] == (0.707223, 0.578729, 0.703617)  # Bioptimus' own H&E statistics


@pytest.mark.slow
def test_uni_builds_for_real_and_encodes_other_patch_sizes(no_network):
    torch.manual_seed(0)
    enc = build_encoder("uni", in_chans=3, spatial_dims=2, patch_size=256, pretrained=False).eval()
    with torch.no_grad():
        out = enc(torch.rand(2, 3, 256, 256))  # resized to 224 inside
    assert out.shape == (2, 1024) and torch.isfinite(out).all()


def test_foundation_encoder_refuses_other_inputs():
    with pytest.raises(ConfigError, match="model.encoder: 'uni' encodes RGB 2D patches; got in_chans=1"):
        build_encoder("uni", in_chans=1, spatial_dims=2, patch_size=224)
    with pytest.raises(ConfigError, match="spatial_dims=3"):
        build_encoder("virchow2", in_chans=3, spatial_dims=3, patch_size=32)


# --- weights -----------------------------------------------------------------------------------------

TINY = FoundationSpec(
    name="tiny-test",
    title="a tiny ViT with registers, SwiGLU and class + mean pooling, for tests",
    arch="vit_small_patch16_224",
    timm_kwargs={
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "num_classes": 0,
        "dynamic_img_size": True,
        "init_values": 1e-5,
        "reg_tokens": 2,
        "no_embed_class": True,
        "mlp_ratio": 2.66667 * 2,
        "mlp_layer": "SwiGLUPacked",
        "act_layer": "SiLU",
    },
    pool="token+mean",
    dim=64,
    mpp=0.5,
    input_size=32,
    mean=(0.7, 0.55, 0.7),  # not ImageNet's: features normalised with the wrong statistics would differ
    std=(0.2, 0.25, 0.18),
    licence="test",
    gated=True,
    hub="nobody/tiny-test",
)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(FOUNDATION, "tiny-test", TINY)
    return "tiny-test"


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_state_dict_round_trips_through_model_pretrained(tiny, tmp_path, suffix, no_network):
    torch.manual_seed(1)
    original = build_foundation(tiny).eval()
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in original.trunk.state_dict().items()}
    if suffix == ".bin":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    torch.manual_seed(2)  # another random start: only the file can make them equal
    cfg = ModelConfig(encoder=tiny, pretrained=str(path), patch_size=32, d_model=16, n_heads=2, d_mlp=16)
    model = build_model(cfg).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), original(x), rtol=0, atol=0)
    assert model.encoder.weights_path == path


def test_dinov2_transformers_file_loads_into_the_timm_model(tiny, tmp_path):
    """A Hugging Face Dinov2Model file (how Phikon-v2 is published): written here from a timm model with
    the transformers names (query, key and value apart; `lambda1` layer scales; a mask token), it loads
    back into a fresh model with the same outputs."""
    dinov2 = {
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "init_values": 1e-5,
    }
    spec = FoundationSpec(
        **{**_fields(TINY), "name": "tiny-dinov2", "pool": "token", "dim": 32, "timm_kwargs": dinov2}
    )
    torch.manual_seed(3)
    original = FoundationEncoder(build_trunk(spec), spec).eval()
    hf = {}
    for k, v in original.trunk.state_dict().items():
        hf.update(_to_transformers_names(k, v))
    hf["embeddings.mask_token"] = torch.zeros(1, 32)
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hf.items()}, str(path))
    from ips.model.foundation import load_foundation_weights

    torch.manual_seed(4)
    fresh = FoundationEncoder(build_trunk(spec), spec).eval()
    load_foundation_weights(fresh, path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), original(x), rtol=0, atol=0)


def test_conch_coca_file_loads_its_vision_tower(tmp_path):
    """A whole CoCa file (how CONCH is published): `visual.trunk.*`, the contrastive pooler and its
    LayerNorm load; the text tower, the captioning pooler and the projection are left out."""
    tiny_vit = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    spec = FoundationSpec(
        **{**_fields(FOUNDATION["conch"]), "name": "tiny-conch", "timm_kwargs": tiny_vit}
        | {"dim": 16, "pool_heads": 2, "input_size": 32}
    )
    torch.manual_seed(10)
    original = FoundationEncoder(build_trunk(spec), spec).eval()
    coca = {f"visual.{k}": v for k, v in original.state_dict().items()}
    coca |= {
        "visual.attn_pool_caption.query": torch.zeros(256, 16),
        "visual.proj_contrast": torch.zeros(16, 16),
        "text.token_embedding.weight": torch.zeros(10, 16),
        "logit_scale": torch.zeros(()),
    }
    path = tmp_path / "pytorch_model.bin"
    torch.save(coca, path)
    from ips.model.foundation import load_foundation_weights

    torch.manual_seed(11)
    fresh = FoundationEncoder(build_trunk(spec), spec).eval()
    load_foundation_weights(fresh, path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), original(x), rtol=0, atol=0)


def _to_transformers_names(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """timm ViT name -> Hugging Face Dinov2Model name(s), from the transformers source's module layout."""
    top = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    if key in top:
        return {top[key]: value}
    _, i, rest = key.split(".", 2)
    layer = f"encoder.layer.{i}"
    if rest.startswith("attn.qkv."):
        q, k, v = value.chunk(3, dim=0)
        leaf = rest.rsplit(".", 1)[1]
        att = f"{layer}.attention.attention"
        return {f"{att}.query.{leaf}": q, f"{att}.key.{leaf}": k, f"{att}.value.{leaf}": v}
    if rest.startswith("ls"):
        return {f"{layer}.layer_scale{rest[2]}.lambda1": value}
    rest = rest.replace("attn.proj", "attention.output.dense")
    return {f"{layer}.{rest}": value}


def test_a_position_table_for_another_input_size_is_resampled(tiny, tmp_path):
    """A file saved at 48 px (6 x 6 patch grid) loads into the 32 px model (4 x 4): a constant table
    stays that constant, and every other weight is the file's."""
    torch.manual_seed(9)
    big = FoundationEncoder(build_trunk(TINY, img_size=48), TINY)
    state = {k: v.clone() for k, v in big.trunk.state_dict().items()}
    assert state["pos_embed"].shape == (1, 36, 32)  # registers and class token carry no position here
    state["pos_embed"] = torch.full_like(state["pos_embed"], 0.25)
    path = tmp_path / "w48.pt"
    torch.save(state, path)
    small = build_foundation(tiny, pretrained=str(path))
    loaded = small.trunk.state_dict()
    assert loaded["pos_embed"].shape == (1, 16, 32)
    torch.testing.assert_close(loaded["pos_embed"], torch.full((1, 16, 32), 0.25))
    torch.testing.assert_close(loaded["blocks.1.mlp.fc2.weight"], state["blocks.1.mlp.fc2.weight"])


def test_a_file_that_does_not_fit_is_one_line_naming_it(tiny, tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"blocks.0.norm1.weight": torch.ones(8)}, path)
    with pytest.raises(ConfigError) as e:
        build_foundation(tiny, pretrained=str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "does not fit encoder 'tiny-test'" in msg
    with pytest.raises(
        ConfigError, match=r"weights file .*missing.bin does not exist \(tiny-test weights are"
    ):
        build_foundation(tiny, pretrained=str(tmp_path / "missing.bin"))


def test_without_a_token_or_a_network_the_error_names_the_file(tiny, monkeypatch, no_network):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError) as e:
        build_foundation(tiny, pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg and "pytorch_model.bin from https://huggingface.co/nobody/tiny-test" in msg
    assert "no Hugging Face token" in msg and "model.pretrained" in msg

    def offline(*args, **kwargs):
        raise OSError("we have no network here")

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(ConfigError, match=r"no hub access \(OSError: we have no network here\); download"):
        build_foundation(tiny, pretrained=True)


def test_cli_without_hub_access_exits_2_with_one_line(tiny, tmp_path, monkeypatch, capsys, no_network):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    store = make_store(tmp_path, "s", size=(32, 32), patch=16)
    assert main(["embed", str(store), "--encoder", tiny, "--pretrained", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "download pytorch_model.bin from https://huggingface.co/nobody/tiny-test" in err[0]
    )


def test_hub_weights_under_the_other_usual_name_load(tiny, monkeypatch, tmp_path):
    """With a token and a hub (here a stand-in that has only `model.safetensors`), the weights load."""
    import huggingface_hub
    from safetensors.torch import save_file

    torch.manual_seed(8)
    original = build_foundation(tiny).eval()
    published = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in original.trunk.state_dict().items()}, str(published))
    asked = []

    class EntryNotFoundError(Exception):
        pass

    def hub(repo, name, **kwargs):
        asked.append(name)
        if name != "model.safetensors":
            raise EntryNotFoundError(f"{name} not in {repo}")
        return str(published)

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_real_token")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub)
    loaded = build_foundation(tiny, pretrained=True).eval()
    assert asked == ["pytorch_model.bin", "model.safetensors"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x), rtol=0, atol=0)


# --- prep at the encoder's magnification --------------------------------------------------------------


@pytest.fixture
def slide(tmp_path):
    """A 0.25 um/px (40x-like) pyramidal TIFF, tissue everywhere."""
    img = tissue_image(960, 960, box=(0.0, 0.0, 1.0, 1.0))
    return write_pyramid_tiff(tmp_path / "s40.tif", img, levels=2, tile=64, mpp=0.25)


def test_prep_encoder_cuts_the_grid_at_its_mpp_and_input_size(slide, tmp_path):
    out = tmp_path / "out"
    rc = main(["prep", str(slide), "--out", str(out), "--encoder", "uni", "--store-from", "grid", "--quiet"])
    assert rc == 0
    store = open_store(out / "s40.zarr")
    grid = store.grid("default")
    assert grid.patch_size == (224, 224) and grid.level == 0
    assert store.spacing == [0.5, 0.5]  # the store begins at the 0.5 um/px level
    assert grid.n_patches == (480 // 224) ** 2
    # an explicit --patch-size wins; the magnification stays the encoder's
    rc = main(
        ["prep", str(slide), "--out", str(tmp_path / "o2"), "--encoder", "virchow2", "--patch-size", "96"]
    )
    assert rc == 0
    made = open_store(tmp_path / "o2" / "s40.zarr")
    assert made.grid().patch_size == (96, 96) and made.grid().level == 1


def test_prep_encoder_refuses_an_unknown_name_and_a_second_scale(slide, tmp_path, capsys):
    assert main(["prep", str(slide), "--out", str(tmp_path / "o"), "--encoder", "unii"]) == 2
    assert "--encoder: no foundation encoder 'unii' (did you mean 'uni'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["prep", str(slide), "--out", str(tmp_path / "o"), "--encoder", "uni", "--mpp", "1.0"])
    assert e.value.code == 2


def test_prep_store_from_grid_at_mpp_1_with_the_default_codec(tmp_path):
    """Contract: `ips prep ... --store-from grid --mpp 1.0` with the default codec, on a 0.5 um/px slide."""
    img = tissue_image(512, 640, box=(0.1, 0.1, 0.9, 0.9))
    src = write_pyramid_tiff(tmp_path / "s20.tif", img, levels=1, tile=64, mpp=0.5)  # no level at 1.0
    out = tmp_path / "out"
    rc = main(
        ["prep", str(src), "--out", str(out), "--store-from", "grid", "--mpp", "1.0", "--patch-size", "32"]
    )
    assert rc == 0
    store = out / "s20.zarr"
    attrs = zarr.open_group(str(store), mode="r").attrs["ips"]
    assert attrs["provenance"]["options"]["codec"] == "zstd"
    assert attrs["spacing"] == [1.0, 1.0] and attrs["level_shapes"][0] == [3, 256, 320]
    assert attrs["source_level"]["downsample"] == [2, 2]
    verify_store(store)
    # the store's level 0 is the 2x mean of the slide: read one patch and compare
    opened = open_store(store)
    r, c = (int(v) for v in opened.coords("default")[0])
    patch = ZarrPatchSource(store).read(np.array([0]))[0].numpy()  # (3, 32, 32)
    window = img[2 * r : 2 * r + 64, 2 * c : 2 * c + 64].astype(np.float64)  # (64, 64, 3)
    means = window.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3)).transpose(2, 0, 1)
    assert np.abs(patch - means).max() <= 1.0


def test_prep_store_from_grid_at_mpp_1_on_the_real_svs(tmp_path):
    """The same contract on the real Aperio slide (0.499 um/px, one level): a 2x store, verified."""
    import os

    root = os.environ.get("IPS_TEST_DATA")
    svs = Path(root or "") / "cmu_small_region.svs"
    if not root or not svs.is_file():
        pytest.skip("IPS_TEST_DATA with cmu_small_region.svs is not set")
    out = tmp_path / "out"
    assert main(["prep", str(svs), "--out", str(out), "--store-from", "grid", "--mpp", "1.0", "--quiet"]) == 0
    import openslide

    with openslide.OpenSlide(str(svs)) as slide:
        width, height = slide.dimensions
    attrs = zarr.open_group(str(out / "cmu_small_region.zarr"), mode="r").attrs["ips"]
    assert attrs["provenance"]["options"]["codec"] == "zstd"
    assert attrs["level_shapes"][0] == [3, height // 2, width // 2]
    assert attrs["spacing"] == pytest.approx([0.998, 0.998], abs=1e-3)
    verify_store(out / "cmu_small_region.zarr")


# --- the features path -------------------------------------------------------------------------------


def test_embed_writes_fp16_features_with_provenance_and_they_train(tiny, tmp_path, capsys):
    torch.manual_seed(5)
    weights = tmp_path / "tiny.bin"
    torch.save(build_foundation(tiny).trunk.state_dict(), weights)
    stores = [
        make_store(tmp_path / "stores", f"s{i}", size=(64, 48), patch=16, seed=i, spacing=(0.5, 0.5))
        for i in range(4)
    ]
    args = ["--encoder", tiny, "--pretrained", str(weights), "--name", "tiny", "--chunk-size", "5"]
    assert main(["embed", *map(str, stores), *args]) == 0
    for store in stores:
        feats = zarr.open_group(str(store), mode="r")["features/tiny/embeddings"]
        assert feats.dtype == np.float16 and feats.shape == (12, 64)
        prov = dict(zarr.open_group(str(store), mode="r")["features/tiny"].attrs["provenance"])
        assert prov["encoder"] == tiny and prov["dtype"] == "float16" and prov["mpp"] == 0.5
        assert prov["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
        assert prov["mean"] == list(TINY.mean) and prov["std"] == list(TINY.std)
        assert prov["foundation"]["pool"] == "token+mean" and prov["foundation"]["input_size"] == 32
        assert open_store(store).features["tiny"].dim == 64
        verify_store(store)  # the store stays whole with the feature set and its provenance in it
    # the features are the encoder's output on the patches normalised with the model's own statistics
    enc = build_foundation(tiny, pretrained=str(weights)).eval()
    px = ZarrPatchSource(stores[0]).read(np.arange(12)).float() / 255.0
    mean, std = torch.tensor(TINY.mean).view(1, 3, 1, 1), torch.tensor(TINY.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = enc((px - mean) / std).numpy()
    got = FeatureSource(stores[0], "tiny").read(np.arange(12)).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # fp16 storage

    manifest = tmp_path / "manifest.csv"
    rows = [f"s{i},{s},{i % 2},{'train' if i < 3 else 'val'}" for i, s in enumerate(stores)]
    manifest.write_text("slide_id,path,label,split\n" + "\n".join(rows) + "\n")
    config = tmp_path / "features.yaml"
    config.write_text(
        json.dumps(
            {
                "model": {"encoder": "features", "feature_dim": 64, "d_model": 16, "n_heads": 2, "d_mlp": 16},
                "data": {"mode": "features", "features": "tiny"},
                "selection": {"memory_size": 4, "iter_size": 8},
                "train": {"epochs": 1, "batch_size": 2, "device": "cpu"},
            }
        )
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--manifest", str(manifest), "--out", str(run)]) == 0
    assert (run / "checkpoints" / "best.pt").is_file() or (run / "checkpoints" / "last.pt").is_file()


def test_embed_restarts_when_the_weights_change(tiny, tmp_path):
    store = make_store(tmp_path, "s", size=(48, 48), patch=16, spacing=(0.5, 0.5))
    paths = []
    for seed in (6, 7):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"w{seed}.pt")
        torch.save(build_foundation(tiny).trunk.state_dict(), paths[-1])
    common = ["--encoder", tiny, "--name", "f", "--dtype", "float32"]
    assert main(["embed", str(store), *common, "--pretrained", str(paths[0])]) == 0
    first = FeatureSource(store, "f").read(np.arange(9)).numpy()
    # the same name again with other weights: a complete set is kept unless --overwrite
    assert main(["embed", str(store), *common, "--pretrained", str(paths[1]), "--overwrite"]) == 0
    second = FeatureSource(store, "f").read(np.arange(9)).numpy()
    assert not np.allclose(first, second)
    prov = zarr.open_group(str(store), mode="r")["features/f"].attrs["provenance"]
    assert prov["weights_sha256"] == hashlib.sha256(paths[1].read_bytes()).hexdigest()


def test_embed_warns_when_the_grid_is_not_at_the_encoders_mpp(tiny, tmp_path, capsys):
    store = make_store(tmp_path, "s", size=(48, 48), patch=16, spacing=(0.25, 0.25))
    assert main(["embed", str(store), "--encoder", tiny, "--name", "f"]) == 0
    err = capsys.readouterr().err
    assert "the grid is at 0.25 um/px, tiny-test was trained at 0.5 um/px" in err
    assert "warning: tiny-test with random weights (no --pretrained)" in err
    prov = zarr.open_group(str(store), mode="r")["features/f"].attrs["provenance"]
    assert prov["weights_sha256"] is None  # random weights, said so


def test_features_config_is_valid():
    from ips.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "features_uni.yaml")
    assert cfg.data.mode == "features" and cfg.model.encoder == "features"
    assert cfg.model.feature_dim == foundation_spec("uni").dim
