"""Inference on trained models: the engine (`engine`: `Selector` and `Predictor`, the one top-M path that
validation, `ips predict`, `ips heatmap` and `ips demo` share; `load` a checkpoint), what one pass over a
slide yields (`slide`: exact attention over all N, whole-bag aggregation), the per-slide loops of the
commands (`loop`), prediction files (`predictions`), heatmaps and their files (`heatmap`, `render`,
`geojson`, `nifti`), and precomputed features (`embed`)."""
