"""Reading stores: open a store (`store`), read patches chunk-aligned (`chunk_io`, `zarr_source`), the patch
source protocol (`sources`), opening a slide's source from a manifest record (`open`), prefetching
(`streaming`), manifests (`manifest`) and training-time augmentation (`augment`)."""
