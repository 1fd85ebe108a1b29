"""The second look near the threshold: calibrated with the threshold, taken by the
verifier only for first scores within the band, and scored by evaluate as the verifier
decides."""

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from auditlens.cli import main
from auditlens.device_app.auditlog import AuditLog
from auditlens.device_app.bundle import ReferenceBundle
from auditlens.device_app.imaging import load_image
from auditlens.device_app.preprocess import moved_views, pool_views, to_photo_views
from auditlens.device_app.verifier import Verifier, VerifierOptions
from auditlens.errors import BundleFormatError, CatalogError
from auditlens.evaluation import metrics
from auditlens.evaluation.calibrate import calibrate, rewrite_bundle
from auditlens.evaluation.evaluate import evaluate

from .conftest import SAMPLE

QUIET = VerifierOptions(check_quality=False)


@pytest.fixture(scope="module")
def looked(tmp_path_factory, sample_bundle):
    """The sample bundle calibrated for 10% with a second look over every first score
    (band 1.0), so that each of the sample's few pairs takes it: scored by the cosine
    alone, within -1..1 (the cell term's second look: test_cells.py; with rivals, whose
    term takes scores below -1: test_rivals.py)."""
    out = tmp_path_factory.mktemp("second_look") / "bundle"
    calibrate(sample_bundle, SAMPLE / "photos.csv", 0.1, out=out, progress=False,
              second_look=0.15, second_look_band=1.0, cells_weight=0, rival_weight=0)
    return out


def test_moved_views_are_the_shifted_views_besides_the_first(sample_bundle, sample_photos):
    spec = ReferenceBundle.load(sample_bundle).spec
    image = load_image(sample_photos[0].photo, draft=spec.draft_size)
    shifted = to_photo_views(image, replace(spec, photo_shift=0.15))
    moved = moved_views(image, spec, 0.15)
    per_box = 2 if spec.photo_mirror else 1
    assert moved.shape == (4 * len(spec.photo_zooms) * per_box, spec.input_size, spec.input_size, 3)
    np.testing.assert_array_equal(moved, shifted[per_box:])
    with pytest.raises(ValueError, match="inside"):
        moved_views(image, spec, 0.2)  # a 0.7 box moved 0.2 leaves the crop box


def test_calibration_keeps_the_verdicts_within_the_target(looked, sample_photos):
    b = ReferenceBundle.load(looked)
    look = b.decision["second_look"]
    assert b.manifest["format_version"] == 1  # the first threshold holds without the second look
    assert look["photo_shift"] == 0.15 and look["band"] == 1.0 and look["share_of_pairs"] == 1.0
    assert look["measured_far"] <= 0.1 and 0 < look["measured_tar"] <= 1
    # the verdicts the verifier gives the calibration photos' genuine pairs
    v = Verifier(b, QUIET)
    accepted = [v.verify(p.photo, p.product_id).matched for p in sample_photos]
    assert np.mean(accepted) == pytest.approx(look["measured_tar"])


def test_a_second_look_decides_near_the_threshold_and_only_there(looked, sample_photos):
    v = Verifier(looked, QUIET)
    first = Verifier(looked, replace(QUIET, second_look=False))
    photo = sample_photos[0]
    verdict = v.verify(photo.photo, photo.product_id)
    plain = first.verify(photo.photo, photo.product_id)
    assert plain.first_score is None and plain.threshold == v.bundle.threshold
    assert verdict.first_score == pytest.approx(plain.score)
    assert verdict.threshold == v.bundle.decision["second_look"]["threshold"]
    assert "a second look with 10 views" in verdict.reasons[0]
    # the second score is the product's score of the ten views, first and moved, pooled
    capture = v.prepare(photo.photo)
    v.embed(capture)  # its cells, when the bundle weighs them
    views = np.concatenate([capture.views, moved_views(capture.image, v.spec, 0.15)])
    pooled = pool_views(v.encoder.embed(views), len(views))[0]
    assert verdict.score == pytest.approx(v.score(pooled, photo.product_id, capture.cells), abs=1e-6)
    assert verdict.matched == (verdict.score >= verdict.threshold)

    # a band that no first score falls in: the first look decides
    b = ReferenceBundle.load(looked)
    decision = json.loads(json.dumps(b.decision))
    decision["second_look"]["band"] = abs(plain.score - b.threshold) / 2
    narrow = rewrite_bundle(b, looked.parent / "narrow", decision)
    again = Verifier(narrow, QUIET).verify(photo.photo, photo.product_id)
    assert again.first_score is None and again.score == pytest.approx(plain.score)
    assert again.decision == plain.decision


