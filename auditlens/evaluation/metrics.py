"""Verification and identification metrics, in plain numpy, with exact definitions.

Conventions used by every function here:

* A *score* is a similarity: higher means "more likely the same product". A pair is
  **accepted** when ``score >= threshold`` (the same rule as ``Verifier.verify``).
* ``genuine`` holds the scores of same-product pairs, ``impostor`` those of
  different-product pairs.
* ``FAR(t) = #{impostor >= t} / #impostor`` (false-accept rate),
  ``FRR(t) = #{genuine < t} / #genuine`` (false-reject rate), ``TAR(t) = 1 - FRR(t)``.
  Both are step functions of ``t``; a tie with the threshold is an *accept*.
* The *operating points* are the thresholds ``t`` in the sorted unique scores of both
  sets, plus ``+inf`` (accept nothing: FAR 0, TAR 0). The lowest score accepts every
  pair (FAR 1, TAR 1). No other threshold gives a different (FAR, TAR).

Every function raises ``ValueError`` on an empty score set.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "OperatingPoints", "operating_points", "roc_auc", "eer", "EER", "threshold_at_far",
    "tar_at_far", "far_frr_at", "topk_accuracy", "identification_ranks", "probit",
    "COLLAPSED_SCORE", "ONE_LATENT_COSINE", "mean_cross_cosine",
]

COLLAPSED_SCORE = 0.98
"""A mean cosine between *different* products this high: the encoder maps everything to
one point, so any product scores like the right one (the shipped model scores other
products about 0 on average over grocery-dev's val photos; an encoder trained for a few
hundred steps from scratch gave its originals 0.9999)."""


def _scores(values, name: str) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"no {name} scores")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} scores contain NaN or infinity")
    return a


@dataclass(frozen=True)
class OperatingPoints:
    """Every distinct operating point, by increasing threshold.

    ``thresholds[i]`` accepts ``far[i]`` of the impostors and ``tar[i]`` of the genuine
    pairs; the last threshold is ``+inf``. ``far`` and ``tar`` never increase along it.
    """

    thresholds: np.ndarray
    far: np.ndarray
    tar: np.ndarray

    @property
    def frr(self) -> np.ndarray:
        return 1.0 - self.tar


def operating_points(genuine, impostor) -> OperatingPoints:
    """(threshold, FAR, TAR) at every distinct threshold: the ROC and DET curves' points."""
    g = np.sort(_scores(genuine, "genuine"))
    i = np.sort(_scores(impostor, "impostor"))
    thresholds = np.unique(np.concatenate([g, i]))
    # #{x >= t} = n - #{x < t} = n - searchsorted(x, t, 'left')
    tar = (g.size - np.searchsorted(g, thresholds, side="left")) / g.size
    far = (i.size - np.searchsorted(i, thresholds, side="left")) / i.size
    return OperatingPoints(np.append(thresholds, np.inf), np.append(far, 0.0), np.append(tar, 0.0))


def far_frr_at(genuine, impostor, threshold: float) -> tuple[float, float]:
    """(FAR, FRR) when accepting ``score >= threshold``."""
    g = _scores(genuine, "genuine")
    i = _scores(impostor, "impostor")
    return float((i >= threshold).mean()), float((g < threshold).mean())


def roc_auc(genuine, impostor) -> float:
    """Area under the ROC curve: the probability that a random genuine pair scores
    higher than a random impostor pair, a tie counting one half (Mann-Whitney U / (n_g n_i)).

    This equals the trapezoidal area under the ROC through :func:`operating_points`.
    """
    g = _scores(genuine, "genuine")
    i = _scores(impostor, "impostor")
    both = np.concatenate([g, i])
    order = np.argsort(both, kind="mergesort")
    sorted_scores = both[order]
    ranks = np.empty(both.size, dtype=np.float64)
    # average 1-based ranks over ties
    uniq, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: g.size].sum() - g.size * (g.size + 1) / 2.0
    return float(u / (g.size * i.size))


@dataclass(frozen=True)
class EER:
    """The equal error rate and the operating point that realises it best."""

    eer: float
    """Where FAR = FRR on the straight-line interpolation between consecutive operating
    points (the convention of the ROC's trapezoidal area)."""
    threshold: float
    """Of the two operating points around the crossing, the one whose FAR and FRR are
    closer (on a tie, the higher threshold: fewer false accepts). An actual score, so a
    deployed threshold reproduces ``far`` and ``frr`` exactly on these pairs."""
    far: float
    """FAR at ``threshold``."""
    frr: float
    """FRR at ``threshold``."""

    def to_dict(self) -> dict:
        return {"eer": self.eer, "threshold": self.threshold, "far": self.far, "frr": self.frr}


