"""``auditlens calibrate``: choose a bundle's decision threshold for a target false-accept
rate on labelled photos, and write it into the bundle.

The photos are paired by the evaluation protocol (:mod:`.protocol`); the impostor pairs
(random products of other groups and every other product of the same group) give the
false-accept rate ``FAR(t) = #{impostor score >= t} / #impostor``, pooled over 20 draws
of the random impostors (seeds ``seed`` to ``seed + 19``: the mean FAR over the draws), so
that the threshold does not jump with one draw's few highest impostor scores. The
threshold is the *smallest* one whose FAR on these pairs is at most the target
(:func:`metrics.threshold_at_far`): the most genuine photos accepted for that false-accept
budget.

The bundle's ``decision`` then holds::

    threshold      the decision threshold (cosine)
    target_far     the false-accept rate asked for
    measured_far   FAR at the threshold on the calibration pairs (<= target_far)
    measured_far_upper95  a one-sided 95% upper bound on that rate (Wilson score, over
                   one draw's impostor pairs: the threshold was chosen on these same pairs,
                   so the measured rate itself is the optimistic end)
    measured_tar   share of genuine pairs accepted at the threshold
    calibrated_on  what data: photos file, photos, genuine / impostor pairs
    far_curve      [[score, far], ...] by increasing score: the measured FAR of a
                   threshold at that score, which ``Verifier.estimated_far`` interpolates
                   to give each verdict a calibrated false-accept estimate
    pairs, protocol, model_id, calibrated_at   details for the record

The bundle is re-written whole through :func:`write_bundle` (atomically, every sha256
renewed). A signed bundle is re-signed with ``--sign-key``; without one calibration
refuses, unless ``--drop-signature`` says to write it unsigned.

Calibrate on photos the evaluation does not use (e.g. the training photos when
evaluating on the validation photos): a threshold measured on its own test photos
flatters the test.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from auditlens.catalog import Catalog, LabelledPhoto, read_labelled_photos, unchecked_verdicts
from auditlens.cli import non_negative_int, open_catalog_said, photo_shift, thread_count
from auditlens.device_app.bundle import sha256_bytes
from auditlens.device_app.cells import DEFAULT_SD_WEIGHT, npy_bytes, score_ceiling
from auditlens.device_app.preprocess import PreprocessSpec, check_shift
from auditlens.device_app.rivals import ALONE_KEYS, RIVALS
from auditlens.device_app.rivals import DEFAULT_WEIGHT as DEFAULT_RIVAL_WEIGHT
from auditlens.device_app.rivals import MAX_WEIGHT as MAX_RIVAL_WEIGHT
from auditlens.device_app.second_look import DEFAULT_BAND, SecondLook
from auditlens.device_app.signing import read_key_file
from auditlens.errors import AuditlensError, BundleSignatureError, CatalogError
from auditlens.evaluation import metrics
from auditlens.evaluation.protocol import (
    COPY_SCORE,
    DEFAULT_SEED,
    HARD,
    IMPOSTOR_DRAWS,
    N_IMPOSTORS,
    Embedded,
    Pairs,
    contradictory_note,
    embed_photos,
    not_enrolled_note,
    product_groups,
    protocol_description,
    unreadable_note,
)
from auditlens.evaluation.protocol import (
    impostor_draws as pair_draws,
)
from auditlens.files import atomic_write

CURVE_POINTS = 160
"""About how many [score, far] points the far_curve keeps (log-spaced in FAR)."""

MAX_SD_WEIGHT = 5.0
"""The largest ``--cells-weight`` taken: the cell term then outweighs the cosine many times
over (the cells alone scored trained products worse: docs/ablation.md)."""

MIN_IMPOSTORS_PER_TARGET = 10
"""Warn when fewer than this many impostor pairs are expected to pass at the target."""

# manifest keys write_bundle makes itself; every other key is carried over
_WRITTEN_BY_WRITE_BUNDLE = {"format", "format_version", "created", "auditlens_version", "model",
                            "references_model_id", "preprocess", "latent_dim", "latent_dtype",
                            "counts", "decision", "probe", "files"}


def far_curve(impostor, points: int = CURVE_POINTS) -> list[list[float]]:
    """[[score, far], ...] by strictly increasing score, where ``far`` is the share of
    impostors scoring at least ``score``.

    Points are taken at log-spaced ranks of the descending impostor scores (dense where
    FAR is small, where thresholds live), plus the lowest impostor score (FAR 1) and, last,
    the next float above the highest impostor score (FAR 0).
    """
    desc = np.sort(np.asarray(impostor, dtype=np.float64))[::-1]
    n = desc.size
    if n == 0:
        raise ValueError("no impostor scores")
    asc = desc[::-1]
    ranks = np.unique(np.round(np.geomspace(1, n, max(points - 1, 2))).astype(np.int64)) - 1
    ranks = np.union1d(ranks, [n - 1])
    curve: dict[float, float] = {}
    for r in ranks:
        s = float(np.float32(desc[r]))
        far = (n - np.searchsorted(asc, desc[r], side="left")) / n
        curve[round(s, 6)] = float(far) if round(s, 6) not in curve else max(curve[round(s, 6)], float(far))
    top = float(np.nextafter(np.float32(desc[0]), np.float32(np.inf)))
    out = sorted(curve.items())
    if round(top, 6) <= out[-1][0]:
        top = out[-1][0] + 1e-6
    out.append((round(top, 6), 0.0))
    return [[s, round(f, 6)] for s, f in out]


CALIBRATION_MARGIN = 1e-3
"""Largest step the threshold is moved above the highest rejected impostor."""


def _with_margin(smallest: float, impostor: np.ndarray) -> float:
    """Move the smallest admissible threshold halfway to the next impostor score (at most
    :data:`CALIBRATION_MARGIN`), so the same FAR holds when a device recomputes a score a
    few float32 steps differently (another CPU, another summation order)."""
    above = impostor[impostor >= smallest]
    gap = float(above.min() - smallest) if above.size else 2 * CALIBRATION_MARGIN
    return smallest + min(gap / 2, CALIBRATION_MARGIN)


def decide(genuine, impostor, target_far: float, *, hard=None, ceiling: float = 1.0) -> dict:
    """The decision dict for ``target_far`` from genuine and impostor scores (no I/O).
    ``ceiling``: the highest score there is (a cosine's 1; more with a cell term:
    :func:`~auditlens.device_app.cells.score_ceiling`)."""
    genuine = np.asarray(genuine, dtype=np.float64)
    impostor = np.asarray(impostor, dtype=np.float64)
    # A threshold is a cosine: at most 1, even when impostors score 1 (one image enrolled
    # under two products), and then the measured FAR says the target was not reached.
    threshold = min(_with_margin(metrics.threshold_at_far(impostor, target_far), impostor), ceiling)
    far, frr = metrics.far_frr_at(genuine, impostor, threshold)
    out = {
        "threshold": threshold,
        "target_far": float(target_far),
        "measured_far": far,
        "measured_tar": 1.0 - frr,
    }
    if hard is not None and np.size(hard):
        out["measured_far_hard"] = float((np.asarray(hard) >= threshold).mean())
    out["far_curve"] = _with_point(far_curve(impostor), threshold, far)
    return out


def decide_second_look(first: Pairs, second: np.ndarray, impostor_first: np.ndarray,
                       impostor_second: np.ndarray, threshold: float, target_far: float, *,
                       shift: float, band: float, ceiling: float = 1.0) -> dict:
    """The decision's ``second_look`` block (:mod:`auditlens.device_app.second_look`).

    ``first``: one draw's pairs with their first scores, ``second`` their second-look
    scores; ``impostor_first``/``impostor_second``: every draw's impostor pairs, pooled.
    The second look's threshold is the smallest that keeps both its own scores' FAR and
    that of the verdicts (first and second looks together) within ``target_far``."""
    own = metrics.threshold_at_far(impostor_second, target_far)
    look = SecondLook(shift, band, own)
    near = look.near(impostor_first, threshold)
    # false accepts the verdicts may still take from the second looks
    allowed = math.floor(target_far * impostor_first.size + 1e-9) - int((impostor_first[~near] >= threshold).sum())
    looked = impostor_second[near]
    smallest = own
    if looked.size and (looked >= own).sum() > allowed:
        smallest = max(own, metrics.threshold_at_far(looked, (max(allowed, 0) + 0.5) / looked.size))
    second_threshold = min(_with_margin(smallest, impostor_second), ceiling)
    look = replace(look, threshold=second_threshold)
    verdict = look.decision_scores(first.score, second, threshold)
    pooled = look.decision_scores(impostor_first, impostor_second, threshold)
    hard = first.kind == HARD
    out = {"photo_shift": shift, "band": band, "threshold": second_threshold,
           "measured_far": float((pooled >= threshold).mean()),
           "measured_tar": float((verdict[first.genuine] >= threshold).mean()),
           "share_of_pairs": float(np.mean(look.near(first.score, threshold)))}
    if hard.any():
        out["measured_far_hard"] = float((verdict[hard] >= threshold).mean())
    out["far_curve"] = _with_point(far_curve(impostor_second), second_threshold,
                                   float((impostor_second >= second_threshold).mean()))
    return out


def _no_decision(decision: dict, genuine: np.ndarray, impostor: np.ndarray,
                 top_cosine: float | None = None) -> str:
    """Why a calibration stores nothing: its target rate cannot be kept, or only by a
    threshold that accepts none of the genuine pairs; and what to do about it.
    ``top_cosine``: the impostors' highest cosine, when their scores add a cell term."""
    target, threshold = decision["target_far"], decision["threshold"]
    top_impostor, top_genuine = float(impostor.max()), float(genuine.max()) if genuine.size else float("nan")
    if decision["measured_far"] > target:
        said = (f"no threshold reaches a false-accept rate of {target:g}: {decision['measured_far']:.1%} of "
                f"the impostor pairs score {threshold:.4f} or more, as high as a cosine goes")
    else:
        said = (f"the threshold that keeps a false-accept rate of {target:g}, {threshold:.4f}, accepts none "
                f"of the {genuine.size} genuine pairs: the highest impostor scores {top_impostor:.4f}, the "
                f"best genuine pair {top_genuine:.4f}")
    if (top_impostor if top_cosine is None else top_cosine) >= COPY_SCORE:  # a copy: a cosine of 1
        return (f"{said}. Impostors that score like the product itself come from products enrolled from "
                "one image, or from an encoder that gives every image nearly the same latent (train it "
                "longer); nothing was written")
    return (f"{said}. Check the photos' labels; if they are right, the model cannot tell these products "
            "apart at that rate: calibrate on more labelled photos, or for a higher --target-far; nothing "
            "was written")


