"""The rival term: a claim's score less what another enrolled product beats it by, checked
by hand, through the verifier and calibration, and for bundles that lack rivals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from auditlens.cli import main
from auditlens.device_app.bundle import ReferenceBundle
from auditlens.device_app.rivals import (
    RIVAL_SHORTLIST,
    RIVALS,
    best_rivals,
    effective_decision,
    penalise,
    rival_shortlist,
)
from auditlens.device_app.verifier import Verifier, VerifierOptions
from auditlens.errors import BundleFormatError, CatalogError
from auditlens.evaluation.calibrate import calibrate
from tests.conftest import MODELS, SAMPLE


def test_best_rivals_and_the_penalty_by_hand():
    scores = np.array([[0.9, 0.5, 0.7],
                       [0.2, 0.8, 0.8],   # a tie: each is the other's rival
                       [0.1, 0.3, 0.2]], np.float32)
    np.testing.assert_allclose(best_rivals(scores), [[0.7, 0.9, 0.9], [0.8, 0.8, 0.8], [0.3, 0.2, 0.3]])
    # a rival sought among some products only: the first product is no one's rival in row 3
    eligible = np.array([[1, 1, 1], [1, 1, 1], [0, 1, 1]], bool)
    np.testing.assert_allclose(best_rivals(scores, eligible)[2], [0.3, 0.2, 0.3])
    np.testing.assert_allclose(penalise(scores, best_rivals(scores), 2.0),
                               [[0.9, 0.5 - 2 * 0.4, 0.7 - 2 * 0.2], [0.2 - 2 * 0.6, 0.8, 0.8],
                                [0.1 - 2 * 0.2, 0.3, 0.2 - 2 * 0.1]], atol=1e-6)
    # a bundle of one product has no rival, and nothing is taken off
    assert np.isneginf(best_rivals(scores[:, :1])).all()
    np.testing.assert_array_equal(penalise(scores[:, :1], best_rivals(scores[:, :1]), 1.0), scores[:, :1])


def test_the_rival_is_sought_among_the_cosines_shortlist():
    cosines = np.random.default_rng(0).normal(size=(3, 70)).astype(np.float32)
    assert rival_shortlist(cosines[:, :8]) is None
    shortlist = rival_shortlist(cosines)
    assert RIVAL_SHORTLIST == 8 and (shortlist.sum(axis=1) == RIVAL_SHORTLIST).all()
    for row, chosen in zip(cosines, shortlist):
        assert row[chosen].min() >= row[~chosen].max()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, sample_bundle):
    """The sample bundle calibrated on its photos with the rival term, and without it."""
    root = tmp_path_factory.mktemp("rivals")
    with_rivals, plain = root / "with", root / "plain"
    d = calibrate(sample_bundle, SAMPLE / "photos.csv", 0.1, out=with_rivals, progress=False, second_look=0,
                  rival_weight=1.5, allow_few_photos=True)
    calibrate(sample_bundle, SAMPLE / "photos.csv", 0.1, out=plain, progress=False, second_look=0,
              rival_weight=0, allow_few_photos=True)
    return d, with_rivals, plain


def test_verify_lowers_a_claim_by_what_its_rival_beats_it_by(calibrated, sample_photos):
    d, with_rivals, plain = calibrated
    options = VerifierOptions(check_quality=False)
    judged, raw = Verifier(with_rivals, options), Verifier(plain, options)
    assert judged.rival_weight == 1.5 and raw.rival_weight == 0
    ids = [p.product_id for p in raw.bundle.products]
    lowered = 0
    for photo in sample_photos[::2]:
        capture = raw.prepare(photo.photo)
        raw.embed(capture)
        scores = np.array([raw.capture_score(capture, pid) for pid in ids])
        cosines = raw.search.product_scores(capture.latent)
        near = np.argsort(-cosines)[:RIVAL_SHORTLIST]  # the rival is one of the photo's nearest
        for k, pid in enumerate(ids):
            rival = max(scores[q] for q in near if q != k)
            expected = scores[k] - 1.5 * max(0.0, rival - scores[k])
            verdict = judged.verify(capture, pid)
            assert verdict.score == pytest.approx(expected, abs=1e-5)
            assert verdict.threshold == d["threshold"]
            if rival > scores[k]:
                lowered += 1
                beaten_by = ids[max((q for q in near if q != k), key=lambda q: scores[q])]
                assert any(r.startswith(f"{beaten_by} scores higher") for r in verdict.reasons)
        np.testing.assert_allclose(judged.product_scores(capture.latent, capture.cells),
                                   penalise(scores, best_rivals(scores[None], rival_shortlist(cosines[None]))[0], 1.5),
                                   atol=1e-5)
        # the ranking is the same; the best product keeps its score
        assert [c.product_id for c in judged.identify(capture, 3)] == [c.product_id for c in raw.identify(capture, 3)]
        assert judged.identify(capture, 1)[0].score == pytest.approx(scores.max(), abs=1e-6)
    assert lowered > 0


def test_calibration_keeps_the_threshold_without_rivals_and_meets_its_rate(calibrated, sample_photos):
    from auditlens.evaluation.protocol import embed_photos, impostor_draws, product_groups

    d, with_rivals, plain = calibrated
    assert d[RIVALS]["weight"] == 1.5
    assert d[RIVALS]["products"] == [p.product_id for p in ReferenceBundle.load(plain).products]
    without = ReferenceBundle.load(plain).decision
    for key in ("threshold", "measured_far", "measured_tar", "far_curve"):
        assert d[RIVALS]["alone"][key] == without[key]
    # the rate stored is the one the verifier's scores give on the calibration's own photos
    verifier = Verifier(with_rivals, VerifierOptions(check_quality=False))
    embedded = embed_photos(verifier, sample_photos, progress=False)
    draws = impostor_draws(embedded, product_groups(verifier.bundle)[0])
    impostor = np.concatenate([p.score[p.impostor] for p in draws])
    assert (impostor >= d["threshold"]).mean() == pytest.approx(d["measured_far"]) and d["measured_far"] <= 0.1


def test_a_bundle_without_every_rival_judges_by_the_threshold_without_them(calibrated, tmp_path, capsys):
    d, with_rivals, _ = calibrated
    copy = tmp_path / "b"
    shutil.copytree(with_rivals, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["decision"][RIVALS]["products"].append("A-Product-Not-Enrolled")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bundle = ReferenceBundle.load(copy)
    assert bundle.rival_weight == 0 and RIVALS not in bundle.decision
    assert bundle.threshold == d[RIVALS]["alone"]["threshold"] != d["threshold"]
    assert bundle.decision["cells"] == d["cells"]
    verifier = Verifier(bundle, VerifierOptions(check_quality=False))
    assert verifier.threshold == d[RIVALS]["alone"]["threshold"] and verifier.rival_weight == 0
    assert main(["info", str(copy)]) == 0
    assert "1 of which this bundle lacks" in capsys.readouterr().out
    # more products than the calibration's only add rivals: the term applies
    stored = manifest["decision"]
    assert effective_decision(stored, [*stored[RIVALS]["products"], "Another"]) is stored


@pytest.mark.parametrize("change", [
    {"weight": float("nan")}, {"weight": 0}, {"weight": 11}, {"products": "Arla-Milk"}, {"products": []},
    {"alone": {"threshold": 20.0}}, {"alone": {"measured_far": 0.01}}, {"alone": {"threshold": 0.5, "cells": {}}},
])
def test_a_tampered_rivals_block_is_refused(calibrated, tmp_path, change):
    _, with_rivals, _ = calibrated
    copy = tmp_path / "b"
    shutil.copytree(with_rivals, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["decision"][RIVALS].update(change)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleFormatError, match="rivals"):
        ReferenceBundle.load(copy)


def test_calibrate_refuses_a_rival_weight_out_of_range(sample_bundle):
    for weight in (-1.0, float("nan"), 50.0):
        with pytest.raises(CatalogError, match="--rival-weight"):
            calibrate(sample_bundle, SAMPLE / "photos.csv", 0.1, write=False, progress=False, rival_weight=weight)


def test_enrolling_part_of_the_cards_catalogue_takes_its_threshold_without_rivals(tmp_path):
    from auditlens.catalog import open_catalog
    from auditlens.export.enroll import EnrollOptions, enroll

    card = json.loads((MODELS / "encoder.json").read_text())["decision"]
    assert card[RIVALS]["products"] and len(card[RIVALS]["products"]) > 10
    said: list[str] = []
    bundle = ReferenceBundle.load(enroll(open_catalog(SAMPLE / "catalog.csv"), tmp_path / "b",
                                         model=MODELS / "encoder.tflite", options=EnrollOptions(progress=False),
                                         warn=said.append))
    assert RIVALS not in bundle.manifest["decision"] and bundle.rival_weight == 0
    assert bundle.threshold == card[RIVALS]["alone"]["threshold"]
    assert any("weighs rival products" in note for note in said)
    # the shipped sample bundle was enrolled so
    assert ReferenceBundle.load(MODELS / "sample_bundle").threshold == card[RIVALS]["alone"]["threshold"]
