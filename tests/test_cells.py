"""Cell matching: scores checked by hand, the bundle's cells file, the verifier's score
with the cell term, and its calibration."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from auditlens.device_app.bundle import ReferenceBundle, write_bundle
from auditlens.device_app.cells import (
    _REFERENCE_BLOCK,
    CELLS_FILE,
    Z_LIMIT,
    cell_scores,
    fuse,
    product_cell_scores,
    quantize_cells,
    score_ceiling,
)
from auditlens.device_app.verifier import Verifier, VerifierOptions
from auditlens.errors import BundleFormatError, BundleIntegrityError, CatalogError
from auditlens.evaluation.calibrate import calibrate, rewrite_bundle
from tests.conftest import MODELS, SAMPLE


def _unit(rng, *shape) -> np.ndarray:
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_cell_scores_are_each_photo_cells_best_match_averaged():
    rng = np.random.default_rng(1)
    photos = _unit(rng, 2, 2, 3, 4)  # 2 photos, 2 views, 3 cells, 4 components
    refs = _unit(rng, 5, 4, 4)  # 5 references of 4 cells
    expected = np.zeros((2, 5))
    for n in range(2):
        for r in range(5):
            best = [max(float(photos[n, v, c] @ refs[r, k]) for k in range(4)) for v in range(2) for c in range(3)]
            expected[n, r] = np.mean(best)
    np.testing.assert_allclose(cell_scores(photos, refs), expected, atol=1e-6)
    # as a bundle stores them: int8, round(127 x); the scores move by quantization only
    stored = quantize_cells(refs)
    assert stored.dtype == np.int8 and np.abs(stored).max() <= 127
    np.testing.assert_allclose(cell_scores(photos, stored), expected, atol=0.02)


def test_cell_scores_of_a_catalogue_scored_block_by_block_match_one_at_a_time():
    # more references than one block holds: each block's scores land in its own columns
    rng = np.random.default_rng(2)
    photos = _unit(rng, 3, 2, 5, 6)
    refs = quantize_cells(_unit(rng, 2 * _REFERENCE_BLOCK + 7, 3, 6))  # int8, as a bundle holds them
    together = cell_scores(photos, refs)
    assert together.shape == (3, len(refs))
    alone = np.concatenate([cell_scores(photos, refs[r:r + 1]) for r in range(len(refs))], axis=1)
    np.testing.assert_allclose(together, alone, atol=1e-6)


def test_a_product_takes_its_best_reference_cell_score():
    rng = np.random.default_rng(2)
    photos, refs = _unit(rng, 1, 1, 2, 8), _unit(rng, 3, 2, 8)
    per_ref = cell_scores(photos, refs)[0]
    got = product_cell_scores(photos, refs, np.array([0, 1, 1]), 2)[0]
    np.testing.assert_allclose(got, [per_ref[0], max(per_ref[1], per_ref[2])])


def test_fuse_adds_the_weighted_z_score_of_the_cells_against_the_cohort():
    cosines = np.array([[0.5, 0.2, 0.1]])
    cells = np.array([[0.9, 0.6, 0.6]])
    cohort = np.array([[0.6, 0.7, 0.8]])  # mean 0.7, sd sqrt(2/300)
    z = (cells - 0.7) / np.sqrt(2 / 300)
    np.testing.assert_allclose(fuse(cosines, cells, 0.1, cohort), cosines + 0.1 * z, atol=1e-5)
    # the products' own scores as the cohort: z against the catalogue
    own = (cells - cells.mean()) / cells.std()  # [sqrt(2), -1/sqrt(2), -1/sqrt(2)]
    np.testing.assert_allclose(fuse(cosines, cells, 0.1, cells), cosines + 0.1 * own, atol=1e-6)
    np.testing.assert_allclose(own[0, 0], np.sqrt(2), atol=1e-9)
    # a cohort without spread (one original): the cosine alone
    np.testing.assert_allclose(fuse(cosines, cells, 0.5, np.array([[0.4]])), cosines, atol=1e-7)
    assert score_ceiling(0.1) == pytest.approx(1 + 0.1 * Z_LIMIT)


def test_the_shipped_sample_bundle_scores_with_its_cells(sample_bundle, sample_photos):
    bundle = ReferenceBundle.load(sample_bundle)
    assert bundle.cells is not None and bundle.cells.shape == (len(bundle.references), 64, 128)
    # the cohort of the 61 originals the card's threshold was calibrated with, not these 10
    assert bundle.cohort.shape == (bundle.decision["cells"]["cohort"], 64, 128) == (61, 64, 128)
    verifier = Verifier(bundle, VerifierOptions(second_look=False, check_quality=False))
    assert verifier.encoder.has_cells and verifier.cells_weight == bundle.decision["cells"]["weight"] > 0
    photo = sample_photos[0]
    capture = verifier.prepare(photo.photo)
    latent = verifier.embed(capture)
    assert capture.cells.shape == (bundle.spec.num_views, 64, 128) and capture.cells.dtype == np.int8
    np.testing.assert_allclose(np.linalg.norm(capture.cells / 127.0, axis=-1), 1.0, atol=0.03)
    # by hand: best-reference cosine, plus weight x the cell score's z against the cohort
    cosines = latent @ bundle.references.astype(np.float32).T
    cells = cell_scores(capture.cells[None], bundle.cells)[0]
    cohort = cell_scores(capture.cells[None], bundle.cohort)[0]
    expected = cosines + verifier.cells_weight * (cells - cohort.mean()) / cohort.std()
    verdict = verifier.verify(capture, photo.product_id)
    assert verdict.score == pytest.approx(expected[bundle.index(photo.product_id)], abs=1e-4)
    ranked = verifier.identify(capture, top_k=len(bundle.products))
    assert [c.product_id for c in ranked] == [bundle.products[i].product_id for i in np.argsort(-expected)]
    np.testing.assert_allclose([c.score for c in ranked], np.sort(expected)[::-1], atol=1e-4)
    # a score asked for with the latent alone cannot be the verdict's
    with pytest.raises(ValueError, match="cells"):
        verifier.score(latent, photo.product_id)
    assert verifier.score(latent, photo.product_id, capture.cells) == pytest.approx(verdict.score, abs=1e-6)


def test_a_decision_without_a_cells_weight_scores_by_the_cosine(sample_bundle, sample_photos, tmp_path):
    bundle = ReferenceBundle.load(sample_bundle)
    decision = {k: v for k, v in bundle.decision.items() if k not in ("cells", "far_curve", "second_look")}
    decision["threshold"] = 0.6
    plain = ReferenceBundle.load(rewrite_bundle(bundle, tmp_path / "plain", decision))
    assert plain.cells is not None and plain.cells_weight == 0.0
    verifier = Verifier(plain, VerifierOptions(check_quality=False))
    capture = verifier.prepare(sample_photos[0].photo)
    latent = verifier.embed(capture)
    assert capture.cells is None
    verdict = verifier.verify(capture, sample_photos[0].product_id)
    row = plain.product(sample_photos[0].product_id).references[0]
    assert verdict.score == pytest.approx(float(latent @ plain.references[row].astype(np.float32)), abs=1e-5)


def _rewrite(bundle: ReferenceBundle, out, **changes):
    thumbs = [bundle.thumbnails[p.thumbnail] for p in bundle.products]
    kwargs = dict(model_content=bundle.model_content, spec=bundle.spec, products=bundle.products,
                  references=bundle.references, thumbnails=thumbs, decision=bundle.decision,
                  probe_latent=bundle.manifest["probe"]["latent"], cells=bundle.cells, cohort=bundle.cohort)
    return write_bundle(out, **{**kwargs, **changes})


def test_bundle_cells_that_do_not_fit_are_refused(sample_bundle, tmp_path):
    bundle = ReferenceBundle.load(sample_bundle)
    with pytest.raises(BundleFormatError, match="holds no cells.npy"):
        _rewrite(bundle, tmp_path / "a", cells=None)  # the decision weighs cells
    with pytest.raises(BundleFormatError, match="expected int8"):
        _rewrite(bundle, tmp_path / "b", cells=bundle.cells[:-1])  # a row short
    with pytest.raises(BundleFormatError, match="expected int8"):
        _rewrite(bundle, tmp_path / "c", cells=bundle.cells.astype(np.float32))
    with pytest.raises(BundleFormatError, match="weight within"):
        _rewrite(bundle, tmp_path / "d", decision={**bundle.decision, "cells": {"weight": 2.0}})
    with pytest.raises(BundleFormatError, match="cohort.npy holds none"):
        _rewrite(bundle, tmp_path / "e", cohort=None)
    with pytest.raises(BundleFormatError, match="cohort.npy holds int8"):
        _rewrite(bundle, tmp_path / "f", cohort=bundle.cohort[:, :32])  # other cells than the references'
    with pytest.raises(BundleFormatError, match="cohort.npy without cells.npy"):
        _rewrite(bundle, tmp_path / "g", cells=None, decision={"threshold": 0.6})
    assert not any((tmp_path / n).exists() for n in "abcdefg")  # nothing written


def test_tampered_cells_are_refused(sample_bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(sample_bundle, copy)
    data = bytearray((copy / CELLS_FILE).read_bytes())
    data[-1] ^= 0x01
    (copy / CELLS_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="cells.npy does not match"):
        ReferenceBundle.load(copy)
    # dropping the file from the manifest leaves a decision that weighs cells with none
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["files"][CELLS_FILE]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleFormatError, match="holds no cells.npy"):
        ReferenceBundle.load(copy)


def test_calibrate_weighs_the_cells_by_the_spread_of_the_cosines(sample_bundle, tmp_path):
    photos = SAMPLE / "photos.csv"
    weighted = calibrate(sample_bundle, photos, 0.05, write=False, allow_few_photos=True, progress=False,
                         cells_weight=1.0)
    block = weighted["cells"]
    assert block["sd_weight"] == 1.0 and 0.05 < block["cosine_sd"] < 0.5
    assert block["weight"] == pytest.approx(block["cosine_sd"], abs=1e-6)
    half = calibrate(sample_bundle, photos, 0.05, write=False, allow_few_photos=True, progress=False,
                     cells_weight=0.5)
    assert half["cells"]["weight"] == pytest.approx(0.5 * block["cosine_sd"], abs=1e-6)
    plain = calibrate(sample_bundle, photos, 0.05, write=False, allow_few_photos=True, progress=False,
                      cells_weight=0)
    assert "cells" not in plain and plain["threshold"] <= 1.0
    # the threshold is set on the scores with the cell term: genuine photos gain from it
    assert weighted["threshold"] != plain["threshold"]
    with pytest.raises(CatalogError, match="cells-weight"):
        calibrate(sample_bundle, photos, 0.05, write=False, allow_few_photos=True, progress=False,
                  cells_weight=-1)


def test_calibrate_refuses_a_cells_weight_for_a_bundle_without_cells(sample_bundle, tmp_path):
    bundle = ReferenceBundle.load(sample_bundle)
    decision = {"threshold": 0.6}
    out = _rewrite(bundle, tmp_path / "nocells", cells=None, cohort=None, decision=decision)
    with pytest.raises(CatalogError, match="holds no feature-map cells"):
        calibrate(out, SAMPLE / "photos.csv", 0.05, write=False, allow_few_photos=True, progress=False,
                  cells_weight=0.5)


def _model_beside_its_card(tmp_path):
    models = tmp_path / "model"
    models.mkdir()
    for name in ("encoder.tflite", "encoder.json", "encoder.cohort.npy"):
        shutil.copy(MODELS / name, models / name)
    return models


def test_enrolment_takes_the_cards_cohort_and_says_when_it_cannot(tmp_path):
    from auditlens.catalog import open_catalog
    from auditlens.export.enroll import EnrollOptions, enroll

    models = _model_beside_its_card(tmp_path)
    catalog = open_catalog(SAMPLE / "catalog.csv")
    options = EnrollOptions(progress=False)
    said: list[str] = []
    bundle = ReferenceBundle.load(enroll(catalog, tmp_path / "b", model=models / "encoder.tflite",
                                         options=options, warn=said.append))
    card = json.loads((models / "encoder.json").read_text())
    assert np.array_equal(bundle.cohort, np.load(models / "encoder.cohort.npy"))
    assert bundle.decision["cells"] == card["decision"]["cells"]
    assert not any("cohort" in note for note in said)
    # another cohort than the calibrated one, or none: the bundle's own originals, said so
    np.save(models / "encoder.cohort.npy", np.load(models / "encoder.cohort.npy")[:-1])
    for name, why in (("c", "sha256 differs"), ("d", "cannot be read")):
        said.clear()
        bundle = ReferenceBundle.load(enroll(catalog, tmp_path / name, model=models / "encoder.tflite",
                                             options=options, warn=said.append))
        assert len(bundle.cohort) == len(bundle.products) == 10
        assert np.array_equal(bundle.cohort, bundle.cells)
        assert any(why in note for note in said) and any(why in w for w in bundle.decision["warnings"])
        (models / "encoder.cohort.npy").unlink(missing_ok=True)


def test_calibrating_for_a_model_card_writes_the_cohort_beside_it(sample_bundle, tmp_path):
    from auditlens.evaluation.calibrate import write_model_card

    models = _model_beside_its_card(tmp_path)
    (models / "encoder.cohort.npy").unlink()
    card = models / "encoder.json"
    decision = calibrate(sample_bundle, SAMPLE / "photos.csv", 0.05, write=False, allow_few_photos=True,
                         progress=False, model_card=card)
    write_model_card(card, decision, decision["model_id"], views=decision["_views"])
    written = (models / "encoder.cohort.npy").read_bytes()
    assert json.loads(card.read_text())["decision"]["cells"]["cohort_sha256"] == hashlib.sha256(written).hexdigest()
    assert np.array_equal(np.load(models / "encoder.cohort.npy"), ReferenceBundle.load(sample_bundle).cohort)


def test_a_second_look_scores_its_ten_views_with_the_first_views_cells(sample_bundle, sample_photos, tmp_path):
    from auditlens.device_app.preprocess import moved_views, pool_views

    bundle = ReferenceBundle.load(sample_bundle)
    photo = sample_photos[0]
    first = Verifier(bundle, VerifierOptions(second_look=False, check_quality=False)).verify(
        photo.photo, photo.product_id).score
    near = first - 0.01  # a threshold the first score lands just above
    decision = {**bundle.decision, "threshold": near, "far_curve": [],
                "second_look": {"photo_shift": 0.15, "band": 0.05, "threshold": near}}
    looked = Verifier(rewrite_bundle(bundle, tmp_path / "looked", decision), VerifierOptions(check_quality=False))
    verdict = looked.verify(photo.photo, photo.product_id)
    assert verdict.first_score == pytest.approx(first, abs=1e-6)
    capture = looked.prepare(photo.photo)
    looked.embed(capture)
    views = np.concatenate([capture.views, moved_views(capture.image, looked.spec, 0.15)])
    pooled = pool_views(looked.encoder.embed(views), len(views))[0]
    cosines = pooled @ bundle.references.astype(np.float32).T
    cells = cell_scores(capture.cells[None], bundle.cells)[0]
    cohort = cell_scores(capture.cells[None], bundle.cohort)[0]
    expected = cosines + looked.cells_weight * (cells - cohort.mean()) / cohort.std()
    assert verdict.score == pytest.approx(expected[bundle.index(photo.product_id)], abs=1e-4)


def test_identify_in_a_large_catalogue_adds_the_cell_term_to_the_cosines_shortlist(sample_bundle, sample_photos,
                                                                                    tmp_path):
    from auditlens.device_app.bundle import ProductRecord
    from auditlens.device_app.verifier import CELL_SHORTLIST

    bundle = ReferenceBundle.load(sample_bundle)
    rng = np.random.default_rng(3)
    extra = CELL_SHORTLIST + 6 - len(bundle.products)  # past the shortlist
    latents = _unit(rng, extra, bundle.references.shape[1])
    cells = quantize_cells(_unit(rng, extra, *bundle.cells.shape[1:]))
    first = len(bundle.references)
    products = list(bundle.products) + [
        ProductRecord(f"filler-{i}", f"Filler {i}", "", "", "", (first + i,), "") for i in range(extra)]
    thumbs = [bundle.thumbnails[p.thumbnail] for p in bundle.products] + [bundle.thumbnails[bundle.products[0].thumbnail]] * extra
    big = ReferenceBundle.load(_rewrite(bundle, tmp_path / "big", products=products, thumbnails=thumbs,
                                        references=np.concatenate([bundle.references, latents.astype(np.float16)]),
                                        cells=np.concatenate([bundle.cells, cells])))
    verifier = Verifier(big, VerifierOptions(check_quality=False))
    capture = verifier.prepare(sample_photos[0].photo)
    exact = verifier.product_scores(verifier.embed(capture), capture.cells)  # every product scored
    ranked = verifier.identify(capture, top_k=5)
    assert [big.index(c.product_id) for c in ranked] == list(np.argsort(-exact)[:5])
    np.testing.assert_allclose([c.score for c in ranked], np.sort(exact)[::-1][:5], atol=1e-5)
