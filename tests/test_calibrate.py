"""`auditlens calibrate`: the threshold meets the target false-accept rate on its own
data, measured again through the verifier on the rewritten bundle."""

import json
import shutil

import numpy as np
import pytest

from auditlens.cli import main
from auditlens.device_app.bundle import ReferenceBundle
from auditlens.device_app.verifier import Verifier, VerifierOptions
from auditlens.errors import BundleSignatureError
from auditlens.evaluation.calibrate import calibrate, decide, far_curve, write_model_card
from auditlens.evaluation.protocol import embed_photos, make_pairs, product_groups

from .conftest import REPO, SAMPLE, write_csv


@pytest.fixture
def bundle_copy(tmp_path, sample_bundle):
    dst = tmp_path / "bundle"
    shutil.copytree(sample_bundle, dst)
    return dst


def protocol_pairs(bundle_path, photos):
    """The protocol's pairs, rebuilt from the bundle as written."""
    v = Verifier(bundle_path, VerifierOptions(check_quality=False))
    embedded = embed_photos(v, photos, progress=False)
    groups, _ = product_groups(v.bundle)
    return v, embedded, make_pairs(embedded, groups)


@pytest.mark.parametrize("target", [0.05, 0.1, 0.25])
def test_threshold_meets_the_target_on_its_own_photos(bundle_copy, sample_photos, target):
    # the first look alone (tests/test_second_look.py measures the verdicts with a second look)
    d = calibrate(bundle_copy, SAMPLE / "photos.csv", target, progress=False, second_look=0)
    assert d["measured_far"] <= target and d["protocol"]["impostor_draws"] == 20
    # too few impostors is judged on one draw's pairs, not the 20 draws pooled
    few = target * d["pairs"]["impostor"] < 10
    assert few == any("impostor pairs a draw" in w for w in d["warnings"])
    v, embedded, pairs = protocol_pairs(bundle_copy, sample_photos)
    assert v.threshold == d["threshold"] and v.bundle.decision["target_far"] == target
    # the rate is the one over 20 draws of the random impostors, pooled
    groups, _ = product_groups(v.bundle)
    draws = [make_pairs(embedded, groups, seed=k) for k in range(20)]
    imp = np.concatenate([p.score[p.impostor] for p in draws])
    assert (imp >= d["threshold"]).mean() == pytest.approx(d["measured_far"])
    # as low as it can be: at the highest rejected impostor too many impostors pass ...
    assert (imp >= imp[imp < d["threshold"]].max()).mean() > target
    # ... yet no score sits within float32 noise of the threshold
    assert np.abs(imp - d["threshold"]).min() > 1e-6
    # measured again, pair by pair, through Verifier.verify on the re-written bundle (one draw)
    accepted = []
    for n, p in zip(pairs.photo[pairs.impostor], pairs.product[pairs.impostor]):
        photo = embedded.photos[n]
        verdict = v.verify(photo.photo, v.bundle.products[p].product_id)
        accepted.append(verdict.score >= verdict.threshold)
        assert verdict.target_far == target and verdict.estimated_far is not None
    assert np.mean(accepted) == pytest.approx((pairs.score[pairs.impostor] >= d["threshold"]).mean())
    gen = pairs.score[pairs.genuine]
    assert d["measured_tar"] == pytest.approx((gen >= d["threshold"]).mean())


def test_rewrite_keeps_the_bundle_and_records_the_calibration(bundle_copy, sample_bundle, sample_photos):
    before = ReferenceBundle.load(sample_bundle)
    d = calibrate(bundle_copy, sample_photos, 0.1, progress=False)
    after = ReferenceBundle.load(bundle_copy)  # every sha256 verified
    assert after.model_id == before.model_id
    np.testing.assert_array_equal(after.references, before.references)
    assert [p.to_dict() for p in after.products] == [p.to_dict() for p in before.products]
    assert after.thumbnails == before.thumbnails
    assert after.manifest["probe"] == before.manifest["probe"]
    assert after.manifest["created"] == before.manifest["created"]
    dec = after.decision
    for key in ("threshold", "target_far", "calibrated_on", "measured_far", "measured_tar", "far_curve"):
        assert key in dec
    assert "genuine" in dec["calibrated_on"] and "impostor" in dec["calibrated_on"]
    assert dec["pairs"]["genuine"] == len(sample_photos)
    curve = np.asarray(dec["far_curve"])
    assert (np.diff(curve[:, 0]) > 0).all() and (np.diff(curve[:, 1]) <= 0).all()
    assert curve[0, 1] == 1.0 and curve[-1, 1] == 0.0
    assert not any(k.startswith("_") for k in dec)
    assert d["threshold"] == dec["threshold"]


