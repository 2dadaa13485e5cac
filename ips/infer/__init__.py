"""Inference on trained models: one slide (`slide`: top-M or exact attention over all N), predictions over
a manifest (`predict`, `predictions`), heatmaps and their files (`heatmap`, `render`, `geojson`, `nifti`),
and precomputed features (`embed`)."""
