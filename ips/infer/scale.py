"""How attention becomes colour: the one definition shared by the heatmap PNG (`ips heatmap`), the viewer's
overlay (`ips view`) and the GeoJSON measurements.

A patch's attention `a` is its share of the slide (the N shares sum to 1). It is shown relative to
uniform attention 1/N, as `r = log2(N * a)`: 0 where the patch gets what every patch would get if the
model looked everywhere alike, +1 at twice that, -1 at half. Colour runs from `threshold` (at or below it:
transparent, the tissue shows) to `top` (full colour); so a flat map (every r = 0) is transparent,
whatever N, and a slide whose differences are tiny stays nearly transparent instead of filling the range.

Two scales:

- per slide: `top` is the slide's own peak, but never below `MIN_TOP` (twice uniform), so a slide without
  a clear peak is not stretched over the whole colour range;
- global: one `top` for every slide, so the same colour means the same ratio on every slide: either
  `GLOBAL_TOP` (fixed, `global_scale`: the viewer's), or the highest peak of the slides drawn together
  (`cohort_scale`: `ips heatmap --scale cohort`, from one float per slide and task).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CMAP = "turbo"  # blue -> green -> yellow -> dark red: the top stands out against pale H&E
ALPHA_MAX = 0.6  # opacity of full colour: the morphology under the hottest patch stays visible
ALPHA_RAMP_END = 0.5  # opacity rises linearly from 0 (at the threshold) to ALPHA_MAX at this position
MIN_TOP = 1.0  # per-slide scale: full colour at no less than twice uniform
GLOBAL_TOP = 6.0  # global scale: full colour at 64 times uniform
FLOOR = -30.0  # log2 ratio of a patch with no attention (finite, so painting can average it)
TABLE_SIZE = 256


@dataclass(frozen=True)
class Scale:
    """Colour scale over `r = log2(N * a)`: transparent at or below `threshold`, full colour at `top` and
    above; `kind`: "slide" or "global" (how `top` was chosen; for legends); `slides`: how many slides a
    global `top` is the peak of (None: a fixed top)."""

    top: float
    threshold: float = 0.0
    kind: str = "slide"
    slides: int | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.top) and np.isfinite(self.threshold)):
            raise ValueError(
                f"a colour scale needs finite bounds, got top {self.top}, threshold {self.threshold}"
            )
        if self.top <= self.threshold:
            raise ValueError(f"colour scale top {self.top:g} must lie above its threshold {self.threshold:g}")
        if self.kind not in ("slide", "global"):
            raise ValueError(f"colour scale kind must be 'slide' or 'global', got {self.kind!r}")

    def position(self, r: np.ndarray) -> np.ndarray:
        """log2 ratios of any shape -> position in (0, 1] along the colour map; NaN (transparent) at or
        below the threshold and where `r` is not finite."""
        r = np.asarray(r, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            pos = np.clip((r - self.threshold) / (self.top - self.threshold), 0.0, 1.0)
            return np.where(np.isfinite(r) & (r > self.threshold), pos, np.nan)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"top": self.top, "threshold": self.threshold, "kind": self.kind}
        return out if self.slides is None else {**out, "slides": self.slides}


def relative(attention: np.ndarray, n: int | None = None) -> np.ndarray:
    """Attention relative to uniform, `N * a` (1: uniform); `n`: the slide's patch count (default: the
    length of `attention (N,)`)."""
    a = np.asarray(attention, dtype=np.float64)
    return a * (a.shape[0] if n is None else n)


def log_ratio(attention: np.ndarray, n: int | None = None) -> np.ndarray:
    """`r = log2(N * a)` of attention `(N,)` (or any shape with `n` given); `FLOOR` where `a` is 0."""
    rel = relative(attention, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log2(rel)
    return np.where(np.isnan(rel), np.nan, np.maximum(r, FLOOR))


def peak(attention: np.ndarray) -> float:
    """log2 of the highest ratio to uniform in a slide's attention `(N,)`; 0 without patches."""
    a = np.asarray(attention, dtype=np.float64)
    return float(log_ratio(a).max()) if a.size else 0.0


def per_slide(attention: np.ndarray, threshold: float = 0.0) -> Scale:
    """The slide's own scale: `top` = log2 of its peak ratio, at least `MIN_TOP` and above `threshold`."""
    return Scale(top=max(peak(attention), MIN_TOP, threshold + MIN_TOP), threshold=threshold, kind="slide")


def cohort_scale(peaks: Sequence[float], threshold: float = 0.0) -> Scale:
    """One scale for slides drawn together: `top` = the highest of their `peaks` (each slide's `peak`),
    at least `MIN_TOP` and above `threshold`."""
    top = max([*peaks, MIN_TOP, threshold + MIN_TOP])
    return Scale(top=top, threshold=threshold, kind="global", slides=len(peaks))


def global_scale(threshold: float = 0.0) -> Scale:
    """The same scale on every slide: full colour at `GLOBAL_TOP`."""
    return Scale(top=max(GLOBAL_TOP, threshold + MIN_TOP), threshold=threshold, kind="global")


def colour_table(n: int = TABLE_SIZE) -> np.ndarray:
    """The colour map as float `(n, 4)` RGBA in [0, 1]: entry i for position i / (n - 1); opacity 0 at
    position 0, rising to `ALPHA_MAX` at `ALPHA_RAMP_END`."""
    import matplotlib

    values = np.linspace(0.0, 1.0, n)
    table = np.asarray(matplotlib.colormaps[CMAP](values), dtype=np.float64)
    table[:, 3] = ALPHA_MAX * np.clip(values / ALPHA_RAMP_END, 0.0, 1.0)
    return table


def colorize(r: np.ndarray, scale: Scale) -> np.ndarray:
    """log2 ratios of any shape `S` -> uint8 RGBA `(*S, 4)`; transparent where `scale.position` is NaN."""
    table = np.rint(colour_table() * 255.0).astype(np.uint8)  # (256, 4)
    pos = scale.position(r)
    index = np.rint(np.nan_to_num(pos, nan=0.0) * (len(table) - 1)).astype(np.int64)
    out = table[index]
    out[np.isnan(pos)] = 0
    return out


def legend_text(scale: Scale) -> str:
    """What the colours mean, one line."""
    how = "this slide's peak" if scale.kind == "slide" else "the same on every slide"
    if scale.kind == "global" and scale.slides is not None:
        how = f"the peak of the {scale.slides} slides drawn together, the same on each"
    return (
        f"attention relative to uniform (1/N): transparent at or below {ratio_text(scale.threshold)}, "
        f"full colour at {ratio_text(scale.top)} ({how})"
    )


def ratio_text(r: float) -> str:
    """A log2 ratio as the ratio it stands for: 0 -> '1x', 3 -> '8x', -1 -> '0.5x'."""
    return f"{2.0**r:.3g}x"
