"""Accuracy and time per verification of every method, on the same pairs.

Protocol (``auditlens.evaluation.protocol``): each photo against its own
product's original (genuine), 3 random products of other coarse classes (impostor) and
every other product of its own coarse class (hard impostor). Verification: EER and TAR
at FAR 1% over all those pairs (and EER on the hard pairs alone); TAR at FAR 1% rests on
a handful of impostor scores, so it is the median and range over the protocol's impostor
draws, as ``auditlens evaluate`` reports it. Identification: top-1 over every product of
the catalogue. Every method scores the full photo x product
matrix once; the pairs are read out of it, so all methods see identical pairs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from auditlens.catalog import Catalog, LabelledPhoto
from auditlens.evaluation import metrics
from auditlens.evaluation.evaluate import draw_spread
from auditlens.evaluation.protocol import IMPOSTOR_DRAWS, Embedded, impostor_draws
from auditlens.evaluation.protocol import make_pairs as protocol_pairs

from .common import Timing, measure_interleaved
from .peers import Method, ProductRef

# -- metrics and pairs: the evaluation module's, so the bench and `evaluate` agree ----------
METRICS_SOURCE = "auditlens.evaluation.metrics"


def eer(genuine, impostor) -> float:
    return metrics.eer(genuine, impostor).eer


def tar_at_far(genuine, impostor, far: float) -> float:
    return metrics.tar_at_far(genuine, impostor, far)[0]


def top1(scores, truth) -> float:
    return metrics.topk_accuracy(scores, truth, 1)


def _embedded(photos: list[LabelledPhoto], truth: np.ndarray, scores: np.ndarray) -> Embedded:
    return Embedded(photos, np.zeros((len(photos), 1), np.float32), truth, scores.astype(np.float64))


def make_pairs(photos: list[LabelledPhoto], truth: np.ndarray, scores: np.ndarray,
               groups: list[str], seed: int = 0):
    """(genuine scores, impostor scores, hard impostor scores, pair count) of the
    protocol's pairs."""
    pairs = protocol_pairs(_embedded(photos, truth, scores), groups, seed=seed)
    kind = pairs.kind
    return (pairs.score[kind == "genuine"], pairs.score[kind != "genuine"],
            pairs.score[kind == "hard"], len(pairs.score))


def draws_spread(photos: list[LabelledPhoto], truth: np.ndarray, scores: np.ndarray,
                 groups: list[str], seed: int = 0, draws: int = IMPOSTOR_DRAWS) -> dict:
    """EER, TAR at FAR 1% and AUC over the protocol's ``draws`` impostor draws (seeds
    ``seed`` ..), each as {min, median, max}: ``auditlens evaluate``'s spread. TAR at FAR 1%
    is left out when the draws have too few impostor pairs to resolve 1% (fewer than 100)."""
    pairs = impostor_draws(_embedded(photos, truth, scores), groups, seed=seed, draws=draws)
    spread = draw_spread(pairs, {"all": np.ones(len(photos), dtype=bool)}, seed)
    return {"draws": spread["draws"], **spread["all"]}


@dataclass
class MethodResult:
    name: str
    describe: str
    eer: float
    eer_hard: float | None
    tar_at_far1: dict | None
    """TAR at FAR 1% over the protocol's impostor draws: {min, median, max}; None when the
    impostor pairs are too few to resolve FAR 1%."""
    impostor_draws: int
    top1: float
    verify: Timing | None
    """One verification on the phone: prepare the query photo and score it (median, p95);
    timed by :func:`time_verifications`, every method in alternation."""
    prepare_query_ms: float
    """Mean time to prepare one query photo while building the score matrix."""
    score_ms: float
    """Mean time per pair score while building the score matrix."""
    enroll_ms: float | None
    """Mean time to prepare one reference from its original; None for a method that reads
    its references from the bundle (auditlens: its enrolment rate is in the scale section)."""
    reference_bytes: float
    """Mean storage per prepared reference."""
    scores: np.ndarray
    """(N, P) photo x product score matrix."""
    genuine: np.ndarray
    impostor: np.ndarray
    timing_cycle: list
    """(photo, reference) pairs :func:`time_verifications` cycles through."""

    def to_dict(self) -> dict:
        return {
            "method": self.name, "describe": self.describe, "eer": self.eer,
            "eer_hard": self.eer_hard,
            "tar_at_far_1pct": self.tar_at_far1["median"] if self.tar_at_far1 else None,
            "tar_at_far_1pct_range": [self.tar_at_far1["min"], self.tar_at_far1["max"]] if self.tar_at_far1 else None,
            "impostor_draws": self.impostor_draws, "impostor_pairs": len(self.impostor), "top1": self.top1,
            "verify": self.verify.to_dict() if self.verify else None, "prepare_query_ms_mean": self.prepare_query_ms,
            "score_ms_mean": self.score_ms, "prepare_reference_ms_mean": self.enroll_ms,
            "reference_bytes": self.reference_bytes,
        }