def test_a_threshold_given_by_hand_takes_no_second_look(looked, sample_photos):
    v = Verifier(looked, replace(QUIET, threshold=0.5))
    assert v.second_look is None
    assert v.verify(sample_photos[0].photo, sample_photos[0].product_id).first_score is None
    with pytest.raises(ValueError, match="second_look must be True or False"):
        VerifierOptions(second_look="no")


def test_evaluate_scores_each_pair_as_the_verifier_decides_it(tmp_path, looked):
    report = evaluate(looked, SAMPLE / "photos.csv", tmp_path / "ev", plots=False, progress=False,
                      verbose=False)
    assert report["second_look"]["share_of_genuine_pairs"] == 1.0
    assert "far_curve" not in report["decision"]["second_look"]
    # 16 photos give fewer than 100 impostor pairs: no TAR at FAR 1%, for the first look either
    assert report["overall"]["all"]["tar_at_far_1%"] is None and report["second_look"]["first_look"]["tar_at_far_1%"] is None
    from auditlens.evaluation.evaluate import describe

    assert "first look alone: EER" in describe(report) and "TAR at FAR 1% -;" in describe(report)
    v = Verifier(looked, QUIET)
    with open(tmp_path / "ev" / "pairs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) > 50
    for row in rows:
        assert (float(row["score"]) >= v.threshold) == v.verify(row["photo"], row["product"]).matched, row
    # the first look's figures are those of the same pairs at their first scores
    first = np.array([float(r["first_score"]) for r in rows])
    kind = np.array([r["pair"] for r in rows])
    look = report["second_look"]["first_look"]
    assert look["eer"] == pytest.approx(metrics.eer(first[kind == "genuine"], first[kind != "genuine"]).eer, abs=1e-6)
    assert look["eer_hard"] == pytest.approx(metrics.eer(first[kind == "genuine"], first[kind == "hard"]).eer, abs=1e-6)
    assert look["auc"] == pytest.approx(metrics.roc_auc(first[kind == "genuine"], first[kind != "genuine"]), abs=1e-6)
    assert not np.allclose(first, [float(r["score"]) for r in rows])  # every pair took the look: verdicts score otherwise
    assert look["top1"] == report["overall"]["all"]["top1"]  # identification ranks first looks in both


@pytest.mark.parametrize("edit, why", [
    (lambda d: d.update(second_look="yes"), "second_look is not an object"),
    (lambda d: d["second_look"].update(band=0), "band 0 is not"),
    (lambda d: d["second_look"].update(photo_shift=0.5), "photo_shift 0.5 is not"),
    (lambda d: d["second_look"].update(photo_shift=0.2), "inside the crop box"),
    (lambda d: d["second_look"].update(threshold=float("nan")), "threshold nan is not"),
    (lambda d: d["second_look"].update(far_curve=[[0.5, 0.1], [0.4, 0.0]]), "strictly increasing"),
])
def test_a_damaged_second_look_is_refused(tmp_path, looked, edit, why):
    b = ReferenceBundle.load(looked)
    decision = json.loads(json.dumps(b.decision))
    edit(decision)
    manifest = dict(b.manifest, decision=decision)
    folder = tmp_path / "b"
    rewrite_bundle(b, folder, b.decision)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleFormatError, match=why):
        ReferenceBundle.load(folder)


def test_a_capture_whose_pixels_are_gone_is_judged_by_its_first_look(looked, sample_photos):
    v = Verifier(looked, QUIET)
    photo = sample_photos[0]
    capture = v.prepare(photo.photo, keep_image=False)
    verdict = v.verify(capture, photo.product_id)
    plain = Verifier(looked, replace(QUIET, second_look=False)).verify(photo.photo, photo.product_id)
    assert verdict.first_score is None and verdict.threshold == v.threshold
    assert verdict.score == pytest.approx(plain.score) and verdict.decision == plain.decision
    assert "no second look, the capture's pixels were released" in verdict.reasons[0]


