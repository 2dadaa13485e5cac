"""The whole-bag loss (`ips.training.bagloss`): what it observes, what it computes, where its gradient goes."""

import numpy as np
import pytest
import torch

from ips.algo.selection import eval_mode, select
from ips.config import ModelConfig, TaskConfig
from ips.data.sources import InMemoryPatchSource, iter_chunks
from ips.model.ips_model import build_model
from ips.model.tasks import label_tensor, total_loss
from ips.training.bagloss import BagEmbeddings, bag_loss, pad_bags

TASKS = (TaskConfig(name="a", kind="binary"), TaskConfig(name="b", kind="multiclass", num_classes=3))


def make_case(n: int, seed: int, dims: int = 2):
    """A float64 model (GroupNorm: each patch's embedding is its own) and a bag of n patches."""
    torch.manual_seed(seed)
    size = 8 if dims == 2 else 4
    cfg = ModelConfig(
        encoder="ips_cnn_tiny",
        encoder_norm="group",
        spatial_dims=dims,
        in_chans=2,
        patch_size=size,
        d_model=24,
        n_heads=3,
        d_mlp=16,
        pos_enc="sincos",
        tasks=TASKS,
    )
    model = build_model(cfg).double()
    patches = torch.randint(0, 256, (n, 2, *([size] * dims)), dtype=torch.uint8)
    positions = np.random.default_rng(seed).integers(0, 50, size=(n, dims))
    return model, InMemoryPatchSource(patches, positions)


def all_embeddings(model, source) -> torch.Tensor:
    """Every patch embedded at once, by index: the oracle."""
    idx = np.arange(len(source))
    with eval_mode(model), torch.no_grad():
        return model.embed(source.read(idx), torch.from_numpy(source.positions()).double())


def observed(model, source, cap: int, iter_size: int, order=None, seed: int = 0) -> BagEmbeddings:
    bag = BagEmbeddings(len(source), cap, np.random.default_rng(seed))

    def stream(src, chunk):
        return iter_chunks(src, chunk, order=order)

    with eval_mode(model):
        select(model, source, memory_size=3, iter_size=iter_size, observe=bag, stream=stream)
    return bag


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("iter_size", [1, 7, 64])
def test_small_bag_keeps_every_embedding(dims, iter_size):
    model, source = make_case(29, 0, dims)
    order = np.random.default_rng(1).permutation(29)
    bag = observed(model, source, cap=29, iter_size=iter_size, order=order)
    torch.testing.assert_close(bag.embeddings(), all_embeddings(model, source).float(), rtol=0, atol=1e-6)


def test_large_bag_is_the_sample_of_the_largest_keys_whatever_the_chunks():
    n, cap = 50, 12
    model, source = make_case(n, 3)
    keys = np.random.default_rng(5).random(n)  # what BagEmbeddings draws from the same generator
    expected = np.sort(np.argsort(-keys, kind="stable")[:cap])
    full = all_embeddings(model, source).float()
    for iter_size, order_seed in ((1, 0), (9, 1), (50, 2)):
        order = np.random.default_rng(order_seed).permutation(n)
        bag = observed(model, source, cap=cap, iter_size=iter_size, order=order, seed=5)
        assert np.array_equal(np.sort(bag.indices.numpy()), expected)
        torch.testing.assert_close(bag.embeddings(), full[expected], rtol=0, atol=1e-6)


def test_bag_loss_is_the_model_loss_on_the_whole_bag():
    """With every patch kept, the whole-bag loss equals the model's own loss with M = N (the encoder in
    eval mode), slide by slide, bags of different sizes padded."""
    cases = [make_case(n, s) for n, s in ((17, 0), (30, 1), (5, 2))]
    model = cases[0][0]
    bags, expected = [], []
    targets = {"a": label_tensor(TASKS[0], [1, 0, 1]), "b": label_tensor(TASKS[1], [2, 0, 1])}
    for i, (_, source) in enumerate(cases):
        bags.append(observed(model, source, cap=64, iter_size=8).embeddings().double())
        idx = np.arange(len(source))
        with eval_mode(model), torch.no_grad():
            logits, _ = model(source.read(idx)[None], torch.from_numpy(source.positions()).double()[None])
        one = {k: v[i : i + 1] for k, v in targets.items()}
        expected.append(total_loss(TASKS, logits, one))
    with torch.no_grad():
        got = bag_loss(model.eval(), bags, TASKS, targets)
    torch.testing.assert_close(got, torch.cat(expected), rtol=1e-6, atol=1e-6)


def test_bag_loss_trains_the_aggregator_and_heads_not_the_encoder():
    model, source = make_case(20, 0)
    bag = observed(model, source, cap=64, iter_size=8).embeddings().double()
    model.zero_grad()
    bag_loss(model.train(), [bag], TASKS, {"a": torch.tensor([1]), "b": torch.tensor([2])}).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())
    assert model.aggregator.queries.grad.abs().sum() > 0


def test_pad_bags_masks_the_padding():
    x, mask = pad_bags([torch.ones(2, 3), torch.ones(4, 3)])
    assert x.shape == (2, 4, 3)
    assert mask.tolist() == [[True, True, False, False], [True] * 4]
    assert x[0, 2:].abs().sum() == 0


def test_bad_cap():
    with pytest.raises(ValueError, match="cap"):
        BagEmbeddings(5, 0, np.random.default_rng(0))


@pytest.mark.parametrize("micro", [1, 2, 5])
def test_micro_batched_gradients_with_the_bag_loss_equal_full_batch(micro):
    from ips.algo.batch import stack_selections
    from ips.algo.selection import Selection
    from ips.training.step import accumulate_gradients

    def grads(micro_batch: int):
        model, _ = make_case(4, 0)
        g = torch.Generator().manual_seed(1)
        sels = [
            Selection(
                torch.arange(3),
                torch.zeros(3),
                torch.randint(0, 256, (3, 2, 8, 8), generator=g, dtype=torch.uint8),
                torch.rand(3, 2, generator=g, dtype=torch.float64) * 20,
            )
            for _ in range(5)
        ]
        targets = {"a": label_tensor(TASKS[0], [1, 0, 1, 0, 1]), "b": label_tensor(TASKS[1], [0, 1, 2, 0, 1])}
        batch = stack_selections(sels, targets, 3)
        batch.bags = tuple(torch.randn(n, 24, generator=g, dtype=torch.float64) for n in (4, 9, 2, 7, 5))
        loss, _ = accumulate_gradients(model, batch, TASKS, micro_batch_size=micro_batch, bag_weight=0.7)
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_full, g_full = grads(5)
    loss_micro, g_micro = grads(micro)
    assert loss_micro == pytest.approx(loss_full, rel=1e-12)
    assert g_full.keys() == g_micro.keys()
    for name in g_full:
        torch.testing.assert_close(g_micro[name], g_full[name], rtol=1e-10, atol=1e-12)