def eer(genuine, impostor) -> EER:
    """Equal error rate, see :class:`EER` for the exact definition.

    FAR falls and FRR rises along the operating points (increasing threshold), from
    (FAR 1, FRR 0) to (FAR 0, FRR 1), so they cross exactly once. Between the last point
    ``a`` with ``FAR >= FRR`` and the next point ``b``, the segment from ``a`` to ``b`` is
    followed linearly: ``EER = FAR_a + s (FAR_b - FAR_a)`` where ``s`` solves
    ``FAR_a + s dFAR = FRR_a + s dFRR``.
    """
    pts = operating_points(genuine, impostor)
    far, frr = pts.far, pts.frr
    diff = far - frr  # non-increasing, starts >= 0 (FAR 1), ends < 0 (FRR 1)
    a = int(np.nonzero(diff >= 0)[0][-1])
    if diff[a] == 0 or a == len(diff) - 1:
        value = float(far[a])
        best = a
    else:
        b = a + 1
        s = diff[a] / (diff[a] - diff[b])
        value = float(far[a] + s * (far[b] - far[a]))
        best = b if abs(diff[b]) <= abs(diff[a]) else a
    t = float(pts.thresholds[best])
    return EER(value, t, float(far[best]), float(frr[best]))


def threshold_at_far(impostor, target_far: float) -> float:
    """The smallest threshold whose FAR on ``impostor`` is at most ``target_far``.

    At most ``k = floor(target_far * n)`` impostors may be accepted; the ``(k+1)``-th
    highest impostor score ``v`` must be rejected, so the threshold is the next float32
    above ``v`` (scores are float32 cosines on the device): every threshold in
    ``(v, that float]`` gives the same FAR and TAR on these pairs, and any lower one a
    higher FAR. Impostors tied at ``v`` are all rejected with it. When ``k >= n`` (every
    impostor may be accepted) it is the lowest impostor score.
    """
    if not 0.0 <= target_far <= 1.0:
        raise ValueError(f"target FAR must be within 0..1, not {target_far}")
    i = np.sort(_scores(impostor, "impostor"))[::-1]
    k = int(np.floor(target_far * i.size + 1e-9))
    if k >= i.size:
        return float(i[-1])
    return float(np.nextafter(np.float32(i[k]), np.float32(np.inf)))


def tar_at_far(genuine, impostor, target_far: float) -> tuple[float, float, float]:
    """(TAR, measured FAR, threshold) at :func:`threshold_at_far`: the highest TAR of any
    threshold whose FAR on these impostors is at most ``target_far`` (no interpolation)."""
    g = _scores(genuine, "genuine")
    t = threshold_at_far(impostor, target_far)
    far, _ = far_frr_at(g, impostor, t)
    return float((g >= t).mean()), far, t


def identification_ranks(scores, true_index) -> np.ndarray:
    """1-based rank of each row's true column in ``scores`` (N, P), pessimistic on ties:
    ``rank = 1 + #{j != true : scores[j] >= scores[true]}``."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(true_index, dtype=np.int64)
    if s.ndim != 2 or t.shape != (s.shape[0],):
        raise ValueError("scores must be (N, P) and true_index (N,)")
    if s.shape[0] == 0:
        raise ValueError("no photos to rank")
    true_scores = s[np.arange(len(t)), t]
    return (s >= true_scores[:, None]).sum(axis=1)  # counts the true column itself once


def topk_accuracy(scores, true_index, k: int) -> float:
    """Share of rows whose true column ranks within the top ``k`` (see
    :func:`identification_ranks` for ties)."""
    return float((identification_ranks(scores, true_index) <= k).mean())


def probit(p) -> np.ndarray:
    """Standard normal quantile, for DET plots (p clipped to [1e-6, 1 - 1e-6])."""
    from statistics import NormalDist

    nd = NormalDist()
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.vectorize(nd.inv_cdf, otypes=[np.float64])(p)


ONE_LATENT_COSINE = 0.999
"""A mean cosine between *different* images this high: the encoder gives every image one
latent (collapsed runs measured 0.9999 to 1.0). Stricter than :data:`COLLAPSED_SCORE`,
because images alike in kind score high between them with a trained model too: the
shipped model gives 50 made-up products (coloured shapes on white) 0.983."""


def mean_cross_cosine(unit_rows) -> float:
    """Mean cosine between the *different* rows of unit vectors (N, D), N >= 2, from their
    sum: O(N D) memory, not the N x N matrix."""
    rows = np.asarray(unit_rows, dtype=np.float64)
    n = len(rows)
    if n < 2:
        raise ValueError("needs two rows or more")
    total = rows.sum(axis=0)
    return float((total @ total - (rows * rows).sum()) / (n * (n - 1)))
