"""The rival term: a claim loses what another enrolled product beats it by.

A photo of one brand of milk claimed as another often scores above the threshold against
the claim, and higher still against its own product. The rival term reads that: with
``s`` the photo's score against the claimed product and ``r`` its best score against any
other product of the bundle (the **rival**), the judged score is::

    s - weight * max(0, r - s)

A claim the photo matches best keeps its score; one another product beats is lowered by
``weight`` times the gap. Rankings do not change (the best product keeps its score, every
other one falls by a multiple of its gap to the best), so identification is the same.

Scored this way, the look-alikes that make most false accepts fall below the threshold,
and ``auditlens calibrate --rival-weight`` sets a lower threshold for the same target
false-accept rate, which accepts more genuine photos (docs/ablation.md, "The rival term").
That rests on the look-alikes being enrolled: a photo of a product the bundle does not
hold has no rival to lose to. So a decision calibrated with the term records the products
it was calibrated with, and the threshold calibrated without it (``alone``): a bundle
that holds every one of those products (more only add rivals, which lower impostors'
scores further) takes the term and its threshold; any other bundle, the threshold without
it (:func:`effective_decision`).

Decision block, ``decision["rivals"]``::

    {"weight": 1.0, "products": [...product ids...], "alone": {threshold, far_curve, ...}}
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

RIVALS = "rivals"

RIVAL_SHORTLIST = 8
"""A photo's rival is sought among the products its cosine ranks best, this many: the
verifier adds the cell term to these alone. Any of 2 to 64 gives the same figures to a
tenth of a point (EER, TAR at FAR 1%, hard EER on all 61 products' val photos and on fold
3/3's new products): the rival that beats a claim is one of the photo's nearest products."""

DEFAULT_WEIGHT = 1.0
"""``calibrate --rival-weight``. On the shipped model's 211 val photos and three folds of
held-out products (docs/ablation.md), 1.0 lowers every set's EER; 2.0 does a little more
for trained products and raises new products' false accepts at the trained threshold."""

MAX_WEIGHT = 10.0
"""Larger weights only ask that the claim be the best product, which 10 already does
within a hundredth of a score."""

ALONE_KEYS = ("threshold", "measured_far", "measured_tar", "measured_far_hard", "measured_far_upper95",
              "far_curve", "second_look")
"""What a decision calibrated with the rival term keeps of the one calibrated without it."""


def best_rivals(scores: np.ndarray, eligible: np.ndarray | None = None) -> np.ndarray:
    """For each photo (row) and product (column), the best score of another product.

    Args:
        scores: (N, P) scores of N photos against P products.
        eligible: (N, P) bool, the products each photo's rival may be (all when None).

    Returns float32 (N, P); ``-inf`` where no other product is eligible.
    """
    scores = np.asarray(scores, dtype=np.float32)
    held = scores if eligible is None else np.where(eligible, scores, -np.inf)
    if held.shape[1] < 2:
        return np.full(held.shape, -np.inf, np.float32)
    order = np.argpartition(-held, 1, axis=1)[:, :2]  # each row's best, then its second best
    first, second = np.take_along_axis(held, order, axis=1).T[..., None]
    is_best = np.arange(held.shape[1])[None, :] == order[:, :1]
    return np.where(is_best, second, first).astype(np.float32)


def rival_shortlist(cosines: np.ndarray) -> np.ndarray | None:
    """The products each photo's rival is sought among, as the verifier seeks it: the
    cosine's best :data:`RIVAL_SHORTLIST`, as (N, P) bool; None when that is every product."""
    cosines = np.asarray(cosines)
    if cosines.shape[1] <= RIVAL_SHORTLIST:
        return None
    top = np.argpartition(-cosines, RIVAL_SHORTLIST - 1, axis=1)[:, :RIVAL_SHORTLIST]
    eligible = np.zeros(cosines.shape, dtype=bool)
    np.put_along_axis(eligible, top, True, axis=1)
    return eligible


def penalise(scores, rivals, weight: float):
    """``scores`` lowered by ``weight`` times what their rivals beat them by."""
    scores = np.asarray(scores, dtype=np.float32)
    gap = np.maximum(np.asarray(rivals, dtype=np.float32) - scores, 0.0)
    return (scores - np.float32(weight) * gap).astype(np.float32)


def applies(decision: dict, product_ids: Iterable[str]) -> bool:
    """Whether the decision weighs rivals and the bundle holds every product it was
    calibrated with."""
    block = decision.get(RIVALS)
    return bool(block) and set(block["products"]) <= set(product_ids)


def effective_decision(decision: dict, product_ids: Iterable[str]) -> dict:
    """The decision a bundle of ``product_ids`` judges by: as stored when the rival term
    applies (:func:`applies`) or none is stored, else the threshold calibrated without it."""
    block = decision.get(RIVALS)
    if not block or applies(decision, product_ids):
        return decision
    return without_rivals(decision)


def without_rivals(decision: dict) -> dict:
    """The decision calibrated without the rival term: ``decision`` with its threshold, rates
    and second look replaced by those of ``decision["rivals"]["alone"]``."""
    kept = {k: v for k, v in decision.items() if k != RIVALS and k not in ALONE_KEYS}
    return {**kept, **decision[RIVALS]["alone"]}


def missing_note(decision: dict, product_ids: Iterable[str]) -> str | None:
    """Why a stored rival term does not apply to a bundle of ``product_ids``; None if it
    does or none is stored."""
    block = decision.get(RIVALS)
    if not block:
        return None
    missing = set(block["products"]) - set(product_ids)
    if not missing:
        return None
    return (f"the threshold {decision['threshold']:.4f} weighs rival products and was calibrated with "
            f"{len(block['products'])} products, {len(missing)} of which this bundle lacks "
            f"(e.g. {sorted(missing)[0]!r}); without them a look-alike has no rival to lose to, so "
            f"the threshold calibrated without rivals applies ({block['alone']['threshold']:.4f}): "
            "calibrate the bundle on labelled photos of its own products to weigh rivals")
