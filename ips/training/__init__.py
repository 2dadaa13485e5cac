"""Training: the loop and the `Trainer` that holds a run's state (`loop`), its inputs (`inputs`), the
exploration of patches beyond the top M (`explore`), the micro-batched step (`step`), the learning-rate
schedule (`schedule`, shared with pretraining), the memory budget (`budget`), BatchNorm recalibration
(`batchnorm`), multi-process helpers (`distributed`) and the run log (`runlog`).

Named `training`, not `train`, so that the package and the curated `ips.train` function do not collide."""
