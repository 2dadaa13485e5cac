"""The experiment the benchmarks run: one small, fixed model and selection setting, built from the
same config dataclasses as training, so that a benchmark exercises the code paths users run."""

from __future__ import annotations

from ips.config import (
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    SelectionConfig,
    TaskConfig,
    TrainConfig,
)


def bench_config(
    *,
    encoder: str,
    patch_size: int,
    memory_size: int,
    iter_size: int,
    batch_size: int,
    in_chans: int = 3,
    device: str = "auto",
    read_threads: int = 2,
    prefetch: int = 2,
) -> ExperimentConfig:
    """A binary-task 2D pixel experiment: `encoder` on `patch_size` patches, M, I, B as given.

    Augmentation is off (it is not what is measured); everything else is the training defaults.
    """
    return ExperimentConfig(
        model=ModelConfig(
            encoder=encoder,
            in_chans=in_chans,
            spatial_dims=2,
            patch_size=patch_size,
            d_model=64,
            n_heads=4,
            d_mlp=128,
            tasks=(TaskConfig(name="label", kind="binary"),),
        ),
        selection=SelectionConfig(memory_size=memory_size, iter_size=iter_size, prefetch=prefetch),
        data=DataConfig(mode="pixels", read_threads=read_threads, augment=False),
        train=TrainConfig(epochs=1, batch_size=batch_size, device=device),
    )