def run_method(method: Method, catalog: Catalog, photos: list[LabelledPhoto], groups: list[str],
               *, timing_photos: int, log=print) -> MethodResult:
    """The method's accuracy on the protocol's pairs; its verification is timed later,
    beside the others' (:func:`time_verifications`)."""
    method.setup()
    products = [ProductRef(p.product_id, p.image) for p in catalog]
    t0 = time.perf_counter()
    refs = [method.prepare_reference(p) for p in products]
    enroll_ms = (time.perf_counter() - t0) * 1e3 / len(refs)
    t0 = time.perf_counter()
    queries = [method.prepare_query(ph.photo) for ph in photos]
    query_ms = (time.perf_counter() - t0) * 1e3 / len(queries)
    t0 = time.perf_counter()
    scores = method.score_matrix(refs, queries)
    score_ms = (time.perf_counter() - t0) * 1e3 / scores.size
    index = {p.product_id: i for i, p in enumerate(products)}
    truth = np.array([index[ph.product_id] for ph in photos], dtype=np.int64)

    genuine, impostor, hard, n_pairs = make_pairs(photos, truth, scores, groups)
    spread = draws_spread(photos, truth, scores, groups)
    # the verifications timed later: photos decoded from their files, scored against their own product
    sample = photos[:: max(1, len(photos) // timing_photos)][:timing_photos]
    cycle = [(ph.photo, refs[index[ph.product_id]]) for ph in sample]
    result = MethodResult(
        method.name, method.describe, eer(genuine, impostor),
        eer(genuine, hard) if len(hard) else None, spread.get("tar_at_far_1%"), spread["draws"],
        top1(scores, truth), None, query_ms, score_ms,
        None if method.references_from_bundle else enroll_ms,
        float(np.mean([method.reference_bytes(r) for r in refs])), scores, genuine, impostor, cycle,
    )
    log(f"  {method.name:14s} EER {result.eer:6.1%}  TAR@FAR1% {tar_cell(result.tar_at_far1):18s}  "
        f"top-1 {result.top1:6.1%}  ({n_pairs} pairs, {len(impostor)} impostors a draw, "
        f"{result.impostor_draws} draws)")
    return result


def tar_cell(spread: dict | None) -> str:
    """TAR at FAR 1% as the report shows it: median (min-max) over the impostor draws."""
    if not spread:
        return "n/a"
    return f"{spread['median']:.1%} ({spread['min']:.1%}-{spread['max']:.1%})"


def time_verifications(methods: list[Method], results: list[MethodResult], repeats: int) -> None:
    """Time one verification of every method in alternation (a, b, c, a, b, c, ...), each
    cycling through its own sample photos, so that a shared machine's drifting load falls
    on every method alike; sets each result's ``verify``."""
    def cycling(method: Method, cycle: list):
        state = {"i": 0}

        def one():
            photo, ref = cycle[state["i"] % len(cycle)]
            state["i"] += 1
            method.verify(photo, ref)
        return one

    if not results:
        return
    runs = max(len(r.timing_cycle) for r in results) * repeats
    timings = measure_interleaved([cycling(m, r.timing_cycle) for m, r in zip(methods, results)], runs)
    for r, t in zip(results, timings):
        r.verify = t
