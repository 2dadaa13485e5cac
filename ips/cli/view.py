"""`ips view STORE... | --manifest M [--split S] [--heatmaps DIR] [--predictions CSV] [--annotations DIR]
[--port P] [--host H]`

A local web viewer: deep zoom of each store's pyramid, the attention overlay of `ips heatmap`,
predictions, and an index of the slides (`ips.view`). Read-only unless `--annotations DIR` is given: then
polygons drawn in the browser are saved as `DIR/<slide_id>.geojson` (QuPath GeoJSON, level-0 pixels: the
manifest's `annotation` column reads them). Prints the URL and serves until interrupted.
Exit 2: bad usage (no slides, a missing store or file, a port in use).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ips.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "view",
        help="view slides and their attention heatmaps in the browser",
        description="Serve the stores (and their heatmaps and predictions) to a web browser, read-only.",
    )
    p.add_argument("stores", nargs="*", metavar="STORE", help="stores made by `ips prep`")
    p.add_argument("--manifest", help="a manifest (slide_id,path[,label,...]): its slides, with their labels")
    p.add_argument(
        "--split", choices=("train", "val", "test"), help="only the manifest's slides of this split"
    )
    p.add_argument("--heatmaps", help="the --out folder of `ips heatmap` (DIR/<slide_id>/scores.zarr)")
    p.add_argument("--predictions", help="predictions.csv of `ips predict`")
    p.add_argument(
        "--annotations",
        metavar="DIR",
        help="save polygons drawn in the browser as DIR/<slide_id>.geojson (QuPath GeoJSON in level-0 "
        "pixels, for the manifest's annotation column); without it the viewer is read-only",
    )
    p.add_argument(
        "--worklist",
        metavar="DIR",
        help="the --out folder of `ips suggest`: its ranking (suggestions.csv) on the index and its "
        "suggested regions outlined on the slides",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; anything else warns)",
    )
    p.add_argument("--port", type=int, default=8765, help="port (0: any free one; default 8765)")
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (a reverse proxy's name); "
        "localhost, loopback addresses and the bound address are always answered",
    )
    p.add_argument(
        "--cache-mb", type=int, default=64, help="memory cap of the tile cache in MiB (default 64)"
    )
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ips.view.catalog import build_catalog, read_worklist, unmatched
    from ips.view.server import ViewerApp, is_loopback, make_server, url_of

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.cache_mb < 1:
        raise ConfigError(f"--cache-mb must be >= 1, got {args.cache_mb}")
    # a warning about a store (one without checksums) is one line of the server's log, not two
    warnings.showwarning = lambda message, category, *_, **__: print(
        f"ips view: {category.__name__}: {message}", file=sys.stderr, flush=True
    )
    catalog = build_catalog(args.stores, args.manifest, args.heatmaps, args.predictions, args.split)
    for line in unmatched(catalog, args.heatmaps, args.predictions):
        print(f"ips view: warning: {line}", file=sys.stderr, flush=True)
    worklist = read_worklist(args.worklist) if args.worklist is not None else []
    stray = sorted(w.slide_id for w in worklist if w.slide_id not in catalog)
    if stray:
        print(
            f"ips view: warning: --worklist {args.worklist}: {len(stray)} suggested slides are not served "
            f"({', '.join(repr(s) for s in stray[:8])}{', ...' if len(stray) > 8 else ''})",
            file=sys.stderr,
            flush=True,
        )
    folder = None
    if args.annotations is not None:
        from ips.view.annotating import AnnotationFolder

        try:
            folder = AnnotationFolder.at(args.annotations)
        except OSError as e:
            raise ConfigError(f"--annotations {args.annotations}: {e.strerror or e}") from None
    app = ViewerApp(catalog, cache_bytes=args.cache_mb << 20, annotations=folder, worklist=worklist)
    if not is_loopback(args.host):
        print(
            f"ips view: warning: binding {args.host}: anyone who can reach this machine on port {args.port} "
            "can see these slides (there is no login); use the default 127.0.0.1 unless you mean it",
            file=sys.stderr,
        )
    try:
        server = make_server(app, args.host, args.port, quiet=not args.verbose, allow_hosts=args.allow_host)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    n_heat = sum(e.heatmap is not None for e in catalog.values())
    if folder is not None:
        print(f"ips view: annotations are saved under {folder.root}", flush=True)
    print(
        f"ips view: {len(catalog)} slides ({n_heat} with heatmaps) at {url_of(server)}  (Ctrl-C stops)",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
