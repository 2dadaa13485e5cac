"""The token-pruning ViT: keep 1 is timm's ViT exactly; tokens really dropped; the keep-score heads learn
from an auxiliary loss that leaves the backbone alone; streaming selection stays exact and O(M + I)."""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch

from ips.algo.selection import eval_mode, global_top_m, select
from ips.config import ConfigError, ModelConfig
from ips.data.sources import InMemoryPatchSource
from ips.model.encoders import build_encoder
from ips.model.ips_model import build_model
from ips.model.macs import count_macs
from ips.model.token_vit import cls_attention, keep_loss, token_size


def _vit(keep: float = 1.0, patch: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return build_encoder("ips_vit_tiny", in_chans=3, spatial_dims=2, patch_size=patch, token_keep=keep)


def test_keep_one_is_timm_vit_exactly():
    enc = _vit(1.0).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        plain = enc.vit(x)  # timm's own forward on the same weights: the oracle
        assert torch.equal(enc(x), plain)
        enc.keep = 0.99  # ceil(0.99 * 64) = 64: the gather path, every token kept in order
        assert torch.equal(enc(x), plain)
        enc.keep = 0.5
        assert not torch.allclose(enc(x), plain)


def test_tokens_are_dropped_per_stage_in_eval_mode_only():
    enc = _vit(0.5)
    seen: list[int] = []
    enc.vit.blocks[-1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    x = torch.randn(2, 3, 16, 16)
    p = (16 // token_size(16)) ** 2  # 64 patch tokens
    with torch.no_grad():
        enc.eval()(x)
        enc.train()(x)
    assert seen == [1 + math.ceil(0.5 * math.ceil(0.5 * p)), 1 + p]  # two stages in eval; none in training
    enc.eval()
    full, half = count_macs(_vit(1.0).eval(), x), count_macs(enc, x)
    assert half < 0.75 * full


def test_cls_attention_equals_timms_attention_weights():
    """Oracle: timm's unfused attention passes its weights through `attn_drop`; a hook reads them."""
    enc = _vit(1.0).eval()
    block = enc.vit.blocks[-1]
    block.attn.fused_attn = False
    weights = []
    block.attn.attn_drop.register_forward_hook(lambda m, a, out: weights.append(out))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        t = enc.vit.norm_pre(enc.vit._pos_embed(enc.vit.patch_embed(x)))
        for b in enc.vit.blocks[:-1]:
            t = b(t)
        ours = cls_attention(block, t)
        block(t)
    a = weights[0][:, :, 0, 1:].mean(dim=1)  # (n, P): the class token's row, over the patch tokens
    assert torch.allclose(ours, a / a.sum(dim=1, keepdim=True), atol=1e-6)


def test_heads_learn_from_the_aux_loss_and_the_backbone_is_untouched():
    enc = _vit(0.5).train()
    x = torch.randn(3, 3, 16, 16)
    out = enc(x)
    assert torch.equal(out, enc.vit(x))  # training runs every token; the value is the plain ViT's
    out.square().sum().backward()
    got = {n: p.grad.clone() for n, p in enc.named_parameters()}
    # the backbone's gradients: those of the plain ViT on the same loss
    enc.zero_grad()
    enc.vit(x).square().sum().backward()
    for n, p in enc.vit.named_parameters():
        assert torch.allclose(got[f"vit.{n}"], p.grad, atol=1e-7), n
    # the heads' gradients: those of the auxiliary loss computed by hand
    enc.zero_grad()
    with torch.no_grad():
        t = enc.vit.norm_pre(enc.vit._pos_embed(enc.vit.patch_embed(x)))
        inputs = []
        for i, b in enumerate(enc.vit.blocks):
            if i in enc.prune_at:
                inputs.append(t[:, 1:].clone())
            if i == len(enc.vit.blocks) - 1:
                target = cls_attention(b, t)
            t = b(t)
    aux = sum(keep_loss(h(s), target) for h, s in zip(enc.keep_heads, inputs))
    aux.backward()
    for n, p in enc.keep_heads.named_parameters():
        assert torch.allclose(got[f"keep_heads.{n}"], p.grad, atol=1e-6), n
        assert p.grad.abs().sum() > 0


def test_keep_loss_is_zero_when_the_scores_rank_as_the_attention():
    target = torch.softmax(torch.randn(2, 9), dim=1)
    assert keep_loss(target.log(), target).abs() < 1e-6
    assert keep_loss(torch.zeros(2, 9), target) > 0


def test_bad_arguments():
    with pytest.raises(ConfigError, match="model.token_keep"):
        ModelConfig(encoder="ips_vit_tiny", token_keep=0.0)
    with pytest.raises(ConfigError, match="2D"):
        build_encoder("ips_vit_tiny", in_chans=1, spatial_dims=3, patch_size=16)
    with pytest.raises(ConfigError, match="encoder_norm"):
        build_encoder("ips_vit_tiny", in_chans=3, spatial_dims=2, patch_size=16, norm="batch")
    with pytest.raises(ConfigError, match="patch_size"):
        build_encoder("ips_vit_tiny", in_chans=3, spatial_dims=2, patch_size=4)


def _case(n: int, seed: int, keep: float = 0.5):
    """A float64 IPS model with the pruning ViT and a bag of n 16-px patches."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        encoder="ips_vit_tiny", token_keep=keep, in_chans=3, patch_size=16, d_model=16, n_heads=2, d_mlp=16
    )
    model = build_model(cfg).double()
    patches = torch.randint(0, 256, (n, 3, 16, 16), dtype=torch.uint8)
    positions = np.random.default_rng(seed).integers(0, 50, size=(n, 2))
    return model, InMemoryPatchSource(patches, positions)


@pytest.mark.parametrize("seed", range(2))
def test_streaming_selection_stays_exact_with_pruning(seed):
    """Each patch keeps its own tokens, so its score does not depend on its chunk: iterative top-M ==
    global top-M over scores computed one patch at a time."""
    model, source = _case(40, seed)
    with eval_mode(model), torch.no_grad():
        pos = torch.from_numpy(source.positions()).double()
        one_by_one = torch.cat([model.embed(source.read(np.array([i])), pos[i : i + 1]) for i in range(40)])
        scores = model.selection_scores(one_by_one[None])[0]
        sel = select(model, source, memory_size=5, iter_size=7)
    assert torch.equal(sel.indices, global_top_m(scores, 5))


@pytest.mark.slow
def test_selection_with_pruning_holds_at_most_m_plus_i():
    from test_selection import _live

    m, i, n = 4, 5, 40
    model, source = _case(n, 1)
    peaks = {"patches": 0, "embeddings": 0}
    exclude = {source.patches.untyped_storage().data_ptr()}
    exclude |= {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    # tensors of these common shapes that other tests left alive are not this pass's: count only new ones
    gc.collect()
    exclude |= {
        o.untyped_storage().data_ptr()
        for o in gc.get_objects()
        if isinstance(o, torch.Tensor) and o.ndim >= 1
    }
    original_read = source.read

    def tracked_read(idx):
        out = original_read(idx)
        gc.collect()
        peaks["patches"] = max(peaks["patches"], _live(source.patch_shape, exclude))
        peaks["embeddings"] = max(peaks["embeddings"], _live((model.d_model,), exclude))
        return out

    source.read = tracked_read
    with eval_mode(model):
        select(model, source, memory_size=m, iter_size=i)
    assert 0 < peaks["patches"] <= m + i and peaks["embeddings"] <= m + i, peaks
