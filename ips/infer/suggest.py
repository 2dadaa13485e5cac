"""Where to annotate next: the scores `ips suggest` ranks slides and regions by (pure numpy; the passes
that produce their inputs are in `ips.infer.worklist`).

A slide is seen by R runs (checkpoints: e.g. the seeds of one experiment). Each component lies in [0, 1]:

- **uncertainty**: the entropy of the runs' mean predictive distribution, over its maximum. Every task is
  a set of categorical distributions `(R, L, K)`: binary `L=1, K=2` (`[1-p, p]`), multiclass `L=1, K=C`,
  multilabel `L=C, K=2`; the value is the mean over tasks of the mean over L of `H(mean_r p) / log K` (each task
  weighs the same, however many labels it has);
- **disagreement** between runs: the mutual information between prediction and run (BALD),
  `(H(mean_r p) - mean_r H(p_r)) / log K`, averaged alike; 0 with one run;
- **attention entropy**: `H(a) / log N` of the slide's attention `a (N,)` (each run, task; mean): 1 when
  the model looks everywhere alike (it has not found what the label is about), 0 on one patch;
- **novelty**: how unlike the slide is to the annotated set: `min_j (1 - cos(e, e_j)) / 2` over the
  annotated slides' embeddings `e_j` and the slides already suggested before it (k-centre greedy, so the
  suggestions do not repeat one another); 1 when there is nothing to compare with. The embeddings are
  the slides' mean patch embeddings, centred on their mean over candidates and annotated slides.

The score of a slide is the sum of the chosen components; slides are picked greedily (the best score,
then novelty is updated against the pick), ties to the earlier slide. Within a slide, a patch's region
score is `mean_r(N a_r) + sd_r(N a_r)` (attention relative to uniform, mean over tasks): where the model
looks, plus where its runs disagree on where to look.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COMPONENTS = ("uncertainty", "disagreement", "attention_entropy", "novelty")


def _entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats over the last axis (0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=-1)


def categorical(kind: str, probs: np.ndarray) -> np.ndarray:
    """Per-run probabilities of one task -> categorical distributions `(R, L, K)`.

    binary: `(R,)` P(positive) -> `(R, 1, 2)`; multiclass: `(R, C)` -> `(R, 1, C)`; multilabel: `(R, C)`
    per-label P -> `(R, C, 2)`."""
    p = np.asarray(probs, dtype=np.float64)
    if kind == "binary":
        p = p.reshape(-1, 1)
        return np.stack([1 - p, p], axis=-1)
    if kind == "multiclass":
        return p[:, None, :]
    if kind == "multilabel":
        return np.stack([1 - p, p], axis=-1)
    raise ValueError(f"no predictive distribution for task kind {kind!r}")


def uncertainty_and_disagreement(dists: Sequence[np.ndarray]) -> tuple[float, float]:
    """(uncertainty, disagreement) of one slide from its tasks' distributions `[(R, L, K), ...]`: per task
    the mean over its L distributions, then the mean over tasks."""
    u, d = [], []
    for p in dists:
        k = p.shape[-1]
        mean_h = _entropy(p.mean(axis=0))  # (L,)
        each_h = _entropy(p).mean(axis=0)  # (L,)
        u.append(float((mean_h / np.log(k)).mean()))
        d.append(float((np.maximum(mean_h - each_h, 0.0) / np.log(k)).mean()))
    return float(np.mean(u)), float(np.mean(d))


def attention_entropy(attention: np.ndarray) -> float:
    """`(R, N, T)` attention shares (each column sums to 1) -> mean of `H / log N`; 0 for N = 1."""
    a = np.asarray(attention, dtype=np.float64)
    n = a.shape[1]
    if n < 2:
        return 0.0
    return float((_entropy(np.moveaxis(a, 1, -1)) / np.log(n)).mean())


def cosine_novelty(e: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`(S, D)` embeddings against `(A, D)` -> `(S,)`: `min_j (1 - cos) / 2`, 1 when A = 0."""
    e = np.asarray(e, dtype=np.float64)
    if len(reference) == 0:
        return np.ones(len(e))
    r = np.asarray(reference, dtype=np.float64)
    unit = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    ref = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    return ((1 - unit @ ref.T) / 2).min(axis=1).clip(0.0, 1.0)


@dataclass
class Candidate:
    """One unannotated slide's fixed components and its embedding `(D,)` (mean over runs)."""

    slide_id: str
    uncertainty: float
    disagreement: float
    attention_entropy: float
    embedding: np.ndarray


@dataclass
class Ranked:
    """A suggestion: its rank (1 = first), total score and components (novelty as when it was picked)."""

    slide_id: str
    rank: int
    score: float
    uncertainty: float
    disagreement: float
    attention_entropy: float
    novelty: float


def rank_slides(
    candidates: Sequence[Candidate],
    annotated: np.ndarray,
    budget: int,
    use: Sequence[str] = COMPONENTS,
    *,
    centre: bool = True,
) -> list[Ranked]:
    """The `budget` best candidates, greedily (module docstring); `annotated (A, D)` embeddings.

    `centre`: novelty compares embeddings minus their mean over the candidates and the annotated slides
    (mean patch embeddings of different slides share a large common part, which would leave every cosine
    near 1 and novelty near 0)."""
    bad = [c for c in use if c not in COMPONENTS]
    if bad or not use:
        raise ValueError(f"unknown score component {bad[0] if bad else ''!r}; valid: {', '.join(COMPONENTS)}")
    if budget < 1:
        raise ValueError(f"the budget must be >= 1, got {budget}")
    fixed = np.array(
        [sum(getattr(c, k) for k in use if k != "novelty") for c in candidates], dtype=np.float64
    )
    emb = np.stack([c.embedding for c in candidates]).astype(np.float64) if candidates else np.zeros((0, 1))
    reference = [np.asarray(a, dtype=np.float64) for a in annotated]
    if centre and len(emb):
        mean = np.concatenate([emb, np.reshape(annotated, (-1, emb.shape[1]))]).mean(axis=0)
        emb, reference = emb - mean, [a - mean for a in reference]
    left = list(range(len(candidates)))
    out: list[Ranked] = []
    while left and len(out) < budget:
        novelty = cosine_novelty(emb[left], np.stack(reference) if reference else np.zeros((0, emb.shape[1])))
        total = fixed[left] + (novelty if "novelty" in use else 0.0)
        j = int(np.argmax(total))  # the first of equal maxima: ties to the earlier slide
        c = candidates[left[j]]
        out.append(
            Ranked(c.slide_id, len(out) + 1, float(total[j]), c.uncertainty, c.disagreement,
                   c.attention_entropy, float(novelty[j]))
        )  # fmt: skip
        reference.append(emb[left[j]])
        del left[j]
    return out


def region_scores(attention: np.ndarray) -> np.ndarray:
    """`(R, N, T)` attention shares -> `(N,)`: `mean_r(N a) + sd_r(N a)`, `a` the mean over tasks."""
    a = np.asarray(attention, dtype=np.float64)
    rel = a.shape[1] * a.mean(axis=2)  # (R, N): 1 = uniform attention
    return rel.mean(axis=0) + rel.std(axis=0)


def top_regions(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best region scores, best first, ties to the lower index."""
    order = np.lexsort((np.arange(len(scores)), -np.asarray(scores)))
    return order[:k]
