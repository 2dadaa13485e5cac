"""Synthetic datasets with known truth: Megapixel MNIST and slides/volumes with planted lesions.

Both write ips stores (through `data_prep.convert.convert_array`) and a manifest; `ips demo` and the
tests build on them. See `megapixel_mnist` and `lesions` for the generation rules.
"""

from ips.synthetic._store import TRUTH_GROUP, GridSpec, grid_share, truth_key
from ips.synthetic.lesions import (
    Lesion,
    LesionSlide,
    lesion_pixel_mask,
    lesion_tasks,
    make_lesion_dataset,
    render_lesion_slide,
    render_slide_2d,
    render_volume_3d,
)
from ips.synthetic.megapixel_mnist import (
    MegapixelSample,
    Placement,
    labels_from_placements,
    load_mnist_csv,
    make_megapixel_mnist,
    make_sample,
    megapixel_mnist_tasks,
    split_digit_pools,
)

__all__ = [
    "TRUTH_GROUP",
    "GridSpec",
    "grid_share",
    "Lesion",
    "LesionSlide",
    "MegapixelSample",
    "Placement",
    "labels_from_placements",
    "lesion_pixel_mask",
    "lesion_tasks",
    "load_mnist_csv",
    "make_lesion_dataset",
    "make_megapixel_mnist",
    "make_sample",
    "megapixel_mnist_tasks",
    "render_lesion_slide",
    "render_slide_2d",
    "render_volume_3d",
    "split_digit_pools",
    "truth_key",
]
