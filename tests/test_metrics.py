"""Evaluation metrics against values computed by hand on tiny fixed score sets."""

import numpy as np
import pytest

from auditlens.evaluation import metrics as m

# genuine and impostor scores; accepted when score >= threshold
G = [0.9, 0.8, 0.7, 0.4]
I = [0.75, 0.5, 0.3, 0.2, 0.1]  # noqa: E741


def f32_above(x: float) -> float:
    return float(np.nextafter(np.float32(x), np.float32(np.inf)))


def test_operating_points_by_hand():
    pts = m.operating_points(G, I)
    assert pts.thresholds.tolist() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.75, 0.8, 0.9, np.inf]
    assert pts.far.tolist() == pytest.approx([1, .8, .6, .4, .4, .2, .2, 0, 0, 0])
    assert pts.tar.tolist() == pytest.approx([1, 1, 1, 1, .75, .75, .5, .5, .25, 0])


def test_auc_by_hand():
    # of the 4 x 5 pairs, genuine wins: 0.9 -> 5, 0.8 -> 5, 0.7 -> 4 (loses to 0.75), 0.4 -> 3
    assert m.roc_auc(G, I) == pytest.approx(17 / 20)
    assert m.roc_auc([1, 2], [0, -1]) == 1.0
    assert m.roc_auc([0, -1], [1, 2]) == 0.0


def test_auc_counts_ties_as_half():
    assert m.roc_auc([0.5, 0.5], [0.5]) == pytest.approx(0.5)
    # 0.6 beats 0.5 (1) and ties 0.6 (1/2); 0.5 ties 0.5 (1/2) and loses to 0.6 (0): 2 / 4
    assert m.roc_auc([0.6, 0.5], [0.5, 0.6]) == pytest.approx(0.5)
    assert m.roc_auc([0.6, 0.6], [0.5, 0.6]) == pytest.approx(3 / 4)


def test_auc_is_the_trapezoid_under_the_roc():
    rng = np.random.default_rng(1)
    g = np.round(rng.normal(1, 1, 300), 1)  # rounded: many ties
    i = np.round(rng.normal(0, 1, 500), 1)
    pts = m.operating_points(g, i)
    far, tar = pts.far[::-1], pts.tar[::-1]
    trapezoid = float(np.sum(np.diff(far) * (tar[1:] + tar[:-1]) / 2))
    brute = float(((g[:, None] > i[None]) + 0.5 * (g[:, None] == i[None])).mean())
    assert m.roc_auc(g, i) == pytest.approx(trapezoid) == pytest.approx(brute)


def test_eer_by_hand():
    # threshold 0.5: FAR 0.4, FRR 0.25; threshold 0.7: FAR 0.2, FRR 0.25. Along the segment,
    # FAR - FRR goes 0.15 -> -0.05, so s = 0.75 and EER = 0.4 - 0.75 * 0.2 = 0.25.
    e = m.eer(G, I)
    assert e.eer == pytest.approx(0.25)
    assert e.threshold == 0.7  # |0.2 - 0.25| < |0.4 - 0.25|
    assert (e.far, e.frr) == pytest.approx((0.2, 0.25))


def test_eer_exact_crossing_and_separation():
    # perfectly separated: EER 0 at the lowest genuine score
    e = m.eer([0.9, 0.8], [0.1, 0.2])
    assert (e.eer, e.threshold, e.far, e.frr) == (0.0, 0.8, 0.0, 0.0)
    # crossing on an operating point: at 0.5 FAR = 1/2 = FRR
    e = m.eer([0.9, 0.4], [0.6, 0.1])
    assert e.eer == pytest.approx(0.5)
    # all scores tied: the only points are (FAR 1, FRR 0) and (0, 1): EER 0.5
    assert m.eer([0.5, 0.5], [0.5]).eer == pytest.approx(0.5)
    # fully inverted: every impostor above every genuine
    assert m.eer([0.1], [0.9]).eer == pytest.approx(1.0)