def second_look_refusal(decision: dict, genuine_pairs: int) -> str | None:
    """Why a decision with a second look stores nothing: its verdicts accept none of the
    genuine pairs, though the first look alone accepts some (``None`` when they accept any)."""
    look = decision.get("second_look")
    if not look or look["measured_tar"] > 0:
        return None
    return (f"with the second look (views moved by {look['photo_shift']:g}) the verdicts accept none of the "
            f"{genuine_pairs} genuine pairs, the first look alone {decision['measured_tar']:.1%}: "
            "calibrate without it (--second-look 0); nothing was written")


def far_upper_bound(far: float, pairs: int, z: float = 1.645) -> float:
    """One-sided upper confidence bound (95% for the default ``z``) on a false-accept rate
    measured as ``far`` over ``pairs`` impostor pairs (Wilson score interval: sound at 0
    false accepts, where it is about 2.7/pairs). Pairs that share photos are not
    independent, so the true uncertainty is somewhat larger still."""
    if pairs <= 0:
        return 1.0
    n, z2 = float(pairs), z * z
    centre = far + z2 / (2 * n)
    spread = z * math.sqrt(far * (1 - far) / n + z2 / (4 * n * n))
    return min(1.0, (centre + spread) / (1 + z2 / n))


def _with_point(curve: list[list[float]], score: float, far: float) -> list[list[float]]:
    """``curve`` with the measured point (``score``, ``far``) in it, FAR kept non-increasing:
    a device interpolates between points, and a gap around the threshold would quote a
    verdict scored right at it a rate above the one measured there (1.0012% for 0.907%)."""
    point = [round(score, 6), round(far, 6)]
    merged = sorted([p for p in curve if p[0] != point[0]] + [point])
    fars = np.minimum.accumulate([f for _, f in merged])  # non-increasing as scores grow
    return [[s, float(f)] for (s, _), f in zip(merged, fars)]