def test_out_writes_a_new_zip_and_leaves_the_input_alone(tmp_path, bundle_copy, sample_photos):
    manifest = (bundle_copy / "manifest.json").read_bytes()
    out = tmp_path / "calibrated.zip"
    calibrate(bundle_copy, sample_photos, 0.1, out=out, progress=False)
    assert (bundle_copy / "manifest.json").read_bytes() == manifest
    assert ReferenceBundle.load(out).decision["target_far"] == 0.1


def test_signed_bundles_are_re_signed_or_refused(tmp_path, bundle_copy, sample_photos):
    pytest.importorskip("cryptography")
    from auditlens.device_app.signing import generate_keypair

    private, public = generate_keypair(tmp_path / "keys")
    b = ReferenceBundle.load(bundle_copy)
    from auditlens.evaluation.calibrate import rewrite_bundle

    signed = tmp_path / "signed"
    rewrite_bundle(b, signed, b.decision, signing_key=private.read_bytes())
    assert ReferenceBundle.load(signed, public_key=public.read_bytes()).signed_by

    with pytest.raises(BundleSignatureError, match="--sign-key"):
        calibrate(signed, sample_photos, 0.1, progress=False)
    calibrate(signed, sample_photos, 0.1, signing_key=private.read_bytes(), progress=False)
    again = ReferenceBundle.load(signed, public_key=public.read_bytes())
    assert again.signed_by and again.decision["target_far"] == 0.1

    calibrate(signed, sample_photos, 0.05, drop_signature=True, progress=False)
    with pytest.raises(BundleSignatureError):
        ReferenceBundle.load(signed, public_key=public.read_bytes())


def test_re_signing_checks_the_signature_it_replaces(tmp_path, bundle_copy, sample_photos):
    """A signed manifest edited after signing (here its catalogue name) is not re-signed:
    re-signing would vouch for the edit. Nor is one signed with another key."""
    pytest.importorskip("cryptography")
    from auditlens.device_app.signing import generate_keypair
    from auditlens.evaluation.calibrate import rewrite_bundle

    private, public = generate_keypair(tmp_path / "keys")
    other, _ = generate_keypair(tmp_path / "other")
    signed = tmp_path / "signed"
    rewrite_bundle(ReferenceBundle.load(bundle_copy), signed, ReferenceBundle.load(bundle_copy).decision,
                   signing_key=private.read_bytes())
    before = {f.name: f.read_bytes() for f in signed.iterdir() if f.is_file()}
    with pytest.raises(BundleSignatureError, match="does not verify"):
        calibrate(signed, sample_photos, 0.1, signing_key=other.read_bytes(), progress=False)
    manifest = json.loads((signed / "manifest.json").read_text())
    manifest["catalog"] = "edited after signing"
    (signed / "manifest.json").write_text(json.dumps(manifest))
    before["manifest.json"] = (signed / "manifest.json").read_bytes()
    with pytest.raises(BundleSignatureError, match="does not verify"):
        calibrate(signed, sample_photos, 0.1, signing_key=private.read_bytes(), progress=False)
    assert {f.name: f.read_bytes() for f in signed.iterdir() if f.is_file()} == before


def test_impostors_as_high_as_genuine_copies_keep_the_threshold_a_cosine():
    """Two products enrolled from one image: their impostor pairs score 1. No threshold
    can reject them; the threshold stays 1 (a cosine a bundle may hold) and the measured
    FAR shows the target was missed."""
    d = decide([1.0, 0.9], [1.0, 1.0, 0.2, 0.1], 0.01)
    assert d["threshold"] == 1.0 and d["measured_far"] == pytest.approx(0.5)


