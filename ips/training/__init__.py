"""Training: the loop (`loop`), the micro-batched step (`step`), the memory budget (`budget`), BatchNorm
recalibration (`batchnorm`), multi-process helpers (`distributed`) and the run log (`runlog`).

Named `training`, not `train`, so that the package and the curated `ips.train` function do not collide."""
