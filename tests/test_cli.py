"""The public command line, run as a user runs it (a subprocess of the installed script)."""

import csv
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from auditlens.cli import COMMANDS

from .conftest import REPO, SAMPLE, needs_signing, write_csv


def run(*args, check_rc=None):
    proc = subprocess.run([sys.executable, "-m", "auditlens.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout + proc.stderr
    return proc


def test_demo_prints_matches_and_mismatches():
    out = run("demo", check_rc=0).stdout
    assert "MATCH" in out and "NO MATCH" in out
    assert "genuine photos accepted" in out
    # the README shows the demo's output (some rows left out as "..."): it must be this one
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    shown = next(b for b in re.findall(r"```\n(.*?)```", readme, flags=re.S) if "genuine photos accepted" in b)
    printed = out.splitlines()
    for line in shown.splitlines():
        assert line in ("", "...") or line in printed, f"README's demo line is not what demo prints: {line}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command):
    out = run(command, "--help", check_rc=0).stdout
    assert "usage: auditlens" in out and len(out.splitlines()) > 3


def test_verify_json_and_exit_codes(sample_photos):
    photo = sample_photos[0]
    proc = run("verify", "--json", "--product", photo.product_id, photo.photo)
    verdict = json.loads(proc.stdout)
    assert proc.returncode == {"match": 0, "no_match": 1, "retake": 3}[verdict["decision"]]
    assert verdict["product_id"] == photo.product_id and 0 < verdict["threshold"] < 1
    assert proc.stderr == ""  # LiteRT's "Created ... XNNPACK delegate" line is not passed on
    copy = run("verify", "--product", "Banana", SAMPLE / "originals" / "Banana.jpg", check_rc=3)
    assert "catalogue original" in copy.stdout


def test_verdict_states_the_calibrated_false_accept_rate(sample_photos, tmp_path):
    """A score above every calibration impostor is said to be so, not printed as a 0.00%
    rate; a rate measured on another catalogue's products is not quoted at all."""
    import shutil

    from auditlens.cli import _format_verdict
    from auditlens.device_app.bundle import products_fingerprint
    from auditlens.device_app.verifier import Verifier, far_share

    lent = Verifier(REPO / "models" / "sample_bundle")  # the card's threshold, from 61 other products
    assert not lent.bundle.far_measured and lent.bundle.decision.get("far_curve")
    for photo in sample_photos[:4]:
        verdict = lent.verify(photo.photo, photo.product_id)
        assert verdict.estimated_far is None and "false-accept" not in _format_verdict(verdict)

    # the same curve, as if measured on these products
    shutil.copytree(REPO / "models" / "sample_bundle", tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["decision"]["products"] = products_fingerprint(p.product_id for p in lent.bundle.products)
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    verifier = Verifier(tmp_path / "b")
    assert verifier.bundle.far_measured
    top = max(s for s, _ in verifier.bundle.decision["far_curve"])
    seen = set()
    for photo in sample_photos:
        verdict = verifier.verify(photo.photo, photo.product_id)
        line = _format_verdict(verdict).splitlines()[0]
        above = verdict.score > top
        accepted = verdict.decision == "match"  # a NO MATCH accepts nothing: no rate is quoted
        assert ("above every calibration impostor" in line) == (above and accepted)
        assert (f"est. false-accept {far_share(verdict.estimated_far)}" in line) == (accepted and not above)
        seen.add((above, accepted))
    assert {(True, True), (False, True), (False, False)} <= seen  # the sample photos show each case
    # a RETAKE was not judged: no rate is quoted for its score
    import dataclasses

    retake = dataclasses.replace(verdict, decision="retake", reasons=("the photo is too dark",))
    assert "false-accept" not in _format_verdict(retake) and "impostor" not in _format_verdict(retake)


def test_far_share_wording():
    from auditlens.device_app.verifier import far_share

    assert far_share(0.0096) == "0.96%" and far_share(0.0001) == "0.01%"
    assert far_share(0.00005) == "< 0.01%"  # not printed as 0.00%
    assert far_share(0.0) is None  # above every calibration impostor


def test_errors_are_one_clear_line(tmp_path, sample_photos):
    unknown = run("verify", "--product", "nope", sample_photos[0].photo, check_rc=2)
    assert "not in this bundle" in unknown.stderr and "Traceback" not in unknown.stderr
    # without --bundle the error says it is the sample bundle that lacks the product
    assert "the shipped sample bundle: no --bundle was given" in unknown.stderr
    named = run("verify", "--bundle", REPO / "models" / "sample_bundle", "--product", "nope", sample_photos[0].photo, check_rc=2)
    assert "not in this bundle" in named.stderr and "sample bundle" not in named.stderr
    text = tmp_path / "photo.jpg"
    text.write_text("this is not a photo")
    bad = run("verify", "--product", "Banana", text, check_rc=2)
    assert "not a readable image" in bad.stderr and "Traceback" not in bad.stderr


def test_score_writes_every_pair_even_bad_photos(tmp_path, sample_photos):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    rows = [[p.photo, p.product_id] for p in sample_photos[:4]]
    rows += [[sample_photos[0].photo, "Carrots"], [str(SAMPLE / "originals" / "Banana.jpg"), "Banana"],
             [str(tmp_path / "broken.jpg"), "Banana"]]
    pairs = write_csv(tmp_path / "pairs.csv", ["photo", "product_id"], rows)
    out = tmp_path / "scores.csv"
    proc = run("score", "--pairs", pairs, "--out", out, "--no-progress", check_rc=2)
    assert proc.stdout.startswith("6 of 7 pairs scored (") and "1 could not be: see their error column" in proc.stdout
    got = list(csv.DictReader(out.open()))
    assert [r["product_id"] for r in got] == [r[1] for r in rows]
    assert got[-1]["verdict"] == "error" and got[-1]["error"] and not got[-1]["reasons"]
    assert all(r["verdict"] in ("match", "no_match", "retake") for r in got[:-1])
    from auditlens.device_app.verifier import Verifier

    verifier = Verifier(REPO / "models" / "sample_bundle")  # the default bundle `score` used
    assert float(got[0]["score"]) == pytest.approx(verifier.verify(rows[0][0], rows[0][1]).score, abs=1e-5)
    # a RETAKE row says what to fix (the catalogue image itself was submitted)
    assert got[-2]["verdict"] == "retake" and "catalogue" in got[-2]["reasons"]
    assert all(r["reasons"] for r in got[:-1])


def test_score_interrupted_keeps_the_rows_it_scored(tmp_path, sample_photos, monkeypatch, capsys):
    """Ctrl-C (or a fault) during a long `score` run: OUT is not written half, and the rows
    scored so far are kept beside it."""
    from auditlens.cli import main
    from auditlens.device_app.verifier import Verifier

    pairs = write_csv(tmp_path / "pairs.csv", ["photo", "product_id"],
                      [[p.photo, p.product_id] for p in sample_photos[:5]])
    judged = Verifier.verify
    calls = []

    def interrupted_on_the_fourth(self, capture, product_id):
        calls.append(product_id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return judged(self, capture, product_id)

    monkeypatch.setattr(Verifier, "verify", interrupted_on_the_fourth)
    out = tmp_path / "scores.csv"
    assert main(["score", "--pairs", str(pairs), "--out", str(out), "--no-progress"]) == 130
    assert "stopped after 3 of 5 pairs" in capsys.readouterr().err and not out.exists()
    kept = list(csv.DictReader((tmp_path / "scores.partial.csv").open()))
    assert [r["product_id"] for r in kept] == [p.product_id for p in sample_photos[:3]]
    scores = [Verifier(REPO / "models" / "sample_bundle").verify(p.photo, p.product_id).score for p in sample_photos[:3]]
    assert [float(r["score"]) for r in kept] == pytest.approx(scores, abs=1e-5)


def test_score_that_cannot_write_its_output_names_it_and_says_what_became_of_the_rows(tmp_path, sample_photos):
    """The disk fills while `score` runs (here a 1,500-byte file-size limit): the error
    names OUT, not its hidden temporary file, says where the scored rows went (nowhere: the
    partial copies fail too), exits 2 without a traceback and leaves no temporary file."""
    import resource

    pairs = write_csv(tmp_path / "pairs.csv", ["photo", "product_id"],
                      [[p.photo, p.product_id] for p in sample_photos])
    out = tmp_path / "out" / "scores.csv"
    out.parent.mkdir()
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))  # noqa: E731
    proc = subprocess.run([sys.executable, "-m", "auditlens.cli", "score", "--pairs", str(pairs), "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, timeout=300, preexec_fn=limit,
                          env={**os.environ, "TMPDIR": str(tmp_path / "out")})
    assert proc.returncode == 2, proc.stderr
    assert f"scored {len(sample_photos)} pairs, but could not write {out}" in proc.stderr
    assert (f"those rows could not be kept either ({out.parent / 'scores.partial.csv'}: cannot write it: "
            "File too large)") in proc.stderr
    assert f"auditlens: error: {out}: cannot write it: File too large" in proc.stderr
    assert "Traceback" not in proc.stderr and list(out.parent.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_an_output_in_a_folder_without_write_permission_is_refused_before_any_work(tmp_path, sample_photos):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    pairs = write_csv(tmp_path / "pairs.csv", ["photo", "product_id"], [[sample_photos[0].photo, "Banana"]])
    proc = run("score", "--pairs", pairs, "--out", locked / "scores.csv", check_rc=2)
    assert "is not writable" in proc.stderr and "scored" not in proc.stderr


def test_enroll_then_info_and_identify(tmp_path, sample_photos):
    run("enroll", SAMPLE / "catalog.csv", "--out", tmp_path / "b", "--no-progress", check_rc=0)
    info = run("info", tmp_path / "b", check_rc=0).stdout
    assert "every sha256 verified" in info and "products   10" in info
    ident = run("identify", "--bundle", tmp_path / "b", "--top", "3", sample_photos[0].photo, check_rc=0)
    lines = ident.stdout.strip().splitlines()
    from auditlens.device_app.bundle import ReferenceBundle

    threshold = ReferenceBundle.load(tmp_path / "b").threshold
    assert lines[0] == f"threshold {threshold:.3f} (* clears it)" and len(lines) == 4
    assert all(line.split()[0] == f"{rank}." for rank, line in enumerate(lines[1:], 1))


def test_identify_says_which_products_clear_the_threshold_and_when_to_retake(tmp_path, sample_photos):
    """identify ranked a black frame and the catalogue original itself with exit 0 and no
    word of the threshold (found in review); verify called both RETAKE."""
    from PIL import Image

    photo = sample_photos[0]
    ranked = json.loads(run("identify", "--json", "--top", "3", photo.photo, check_rc=0).stdout)
    threshold = ranked[0]["threshold"]
    assert [c["passes_threshold"] for c in ranked] == [c["score"] >= threshold for c in ranked]
    assert ranked[0]["product_id"] == photo.product_id and ranked[0]["retake"] == []
    Image.new("RGB", (640, 480), (3, 3, 3)).save(tmp_path / "black.jpg")
    dark = run("identify", tmp_path / "black.jpg", check_rc=3).stdout
    assert "RETAKE:" in dark and "dark" in dark
    copy = run("identify", SAMPLE / "originals" / "Banana.jpg", check_rc=3).stdout
    assert "RETAKE: the photo reproduces the catalogue original" in copy
    # the original scores far above the threshold, yet is not judged: nothing is starred
    assert copy.splitlines()[0].endswith("(not applied: retake the photo)") and "*" not in copy
    assert "*" in run("identify", photo.photo, check_rc=0).stdout


def test_a_greyscale_or_blank_photo_is_a_retake_not_a_verdict(tmp_path, sample_photos):
    """The greyscale copy of a milk's photo scored as a MATCH for another milk, and a fully
    transparent PNG was called overexposed (found in review)."""
    from PIL import Image

    photo = next(p for p in sample_photos if p.product_id == "Arla-Standard-Milk")
    Image.open(photo.photo).convert("L").save(tmp_path / "grey.jpg")
    for claimed in ("Arla-Standard-Milk", "Oatly-Oat-Milk"):
        verdict = json.loads(run("verify", "--json", "-p", claimed, tmp_path / "grey.jpg", check_rc=3).stdout)
        assert verdict["decision"] == "retake" and verdict["reasons"][0].startswith("no colour: the photo is greyscale")
    Image.new("RGBA", (400, 300), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    out = run("verify", "-p", "Banana", tmp_path / "clear.png", check_rc=3).stdout
    assert "blank: the photo is one flat colour" in out and "overexposed" not in out
    assert run("verify", "-p", "Arla-Standard-Milk", photo.photo).returncode in (0, 1)  # judged


def test_enroll_with_reference_photos_needs_its_own_calibration(tmp_path, sample_photos):
    from auditlens.device_app.bundle import ReferenceBundle

    refs = tmp_path / "refs.csv"
    with refs.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["photo", "product_id"])
        w.writerows((p.photo, p.product_id) for p in sample_photos[:3])
    with_refs = run("enroll", SAMPLE / "catalog.csv", "--references", refs, "--out", tmp_path / "b",
                    "--no-progress", check_rc=0)
    assert "not calibrated" in with_refs.stderr and "reference photos" in with_refs.stderr
    b = ReferenceBundle.load(tmp_path / "b")
    assert len(b.references) == len(b.products) + 3
    assert b.decision["target_far"] is None and b.decision["calibrated_on"] is None
    # each reference photo sits with its product, after the original
    photo = sample_photos[0]
    rows = next(p for p in b.products if p.product_id == photo.product_id).references
    assert len(rows) == 1 + sum(p.product_id == photo.product_id for p in sample_photos[:3])
    # a photo enrolled as a reference is its product's best match
    ident = run("identify", "--bundle", tmp_path / "b", "--top", "1", photo.photo, check_rc=0).stdout
    assert photo.product_id in ident
    # info --products lists every id verify takes, with its references, in text and JSON
    listed = json.loads(run("info", tmp_path / "b", "--products", "--json", check_rc=0).stdout)["products"]
    assert [r["product_id"] for r in listed] == [p.product_id for p in b.products]
    assert {r["product_id"]: r["references"] for r in listed}[photo.product_id] == len(rows)
    assert next(r for r in listed if r["product_id"] == "Banana") == {
        "product_id": "Banana", "name": "Banana", "kind": "Fruit", "group": "Banana", "references": 1}
    text = run("info", tmp_path / "b", "--products", check_rc=0).stdout.splitlines()
    table = text[text.index("") + 1:]
    assert table[0].split() == ["product", "id", "name", "kind", "group", "refs"] and len(table) == 11
    assert table[1].split()[0] == b.products[0].product_id and table[1].split()[-1] == str(
        len(b.products[0].references))
    assert "--products lists them" in run("info", tmp_path / "b", check_rc=0).stdout
    # calibrating on labelled photos makes it a calibrated bundle again
    run("calibrate", "--bundle", tmp_path / "b", "--photos", SAMPLE / "photos.csv", "--no-progress", check_rc=0)
    recalibrated = ReferenceBundle.load(tmp_path / "b").decision
    assert recalibrated["target_far"] == 0.01 and recalibrated["products"]["count"] == 10
    # ... but its threshold is no model card's: those go to bundles of originals alone
    card = tmp_path / "encoder.json"
    card.write_bytes((REPO / "models" / "encoder.json").read_bytes())
    refused = run("calibrate", "--bundle", tmp_path / "b", "--photos", SAMPLE / "photos.csv",
                  "--model-card", card, "--no-progress", check_rc=2)
    assert "3 reference photo(s) besides its originals" in refused.stderr
    assert card.read_bytes() == (REPO / "models" / "encoder.json").read_bytes()


def test_enroll_says_when_a_model_has_no_card_beside_it(tmp_path):
    alone = tmp_path / "model" / "encoder.tflite"
    alone.parent.mkdir()
    shutil.copy(REPO / "models" / "encoder.tflite", alone)
    said = run("enroll", SAMPLE / "catalog.csv", "--model", alone, "--out", tmp_path / "b",
               "--no-progress", check_rc=0).stderr
    assert f"no model card beside {alone}" in said and "the preprocessing is assumed (128 px, center crop, photo views 1)" in said
    assert "is not calibrated (no model card beside the model)" in said and "for these photo views" not in said
    with_card = run("enroll", SAMPLE / "catalog.csv", "--out", tmp_path / "c", "--no-progress", check_rc=0)
    assert "no model card" not in with_card.stderr


def test_enroll_with_other_photo_views_drops_the_calibration(tmp_path, sample_photos):
    from auditlens.device_app.bundle import ReferenceBundle
    from auditlens.errors import BundleFormatError
    from auditlens.export.enroll import DEFAULT_THRESHOLD

    calibrated = run("enroll", SAMPLE / "catalog.csv", "--out", tmp_path / "card", "--no-progress", check_rc=0)
    # views no shipped card uses: the card's threshold does not hold for them
    dropped = run("enroll", SAMPLE / "catalog.csv", "--out", tmp_path / "other", "--no-progress",
                  "--photo-zooms", "1,0.6", "--photo-mirror", check_rc=0)
    assert "not calibrated" in dropped.stderr and "auditlens calibrate" in dropped.stderr
    # the card's views: its threshold carries over, flagged as calibrated on other products
    assert "not calibrated" not in calibrated.stderr and "another catalogue" in calibrated.stderr
    card, other = ReferenceBundle.load(tmp_path / "card"), ReferenceBundle.load(tmp_path / "other")
    assert other.spec.photo_zooms == (1.0, 0.6) and other.spec.num_views == 4
    assert card.decision["calibrated_on"] and card.spec != other.spec
    assert other.decision["calibrated_on"] is None and other.threshold == DEFAULT_THRESHOLD
    # info says how each bundle embeds a photo
    assert ("photos     each embedded as 2 views, averaged: the middle 70% (of each side) of the "
            "centred square, and its mirror image") in run("info", tmp_path / "card", check_rc=0).stdout
    assert ("photos     each embedded as 4 views, averaged: the centred square, the middle 60% (of each "
            "side) of the centred square, each with its mirror image") in run("info", tmp_path / "other",
                                                                              check_rc=0).stdout
    bad = run("enroll", SAMPLE / "catalog.csv", "--out", tmp_path / "bad", "--photo-zooms", "0.8,0.2", check_rc=2)
    assert "photo_zooms must be one or more zooms within 0.3..1.0" in bad.stderr and "Traceback" not in bad.stderr
    # shifted copies of the card's 0.7 view: ten views, not calibrated
    shifted = run("enroll", SAMPLE / "catalog.csv", "--out", tmp_path / "shifted", "--no-progress",
                  "--photo-shift", "0.15", check_rc=0)
    assert "not calibrated" in shifted.stderr and ReferenceBundle.load(tmp_path / "shifted").spec.num_views == 10
    # a reader that predates the shift would embed two views and apply this threshold: the
    # bundle says format 2, which such a reader refuses; bundles without a shift stay format 1
    # (the card's second look near the threshold included: its first threshold holds alone)
    manifest = json.loads((tmp_path / "shifted" / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["preprocess"]["photo_shift"] == 0.15
    plain = json.loads((tmp_path / "card" / "manifest.json").read_text())
    assert plain["format_version"] == 1 and "photo_shift" not in plain["preprocess"]
    assert plain["decision"]["second_look"]["photo_shift"] == 0.15
    manifest["format_version"] = 1
    (tmp_path / "shifted" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleFormatError, match="photo_shift needs bundle format version 2, not 1"):
        ReferenceBundle.load(tmp_path / "shifted")
    manifest["format_version"] = 2
    (tmp_path / "shifted" / "manifest.json").write_text(json.dumps(manifest))
    assert ("photos     each embedded as 10 views, averaged: the middle 70% (of each side) of the centred "
            "square, also moved left, right, up and down by 15% of the centred square's side, each with "
            "its mirror image") in run("info", tmp_path / "shifted", check_rc=0).stdout
    outside = run("enroll", SAMPLE / "catalog.csv", "--out", tmp_path / "bad", "--photo-shift", "0.2", check_rc=2)
    assert "keep every shifted box inside the crop box" in outside.stderr and not (tmp_path / "bad").exists()
    for text, said in (("x", "must be a number, not 'x'"), ("0.5", "must be within 0..0.35, not 0.5")):
        wrong = run("enroll", SAMPLE / "catalog.csv", "--out", tmp_path / "bad", "--photo-shift", text, check_rc=2)
        assert f"--photo-shift: the shift {said}" in wrong.stderr


@needs_signing
def test_info_says_whether_the_signature_was_checked(tmp_path):
    from auditlens.device_app.signing import generate_keypair

    private, public = generate_keypair(tmp_path / "keys")
    run("enroll", SAMPLE / "catalog.csv", "--out", tmp_path / "signed", "--sign-key", private,
        "--no-progress", check_rc=0)
    assert "manifest.sig present but NOT checked (pass --public-key" in run("info", tmp_path / "signed",
                                                                            check_rc=0).stdout
    checked = run("info", tmp_path / "signed", "--public-key", public, check_rc=0).stdout
    assert "signature checked" in checked and "NOT checked" not in checked
    photo = SAMPLE / "photos" / "Banana_001.jpg"
    unchecked = run("identify", "--bundle", tmp_path / "signed", photo, check_rc=0)
    assert "signature was not checked" in unchecked.stderr
    assert run("identify", "--bundle", tmp_path / "signed", "--public-key", public, photo,
               check_rc=0).stderr == ""

    run("enroll", SAMPLE / "catalog.csv", "--out", tmp_path / "plain", "--no-progress", check_rc=0)
    manifest_path = tmp_path / "plain" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["created"]  # optional to the loader: `info` must not trip over it either
    manifest_path.write_text(json.dumps(manifest))
    plain = run("info", tmp_path / "plain", check_rc=0).stdout
    assert "made ?" in plain and "not signed" in plain

    # an unsigned bundle (or a signed one whose manifest.sig was removed) is said to be one
    for unsigned in (tmp_path / "plain", tmp_path / "stripped"):
        if unsigned.name == "stripped":
            shutil.copytree(tmp_path / "signed", unsigned)
            (unsigned / "manifest.sig").unlink()
        said = run("identify", "--bundle", unsigned, photo, check_rc=0).stderr
        assert "warning: the bundle is not signed" in said and "--public-key KEY" in said
    # the shipped sample is a demo: unsigned, and not warned about
    assert "not signed" not in run("identify", photo, check_rc=0).stderr
    # a --public-key that is no key is said so, whether the bundle is signed or not
    for bundle, rest in ((tmp_path / "plain", "not signed"), (tmp_path / "signed", None)):
        said = run("verify", "-p", "Banana", "--bundle", bundle, "--public-key", REPO / "README.md",
                   photo, check_rc=2).stderr
        assert "neither PEM, 32 raw bytes nor 64 hex digits" in said and (rest is None or rest not in said)
    said = run("verify", "-p", "Banana", "--bundle", tmp_path / "plain", "--public-key", public,
               photo, check_rc=2).stderr
    assert "the bundle is not signed, and this device only accepts bundles signed" in said


def test_an_unexpected_error_exits_2_not_1_which_means_no_match(tmp_path, monkeypatch, capsys):
    from auditlens.cli import main

    def broken(args):
        raise RuntimeError("disk controller on fire")

    monkeypatch.setattr("auditlens.device_app.verify_log.run", broken)
    assert main(["verify-log", str(tmp_path / "a.db")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["auditlens: internal error: RuntimeError: disk controller on fire "
                   "(set AUDITLENS_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("AUDITLENS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="on fire"):
        main(["verify-log", str(tmp_path / "a.db")])


@pytest.mark.parametrize("args, message", [
    (["verify", "--product", "Banana", "--threads", "100000", "PHOTO"], "--threads: at most 256 threads, not 100000"),
    (["evaluate", "--photos", "PHOTO", "--out", "OUT", "--impostors", "-3"], "--impostors: must be 0 or more, not -3"),
    (["calibrate", "--photos", "PHOTO", "--impostors", "-1"], "--impostors: must be 0 or more, not -1"),
    (["identify", "--top", "0", "PHOTO"], "--top/-k: must be at least 1, not 0"),
    (["identify", "--top", "-1", "PHOTO"], "--top/-k: must be at least 1, not -1"),
    (["verify", "--product", "Banana", "--threads", "0", "PHOTO"], "--threads: must be at least 1"),
    (["enroll", "CATALOG", "--out", "OUT", "--threshold", "nan"], "lies in [-1, 1], not nan"),
    (["enroll", "CATALOG", "--out", "OUT", "--threshold", "1.5"], "lies in [-1, 1], not 1.5"),
    (["verify", "--product", "Banana", "--public-key", "MISSING", "PHOTO"],
     "MISSING: cannot read the publisher's public key (No such file or directory); `auditlens keygen` writes"),
    (["info", "--public-key", "MISSING"], "MISSING: cannot read the publisher's public key (No such file"),
    (["enroll", "CATALOG", "--out", "OUT", "--sign-key", "MISSING"],
     "MISSING: cannot read the publisher's private key (No such file"),
    (["calibrate", "--bundle", "BUNDLE", "--photos", "PHOTOS", "--out", "OUT", "--sign-key", "MISSING"],
     "MISSING: cannot read the publisher's private key (No such file"),
    (["verify", "--product", "NoSuchProduct", "PHOTO"], "is not in this bundle (10 products, made "),
    (["verify", "--product", "NoSuchProduct", "PHOTO"], "(`auditlens info BUNDLE --products` lists the ids"),
    (["identify", "--bundle", "ORIGINALS", "PHOTO"], "originals is a folder of images (a catalogue's "
     "originals?), not a reference bundle"),
    (["enroll", "CATALOG", "--out", "OUT", "--model", "MISSING"], "MISSING: cannot read the model file: No such file"),
    (["export", "MISSING", "--representative", "CATALOG", "--out", "m.tflite", "--float16", "--float-ops", "2"],
     "--float-ops applies to the int8 export only"),
    (["export", "MISSING", "--representative", "CATALOG", "--out", "m.tflite", "--float-ops", "-3"],
     "--float-ops: must be 0 or more, not -3"),
    (["enroll", "MISSING", "--out", "OUT"], "nothing-here: no such file or folder (a catalogue is"),
    (["enroll", "CATALOG", "--out", "OUT", "--model", "KERAS"], "default.keras is a zip archive, not a "
     "TFLite model: a Keras model; export it first"),
    (["enroll", "CATALOG", "--out", "OUT", "--model", "ZIP"], "bundle.zip is a zip archive, not a TFLite model"),
    (["enroll", "CATALOG", "--out", "OUT", "--model", "CATALOG"], "catalog.csv: not a valid TFLite model"),
    (["verify", "--product", "Banana", "FOLDER"], "a folder, not an image file"),
])
def test_bad_arguments_and_missing_files_are_one_clear_line(tmp_path, sample_photos, args, message):
    names = {"PHOTO": sample_photos[0].photo, "CATALOG": SAMPLE / "catalog.csv",
             "OUT": tmp_path / "b", "MISSING": tmp_path / "nothing-here",
             "KERAS": REPO / "models" / "default.keras", "FOLDER": SAMPLE, "ZIP": tmp_path / "bundle.zip",
             "PHOTOS": SAMPLE / "photos.csv", "ORIGINALS": SAMPLE / "originals",
             "BUNDLE": REPO / "models" / "sample_bundle"}
    if "ZIP" in args:  # a bundle zip given as the model
        shutil.make_archive(str(tmp_path / "bundle"), "zip", REPO / "models" / "sample_bundle")
    proc = run(*[names.get(a, a) for a in args], check_rc=2)
    assert message.replace("MISSING", str(tmp_path / "nothing-here")) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


def test_demo_refuses_a_bundle_without_the_sample_products(tmp_path):
    catalog = write_csv(tmp_path / "catalog.csv", ["product_id", "image"],
                        [["only-one", SAMPLE / "originals" / "Banana.jpg"]])
    run("enroll", catalog, "--out", tmp_path / "b", "--no-progress", check_rc=0)
    proc = run("demo", "--bundle", tmp_path / "b", check_rc=2)
    assert "at least two products" in proc.stderr and "Traceback" not in proc.stderr


def test_output_paths_that_cannot_work_are_refused_before_any_work(tmp_path, sample_photos):
    pairs = write_csv(tmp_path / "pairs.csv", ["photo", "product_id"],
                      [[p.photo, p.product_id] for p in sample_photos[:2]])
    (tmp_path / "a-folder").mkdir()
    proc = run("score", "--pairs", pairs, "--out", tmp_path / "a-folder", "--no-progress", check_rc=2)
    assert f"{tmp_path / 'a-folder'} is a folder; give a file name" in proc.stderr
    assert "scoring" not in proc.stderr  # refused before the first photo
    proc = run("score", "--pairs", pairs, "--out", tmp_path / "no-such" / "s.csv", "--no-progress", check_rc=2)
    assert "does not exist" in proc.stderr

    (tmp_path / "a-file").write_text("keep me")
    proc = run("evaluate", "--photos", pairs, "--out", tmp_path / "a-file", "--no-progress", check_rc=2)
    assert f"{tmp_path / 'a-file'} is a file; give a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "a-file").read_text() == "keep me"
    # a path under a file: refused up front, not after every photo is embedded
    for command in (("evaluate", "--photos", pairs), ("enroll", SAMPLE / "catalog.csv")):
        proc = run(*command, "--out", tmp_path / "a-file" / "sub", "--no-progress", check_rc=2)
        assert f"{tmp_path / 'a-file'} is a file, so no folder can be made there" in proc.stderr
        assert "Traceback" not in proc.stderr and "embedding" not in proc.stderr


@pytest.mark.parametrize("blocked, args, extra", [
    ("matplotlib", ["evaluate", "--photos", SAMPLE / "photos.csv"], "[eval]"),
    ("tensorflow", ["train", SAMPLE / "catalog.csv", "--epochs", "1", "--steps-per-epoch", "1"], "[train]"),
    ("keras", ["teacher-features", SAMPLE / "catalog.csv", "--model", "keras:MobileNetV2",
               "--weights", SAMPLE / "catalog.csv"], "[train]"),
])
def test_a_missing_extra_is_named_before_any_work(tmp_path, blocked, args, extra):
    """Without the extra a command needs, it says which to install (exit 2, not an
    'internal error'), and evaluate says so before embedding a photo, writing nothing."""
    out = tmp_path / "out"
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from auditlens.cli import main\n"
            f"sys.exit(main({[*map(str, args), '--out', str(out)]!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert f"needs {blocked}" in proc.stderr and extra in proc.stderr and "internal error" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_verdicts_of_an_uncalibrated_bundle_say_so(tmp_path, sample_photos):
    """A model without its card enrols with the default threshold: enroll and info said
    'not calibrated', verify, identify and score did not (found in review)."""
    model = tmp_path / "encoder.tflite"  # no encoder.json beside it
    model.write_bytes((REPO / "models" / "encoder.tflite").read_bytes())
    run("enroll", SAMPLE / "catalog.csv", "--model", model, "--out", tmp_path / "b", "--no-progress", check_rc=0)
    photo = sample_photos[0]
    pairs = write_csv(tmp_path / "pairs.csv", ["photo", "product_id"], [[photo.photo, photo.product_id]])
    for args in (["verify", "-p", photo.product_id, photo.photo], ["identify", photo.photo],
                 ["score", "--pairs", pairs, "--out", tmp_path / "s.csv", "--no-progress"]):
        proc = run(*args, "--bundle", tmp_path / "b")
        assert proc.returncode in (0, 1), proc.stderr
        assert "threshold 0.500 is not calibrated" in proc.stderr and "auditlens calibrate" in proc.stderr
    assert "not calibrated" not in run("verify", "-p", photo.product_id, photo.photo).stderr


def test_a_card_calibrated_on_another_catalogue_lends_its_threshold_with_a_warning(tmp_path):
    from auditlens.catalog import open_catalog
    from auditlens.device_app.bundle import ReferenceBundle, products_fingerprint
    from auditlens.device_app.rivals import effective_decision

    catalog = open_catalog(SAMPLE / "catalog.csv")
    model = tmp_path / "encoder.tflite"
    model.write_bytes((REPO / "models" / "encoder.tflite").read_bytes())
    shutil.copy(REPO / "models" / "encoder.cohort.npy", tmp_path)  # the card's cell cohort
    card = json.loads((REPO / "models" / "encoder.json").read_text())
    # the card's decision without rivals (lent without them to a bundle that lacks its
    # products: tests/test_rivals.py)
    card["decision"] = effective_decision(card["decision"], [])
    card["decision"]["products"] = products_fingerprint(["Milk-A", "Milk-B"])  # another catalogue
    (tmp_path / "encoder.json").write_text(json.dumps(card))
    other = run("enroll", SAMPLE / "catalog.csv", "--model", model, "--out", tmp_path / "b1",
                "--no-progress", check_rc=0)
    assert "calibrated on another catalogue (2 products" in other.stderr
    b = ReferenceBundle.load(tmp_path / "b1")
    assert b.threshold == pytest.approx(card["decision"]["threshold"])
    assert any("not measured" in w for w in b.decision["warnings"])
    assert "warning: the threshold was calibrated on another catalogue" in run(
        "info", tmp_path / "b1", check_rc=0).stdout
    # the same products the card was calibrated with: no warning
    card["decision"]["products"] = products_fingerprint(catalog.ids)
    (tmp_path / "encoder.json").write_text(json.dumps(card))
    same = run("enroll", SAMPLE / "catalog.csv", "--model", model, "--out", tmp_path / "b2",
               "--no-progress", check_rc=0)
    assert "another catalogue" not in same.stderr
    # only the calibration's own warnings (the card's), none about another catalogue
    assert ReferenceBundle.load(tmp_path / "b2").decision["warnings"] == card["decision"]["warnings"]


def test_info_runs_the_model_on_the_probe(tmp_path):
    """`info` checks more than hashes: a manifest whose probe latent the model does not
    reproduce (references made with another model, every hash rewritten) is refused, as
    `verify` refuses it."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(REPO / "models" / "sample_bundle", bundle)
    said = run("info", bundle, check_rc=0).stdout
    assert "reproduces the references' probe latent" in said
    # the score's cell term, with the card's weight and the cohort the bundle carries
    cells = json.loads((bundle / "manifest.json").read_text())["decision"]["cells"]
    assert (f"scores: cosine + {cells['weight']:.4f} x the cell score's z against a cohort of "
            f"{cells['cohort']} originals") in said
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["probe"]["latent"] = [-v for v in manifest["probe"]["latent"]]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    refused = run("info", bundle)
    assert refused.returncode != 0 and "the model does not reproduce the latents" in refused.stderr


def test_a_damaged_tiff_is_one_line_without_pillows_warning(tmp_path):
    """Pillow warns ("Truncated File Read", with its source line) before auditlens gives its
    own one-line error; the CLI shows only the latter (AUDITLENS_DEBUG=1 shows both)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "TIFF", compression="tiff_deflate")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(buf.getvalue()[:-50])
    proc = run("verify", cut, "-p", "Banana", check_rc=2)
    assert proc.stderr.strip().splitlines() == [
        line for line in proc.stderr.strip().splitlines() if line.startswith("auditlens: error:")]
    assert "cut.tif" in proc.stderr and "Warning" not in proc.stderr


def test_score_rows_join_back_to_the_pairs_file_and_never_replace_it(tmp_path, sample_photos):
    """The photo column is the pairs file's own text (it was the path resolved against the
    CSV's folder, different for every working folder), so the output can be scored again;
    an --out that is the --pairs file is refused instead of replacing it."""
    import shutil

    shutil.copytree(SAMPLE / "photos", tmp_path / "photos")
    given = [f"photos/{Path(p.photo).name}" for p in sample_photos[:3]]
    pairs = write_csv(tmp_path / "pairs.csv", ["photo", "product_id"],
                      [[g, p.product_id] for g, p in zip(given, sample_photos)])
    out = tmp_path / "scores.csv"
    run("score", "--pairs", pairs, "--out", out, "--no-progress", check_rc=0)
    assert [r["photo"] for r in csv.DictReader(out.open())] == given
    run("score", "--pairs", out, "--out", tmp_path / "again.csv", "--no-progress", check_rc=0)  # scored again
    before = pairs.read_bytes()
    same = run("score", "--pairs", pairs, "--out", pairs, "--no-progress", check_rc=2)
    assert "is the input" in same.stderr and pairs.read_bytes() == before


def test_score_stopped_by_sigterm_keeps_the_rows_it_scored(tmp_path, sample_photos):
    """`timeout`, systemd and CI stop a command with SIGTERM: the scored rows are kept as
    after Ctrl-C (they were lost)."""
    import shutil
    import signal

    rows = []
    for copy in range(40):  # 640 distinct photo files: each is decoded and embedded
        for p in sample_photos:
            name = tmp_path / f"{copy}_{Path(p.photo).name}"
            shutil.copy(p.photo, name)
            rows.append([str(name), p.product_id])
    pairs = write_csv(tmp_path / "pairs.csv", ["photo", "product_id"], rows)
    out = tmp_path / "scores.csv"
    proc = subprocess.Popen([sys.executable, "-m", "auditlens.cli", "score", "--pairs", str(pairs),
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"scoring" not in seen:  # the progress bar has started: the handler is in place
        char = proc.stderr.read(1)
        assert char, "score ended before scoring"
        seen += char
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and b"stopped after" in err and not out.exists()
    kept = list(csv.DictReader((tmp_path / "scores.partial.csv").open()))
    assert len(kept) < len(rows) and all(r["verdict"] in ("match", "no_match", "retake") for r in kept)


@needs_signing
def test_info_takes_the_bundle_as_the_other_commands_do_and_says_if_it_is_signed(tmp_path):
    from auditlens.device_app.signing import generate_keypair

    as_option = json.loads(run("info", "--bundle", SAMPLE.parent / "sample_bundle", "--json", check_rc=0).stdout)
    positional = json.loads(run("info", SAMPLE.parent / "sample_bundle", "--json", check_rc=0).stdout)
    assert as_option == positional and positional["signature"] == {"present": False, "checked_by": None}
    private, public = generate_keypair(tmp_path / "keys")
    run("enroll", SAMPLE / "catalog.csv", "--out", tmp_path / "b", "--sign-key", private, "--no-progress", check_rc=0)
    unchecked = json.loads(run("info", "-b", tmp_path / "b", "--json", check_rc=0).stdout)["signature"]
    checked = json.loads(run("info", "-b", tmp_path / "b", "--public-key", public, "--json", check_rc=0).stdout)
    assert unchecked == {"present": True, "checked_by": None}
    assert checked["signature"]["present"] and checked["signature"]["checked_by"].startswith("ed25519:")


def test_json_commands_print_a_json_failure_on_stdout(tmp_path):
    """A script that reads --json from stdout gets JSON when the command fails too (exit 2),
    besides the one-line error on stderr; the verdict commands' --help gives their exit codes."""
    missing = run("verify", "--json", "-p", "Banana", tmp_path / "gone.jpg")
    assert missing.returncode == 2 and "auditlens: error:" in missing.stderr
    failure = json.loads(missing.stdout)
    assert failure["ok"] is False and "gone.jpg: no such image file" in failure["error"]
    unknown = run("identify", "--json", "--bundle", tmp_path / "no-bundle", SAMPLE / "photos" / "Banana_001.jpg")
    assert unknown.returncode == 2 and json.loads(unknown.stdout)["ok"] is False
    wrong_id = run("verify", "--json", "-p", "banana", SAMPLE / "photos" / "Banana_001.jpg")
    assert wrong_id.returncode == 2 and "did you mean 'Banana'?" in json.loads(wrong_id.stdout)["error"]
    plain = run("verify", "-p", "Banana", tmp_path / "gone.jpg")  # without --json: stderr alone
    assert plain.returncode == 2 and plain.stdout == ""
    def help_text(command):  # argparse wraps to the terminal's width
        return " ".join(run(command, "--help", check_rc=0).stdout.split())

    assert "Exit status: 0 MATCH, 1 NO MATCH, 3 RETAKE" in help_text("verify")
    assert "130 when stopped" in help_text("score")


def test_a_reader_that_stops_early_is_not_an_error():
    proc = subprocess.run(f"{shlex.quote(sys.executable)} -m auditlens.cli demo | head -1", shell=True,
                          capture_output=True, text=True, timeout=300)
    assert proc.stdout.startswith("auditlens demo:") and "Broken pipe" not in proc.stderr
    assert proc.stderr == ""


@needs_signing
def test_keygen_quotes_its_paths_and_restores_a_lost_public_key(tmp_path):
    keys = tmp_path / "publisher keys"  # a folder with a space: the printed commands must run as shown
    made = run("keygen", "--out", keys, check_rc=0).stdout
    sign = next(line for line in made.splitlines() if "--sign-key" in line)
    command = shlex.split(sign[sign.index("`") + 1:sign.rindex("`")])
    assert command[:2] == ["auditlens", "enroll"] and command[-1] == str(keys / "publisher.key")
    original = (keys / "publisher.pub").read_bytes()
    (keys / "publisher.pub").unlink()
    refused = run("keygen", "--out", keys, check_rc=2)
    assert "--restore-public writes it again" in refused.stderr
    restored = run("keygen", "--out", keys, "--restore-public", check_rc=0).stdout
    assert (keys / "publisher.pub").read_bytes() == original and "written again" in restored
    again = run("keygen", "--out", keys, "--restore-public", check_rc=2)
    assert "exists already; nothing to restore" in again.stderr
    (keys / "publisher.pub").unlink()
    (keys / "publisher.pub").symlink_to(tmp_path / "nowhere.pub")  # a link to nothing is no lost key
    assert "--restore-public" not in run("keygen", "--out", keys, check_rc=2).stderr
    lost = run("keygen", "--out", tmp_path / "empty", "--restore-public", check_rc=2)
    assert "cannot read the private key" in lost.stderr and not (tmp_path / "empty").exists()


def test_info_describes_single_views_and_the_whole_frame():
    from auditlens.cli import _describe_views
    from auditlens.device_app.preprocess import PreprocessSpec

    assert _describe_views(PreprocessSpec(64)) == "each embedded as 1 view: the centred square"
    assert _describe_views(PreprocessSpec(64, crop="full")) == "each embedded as 1 view: the whole frame"
    assert (_describe_views(PreprocessSpec(64, crop="full", photo_zooms=(0.675,)))
            == "each embedded as 1 view: the middle 67.5% (of each side) of the whole frame")
    assert (_describe_views(PreprocessSpec(64, photo_mirror=True))
            == "each embedded as 2 views, averaged: the centred square, and its mirror image")
    assert (_describe_views(PreprocessSpec(64, crop="full", photo_zooms=(0.8, 0.5), photo_shift=0.1))
            == "each embedded as 10 views, averaged: the middle 80% (of each side) of the whole frame, "
               "the middle 50% (of each side) of the whole frame, each also moved left, right, up and "
               "down by 10% of the whole frame's side")
