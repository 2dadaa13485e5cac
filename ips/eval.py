"""Heatmaps against planted truth: how well a heatmap's attention finds the objects of a synthetic set.

The synthetic stores (`ips.synthetic`) hold, per grid, the share of each patch inside a planted object
(`ips_truth/...`, `(N,)` float). A heatmap's `scores.zarr` (`ips heatmap`) holds the attention of every
patch `(N, T)`. `lesion_auroc` compares the two for one slide; `heatmap_truth_summary` averages it over
slides, per task.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# a patch at least a quarter inside the object counts as positive for the "core" AUROC
CORE_SHARE = 0.25


def lesion_auroc(
    scores_path: str | Path,
    store_path: str | Path,
    task: int = 0,
    min_share: float | None = None,
    truth: str = "lesion",
) -> float:
    """AUROC of the heatmap's attention of each patch against the truth "overlaps a lesion".

    `scores_path`: a heatmap's scores.zarr (`attention (N, T)`, its grid's name); `store_path`: the
    slide's store with that grid's truth `(N,)` at `ips.synthetic.truth_key(truth, grid)`: the share of
    each patch inside a lesion (`truth="digit"` for the digits of a Megapixel MNIST canvas). `min_share`
    None: positives are the patches with any share > 0, negatives all others. `min_share` s: positives
    hold a share >= s, negatives none at all, and the patches in between (a sliver of the lesion's edge,
    which look like background) are left out. NaN when the slide has no positive or no negative patch.
    """
    import zarr

    from ips.format.names import DEFAULT_GRID
    from ips.model.metrics import auroc
    from ips.synthetic import truth_key

    scores = zarr.open_group(str(scores_path), mode="r")
    attention = np.asarray(scores["attention"][...])[:, task]
    key = truth_key(truth, scores.attrs.get("grid", DEFAULT_GRID))  # the truth of the heatmap's grid
    share = np.asarray(zarr.open_group(str(store_path), mode="r")[key][...])
    if min_share is None:
        return auroc(attention, share > 0)
    keep = (share >= min_share) | (share == 0)
    return auroc(attention[keep], share[keep] >= min_share)


def heatmap_truth_summary(
    pairs: Sequence[tuple[Path, Path]], tasks: Sequence[str], truth: str = "lesion"
) -> dict[str, dict[str, float]]:
    """Per task: mean per-slide AUROC over `pairs` of (scores.zarr, store), "any" share and "core" share.

    Slides without a positive or a negative patch give NaN and are left out of the means; `n_slides`
    counts the slides that entered them.
    """
    summary: dict[str, dict[str, float]] = {}
    for i, task in enumerate(tasks):
        anyshare = np.array([lesion_auroc(sc, st, task=i, truth=truth) for sc, st in pairs], dtype=float)
        core = np.array(
            [lesion_auroc(sc, st, task=i, min_share=CORE_SHARE, truth=truth) for sc, st in pairs], dtype=float
        )
        counted = ~np.isnan(anyshare)
        summary[task] = {
            "heatmap_auroc": float(np.mean(anyshare[counted])) if counted.any() else float("nan"),
            "heatmap_auroc_core": float(np.nanmean(core)) if (~np.isnan(core)).any() else float("nan"),
            "n_slides": int(counted.sum()),
        }
    return summary