def rewrite_bundle(bundle, out: str | os.PathLike, decision: dict, *,
                   signing_key: bytes | str | None = None) -> Path:
    """Write ``bundle`` (a loaded ``ReferenceBundle``) to ``out`` with a new decision,
    keeping everything else (products, references, thumbnails, model, probe, extra keys)."""
    from auditlens.device_app.bundle import write_bundle

    m = bundle.manifest
    extra = {k: v for k, v in m.items() if k not in _WRITTEN_BY_WRITE_BUNDLE}
    extra["created"] = m.get("created")  # the references date from enrolment, not from now
    thumbnails = [bundle.thumbnails[p.thumbnail] for p in bundle.products]
    return write_bundle(
        out, model_content=bundle.model_content, spec=bundle.spec, products=bundle.products,
        references=bundle.references, thumbnails=thumbnails, decision=decision,
        probe_latent=m["probe"]["latent"], extra=extra, signing_key=signing_key, cells=bundle.cells,
        cohort=bundle.cohort,
    )


def calibrate(
    bundle: str | os.PathLike,
    labelled_photos: Sequence[LabelledPhoto] | str | os.PathLike,
    target_far: float = 0.01,
    *,
    out: str | os.PathLike | None = None,
    write: bool = True,
    catalog: Catalog | None = None,
    seed: int = DEFAULT_SEED,
    n_impostors: int = N_IMPOSTORS,
    impostor_draws: int = IMPOSTOR_DRAWS,
    signing_key: bytes | str | None = None,
    drop_signature: bool = False,
    threads: int = 1,
    progress: bool = True,
    model_card: str | os.PathLike | None = None,
    allow_few_photos: bool = False,
    second_look: float | None = None,
    second_look_band: float | None = None,
    cells_weight: float | None = None,
    rival_weight: float = DEFAULT_RIVAL_WEIGHT,
) -> dict:
    """Calibrate the bundle at ``bundle`` for ``target_far`` and return the decision.

    Photos too few to measure ``target_far`` at all (fewer distinct impostor pairs, over
    every draw, than one false accept at that rate needs) are refused with a
    :class:`CatalogError` unless ``allow_few_photos``: the threshold would only keep out
    the handful of impostors seen, and the bundle would say "calibrated for 1%". Photos
    that give fewer than ``MIN_IMPOSTORS_PER_TARGET`` expected false accepts a draw are
    warned about, and refused for a ``model_card`` unless ``allow_few_photos``.

    The bundle is re-written in place, or to ``out`` (a folder, or a path ending in
    ``.zip``); nothing is written when ``write`` is false. ``model_card``: the decision
    is meant for that card too (the caller writes it with `write_model_card`), so the card
    is checked before anything is embedded or written, and a bundle with reference photos
    is refused.

    ``second_look``: the shift of a second look near the threshold (:mod:`auditlens.device_app.second_look`)
    to calibrate with the threshold, for first scores within ``second_look_band`` of it
    (default: the bundle's band, or :data:`DEFAULT_BAND`); 0 for none; None keeps the
    bundle's (none when it has none).

    ``cells_weight``: for a bundle with feature-map cells, the cell term's weight in
    standard deviations of the photos' cosines (:mod:`auditlens.device_app.cells`; default
    :data:`~auditlens.device_app.cells.DEFAULT_SD_WEIGHT`; 0: the cosine alone). The
    threshold, its rates and the second look are calibrated on the scores with that term.

    ``rival_weight``: the rival term's weight (:mod:`auditlens.device_app.rivals`; 0: none).
    The decision is calibrated with it, and stores the bundle's products and the decision
    calibrated without it, which bundles that lack some of those products judge by.
    """
    from auditlens.device_app.bundle import (
        ReferenceBundle,
        check_replaceable,
        is_signed,
        products_fingerprint,
        refuse_non_bundle,
    )
    from auditlens.device_app.signing import public_key_of
    from auditlens.device_app.verifier import Verifier, VerifierOptions

    if not 0.0 < target_far < 1.0:
        raise CatalogError(f"target false-accept rate must be within (0, 1), not {target_far}")
    if isinstance(bundle, (str, os.PathLike)):
        refuse_non_bundle(bundle)  # a model, card or run given as the bundle: said as such
    if write:  # before the photos are embedded, not after
        if out is not None:
            check_replaceable(out)
        elif isinstance(bundle, (str, os.PathLike)):  # in place: the bundle's own folder or zip
            check_replaceable(bundle, advice="move what is not the bundle's out of it, or write the "
                              "calibrated bundle elsewhere with --out")
    source = ""
    if isinstance(labelled_photos, (str, os.PathLike)):
        source = str(labelled_photos)
        labelled_photos = read_labelled_photos(labelled_photos)
    photos = list(labelled_photos)
    unchecked = unchecked_verdicts(photos)
    signed = is_signed(bundle)
    if write and signed and signing_key is None and not drop_signature:
        raise BundleSignatureError(
            f"{bundle} is signed; re-writing its manifest needs the publisher's key to re-sign "
            "it: pass --sign-key publisher.key (or --drop-signature to write it unsigned, which "
            "devices that require signed bundles will refuse)")

    # Re-signing vouches for the whole manifest: the signature there must be the same
    # key's, or an edit made after signing would be signed anew.
    public_key = public_key_of(signing_key) if signing_key is not None else None
    b = ReferenceBundle.load(bundle, public_key=public_key if write and signed else None)
    if model_card is not None:  # before the photos are embedded and the bundle rewritten
        read_model_card(model_card, b.model_id)
        if len(b.references) > len(b.products):
            raise CatalogError(
                f"{bundle} holds {len(b.references) - len(b.products)} reference photo(s) besides "
                "its originals; a model card's threshold is for bundles of originals alone (enroll "
                "gives it to those), and photo references raise impostor scores: calibrate this "
                "bundle without --model-card")
    if second_look is None:
        second_look = b.second_look.photo_shift if b.second_look else 0.0
    if second_look_band is None:
        second_look_band = b.second_look.band if b.second_look else DEFAULT_BAND
    elif not second_look:
        raise CatalogError(f"--second-look-band {second_look_band:g} without a second look: "
                           + ("--second-look 0 drops the bundle's" if b.second_look else
                              "the bundle has none; give --second-look SHIFT"))
    if second_look:
        try:
            check_shift(b.spec, second_look)
        except ValueError as exc:
            raise CatalogError(f"--second-look {second_look:g}: {exc}") from exc
        if not 0.0 < second_look_band <= 1.0:
            raise CatalogError(f"--second-look-band must be a cosine band within (0, 1], not {second_look_band:g}")
    if cells_weight is not None and not (math.isfinite(cells_weight) and 0 <= cells_weight <= MAX_SD_WEIGHT):
        raise CatalogError(f"--cells-weight must be within 0..{MAX_SD_WEIGHT:g} standard deviations, "
                           f"not {cells_weight:g}")
    if not (math.isfinite(rival_weight) and 0 <= rival_weight <= MAX_RIVAL_WEIGHT):
        raise CatalogError(f"--rival-weight must be within 0..{MAX_RIVAL_WEIGHT:g}, not {rival_weight:g}")
    if cells_weight and b.cells is None:
        raise CatalogError(f"--cells-weight {cells_weight:g}: {bundle} holds no feature-map cells; export "
                           "the model with --cells and enrol the catalogue with it")
    verifier = Verifier(b, VerifierOptions(num_threads=threads, check_quality=False))
    embedded = embed_photos(verifier, photos, progress=progress, desc="calibrating",
                            second_look_shift=second_look)
    if not embedded.photos:
        raise CatalogError(f"{source or 'labelled photos'}: none of the {len(photos)} photos could be "
                           f"used ({len(embedded.failed)} unreadable, {len(embedded.not_enrolled)} of "
                           "products not in the bundle)")
    cells_block = None
    if b.cells is not None:
        sd_weight = DEFAULT_SD_WEIGHT if cells_weight is None else float(cells_weight)
        spread = float(np.std(embedded.cosines))
        if sd_weight:
            cells_block = {"weight": round(min(1.0, sd_weight * spread), 6), "sd_weight": sd_weight,
                           "cosine_sd": round(spread, 6), "cohort": len(b.cohort),
                           "cohort_sha256": sha256_bytes(npy_bytes(b.cohort))}
        embedded = embedded.weighed(cells_block["weight"] if cells_block else 0.0)
    groups, _ = product_groups(b, catalog)

    def decide_on(emb: Embedded):
        """The threshold (and second look) for scores ``emb``, with the draws and pairs they rest on."""
        # The FAR pooled over several draws of the random impostors: one draw's 1% rests on
        # about ten impostor scores of a few hundred photos, and its threshold jumps with them.
        draws = pair_draws(emb, groups, seed=seed, n_impostors=n_impostors, draws=impostor_draws)
        pairs = draws[0]
        genuine = pairs.score[pairs.genuine]
        impostor = np.concatenate([d.score[d.impostor] for d in draws])
        if impostor.size == 0:
            raise CatalogError("calibration needs impostor pairs: " + (
                "the bundle holds a single product" if len(b.products) < 2 else
                f"--impostors {n_impostors} draws none, and no product shares a group with another"))
        n_products = len(b.products)
        distinct = np.unique(np.concatenate([d.photo[d.impostor] * n_products + d.product[d.impostor]
                                             for d in draws])).size
        if target_far * distinct < 1 and not allow_few_photos:
            raise CatalogError(
                f"{source or 'labelled photos'}: {len(emb.photos)} usable photo(s) give {distinct} distinct "
                f"impostor pairs, too few to measure a false-accept rate of {target_far:g} (that needs at "
                f"least {math.ceil(1 / target_far)}): calibrate on more labelled photos, or a higher "
                "--target-far, or pass --allow-few-photos to store a threshold that only keeps out the "
                "impostors seen")
        ceiling = score_ceiling(cells_block["weight"]) if cells_block else 1.0
        decision = decide(genuine, impostor, target_far, hard=pairs.score[pairs.kind == HARD],  # the same in every draw
                          ceiling=ceiling)
        if decision["measured_far"] > target_far or decision["measured_tar"] == 0:
            # a threshold that cannot keep its rate would be stored as if it did, and one that
            # keeps it only by accepting no genuine photo is no decision: nothing is written
            cosines = emb.scores if emb.cosines is None else emb.cosines
            top_cosine = max(float(cosines[d.photo, d.product][d.impostor].max(initial=-1.0)) for d in draws)
            raise CatalogError(f"{source or 'labelled photos'}: " + _no_decision(decision, genuine, impostor, top_cosine))
        if second_look:  # the second look's threshold, beside the first
            decision["second_look"] = decide_second_look(
                pairs, emb.second_scores[pairs.photo, pairs.product], impostor,
                np.concatenate([emb.second_scores[d.photo, d.product][d.impostor] for d in draws]),
                decision["threshold"], target_far, shift=second_look, band=second_look_band, ceiling=ceiling)
            refused = second_look_refusal(decision, genuine.size)
            if refused:
                raise CatalogError(f"{source or 'labelled photos'}: {refused}")
        return decision, draws, pairs, distinct

    alone = None
    if rival_weight:  # the threshold without rivals too, for bundles that lack some of these products
        alone = decide_on(embedded)[0]
        embedded = embedded.weighed(cells_block["weight"] if cells_block else 0.0, rival_weight)
    decision, draws, pairs, distinct = decide_on(embedded)
    if cells_block:
        decision["cells"] = cells_block
    counts = pairs.counts()
    decision["calibrated_on"] = (
        f"{Path(source).name if source else 'labelled photos'}: {len(embedded.photos)} photos, "
        f"{counts['genuine']} genuine / {counts['impostor'] + counts[HARD]} impostor pairs "
        f"({counts[HARD]} hard)")
    decision["pairs"] = {"photos": len(embedded.photos), "genuine": counts["genuine"],
                         "impostor": counts["impostor"] + counts[HARD], "hard": counts[HARD],
                         "photos_unreadable": len(embedded.failed),
                         "photos_not_enrolled": len(embedded.not_enrolled),
                         "photo_rows_repeated": len(embedded.repeated),
                         "photo_rows_contradictory": len(embedded.contradictory),
                         "products_with_photos": len(set(embedded.truth.tolist()))}
    decision["photos_source"] = Path(source).name if source else ""
    decision["protocol"] = {k: v for k, v in protocol_description(seed, n_impostors).items()
                            if k in ("version", "seed", "random_impostors_per_photo")}
    decision["protocol"]["impostor_draws"] = len(draws)
    decision["model_id"] = b.model_id
    decision["products"] = products_fingerprint(p.product_id for p in b.products)
    decision["calibrated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    decision["warnings"] = []
    per_draw = counts["impostor"] + counts[HARD]  # the draws repeat the hard pairs
    decision["measured_far_upper95"] = far_upper_bound(decision["measured_far"], per_draw)
    if alone is not None:
        alone["measured_far_upper95"] = far_upper_bound(alone["measured_far"], per_draw)
        decision[RIVALS] = {"weight": float(rival_weight), "products": [p.product_id for p in b.products],
                            "alone": {k: alone[k] for k in ALONE_KEYS if k in alone}}
    if target_far * per_draw < MIN_IMPOSTORS_PER_TARGET:
        few = (f"only {per_draw} impostor pairs a draw ({distinct} distinct over {len(draws)} draws): "
               f"a FAR of {target_far:g} is measured from {target_far * per_draw:.1f} expected false "
               "accepts a draw")
        if model_card is not None and write and not allow_few_photos:
            # a card's threshold becomes the default of every bundle enrolled with the model
            # later (a dry run writes no card: it only warns)
            raise CatalogError(
                f"{source or 'labelled photos'}: {few}, too few for the model card, whose threshold "
                f"every later enrolment takes (at least {math.ceil(MIN_IMPOSTORS_PER_TARGET / target_far)} "
                "a draw): calibrate on more labelled photos, leave out --model-card, or pass "
                "--allow-few-photos")
        decision["warnings"].append(
            f"{few}; use more photos" + ("" if target_far * per_draw >= 1 else
                                         ": with under one a draw, the threshold is little more "
                                         "than the highest impostor score"))
    if second_look:
        if decision["second_look"]["measured_tar"] < decision["measured_tar"]:
            decision["warnings"].append(
                f"the second look lowers the share of genuine pairs accepted on these photos "
                f"({decision['measured_tar']:.1%} -> {decision['second_look']['measured_tar']:.1%}): "
                "consider calibrating without it (--second-look 0)")
    if not counts[HARD]:
        decision["warnings"].append(
            "no look-alike impostor pairs (no product shares its catalogue group with another): "
            "the rate ignores products that look alike, such as two brands of milk; give the "
            "catalogue a group column (or pass --catalog with one)")
    uncovered = len(b.products) - decision["pairs"]["products_with_photos"]
    if uncovered:
        decision["warnings"].append(
            f"calibrated with {len(b.products)} products, {uncovered} of them without a photo: the "
            "rate is measured on the others' photos, and products the model was not trained on "
            "are often falsely accepted more than that; add photos of every product, of newly "
            "added ones above all")
    if unchecked:
        decision["warnings"].append(unchecked)
    if embedded.repeated:
        decision["warnings"].append(f"{len(embedded.repeated)} photo rows repeat an earlier row (the same "
                                    "image and product); each photo counted once")
    if embedded.contradictory:
        decision["warnings"].append(contradictory_note(embedded.contradictory))
    if embedded.not_enrolled:
        decision["warnings"].append(not_enrolled_note(embedded.not_enrolled, b))
    said_here = {}  # the manifest names skipped photos by file name; the command line, in full
    if embedded.failed:
        decision["warnings"].append(unreadable_note(embedded.failed, file_names=True))
        said_here[decision["warnings"][-1]] = unreadable_note(embedded.failed)

    if write:
        target = Path(out) if out is not None else Path(bundle)
        rewrite_bundle(b, target, decision, signing_key=signing_key)
        ReferenceBundle.load(target)  # prove the written bundle is valid
        decision_written_to = str(target)
    else:
        decision_written_to = None
    decision["_written_to"] = decision_written_to
    decision["_views"] = {"photo_zooms": list(b.spec.photo_zooms), "photo_mirror": b.spec.photo_mirror,
                          "photo_shift": b.spec.photo_shift}
    decision["_was_signed"] = signed
    decision["_said_here"] = said_here
    decision["_cohort"] = b.cohort  # for a model card (write_model_card)
    return decision


def read_model_card(card_path: str | os.PathLike, model_id: str) -> dict:
    """The model card at ``card_path``, refused when it is missing or unreadable, or when
    the model beside it (same stem, ``.tflite``) is not the model ``model_id``."""
    from auditlens.device_app.interpreter import model_id_of
    from auditlens.export.enroll import load_model_card

    card_path = Path(card_path)
    model = card_path.with_suffix(".tflite")
    if model.is_file() and (beside := model_id_of(model.read_bytes())) != model_id:
        raise CatalogError(f"{card_path}: the model beside it ({model.name}, {beside}) is not the "
                           f"calibrated model {model_id}")
    card = load_model_card(card_path)
    if card.get("model_id") not in (None, model_id):  # a card copied away from its model
        raise CatalogError(f"{card_path}: the card is for model {card['model_id']}, not the calibrated "
                           f"model {model_id}")
    if not isinstance(card.get("preprocess"), dict):
        raise CatalogError(f"{card_path}: not a model card (no 'preprocess' object)")
    try:
        PreprocessSpec.from_dict(card["preprocess"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CatalogError(f"{card_path}: its 'preprocess' cannot be read: {exc}") from exc
    return card


def write_model_card(card_path: str | os.PathLike, decision: dict, model_id: str,
                     views: dict | None = None) -> dict:
    """Store ``decision`` in a model card (``models/encoder.json``) under ``"decision"``,
    so that `auditlens enroll` writes it into every bundle made with that model.

    ``views``: the calibrated bundle's ``photo_zooms``, ``photo_mirror`` and ``photo_shift``. A threshold
    holds only for photos embedded as the calibration embedded them, and `enroll` applies
    the card's decision only to bundles with the card's views, so the card takes them too.

    Refuses what `read_model_card` refuses. Returns the views it changed, as
    ``{name: (before, after)}``, for the caller to tell the engineer.
    """
    card_path = Path(card_path)
    card = read_model_card(card_path, model_id)
    card["decision"] = {k: v for k, v in decision.items() if not k.startswith("_")}
    if decision.get("cells"):  # the cohort the threshold was calibrated with, for later enrolments
        from auditlens.export.enroll import cohort_path

        with atomic_write(cohort_path(card_path), binary=True) as fh:
            fh.write(npy_bytes(decision["_cohort"]))
    changed = {}
    if views is not None:
        before = PreprocessSpec.from_dict(card["preprocess"])
        after = PreprocessSpec.from_dict({**card["preprocess"], **views})
        card["preprocess"] = after.to_dict()  # as export writes it: a shift of 0 is no key
        changed = {name: (getattr(before, name), getattr(after, name)) for name in views
                   if getattr(before, name) != getattr(after, name)}
    with atomic_write(card_path) as fh:
        json.dump(card, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return changed


# -- CLI --------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = (
        "Choose a bundle's decision threshold for a target false-accept rate (FAR): the\n"
        "smallest threshold whose FAR on the impostor pairs of LABELLED.csv is at most the\n"
        "target (evaluation protocol: for each photo, 3 random products of other groups and\n"
        "every other product of its own group, the catalogue's 'group' column). Writes\n"
        "threshold, target_far, measured_far/_tar, calibrated_on and far_curve into the\n"
        "manifest's decision; verdicts then report an estimated false-accept rate.\n"
        "Calibrate on photos you do not evaluate on.")
    p.epilog = ("examples:\n"
                "  auditlens calibrate --bundle bundle/ --photos heldout.csv --target-far 0.01\n"
                "  auditlens calibrate --bundle b.zip --photos heldout.csv --out b-cal.zip --sign-key publisher.key\n"
                "  auditlens calibrate --bundle bundle/ --photos heldout.csv --model-card runs/mine/encoder.json\n"
                "(heldout.csv: labelled photos the encoder was not trained on; a threshold chosen on\n"
                "training photos accepts far fewer genuine field photos than it promises)")
    p.add_argument("--bundle", "-b", type=Path, required=True, help="reference bundle folder or .zip")
    p.add_argument("--photos", required=True, type=Path, metavar="LABELLED.csv",
                   help="CSV of photo,product_id (paths relative to the CSV)")
    p.add_argument("--target-far", type=float, default=0.01,
                   help="false-accept rate to calibrate for (default: %(default)s)")
    p.add_argument("--out", "-o", type=Path, default=None, metavar="NEW_BUNDLE",
                   help="write the calibrated bundle here (folder or .zip) instead of in place")
    p.add_argument("--dry-run", action="store_true", help="print the threshold, write nothing (neither bundle nor model card)")
    p.add_argument("--model-card", type=Path, default=None, metavar="ENCODER.json",
                   help="also store the decision in this model card, for `auditlens enroll`")
    p.add_argument("--sign-key", type=Path, default=None, metavar="publisher.key",
                   help="re-sign the manifest with this Ed25519 private key")
    p.add_argument("--allow-few-photos", action="store_true",
                   help="store a threshold even when the photos give fewer distinct impostor pairs "
                   "than the target FAR can be measured on (1/FAR), or, with --model-card, fewer "
                   f"than {MIN_IMPOSTORS_PER_TARGET} expected false accepts a draw (1,000 pairs at 1%%); "
                   "refused otherwise")
    p.add_argument("--drop-signature", action="store_true",
                   help="write a signed bundle back unsigned (devices requiring signatures refuse it)")
    p.add_argument("--catalog", default=None, help="catalogue to take group/kind from when the bundle lacks them")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="protocol seed (default: %(default)s)")
    p.add_argument("--impostors", type=non_negative_int, default=N_IMPOSTORS,
                   help="random impostors from other groups per photo (default: %(default)s)")
    p.add_argument("--threads", type=thread_count, default=min(2, os.cpu_count() or 1),
                   help="interpreter threads (default: %(default)s)")
    p.add_argument("--second-look", type=photo_shift, default=None, metavar="SHIFT",
                   help="also calibrate a second look at photos that score near the threshold: their "
                   "view moved left, right, up and down by SHIFT of the crop box (0.15 measured best), "
                   "five times the encoder runs for those photos alone; 0: none (default: the bundle's own)")
    p.add_argument("--second-look-band", type=float, default=None, metavar="COSINE",
                   help="how near the threshold a first score takes the second look (default: the "
                   f"bundle's, else {DEFAULT_BAND})")
    p.add_argument("--cells-weight", type=float, default=None, metavar="SD",
                   help="for a bundle whose model gives feature-map cells (export --cells): the cell "
                   "term's weight in the score, in standard deviations of the photos' cosines "
                   f"(default {DEFAULT_SD_WEIGHT:g}; 0: the cosine alone)")
    p.add_argument("--rival-weight", type=float, default=DEFAULT_RIVAL_WEIGHT, metavar="W",
                   help="lower a claim's score by W x what another enrolled product beats it by "
                   "(look-alikes then fall below the threshold); calibrated with the bundle's products, "
                   "and bundles that lack some of them take the threshold calibrated without it "
                   f"(default {DEFAULT_RIVAL_WEIGHT:g}; 0: none)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args) -> int:
    catalog = open_catalog_said(args.catalog) if args.catalog else None
    key = read_key_file(args.sign_key, "publisher's private key")
    try:
        d = calibrate(args.bundle, args.photos, args.target_far, out=args.out, write=not args.dry_run,
                      catalog=catalog, seed=args.seed, n_impostors=args.impostors, signing_key=key,
                      drop_signature=args.drop_signature, threads=args.threads,
                      progress=not args.no_progress, model_card=args.model_card,
                      allow_few_photos=args.allow_few_photos, second_look=args.second_look,
                      second_look_band=args.second_look_band, cells_weight=args.cells_weight,
                      rival_weight=args.rival_weight)
    except ValueError as exc:
        raise CatalogError(str(exc)) from exc
    print(f"threshold {d['threshold']:.6f} for target FAR {d['target_far']:.2%}: measured FAR "
          f"{d['measured_far']:.2%} over {d['protocol']['impostor_draws']} impostor draws of "
          f"{d['pairs']['impostor']} pairs (95% upper bound {d['measured_far_upper95']:.2%}), "
          f"TAR {d['measured_tar']:.2%}"
          + (f", FAR on hard impostors {d['measured_far_hard']:.2%}" if "measured_far_hard" in d else ""))
    look = d.get("second_look")
    if look:
        print(f"second look (views moved by {look['photo_shift']:g}) for first scores within {look['band']:g} "
              f"of the threshold ({look['share_of_pairs']:.1%} of the pairs): threshold {look['threshold']:.6f}; "
              f"the verdicts: FAR {look['measured_far']:.2%}, TAR {look['measured_tar']:.2%}"
              + (f", FAR on hard impostors {look['measured_far_hard']:.2%}" if "measured_far_hard" in look else ""))
    if d.get("cells"):
        print(f"scores: cosine + {d['cells']['weight']:.4f} x the cell score's z against a cohort of {d['cells']['cohort']} originals "
              f"({d['cells']['sd_weight']:g} x the photos' cosine spread {d['cells']['cosine_sd']:.4f})")
    if d.get(RIVALS):
        alone = d[RIVALS]["alone"]
        print(f"scores less {d[RIVALS]['weight']:g} x what a rival product beats the claim by; without rivals "
              f"(bundles lacking some of these {len(d[RIVALS]['products'])} products): threshold "
              f"{alone['threshold']:.6f}, TAR {alone['measured_tar']:.2%}")
    print(f"calibrated on {d['calibrated_on']}; far_curve of {len(d['far_curve'])} points")
    for w in d["warnings"]:
        print(f"auditlens: warning: {d['_said_here'].get(w, w)}", file=sys.stderr)
    if d["_written_to"]:
        sig = ""
        if d["_was_signed"]:
            sig = " (re-signed)" if key else " (written UNSIGNED: the signature was dropped)"
        elif key:
            sig = " (signed)"
        print(f"wrote the calibrated bundle to {d['_written_to']}{sig}")
    if args.model_card and args.dry_run:
        print(f"dry run: model card {args.model_card} left as it is")
    elif args.model_card:
        try:  # checked again at write time: the card may have changed during the calibration
            changed = write_model_card(args.model_card, d, d["model_id"], views=d["_views"])
        except OSError as exc:
            raise AuditlensError(f"{args.model_card}: cannot update the model card: {exc}") from exc
        print(f"stored the decision in model card {args.model_card}")
        for name, (before, after) in changed.items():  # every later enrolment embeds photos so
            print(f"  and the calibrated bundle's {name}: {before} -> {after} (bundles enrolled "
                  "with this card now embed photos this way)")
    return 0
