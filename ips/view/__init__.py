"""`ips view`: a local, read-only web viewer of stores and their attention heatmaps.

- `catalog`: which slides are served (stores, manifest, predictions.csv, heatmap folders);
- `reading`: the store's reads, through the checked reader `ips predict` uses, after refusing links in the store;
- `tiles`: tiles cut from the pyramid levels on demand, encoded, kept in an LRU cache capped in bytes;
- `overlay`: per-patch scores (`scores.zarr` of `ips heatmap`) as images at patch resolution;
- `server`: the routes (`ViewerApp`, testable without sockets) and the HTTP layer (Host check, one-line errors);
- `serving`: the sockets: a listen backlog for hundreds of requests, head deadlines, a bounded worker pool;
- `assets/`: the page (plain HTML/CSS/JS, a canvas deep-zoom viewer; nothing loaded from the network).
"""
