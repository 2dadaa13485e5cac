"""Names and constants of the ips store format (docs/FORMAT.md), shared by writer and readers."""

FORMAT_VERSION = 1
COMPLETE_MARKER = "ips_complete.json"
PARTIAL_SUFFIX = ".partial"
MASK_ARRAY = "mask"
GRIDS_GROUP = "grids"
FEATURES_GROUP = "features"
COORDS_ARRAY = "coords"
TISSUE_ARRAY = "tissue"
EMBEDDINGS_ARRAY = "embeddings"
DEFAULT_GRID = "default"
IPS_ATTR = "ips"
OME_ATTR = "ome"