def test_the_audit_trail_keeps_one_run_across_second_looks(tmp_path, looked, sample_photos, capsys):
    v = Verifier(looked, QUIET)
    narrow = Verifier(looked, replace(QUIET, second_look=False))
    with AuditLog(tmp_path / "audit.db") as log:
        for p in sample_photos[:3]:
            for verifier in (v, narrow):
                log.append(verifier.verify(p.photo, p.product_id), photo=Path(p.photo).read_bytes(),
                           auditor="A. Smith")
        report = log.verify_chain()
        log.export_csv(tmp_path / "audit.csv")
    with open(tmp_path / "audit.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["bundle_id"] for r in rows} == {v.bundle.bundle_id}
    looked_twice = [r for r in rows if r["first_score"]]  # the CSV says which verdicts took it
    assert [int(r["id"]) for r in looked_twice] == [1, 3, 5]
    assert all(float(r["threshold"]) == pytest.approx(v.second_look.threshold, abs=1e-6) for r in looked_twice)
    assert all(float(r["first_threshold"]) == pytest.approx(v.threshold, abs=1e-6) for r in looked_twice)
    # thresholds 0.599 (second looks) and the bundle's alternate, yet it is one bundle's run
    assert [(r["first_id"], r["last_id"], r["threshold"]) for r in report.judged_with] == [(1, 6, v.threshold)]
    assert main(["verify-log", str(tmp_path / "audit.db")]) == 0
    assert "second look" not in capsys.readouterr().err


def test_info_and_pairs_csv_say_what_the_second_look_did(tmp_path, looked, capsys):
    assert main(["info", str(looked)]) == 0
    assert "first scores within 1 of it take a second look: 10 views" in capsys.readouterr().out
    evaluate(looked, SAMPLE / "photos.csv", tmp_path / "ev", plots=False, progress=False, verbose=False)
    with open(tmp_path / "ev" / "pairs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    b = ReferenceBundle.load(looked)
    look = b.decision["second_look"]
    for row in rows:  # band 1.0: every pair took it, and its score is the second one moved
        moved = float(row["second_look_score"]) - look["threshold"] + b.threshold
        assert float(row["score"]) == pytest.approx(moved, abs=2e-6) and row["first_score"]


def test_calibrate_refuses_a_shift_the_views_cannot_take(tmp_path, sample_bundle, capsys):
    with pytest.raises(CatalogError, match="inside the crop box"):
        calibrate(sample_bundle, SAMPLE / "photos.csv", 0.1, write=False, progress=False, second_look=0.3)
    code = main(["calibrate", "--bundle", str(sample_bundle), "--photos", str(SAMPLE / "photos.csv"),
                 "--target-far", "0.1", "--second-look", "0.15", "--second-look-band", "0", "--dry-run",
                 "--no-progress"])
    assert code != 0 and "--second-look-band must be" in capsys.readouterr().err
    with pytest.raises(CatalogError, match="--second-look-band 0.05 without a second look: --second-look 0 drops"):
        calibrate(sample_bundle, SAMPLE / "photos.csv", 0.1, write=False, progress=False, second_look=0,
                  second_look_band=0.05)


def test_recalibration_keeps_the_bundles_second_look_unless_told(tmp_path, looked):
    kept = calibrate(looked, SAMPLE / "photos.csv", 0.2, write=False, progress=False)
    assert kept["second_look"]["photo_shift"] == 0.15 and kept["second_look"]["band"] == 1.0
    dropped = calibrate(looked, SAMPLE / "photos.csv", 0.2, write=False, progress=False, second_look=0)
    assert "second_look" not in dropped


def test_batch_scoring_takes_the_second_look_as_verify_does(tmp_path, looked, sample_photos):
    products = sorted({p.product_id for p in sample_photos})
    pairs = tmp_path / "pairs.csv"
    with open(pairs, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["photo", "product_id"])
        for i, p in enumerate(sample_photos):
            w.writerows([[p.photo, p.product_id], [p.photo, products[i % len(products)]]])
    assert main(["score", "--pairs", str(pairs), "--out", str(tmp_path / "out.csv"), "--bundle", str(looked),
                 "--no-progress"]) == 0
    v = Verifier(looked)
    with open(tmp_path / "out.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * len(sample_photos)
    for row in rows:  # each photo's pixels are released after its first pair: the second look came before
        verdict = v.verify(row["photo"], row["product_id"])
        assert row["verdict"] == verdict.decision and float(row["score"]) == pytest.approx(verdict.score, abs=1e-5)
        assert float(row["threshold"]) == pytest.approx(verdict.threshold, abs=1e-5)
        assert (row["first_score"] != "") == (verdict.first_score is not None)
        assert verdict.decision == "retake" or "second look" in row["reasons"]