def test_eer_matches_a_dense_sweep_on_continuous_scores():
    rng = np.random.default_rng(2)
    g, i = rng.normal(2, 1, 2000), rng.normal(0, 1, 2000)
    e = m.eer(g, i)
    far, frr = m.far_frr_at(g, i, e.threshold)
    assert abs(far - frr) < 0.01 and abs(e.eer - (far + frr) / 2) < 0.005
    assert e.eer == pytest.approx(0.1587, abs=0.02)  # two unit normals 2 apart: Phi(-1)


def test_tar_at_far_by_hand():
    # FAR 20%: one of 5 impostors may pass; the 2nd highest (0.5) must not: t just above 0.5
    tar, far, t = m.tar_at_far(G, I, 0.2)
    assert t == f32_above(0.5) and far == pytest.approx(0.2) and tar == pytest.approx(0.75)
    # FAR 10% allows floor(0.5) = 0 false accepts: t just above 0.75
    tar, far, t = m.tar_at_far(G, I, 0.1)
    assert t == f32_above(0.75) and far == 0.0 and tar == pytest.approx(0.5)
    # FAR 100%: everything may pass
    tar, far, t = m.tar_at_far(G, I, 1.0)
    assert t == 0.1 and far == 1.0 and tar == 1.0


def test_threshold_at_far_rejects_ties_together():
    # FAR 25% of 4 allows one false accept, but the two top impostors tie: both rejected
    t = m.threshold_at_far([0.9, 0.9, 0.5, 0.1], 0.25)
    assert t == f32_above(0.9)
    assert m.far_frr_at([1.0], [0.9, 0.9, 0.5, 0.1], t)[0] == 0.0


def test_threshold_at_far_is_the_smallest_that_meets_the_target():
    rng = np.random.default_rng(3)
    imp = rng.normal(0, 1, 997).astype(np.float32)
    for target in (0.001, 0.01, 0.05, 0.2, 0.5):
        t = m.threshold_at_far(imp, target)
        assert (imp >= t).mean() <= target
        below = float(np.nextafter(np.float32(t), np.float32(-np.inf)))
        assert (imp >= below).mean() > target


def test_topk_by_hand():
    scores = np.array([
        [0.9, 0.1, 0.2, 0.3],   # true 0: rank 1
        [0.5, 0.4, 0.6, 0.1],   # true 1: rank 3
        [0.2, 0.7, 0.7, 0.0],   # true 2, tied with 1: pessimistic rank 2
    ])
    truth = [0, 1, 2]
    assert m.identification_ranks(scores, truth).tolist() == [1, 3, 2]
    assert m.topk_accuracy(scores, truth, 1) == pytest.approx(1 / 3)
    assert m.topk_accuracy(scores, truth, 2) == pytest.approx(2 / 3)
    assert m.topk_accuracy(scores, truth, 5) == 1.0


def test_empty_and_invalid_inputs_fail_clearly():
    with pytest.raises(ValueError, match="genuine"):
        m.eer([], [0.1])
    with pytest.raises(ValueError, match="impostor"):
        m.roc_auc([0.1], [])
    with pytest.raises(ValueError, match="NaN"):
        m.roc_auc([np.nan], [0.1])
    with pytest.raises(ValueError):
        m.threshold_at_far([0.1], 1.5)


def test_probit():
    assert m.probit(0.5) == pytest.approx(0.0)
    assert m.probit([0.025, 0.975]) == pytest.approx([-1.959964, 1.959964], abs=1e-5)


def test_mean_cross_cosine_is_the_mean_over_pairs_of_different_rows():
    from auditlens.evaluation.metrics import mean_cross_cosine

    rows = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # cosines 1, 0, 0 between different rows
    assert mean_cross_cosine(rows) == pytest.approx(1 / 3)
    assert mean_cross_cosine(np.array([[0.6, 0.8], [-0.6, -0.8]])) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="two rows"):
        mean_cross_cosine(np.array([[1.0, 0.0]]))
