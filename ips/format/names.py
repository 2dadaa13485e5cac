"""Names and constants of the ips store format (docs/FORMAT.md), shared by writer and readers."""

# 2: the completion marker records every written chunk/shard key with its size and crc32c
# (ips.format.checksums); version-1 stores open with a warning that they cannot be verified
# 3: the marker also records each array's metadata and each grid's attributes (ips.format.store)
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
COMPLETE_MARKER = "ips_complete.json"
PARTIAL_SUFFIX = ".partial"  # DIR/.<slide_id>.zarr.partial-<pid>: a conversion in progress (or killed)
LOCK_SUFFIX = ".lock"  # DIR/.<slide_id>.zarr.lock: held by the prep writing that store
MASK_ARRAY = "mask"
GRIDS_GROUP = "grids"
FEATURES_GROUP = "features"
COORDS_ARRAY = "coords"
TISSUE_ARRAY = "tissue"
EMBEDDINGS_ARRAY = "embeddings"
DEFAULT_GRID = "default"
IPS_ATTR = "ips"
OME_ATTR = "ome"