def test_a_target_no_threshold_reaches_is_refused_and_nothing_written(tmp_path, sample_photos, capsys):
    """Two brands of milk enrolled from one image, and a photo that is that image: its pair
    with the other brand scores as its genuine pair does, higher than any other genuine
    photo. The only threshold that keeps that impostor out accepts no genuine pair at all
    (and one at or above 1, as float16 references can give, none keeps out); stored, it would
    read as calibrated and reject every photo. calibrate refuses and says why, writing nothing."""
    import csv

    rows = list(csv.DictReader((SAMPLE / "catalog.csv").open(newline="")))
    milk = [r for r in rows if r["group"] == "Milk"]
    assert len(milk) == 2
    shared = str(SAMPLE / milk[0]["image"])
    write_csv(tmp_path / "catalog.csv", ["product_id", "image", "name", "group", "kind"],
              [[r["product_id"], shared if r in milk else str(SAMPLE / r["image"]), r["name"], r["group"],
                r["kind"]] for r in rows])
    # photos embedded as the whole frame, as originals are, so the copy scores exactly as its original
    assert main(["enroll", str(tmp_path / "catalog.csv"), "--out", str(tmp_path / "b"), "--photo-zooms", "1",
                 "--no-photo-mirror", "--no-progress"]) == 0
    manifest = (tmp_path / "b" / "manifest.json").read_bytes()
    shutil.copy(shared, tmp_path / "copy_of_the_original.jpg")
    write_csv(tmp_path / "photos.csv", ["photo", "product_id"],
              [[p.photo, p.product_id] for p in sample_photos]
              + [[tmp_path / "copy_of_the_original.jpg", milk[0]["product_id"]]])
    capsys.readouterr()
    rc = main(["calibrate", "--bundle", str(tmp_path / "b"), "--photos", str(tmp_path / "photos.csv"),
               "--target-far", "0.01", "--allow-few-photos", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "the threshold that keeps a false-accept rate of 0.01" in err, err
    assert "accepts none of the 17 genuine pairs" in err
    assert "enrolled from one image" in err and "nothing was written" in err
    assert (tmp_path / "b" / "manifest.json").read_bytes() == manifest
    # photos labelled with the wrong products: their true products are now impostors that
    # outscore every "genuine" pair; the refusal names the scores and asks for the labels
    ids = [r["product_id"] for r in rows]
    write_csv(tmp_path / "mislabelled.csv", ["photo", "product_id"],
              [[p.photo, ids[(ids.index(p.product_id) + 5) % len(ids)]] for p in sample_photos])
    rc = main(["calibrate", "--bundle", str(SAMPLE.parent / "sample_bundle"), "--photos",
               str(tmp_path / "mislabelled.csv"), "--target-far", "0.05", "--allow-few-photos", "--dry-run",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "accepts none of the 16 genuine pairs: the highest impostor scores " in err, err
    assert "Check the photos' labels" in err and "enrolled from one image" not in err


def test_a_target_no_threshold_can_reach_is_said_with_its_cause():
    """Impostors at or above 1 (float16 references can give 1.00005): no threshold a cosine
    may take keeps them out; the refusal says so and names the likely causes."""
    from auditlens.evaluation.calibrate import _no_decision

    genuine, impostor = np.array([0.95, 0.9]), np.array([1.00005, 1.00005, 0.2, 0.1])
    d = decide(genuine, impostor, 0.01)
    assert d["threshold"] == 1.0 and d["measured_far"] == pytest.approx(0.5)
    said = _no_decision(d, genuine, impostor)
    assert said.startswith("no threshold reaches a false-accept rate of 0.01: 50.0% of the impostor pairs "
                           "score 1.0000 or more")
    assert "enrolled from one image" in said and "Check the photos' labels" not in said


def test_far_curve_and_decide_on_fixed_scores():
    imp = [0.9, 0.8, 0.8, 0.5, 0.1]
    curve = far_curve(imp)
    assert curve[0] == [0.1, 1.0]
    assert [0.8, 0.6] in curve and [0.9, 0.2] in curve
    assert curve[-1][1] == 0.0 and curve[-1][0] > 0.9
    d = decide([0.95, 0.85, 0.7], imp, 0.2)
    # one false accept of 5 allowed: the 2nd highest impostor (0.8, twice) is rejected
    assert d["measured_far"] == pytest.approx(0.2)  # only 0.9 passes
    assert d["measured_tar"] == pytest.approx(2 / 3)  # 0.95 and 0.85
    # just above 0.8, with the margin that keeps float32 noise from crossing it
    assert d["threshold"] == pytest.approx(0.8 + 1e-3, abs=1e-6)


def test_the_measured_rate_carries_an_upper_bound(sample_bundle):
    from auditlens.evaluation.calibrate import far_upper_bound

    z2 = 1.645 ** 2
    assert far_upper_bound(0.0, 1000) == pytest.approx(z2 / (1000 + z2))  # Wilson at 0 accepts
    assert far_upper_bound(0.01, 100) > far_upper_bound(0.01, 1000) > far_upper_bound(0.01, 10000) > 0.01
    assert far_upper_bound(0.3, 0) == 1.0
    d = calibrate(sample_bundle, SAMPLE / "photos.csv", 0.1, write=False, progress=False)
    assert d["measured_far"] < d["measured_far_upper95"] == pytest.approx(
        far_upper_bound(d["measured_far"], d["pairs"]["impostor"]))


def test_the_rate_quoted_at_the_threshold_is_the_rate_measured_there():
    """A device interpolates the stored curve: a verdict scored right at the threshold must
    be quoted the FAR measured there (at most the target), not a straight line drawn
    across the gap between two kept points."""
    rng = np.random.default_rng(0)
    for trial in range(100):
        impostor = rng.normal(0.2, 0.15, rng.integers(2_000, 20_000))
        d = decide(rng.normal(0.7, 0.1, 300), impostor, 0.01)
        curve = np.asarray(d["far_curve"])
        assert np.all(np.diff(curve[:, 0]) > 0) and np.all(np.diff(curve[:, 1]) <= 0)
        quoted = float(np.interp(d["threshold"], curve[:, 0], curve[:, 1]))
        assert quoted <= d["target_far"] and quoted == pytest.approx(d["measured_far"], abs=2e-6), trial


def test_cli_calibrate_and_model_card(tmp_path, bundle_copy, capsys):
    card = tmp_path / "encoder.json"
    card.write_text(json.dumps({"preprocess": {"input_size": 96, "crop": "center"}}))
    # 16 photos give 52 impostor pairs a draw, 5.2 expected false accepts at 10%: enough to
    # store in one bundle with a warning, too few for the card every later bundle takes
    before = card.read_bytes(), (bundle_copy / "manifest.json").read_bytes()
    rc = main(["calibrate", "--bundle", str(bundle_copy), "--photos", str(SAMPLE / "photos.csv"),
               "--target-far", "0.1", "--model-card", str(card), "--no-progress"])
    assert rc == 2 and (card.read_bytes(), (bundle_copy / "manifest.json").read_bytes()) == before
    err = capsys.readouterr().err
    assert "only 52 impostor pairs a draw" in err and "too few for the model card" in err
    assert "--allow-few-photos" in err
    rc = main(["calibrate", "--bundle", str(bundle_copy), "--photos", str(SAMPLE / "photos.csv"),
               "--target-far", "0.1", "--model-card", str(card), "--no-progress", "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 0 and "auditlens: warning: only 52 impostor pairs a draw" in err  # writes nothing
    # the sample's 16 photos show 8 of its 10 products: the other 2 are not measured
    assert "auditlens: warning: calibrated with 10 products, 2 of them without a photo" in err
    assert (card.read_bytes(), (bundle_copy / "manifest.json").read_bytes()) == before
    rc = main(["calibrate", "--bundle", str(bundle_copy), "--photos", str(SAMPLE / "photos.csv"),
               "--target-far", "0.1", "--model-card", str(card), "--no-progress", "--allow-few-photos"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "threshold" in out and "over 20 impostor draws of 52 pairs (95% upper bound" in out
    saved = json.loads(card.read_text())
    assert saved["preprocess"]["input_size"] == 96  # the rest of the card is kept
    assert saved["decision"]["threshold"] == ReferenceBundle.load(bundle_copy).threshold
    assert saved["decision"]["far_curve"]


def test_model_card_takes_the_views_it_was_calibrated_with(tmp_path, capsys):
    """A threshold calibrated on photos embedded as several views is stored with those
    views, so the next `enroll` with the card embeds photos the same way and applies it."""
    model = tmp_path / "encoder.tflite"
    shutil.copy(REPO / "models" / "encoder.tflite", model)
    shipped = json.loads((REPO / "models" / "encoder.json").read_text())
    shipped["preprocess"].update(photo_zooms=[0.7], photo_mirror=False)  # a card of one plain view
    (tmp_path / "encoder.json").write_text(json.dumps(shipped))
    catalog = str(SAMPLE / "catalog.csv")
    assert main(["enroll", catalog, "--model", str(model), "--out", str(tmp_path / "views"),
                 "--photo-zooms", "0.8,0.7", "--photo-mirror", "--photo-shift", "0.1", "--no-progress"]) == 0
    assert main(["calibrate", "-b", str(tmp_path / "views"), "--photos", str(SAMPLE / "photos.csv"),
                 "--target-far", "0.1", "--model-card", str(tmp_path / "encoder.json"), "--no-progress",
                 "--allow-few-photos"]) == 0
    card = json.loads((tmp_path / "encoder.json").read_text())
    assert card["preprocess"]["photo_zooms"] == [0.8, 0.7] and card["preprocess"]["photo_mirror"] is True
    assert card["preprocess"]["photo_shift"] == 0.1
    out = capsys.readouterr().out  # the card's views changed: said, as every enrolment follows them
    assert "and the calibrated bundle's photo_zooms: (0.7,) -> (0.8, 0.7) (bundles enrolled" in out
    assert "and the calibrated bundle's photo_mirror: False -> True" in out
    assert "and the calibrated bundle's photo_shift: 0.0 -> 0.1" in out
    assert card["preprocess"]["input_size"] == 128  # the rest of the card is kept

    assert main(["enroll", catalog, "--model", str(model), "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    again = ReferenceBundle.load(tmp_path / "again")
    assert again.spec.photo_zooms == (0.8, 0.7) and again.spec.photo_mirror and again.spec.photo_shift == 0.1
    assert again.spec.num_views == 20
    assert again.threshold == ReferenceBundle.load(tmp_path / "views").threshold
    assert again.manifest["decision"]["target_far"] == 0.1
    capsys.readouterr()
    # a whole-square view leaves the card's shift no room: the error says which flag to add
    assert main(["enroll", catalog, "--model", str(model), "--out", str(tmp_path / "wide"),
                 "--photo-zooms", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "photo_shift must be within" in err and "the model card's photo_shift is 0.1: set --photo-shift too" in err
    # calibrated again on a bundle without the shift: the card drops it, as cards never shifted have none
    assert main(["enroll", catalog, "--model", str(model), "--out", str(tmp_path / "plain"),
                 "--photo-shift", "0", "--no-progress"]) == 0
    assert main(["calibrate", "-b", str(tmp_path / "plain"), "--photos", str(SAMPLE / "photos.csv"),
                 "--target-far", "0.1", "--model-card", str(tmp_path / "encoder.json"), "--no-progress",
                 "--allow-few-photos"]) == 0
    card = json.loads((tmp_path / "encoder.json").read_text())
    assert "photo_shift" not in card["preprocess"] and card["preprocess"]["photo_zooms"] == [0.8, 0.7]
    assert "and the calibrated bundle's photo_shift: 0.1 -> 0.0" in capsys.readouterr().out
    capsys.readouterr()


def test_model_card_of_another_model_is_refused(tmp_path, sample_bundle):
    from auditlens.errors import AuditlensError

    (tmp_path / "encoder.tflite").write_bytes(b"not the calibrated model")
    with pytest.raises(AuditlensError, match="not the calibrated model"):
        write_model_card(tmp_path / "encoder.json", {"threshold": 0.5},
                         ReferenceBundle.load(sample_bundle).model_id)


def test_model_card_is_checked_before_the_bundle_is_rewritten(tmp_path, bundle_copy, capsys):
    """A missing card, a file that is no card, or the card of another model: refused before
    any photo is embedded, with the bundle left as it was."""
    manifest = (bundle_copy / "manifest.json").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(REPO / "models" / "encoder.json", other / "encoder.json")
    (other / "encoder.tflite").write_bytes(b"another model")
    (tmp_path / "notes.json").write_text(json.dumps({"threshold": 0.5}))
    (tmp_path / "odd.json").write_text(json.dumps({"preprocess": {"input_size": "wide"}}))
    for card, message in ((tmp_path / "missing.json", "no such model card"),
                          (tmp_path / "notes.json", "not a model card"),
                          (tmp_path / "odd.json", "its 'preprocess' cannot be read"),
                          (other / "encoder.json", "not the calibrated model")):
        rc = main(["calibrate", "-b", str(bundle_copy), "--photos", str(SAMPLE / "photos.csv"),
                   "--model-card", str(card), "--no-progress"])
        assert rc == 2 and message in capsys.readouterr().err
        assert (bundle_copy / "manifest.json").read_bytes() == manifest
    assert not (tmp_path / "missing.json").exists()


def test_a_bundle_holding_other_files_is_not_calibrated_in_place(tmp_path, bundle_copy, capsys):
    """Calibrating in place rewrites the bundle's folder: a file of someone else's in it is
    refused with advice that fits (the old message said "choose another --out", which was not
    given), and nothing changes."""
    manifest = (bundle_copy / "manifest.json").read_bytes()
    (bundle_copy / "notes.txt").write_text("mine")
    rc = main(["calibrate", "-b", str(bundle_copy), "--photos", str(SAMPLE / "photos.csv"),
               "--allow-few-photos", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and "it holds notes.txt, which is not a bundle file" in captured.err
    assert "move what is not the bundle's out of it, or write the calibrated bundle elsewhere with --out" in captured.err
    assert (bundle_copy / "manifest.json").read_bytes() == manifest
    assert (bundle_copy / "notes.txt").read_text() == "mine"


def test_dry_run_writes_nothing(tmp_path, bundle_copy, capsys):
    manifest = (bundle_copy / "manifest.json").read_bytes()
    card = tmp_path / "encoder.json"
    card.write_text(json.dumps({"preprocess": {"input_size": 96, "crop": "center"}}))
    before = card.read_bytes()
    assert main(["calibrate", "-b", str(bundle_copy), "--photos", str(SAMPLE / "photos.csv"),
                 "--target-far", "0.2", "--dry-run", "--model-card", str(card), "--no-progress"]) == 0
    assert (bundle_copy / "manifest.json").read_bytes() == manifest
    assert card.read_bytes() == before  # the model card too: a dry run changes no threshold
    assert f"dry run: model card {card} left as it is" in capsys.readouterr().out


@pytest.mark.grocery
def test_calibration_on_grocery_photos(tmp_path, grocery, shipped_model):
    """FAR 1% on the grocery-dev validation photos, with the shipped model."""
    from auditlens.catalog import open_catalog
    from auditlens.datasets import import_grocery
    from auditlens.export.enroll import EnrollOptions, enroll

    csvs = import_grocery(grocery, tmp_path / "csv")
    # one "\n" a line, as shell tools (cut, sed) read them: no "\r" left on the last field
    assert all(b"\r" not in csvs[name].read_bytes() for name in ("catalog", "train", "val"))
    bundle = enroll(open_catalog(csvs["catalog"]), tmp_path / "bundle", model=shipped_model,
                    options=EnrollOptions(progress=False))
    d = calibrate(bundle, csvs["val"], 0.01, progress=False)
    assert d["measured_far"] <= 0.01
    assert d["pairs"]["impostor"] > 500 and d["pairs"]["hard"] > 0
    assert d["measured_far_hard"] is not None


def test_no_impostor_pairs_says_why(tmp_path, sample_photos):
    """Enrolled from a folder (no groups, so no look-alike pairs) and calibrated with
    --impostors 0: the message names the option, not a one-product bundle."""
    from auditlens.catalog import open_catalog
    from auditlens.errors import CatalogError
    from auditlens.export.enroll import enroll

    bundle = enroll(open_catalog(SAMPLE / "originals"), tmp_path / "b", model=REPO / "models" / "encoder.tflite")
    with pytest.raises(CatalogError, match="--impostors 0 draws none, and no product shares a group"):
        calibrate(bundle, sample_photos, 0.1, n_impostors=0, write=False, progress=False)


def test_photos_too_few_to_measure_the_target_rate_are_refused_unless_allowed(tmp_path, bundle_copy,
                                                                             sample_photos, capsys):
    """One photo gives nine impostor pairs: a '1% FAR' threshold from them keeps out those
    nine and nothing more, and the bundle would claim 1%."""
    from auditlens.errors import CatalogError

    before = (bundle_copy / "manifest.json").read_bytes()
    with pytest.raises(CatalogError, match="1 usable photo.s. give 9 distinct impostor pairs, too few to "
                       "measure a false-accept rate of 0.01 .that needs at least 100."):
        calibrate(bundle_copy, sample_photos[:1], 0.01, progress=False)
    assert (bundle_copy / "manifest.json").read_bytes() == before
    # a rate the pairs can measure passes, as does the whole sample at 1%
    assert calibrate(bundle_copy, sample_photos[:1], 0.2, write=False, progress=False)["target_far"] == 0.2
    assert calibrate(bundle_copy, sample_photos, 0.01, write=False, progress=False)["target_far"] == 0.01
    write_csv(tmp_path / "one.csv", ["photo", "product_id"], [[sample_photos[0].photo, sample_photos[0].product_id]])
    assert main(["calibrate", "-b", str(bundle_copy), "--photos", str(tmp_path / "one.csv"), "--no-progress"]) == 2
    assert "--allow-few-photos" in capsys.readouterr().err
    assert main(["calibrate", "-b", str(bundle_copy), "--photos", str(tmp_path / "one.csv"), "--no-progress",
                 "--allow-few-photos"]) == 0
    assert "only" in json.loads((bundle_copy / "manifest.json").read_text())["decision"]["warnings"][0]


def test_a_catalogue_without_groups_is_warned_that_look_alikes_are_not_measured(tmp_path, sample_photos,
                                                                               bundle_copy):
    from auditlens.catalog import open_catalog
    from auditlens.export.enroll import enroll

    folder = enroll(open_catalog(SAMPLE / "originals"), tmp_path / "b", model=REPO / "models" / "encoder.tflite")
    d = calibrate(folder, sample_photos, 0.1, write=False, progress=False)
    assert d["pairs"]["hard"] == 0 and any("no look-alike impostor pairs" in w for w in d["warnings"])
    grouped = calibrate(bundle_copy, sample_photos, 0.1, write=False, progress=False)  # milk brands share a group
    assert grouped["pairs"]["hard"] > 0 and not any("look-alike" in w for w in grouped["warnings"])


def test_repeated_rows_count_once_and_evaluating_on_the_calibration_photos_is_flagged(tmp_path, bundle_copy,
                                                                                      sample_photos, capsys):
    from auditlens.evaluation.evaluate import describe, evaluate

    rows = [[p.photo, p.product_id] for p in sample_photos]
    write_csv(tmp_path / "calib.csv", ["photo", "product_id"], rows + rows[:5])
    d = calibrate(bundle_copy, tmp_path / "calib.csv", 0.1, progress=False)
    once = calibrate(bundle_copy, SAMPLE / "photos.csv", 0.1, write=False, progress=False)
    assert d["pairs"]["photos"] == 16 and d["pairs"]["photo_rows_repeated"] == 5
    assert d["pairs"]["impostor"] == once["pairs"]["impostor"] and d["threshold"] == once["threshold"]
    assert any("5 photo rows repeat an earlier row" in w for w in d["warnings"])
    # an unreadable photo is named in the manifest by its file name alone: no folder of this
    # machine travels to the devices
    secret = tmp_path / "private_share"
    secret.mkdir()
    (secret / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    write_csv(tmp_path / "with_broken.csv", ["photo", "product_id"], rows + [[secret / "broken.jpg", rows[0][1]]])
    broken = calibrate(bundle_copy, tmp_path / "with_broken.csv", 0.1, write=False, progress=False)
    assert "1 photo could not be read and was skipped: broken.jpg" in broken["warnings"]
    assert "private_share" not in json.dumps({k: v for k, v in broken.items() if not k.startswith("_")})
    # ... while the command line, on the machine that has the photo, names it in full with why
    assert main(["calibrate", "-b", str(bundle_copy), "--photos", str(tmp_path / "with_broken.csv"),
                 "--target-far", "0.1", "--dry-run", "--no-progress"]) == 0
    said = capsys.readouterr().err
    assert f"auditlens: warning: 1 photo could not be read and was skipped: {secret / 'broken.jpg'}: " in said

    report = evaluate(bundle_copy, tmp_path / "calib.csv", tmp_path / "r", progress=False, plots=False)
    text = describe(report)
    assert "5 repeated rows (counted once)" in text
    assert "calibrated on calib.csv too" in text
    write_csv(tmp_path / "test.csv", ["photo", "product_id"], rows)
    assert "calibrated on" not in describe(evaluate(bundle_copy, tmp_path / "test.csv", tmp_path / "r2",
                                                    progress=False, plots=False))

    # the same image under another name (an audit-log export names every verification's
    # photo anew) is a repeat too; the same image labelled with another product is left out
    import shutil

    shutil.copy(rows[0][0], tmp_path / "000017.jpg")
    shutil.copy(rows[1][0], tmp_path / "000018.jpg")
    other = next(r[1] for r in rows if r[1] != rows[1][1])
    write_csv(tmp_path / "renamed.csv", ["photo", "product_id"],
              rows + [[tmp_path / "000017.jpg", rows[0][1]], [tmp_path / "000018.jpg", other]])
    d = calibrate(bundle_copy, tmp_path / "renamed.csv", 0.1, write=False, progress=False)
    assert d["pairs"]["photo_rows_repeated"] == 1 and d["pairs"]["photo_rows_contradictory"] == 2
    assert d["pairs"]["photos"] == 15  # 16, less the image labelled twice
    assert any("2 photo rows show an image that another row labels with another product" in w
               for w in d["warnings"])
    report = evaluate(bundle_copy, tmp_path / "renamed.csv", None, progress=False, plots=False, verbose=False)
    assert report["counts"]["photo_rows_contradictory"] == 2 and report["counts"]["photos_scored"] == 15
    assert "2 labelled with two products (left out)" in describe(report)


def test_enrolling_again_over_a_bundle_calibrated_for_itself_is_refused(tmp_path, bundle_copy, sample_photos,
                                                                        capsys):
    """A threshold written into the bundle alone (no --model-card) is not in the card that
    a new enrolment takes its threshold from: enrolling over it (to add a product) would
    drop the calibration in silence. The shipped sample, whose threshold is the card's, is
    enrolled over as before."""
    calibrate(bundle_copy, sample_photos, 0.1, progress=False)
    calibrated = (bundle_copy / "manifest.json").read_bytes()
    assert main(["enroll", str(SAMPLE / "catalog.csv"), "--out", str(bundle_copy), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a threshold calibrated for a 0.1 false-accept rate" in err and "would lose that calibration" in err
    assert (bundle_copy / "manifest.json").read_bytes() == calibrated
    assert main(["enroll", str(SAMPLE / "catalog.csv"), "--out", str(tmp_path / "fresh"), "--no-progress"]) == 0
    assert main(["enroll", str(SAMPLE / "catalog.csv"), "--out", str(tmp_path / "fresh"), "--no-progress"]) == 0


def test_a_second_look_that_accepts_no_genuine_pair_is_refused():
    """Genuine pairs whose first scores sit just above the threshold are looked at again; when
    every second look scores them low, the verdicts accept none of them, and the decision is
    refused with the way out, though the first look alone accepted them all."""
    from auditlens.evaluation.calibrate import decide_second_look, second_look_refusal
    from auditlens.evaluation.protocol import Pairs

    rng = np.random.default_rng(0)
    impostor_first = rng.uniform(-0.5, 0.4, 1000).astype(np.float32)
    impostor_second = rng.uniform(-0.5, 0.4, 1000).astype(np.float32)
    first = Pairs(photo=np.zeros(1010, int), product=np.zeros(1010, int),
                  kind=np.array(["genuine"] * 10 + ["impostor"] * 1000),
                  score=np.concatenate([np.full(10, 0.46, np.float32), impostor_first]))
    for genuine_second, accepted in ((0.0, False), (0.9, True)):
        second = np.concatenate([np.full(10, genuine_second, np.float32), impostor_second])
        look = decide_second_look(first, second, impostor_first, impostor_second, 0.45, 0.01,
                                  shift=0.15, band=0.03)
        decision = {"measured_tar": 1.0, "second_look": look}
        assert (look["measured_tar"] > 0) == accepted
        refused = second_look_refusal(decision, 10)
        assert (refused is None) == accepted
    assert refused is None and second_look_refusal({"measured_tar": 1.0}, 10) is None
    look["measured_tar"] = 0.0
    assert second_look_refusal({"measured_tar": 0.5, "second_look": look}, 10) == (
        "with the second look (views moved by 0.15) the verdicts accept none of the 10 genuine pairs, "
        "the first look alone 50.0%: calibrate without it (--second-look 0); nothing was written")
