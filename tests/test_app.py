"""The field app, driven for real and headless: Kivy renders offscreen (SDL's offscreen
video driver through Mesa, no display), a folder of photos plays the camera, and the
test walks picker -> camera -> MATCH / NO MATCH / RETAKE -> history -> CSV export, then
checks the verdicts against the engine, the audit records and the export."""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import io
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auditlens.cli import COMMANDS
from auditlens.cli import main as cli_main
from auditlens.device_app.app.camera import (
    CameraUnavailable,
    FileCamera,
    KivyCamera,
    android_frame_rotation,
    texture_to_image,
    upright_rotation,
)
from auditlens.device_app.app.session import Session
from auditlens.device_app.auditlog import AuditLog
from auditlens.device_app.verifier import Verifier


def _load_shots():
    """tests/make_screenshots.py, whether tests/ is a package or not."""
    spec = importlib.util.spec_from_file_location("auditlens_make_screenshots",
                                                  Path(__file__).with_name("make_screenshots.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shots = _load_shots()

REPO = Path(__file__).resolve().parents[1]
HAVE_KIVY = importlib.util.find_spec("kivy") is not None
MODEL = REPO / "models" / "encoder.tflite"

needs_model = pytest.mark.skipif(not MODEL.is_file(), reason="no shipped model yet")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A bundle from the shipped sample catalogue (or a generated one) and a camera
    folder: a photo of product A, a photo of another product, a too-dark photo of A."""
    if not MODEL.is_file():
        pytest.skip("no shipped model (models/encoder.tflite)")
    root = tmp_path_factory.mktemp("demo")
    plan = shots.make_demo(root, MODEL)  # the model is copied into root
    return root, plan


# -- engine-side pieces, no Kivy -------------------------------------------------------
def test_cli_has_app_and_verify_log():
    assert COMMANDS["app"][1] == ("auditlens.device_app.app.main", "add_arguments", "run")
    module, add_arguments, run = COMMANDS["verify-log"][1]
    front_end = importlib.import_module(module)  # engine only: no Kivy
    parser = argparse.ArgumentParser()
    getattr(front_end, add_arguments)(parser)
    args = parser.parse_args(["audit.db", "--expect-head", "0:" + "0" * 64, "--strict"])
    assert args.log == Path("audit.db") and args.strict and args.expect_head == [(0, "0" * 64)]
    assert callable(getattr(front_end, run))


def test_app_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["app", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--camera-dir" in out and "--bundle" in out and "--log" in out and "--camera-rotation" in out


def test_engine_side_imports_no_kivy_or_tensorflow():
    import subprocess
    import sys

    code = ("import sys; import auditlens.device_app.auditlog, auditlens.device_app.app.session, "
            "auditlens.device_app.app.camera, auditlens.device_app.app.main; "
            "bad = [m for m in ('kivy', 'tensorflow', 'keras') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_file_camera(tmp_path):
    with pytest.raises(CameraUnavailable):
        FileCamera(tmp_path / "missing")
    with pytest.raises(CameraUnavailable):
        FileCamera(tmp_path)
    for name, colour in (("b.jpg", (0, 0, 255)), ("a.png", (255, 0, 0)), ("notes.txt", None)):
        if colour is None:
            (tmp_path / name).write_text("not a photo")
        else:
            Image.new("RGB", (80, 60), colour).save(tmp_path / name)
    cam = FileCamera(tmp_path)
    assert [p.name for p in cam.files] == ["a.png", "b.jpg"]
    assert cam.frame().getpixel((1, 1)) == (255, 0, 0)
    # frames are cached per file *and* size: the preview never gets the small analysis frame
    assert cam.frame(max_side=40).size == (40, 30) and cam.frame().size == (80, 60)
    cam.step()
    assert cam.current.name == "b.jpg" and cam.capture() == (tmp_path / "b.jpg").read_bytes()
    cam.step()
    assert cam.current.name == "a.png"
    cam.select("b")
    assert cam.current.name == "b.jpg"


def test_session_search_verify_and_log(demo, tmp_path):
    root, plan = demo
    session = Session(Path(plan["bundle"]), tmp_path / "audit.db", auditor="Sam", device="t")
    bundle = session.load()
    try:
        hits, total = session.search("")
        assert total == len(bundle.products)
        hits, total = session.search("MILK")
        assert hits and all("milk" in (p.name + p.product_id + p.group).lower() for p in hits)
        first = bundle.products[0]
        assert session.search(first.product_id)[0][0].product_id == first.product_id
        assert session.search("zzz-nothing")[1] == 0
        assert session.product_for_code(first.product_id).product_id == first.product_id
        assert session.product_for_code("no-such-code") is None

        camera = Path(plan["camera_dir"])
        photo = (camera / plan["match_photo"]).read_bytes()
        outcome = session.verify(photo, plan["product"])
        assert outcome.verdict.decision == "match" and outcome.record_id == 1
        broken = session.verify(b"\xff\xd8 not really a jpeg", plan["product"])
        assert broken.verdict is None and broken.error and broken.record_id is None
        (record,) = session.history()
        assert record.captured_sha256 == hashlib.sha256(photo).hexdigest()
        assert record.auditor == "Sam" and record.device == "t"
        assert session.check_log().records == 1
        path = session.export("csv", tmp_path)
        assert path.suffix == ".csv" and path.read_text().count("\n") == 2
        summary = session.summary()
        assert summary.startswith(f"{len(bundle.products)} products - model {bundle.model_id[:8]} - "
                                  f"threshold {bundle.threshold:.3f}")
        assert ("NOT calibrated" in summary) == (bundle.decision.get("target_far") is None)
        assert "WARNING" not in summary
        # the demo bundle is unsigned: the picker shows its line as a warning, not muted
        assert bundle.signature == "unsigned" and "not signed" in summary and session.needs_attention()
    finally:
        session.close()


def test_the_app_says_when_opening_the_log_put_back_its_guards(demo, tmp_path):
    """Guards dropped by hand are put back when the app opens the log; the auditor is told
    on the first screen, not only by a later verify-log."""
    from .test_auditlog import _edit_by_hand

    root, plan = demo
    log_path = tmp_path / "audit.db"
    AuditLog(log_path).close()
    _edit_by_hand(log_path, "")
    for attempt in range(2):
        session = Session(Path(plan["bundle"]), log_path, auditor="Sam", device="t")
        session.load()
        try:
            said = "WARNING: the audit log's append-only guards had been removed" in session.summary()
            assert said == (attempt == 0)
            assert session.needs_attention()  # always: the guards, and an unsigned demo bundle
        finally:
            session.close()
    with AuditLog(log_path, create=False) as log:
        assert not log.verify_chain().triggers_intact  # the log keeps its note of it


def test_a_verdict_the_log_cannot_take_is_held_and_written_later(demo, tmp_path):
    """The log fails while a verdict is being saved: the auditor still sees the verdict,
    told it is not logged yet, and it is written, in capture order, once the log works."""
    from auditlens.device_app.auditlog import AuditLog

    root, plan = demo
    session = Session(Path(plan["bundle"]), tmp_path / "audit.db", auditor="Sam", device="t")
    session.load()
    try:
        photo = (Path(plan["camera_dir"]) / plan["match_photo"]).read_bytes()
        session.log.close()  # the log stops accepting records (as with a full disk)
        held = session.verify(photo, plan["product"])
        assert held.verdict.decision == "match" and held.record_id is None
        assert "closed" in held.log_error and session.held() == 1
        assert not session.unlogged  # held on disk, not only in memory

        again = session.verify(photo, plan["product"])  # still failing: held behind the first
        assert again.log_error and session.held() == 2

        session.log = AuditLog(tmp_path / "audit.db", device="t")  # the log works again
        later = session.verify(photo, plan["product"])
        assert later.log_error == "" and later.record_id == 3 and session.held() == 0
        first, _, second = sorted(session.history(), key=lambda r: r.id)
        assert first.created_utc <= second.created_utc and first.decision == "match"
        assert first.auditor == "Sam" and session.check_log().records == 3
        # each record keeps the time its photo was judged, not only when it was written
        assert first.verdict["judged_utc"] == held.verdict.judged_utc <= first.created_utc
        assert first.verdict["judged_utc"] < second.verdict["judged_utc"]
    finally:
        session.close()


def test_held_verdicts_are_listed_and_open_with_their_photo(demo, tmp_path):
    """History lists what the log has not taken, newest first: a verdict held on disk, one
    held only in memory (its folder could not be written) and a damaged file set aside;
    each opens with its photo (none for the damaged one), and one the log has taken since
    says so instead of showing stale data."""
    from auditlens.device_app.auditlog import AuditLog
    from auditlens.errors import AuditlensError

    root, plan = demo
    photo = (Path(plan["camera_dir"]) / plan["match_photo"]).read_bytes()
    other = (Path(plan["camera_dir"]) / plan["mismatch_photo"]).read_bytes()
    session = Session(Path(plan["bundle"]), tmp_path / "audit.db", auditor="Sam", device="t")
    session.load()
    try:
        session.log.close()
        session.held_dir.write_text("")  # a file where the held folder goes: held in memory
        in_memory = session.verify(other, plan["product"])
        assert "kept in memory" in in_memory.log_error and len(session.unlogged) == 1
        session.held_dir.unlink()
        on_disk = session.verify(photo, plan["product"])
        (session.held_dir / "00000000000000000001-cut.unreadable").write_text("{truncated")

        held, older, damaged = session.held_verdicts()
        assert [h.state for h in (held, older, damaged)] == ["waiting", "in memory", "unreadable"]
        assert older.decision == "no_match" and older.verdict == in_memory.verdict.to_dict()
        assert held.decision == "match" and held.score == on_disk.verdict.score
        assert held.judged_utc == on_disk.verdict.judged_utc and held.auditor == "Sam"
        assert not held.set_aside and damaged.set_aside and damaged.verdict == {}
        assert damaged.product_id == "?" and damaged.judged_utc.startswith("1970-01-01")

        opened, image = session.held_detail(held.key)
        assert opened == held and image.size == Image.open(io.BytesIO(photo)).size
        opened, image = session.held_detail(older.key)
        assert opened.verdict == older.verdict and image is not None
        assert session.held_detail(damaged.key) == (damaged, None)

        # set aside after History listed it (History not refreshed): opening it says so
        kept = (session.held_dir / held.key).read_bytes()
        (session.held_dir / held.key).rename(session.held_dir / held.key.replace(".json", ".refused"))
        opened, image = session.held_detail(held.key)
        assert opened.state == "refused" and opened.verdict == held.verdict and image is not None
        (session.held_dir / held.key.replace(".json", ".refused")).rename(session.held_dir / held.key)
        # a name no device writes (a stray file) is listed without a time, not a crash
        (session.held_dir / ("9" * 30 + "-stray.unreadable")).write_text("{}")
        stray = next(h for h in session.held_verdicts() if h.key.startswith("9" * 30))
        assert stray.held_ns == 0 and stray.judged_utc == ""
        # only files of the held folder are read
        (tmp_path / "outside.json").write_bytes(kept)
        with pytest.raises(AuditlensError, match="no longer held"):
            session.held_detail("../outside.json")

        session.log = AuditLog(tmp_path / "audit.db", device="t")  # the log works again
        entry = session.unlogged[0]  # its photo no longer the one judged: the log refuses it
        session.unlogged[0] = (entry[0], entry[1], entry[2][:-1] + b"\x00", entry[3])
        assert session.write_held() == "" and session.check_log().records == 1
        assert sorted(h.state for h in session.held_verdicts()) == ["refused", "unreadable", "unreadable"]
        assert session.held_verdicts()[0].key == older.key  # kept, set aside, not said to wait
        with pytest.raises(AuditlensError, match="no longer held .* it is in History"):
            session.held_detail(held.key)
    finally:
        session.close()


def test_a_held_verdict_survives_the_app_closing_and_is_written_once(demo, tmp_path):
    root, plan = demo
    photo = (Path(plan["camera_dir"]) / plan["match_photo"]).read_bytes()
    session = Session(Path(plan["bundle"]), tmp_path / "audit.db", auditor="Sam", device="t")
    session.load()
    session.log.close()
    held = session.verify(photo, plan["product"])
    assert held.log_error and session.held() == 1
    session.log = None  # the app is killed: nothing more is written
    (held_file,) = session.held_dir.glob("*.json")
    kept = held_file.read_bytes()

    again = Session(Path(plan["bundle"]), tmp_path / "audit.db", auditor="Kim", device="t")
    again.load()  # the next start writes it
    try:
        (record,) = again.history()
        assert record.auditor == "Sam" and record.decision == "match"
        assert record.verdict["judged_utc"] == held.verdict.judged_utc
        assert again.held() == 0 and again.check_log().records == 1
    finally:
        again.close()
    # killed after writing the record but before removing its file: not written twice
    held_file.write_bytes(kept)
    assert json.loads(kept)["auditor"] == "Sam"
    third = Session(Path(plan["bundle"]), tmp_path / "audit.db", device="t")
    third.load()
    try:
        assert third.held() == 0 and len(third.history()) == 1
    finally:
        third.close()
    with AuditLog(tmp_path / "audit.db") as log:
        assert log.verify_chain().records == 1


def test_a_log_that_cannot_be_opened_is_not_blamed_on_the_bundle(demo, tmp_path):
    from auditlens.errors import AuditLogError

    root, plan = demo
    other = tmp_path / "notes.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE notes (t TEXT)")
    con.commit()
    con.close()
    session = Session(Path(plan["bundle"]), other)
    with pytest.raises(AuditLogError, match="not an auditlens audit log"):
        session.load()
    assert session.verifier is not None  # the bundle itself loaded
    blocked = tmp_path / "file"
    blocked.write_text("in the way")
    with pytest.raises(AuditLogError, match="cannot make the log's folder: .*file is a file, not a folder"):
        Session(Path(plan["bundle"]), blocked / "audit.db").load()


def test_app_takes_the_public_key_as_a_file(demo, tmp_path):
    # `auditlens keygen` tells the auditor to pass the .pub file; the app must read it
    pytest.importorskip("cryptography")
    import argparse

    from auditlens.device_app.app.main import add_arguments
    from auditlens.device_app.bundle import ReferenceBundle
    from auditlens.device_app.signing import generate_keypair
    from auditlens.errors import BundleSignatureError
    from auditlens.evaluation.calibrate import rewrite_bundle

    root, plan = demo
    private, public = generate_keypair(tmp_path / "keys")
    _, other_public = generate_keypair(tmp_path / "other")
    bundle = ReferenceBundle.load(plan["bundle"])
    signed = rewrite_bundle(bundle, tmp_path / "signed", bundle.decision, signing_key=private.read_bytes())
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for key, ok in ((public, True), (other_public, False)):
        args = parser.parse_args(["--bundle", str(signed), "--public-key", str(key)])
        session = Session(args.bundle, tmp_path / "audit.db", public_key=args.public_key)
        if ok:
            assert session.load().signed_by
            # signed and checked: no warning on the picker, unless the bundle is uncalibrated
            assert session.needs_attention() == (bundle.target_far is None)
            session.close()
        else:
            with pytest.raises(BundleSignatureError):
                session.load()


def test_app_signs_its_records_with_the_device_key(demo, tmp_path):
    """--log-key: every record the app logs, held ones included, carries the device key's
    signature, which verify-log checks against the device's public key."""
    pytest.importorskip("cryptography")
    import argparse

    from auditlens.device_app.app.main import add_arguments
    from auditlens.device_app.auditlog import AuditLog
    from auditlens.device_app.signing import fingerprint, generate_keypair

    root, plan = demo
    private, public = generate_keypair(tmp_path / "keys", device=True)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--bundle", plan["bundle"], "--log-key", str(private)])
    session = Session(Path(args.bundle), tmp_path / "audit.db", auditor="Sam", log_key=args.log_key)
    session.load()
    try:
        assert session.log.signer == fingerprint(public.read_bytes())
        photo = (Path(plan["camera_dir"]) / plan["match_photo"]).read_bytes()
        assert session.verify(photo, plan["product"]).record_id == 1
        session.log.close()  # the log fails: the verdict is held, and signed once written
        assert session.verify(photo, plan["product"]).record_id is None and session.held() == 1
        session.log = AuditLog(tmp_path / "audit.db", signing_key=args.log_key)
        assert session.verify(photo, plan["product"]).record_id == 3 and session.held() == 0
        report = session.log.verify_chain(device_keys=[public])
        assert report.signed_by == ({"first_id": 1, "last_id": 3, "key": session.log.signer},)
        # the app's upload carries the device's signature of its head
        from auditlens.device_app.auditchain import verify_export

        upload = verify_export(session.export("json", tmp_path), device_keys=[public])
        assert upload.head == report.head and upload.head_signed_by == session.log.signer

        # a held file someone else put beside the log is set aside, never signed into it
        import base64
        import json

        forged = {"verdict": {**session.log.record(1).verdict, "judged_utc": "2026-01-01T00:00:00Z"},
                  "auditor": "mallory", "photo": base64.b64encode(photo).decode("ascii")}
        held = session.held_dir / f"{1:020d}-forged.json"
        session.held_dir.mkdir(exist_ok=True)
        held.write_text(json.dumps(forged))
        assert session.write_held() == "" and len(session.log) == 3
        assert not held.exists() and held.with_suffix(".refused").exists() and session.set_aside() == 1

        # a genuine held file, copied to wait for another log (or kept to be replayed), is not signed in
        session.log.close()
        session.verify(photo, plan["product"])  # held, signed for this log at this time
        (genuine,) = session.held_dir.glob("*.json")
        other_log = tmp_path / "other" / "audit.db"
        other = Session(Path(args.bundle), other_log, auditor="Sam", log_key=args.log_key)
        other.load()
        try:
            other.held_dir.mkdir(exist_ok=True)
            (other.held_dir / genuine.name).write_bytes(genuine.read_bytes())
            assert other.write_held() == "" and len(other.log) == 0 and other.set_aside() == 1
        finally:
            other.close()
        # and History holds the log to this device's key: a record signed by another key turns it red
        session.log = AuditLog(tmp_path / "audit.db", signing_key=args.log_key)
        assert session.write_held() == "" and session.check_log().records == 4
        stranger, _ = generate_keypair(tmp_path / "stranger", device=True)
        with AuditLog(tmp_path / "audit.db", signing_key=stranger) as foreign:
            foreign.append(session.log.record(4).verdict, photo=photo, auditor="mallory")
        from auditlens.errors import AuditChainError

        with pytest.raises(AuditChainError, match="record 5: it is signed by the key"):
            session.check_log()
    finally:
        session.close()

    # started without its key, the app refuses a log whose records are signed
    unsigned = Session(Path(args.bundle), tmp_path / "audit.db", auditor="Sam")
    from auditlens.errors import AuditLogKeyError

    with pytest.raises(AuditLogKeyError, match="newest record is signed with the key .*--log-key"):
        unsigned.load()
    assert unsigned.log is None


# -- the real app, headless --------------------------------------------------------------
needs_kivy = pytest.mark.skipif(not HAVE_KIVY, reason="Kivy is not installed (pip install auditlens[app])")


def run_plan(tmp_path: Path, plan: dict, size: str = "720x1280", **kw) -> dict:
    """Drive the app headless through ``plan`` (a demo plan with its mode set) from a fresh
    log under ``tmp_path``; the run must report no error."""
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    result = shots.run_app_headless(tmp_path / "plan.json", tmp_path / "audit.db", tmp_path / "run", size, **kw)
    assert not result["errors"], result["errors"]
    return result


@needs_kivy
@pytest.mark.parametrize("size", ["720x1280", "1280x800"])
def test_app_end_to_end(demo, tmp_path, size):
    root, plan = demo
    log_path = tmp_path / "audit.db"
    out = tmp_path / "run"
    result = shots.run_app_headless(root / "plan.json", log_path, out, size, auditor="Test Auditor")
    assert not result["errors"], result["errors"][0] + result["stderr_tail"]

    # every screen was reached, and its screenshot is a real, non-blank picture of the window
    w, h = (int(v) for v in size.split("x"))
    expected = {"1-picker": "picker", "1b-picker-search": "picker", "2-camera": "camera",
                "3-match": "verdict", "4-no-match": "verdict", "5-retake": "verdict",
                "6-history": "history", "7-record": "record"}
    assert {k: v["screen"] for k, v in result["screens"].items()} == expected
    for info in result["screens"].values():
        im = Image.open(info["file"])
        assert im.size == (w, h)
        assert np.asarray(im.convert("L")).std() > 20  # text and pictures, not an empty frame

    verifier = Verifier(plan["bundle"])
    # the framing guide brackets what the encoder looks at: the photo's first view
    gx, gy, side, _ = result["guide"]["rect"]
    ix, iy, iw, ih = result["guide"]["image"]
    assert side == pytest.approx(min(iw, ih) * min(0.84, verifier.bundle.spec.photo_zooms[0]), rel=1e-3)
    assert gx - ix == pytest.approx((iw - side) / 2) and gy - iy == pytest.approx((ih - side) / 2)

    # search narrowed the list to the products that match the query
    products = {p.product_id: p for p in verifier.bundle.products}
    assert 0 < len(result["search"]) < len(products)
    for pid in result["search"]:
        p = products[pid]
        assert "milk" in f"{p.product_id} {p.name} {p.group} {p.code}".lower()

    # the verdicts: the same as the engine gives for the same photos
    match, no_match, retake = result["verdicts"]
    assert (match["decision"], no_match["decision"], retake["decision"]) == ("match", "no_match", "retake")
    assert no_match["suggestions"], "a NO MATCH lists look-alikes"
    assert plan["product"] not in no_match["suggestions"]
    assert any("dark" in r for r in retake["reasons"])
    # after a MATCH the highlighted next step is the next product; after the others, a retake
    assert [v["primary"] for v in (match, no_match, retake)] == ["next", "retake", "retake"]
    from auditlens.device_app.app.session import NO_MATCH_ADVICE

    assert NO_MATCH_ADVICE in no_match["texts"] and NO_MATCH_ADVICE not in match["texts"]
    camera = Path(plan["camera_dir"])
    for v in (match, no_match, retake):
        expect = verifier.verify((camera / v["photo"]).read_bytes(), plan["product"])
        assert v["decision"] == expect.decision
        assert v["score"] == pytest.approx(expect.score, abs=1e-5)

    # the audit log: one record per capture, with the photo, its hash, who, what, when
    with AuditLog(log_path, create=False) as log:
        report = log.verify_chain()
        records = log.records()
        stored = {r.id: log.photo(r.id) for r in records}
    assert report.records == 3 and report.triggers_intact
    for v, r in zip((match, no_match, retake), records):
        photo = (camera / v["photo"]).read_bytes()
        assert r.id == v["record_id"]
        assert (r.product_id, r.decision) == (plan["product"], v["decision"])
        assert r.score == pytest.approx(v["score"]) and r.threshold == pytest.approx(plan["threshold"])
        assert r.captured_sha256 == hashlib.sha256(photo).hexdigest() == r.photo_sha256
        assert stored[r.id] == photo
        assert r.auditor == "Test Auditor" and r.device == "test-device"
        assert r.model_id == verifier.bundle.model_id
        assert r.verdict["decision"] == v["decision"]

    # the CSV the History screen exported
    rows = list(csv.DictReader(open(result["export_csv"], newline="", encoding="utf-8")))
    assert [int(r["id"]) for r in rows] == [1, 2, 3]
    assert [r["decision"] for r in rows] == ["match", "no_match", "retake"]
    assert all(r["product_id"] == plan["product"] for r in rows)
    assert rows[-1]["record_hash"] == report.head_hash
    assert result["history_rows"] == 3 and "intact" in result["chain_label"]
    # History: a judged row shows its score against the threshold; a RETAKE row (not judged)
    # its reason, as its score would read like a pass or a fail
    newest_first = result["history_texts"]
    assert "not judged: too dark" in newest_first[0][1] and "score" not in newest_first[0][1]
    assert f"score {no_match['score']:.3f}/{plan['threshold']:.3f}" in newest_first[1][1]
    # a tap on a row shows that record with its stored photo; Back returns to History
    record = result["record"]
    assert record["screen"] == "record" and record["title"] == "Record #2: NO MATCH"
    assert record["photo_shown"] and any(plan["product"] in t for t in record["texts"])
    assert any("auditor Test Auditor - device test-device" in t for t in record["texts"])
    assert record["after_back"] == "history"


@needs_kivy
def test_app_refuses_a_tampered_bundle(demo, tmp_path):
    root, plan = demo
    bad = tmp_path / "bundle"
    shutil.copytree(plan["bundle"], bad)
    refs = bad / "references.npy"
    data = bytearray(refs.read_bytes())
    data[-3] ^= 0xFF  # one flipped byte in the latents
    refs.write_bytes(bytes(data))
    result = run_plan(tmp_path, dict(plan, bundle=str(bad), expect_refusal=True))
    assert result["screens"]["0-refused"]["screen"] == "refusal"
    assert result["load_error"].startswith("BundleIntegrityError")
    assert "integrity" in result["refusal_title"]
    assert result["back_closes"]  # Back is not swallowed on a refusal: the app can be left
    assert not (tmp_path / "audit.db").exists(), "nothing is logged with a refused bundle"


@needs_kivy
def test_app_started_without_the_device_key_of_a_signed_log_says_so(demo, tmp_path):
    """The refusal names the missing key and says not to start a new log (it used to advise
    freeing storage, which does not help)."""
    pytest.importorskip("cryptography")
    from auditlens.device_app.signing import generate_keypair

    root, plan = demo
    key, _ = generate_keypair(tmp_path / "keys", device=True)
    photo = (Path(plan["camera_dir"]) / plan["match_photo"]).read_bytes()
    with AuditLog(tmp_path / "audit.db", signing_key=key) as log:
        log.append(Verifier(plan["bundle"]).verify(photo, plan["product"]), photo=photo, auditor="Sam")
    result = run_plan(tmp_path, dict(plan, expect_refusal=True))
    assert result["load_error"].startswith("AuditLogKeyError")
    assert result["refusal_title"] == "This device's signing key is missing."
    with AuditLog(tmp_path / "audit.db", create=False) as log:
        assert len(log) == 1  # nothing appended


def test_darkened_photo_is_dark():
    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 200, 200)).save(out, "JPEG")
    dark = Image.open(io.BytesIO(shots.darken(out.getvalue())))
    assert np.asarray(dark).mean() < 40


def test_camera_frames_are_turned_upright():
    """A phone's back camera is mounted turned 90 degrees (landscape frames): held upright,
    the frames must turn 90 degrees clockwise; once the display turns with the phone, less."""
    assert [upright_rotation(90, d) for d in (0, 90, 180, 270)] == [90, 0, 270, 180]
    assert upright_rotation(270, 0) == 270 and upright_rotation(0, 0) == 0
    with pytest.raises(ValueError):
        upright_rotation(45, 0)
    if importlib.util.find_spec("jnius") is None:  # not Android: frames are taken as they come
        assert android_frame_rotation(0) is None
    with pytest.raises(ValueError):
        KivyCamera(rotation=45)

    # a 3x2 frame with a red top-left and a blue bottom-right pixel, as a GL texture holds
    # it (RGBA, bottom row first)
    upright = Image.new("RGB", (3, 2), (0, 128, 0))
    upright.putpixel((0, 0), (255, 0, 0))
    upright.putpixel((2, 1), (0, 0, 255))
    pixels = upright.convert("RGBA").transpose(Image.Transpose.FLIP_TOP_BOTTOM).tobytes()
    corners = {}
    for rotation in (0, 90, 180, 270):
        image = texture_to_image((3, 2), pixels, rotation)
        w, h = image.size
        assert (w, h) == ((3, 2) if rotation in (0, 180) else (2, 3))
        red = next((x, y) for x in range(w) for y in range(h) if image.getpixel((x, y)) == (255, 0, 0))
        blue = next((x, y) for x in range(w) for y in range(h) if image.getpixel((x, y)) == (0, 0, 255))
        corners[rotation] = (red, blue)
    # clockwise: the top-left corner goes to the top-right, then bottom-right, then bottom-left
    assert corners == {0: ((0, 0), (2, 1)), 90: ((1, 0), (0, 2)), 180: ((2, 1), (0, 0)), 270: ((0, 2), (1, 0))}
    with pytest.raises(ValueError):
        texture_to_image((3, 2), pixels, 45)


@needs_kivy
def test_app_without_a_camera_degrades(demo, tmp_path):
    """No --camera-dir and no usable webcam: a 'No camera' panel, capture disabled, no crash."""
    root, plan = demo
    result = run_plan(tmp_path, dict(plan, mode="no_camera"))
    info = result["no_camera"]
    if info["camera"] != "None":
        pytest.skip("a camera is attached to this machine")
    assert info["screen"] == "camera" and info["capture_disabled"] and info["capture_returned"] is False


FAKE_ZXING = """
import os

class _Result:
    def __init__(self, text):
        self.text = text

def read_barcodes(image):
    assert image.ndim == 3 and image.shape[2] == 3
    return [_Result(os.environ["AUDITLENS_FAKE_CODE"])]
"""


@needs_kivy
def test_scanning_a_code_selects_the_product(demo, tmp_path):
    """The scan path end to end, with a stand-in for zxing-cpp that 'reads' a fixed code
    from every frame (the real decoder is optional and not installed here)."""
    root, plan = demo
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "zxingcpp.py").write_text(FAKE_ZXING)
    result = run_plan(tmp_path, dict(plan, mode="scan"),
                      extra_env={"PYTHONPATH": str(fake), "AUDITLENS_FAKE_CODE": plan["product"]})
    assert result["scan_button_enabled"]
    assert result["scan"]["product_id"] == plan["product"]
    assert result["scan"]["screen"] == "camera" and not result["scan"]["scanning"]
    assert result["scan"]["hint"].startswith("Scanned")


def test_an_unreadable_held_file_is_set_aside_and_blocks_nothing(demo, tmp_path):
    root, plan = demo
    photo = (Path(plan["camera_dir"]) / plan["match_photo"]).read_bytes()
    session = Session(Path(plan["bundle"]), tmp_path / "audit.db", auditor="Sam", device="t")
    session.held_dir.mkdir()
    (session.held_dir / "00000000000000000001-cut.json").write_text("{truncated")
    session.load()
    try:
        outcome = session.verify(photo, plan["product"])
        assert outcome.log_error == "" and outcome.record_id == 1 and session.held() == 0
        assert [p.name for p in session.held_dir.iterdir()] == ["00000000000000000001-cut.unreadable"]
        assert session.set_aside() == 1  # counted for History, not among the verdicts that wait
    finally:
        session.close()


def test_a_held_verdict_the_log_refuses_is_set_aside_and_blocks_nothing(demo, tmp_path):
    """A held file that reads but that the log refuses as a record (one bit of its photo
    flipped on the storage: no longer the photo the verdict judged) is kept on disk as
    ``*.refused``; the captures after it are logged as usual."""
    import base64

    root, plan = demo
    photo = (Path(plan["camera_dir"]) / plan["match_photo"]).read_bytes()
    session = Session(Path(plan["bundle"]), tmp_path / "audit.db", auditor="Sam", device="t")
    session.load()
    try:
        log = session.log
        session.log.close()
        assert session.verify(photo, plan["product"]).log_error and session.held() == 1
        (held_file,) = session.held_dir.glob("*.json")
        held = json.loads(held_file.read_text())
        damaged = bytearray(base64.b64decode(held["photo"]))
        damaged[len(damaged) // 2] ^= 0x01
        held["photo"] = base64.b64encode(bytes(damaged)).decode("ascii")
        held_file.write_text(json.dumps(held))

        from auditlens.device_app.auditlog import AuditLog

        session.log = AuditLog(log.path, device="t")
        outcomes = [session.verify(photo, plan["product"]) for _ in range(2)]
        assert [(o.log_error, o.record_id) for o in outcomes] == [("", 1), ("", 2)]
        assert session.held() == 0 and session.check_log().records == 2
        assert [p.name for p in session.held_dir.iterdir()] == [held_file.with_suffix(".refused").name]
        assert session.set_aside() == 1
    finally:
        session.close()


@needs_kivy
def test_history_shows_verdicts_the_log_has_not_taken_yet(demo, tmp_path):
    """A verdict judged while the log refuses writes (disk full) is not in the log yet:
    History says how many wait and why, instead of 'No verifications yet'; once the log
    works again, opening History writes it and the notice goes."""
    root, plan = demo
    result = run_plan(tmp_path, dict(plan, mode="held"))
    held = result["held"]
    assert held["decision"] == "match" and "disk is full" in held["log_error"]
    assert held["screen"] == "history" and held["rows"] == 0
    assert held["label"].startswith("1 verdict not yet in the audit log") and "disk is full" in held["label"]
    # it is listed, marked HELD, and opens like a record: its photo beside the original
    ((chip, top, bottom),) = held["listed"]
    name = next(p["name"] for p in json.loads((Path(plan["bundle"]) / "products.json").read_text())
                if p["product_id"] == plan["product"])
    assert chip == "HELD" and top.startswith(f"{name}  (MATCH - score ") and "not in the audit log yet" in bottom
    view = held["view"]
    assert view["screen"] == "record" and view["title"] == "Held: MATCH"
    assert view["photo_shown"] and view["original_shown"] and view["caption"] == "Photo held on this device"
    assert view["details"][0] == f"{name}  ({plan['product']})" and view["details"][1].startswith("MATCH - score ")
    assert view["details"][2].startswith("Not in the audit log yet")
    assert any(f"kept in {tmp_path / '.audit.db.held'}/" in line for line in view["details"])
    assert held["status_gone"].startswith("Held verdict could not be read: ")  # taken by the log meanwhile
    assert held["status_gone"].endswith("no longer held (the audit log took it: it is in History)")
    assert held["label_after"] == "" and held["rows_after"] == 1 and held["waiting_after"] == 0
    assert held["height"] > 10 and held["height_after"] == 0  # no notice, no empty gap above the list
    # a held verdict the log refused stays on disk, and History says a person must look at it
    assert held["label_set_aside"].startswith("1 held verdict could not be written to the audit log")
    assert "a person must look at it" in held["label_set_aside"]
    (chip, top, bottom), (record_chip, record_top, _) = held["listed_set_aside"]  # above the record
    assert chip == "SET ASIDE" and top.startswith(f"{name}  (MATCH - score ") and "a person must look at it" in bottom
    assert record_chip == "MATCH" and record_top == f"#1  {name}"
    view = held["view_set_aside"]
    assert view["title"] == "Set aside: MATCH" and view["photo_shown"]
    assert "The audit log refused it as a record: a person must look at it." in view["details"]


@needs_kivy
def test_the_back_key_returns_to_the_product_picker(demo, tmp_path):
    """Android's Back key used to do nothing; from the camera it goes back to the picker,
    and on the picker it is consumed (a stray press does not close the app)."""
    root, plan = demo
    back = run_plan(tmp_path, dict(plan, mode="back_key"))["back"]
    assert back["from_camera"] == ["camera", True, "picker"]
    assert back["from_picker"] == ["picker", True, "picker"]
    assert back["other_key"] is False


@needs_kivy
def test_history_does_not_take_over_a_screen_the_auditor_moved_to(demo, tmp_path):
    """History is read on the worker; an auditor who picks a product before it is ready
    stays on the camera screen."""
    root, plan = demo
    result = run_plan(tmp_path, dict(plan, mode="moved_on"))
    assert result["moved_on"]["screen"] == "camera"


@needs_kivy
def test_no_capture_before_the_auditor_is_named_and_the_name_is_kept(demo, tmp_path):
    """Every record names its auditor: with the name box empty, capture asks for it and logs
    nothing; the name typed is kept beside the log for the next start."""
    root, plan = demo
    result = run_plan(tmp_path, dict(plan, mode="no_auditor"))["no_auditor"]
    assert result["capture_returned"] is False
    assert result["hint"] == "Enter your name on the product screen first"
    assert result["capture_after"] is True and result["records"] == 1 and result["auditor"] == "Sam Field"
    assert Session(Path(plan["bundle"]), tmp_path / "audit.db").auditor == "Sam Field"  # next start
    assert Session(Path(plan["bundle"]), tmp_path / "audit.db", auditor="Alex").auditor == "Alex"
    assert Session(Path(plan["bundle"]), tmp_path / "elsewhere" / "audit.db").auditor == ""
    cleared = Session(Path(plan["bundle"]), tmp_path / "audit.db")
    cleared.remember_auditor("")  # the name box emptied: the next start asks again
    assert cleared.auditor == "" and Session(Path(plan["bundle"]), tmp_path / "audit.db").auditor == ""


def test_a_record_whose_verdict_was_damaged_is_still_listed():
    """History lists logs whose chain is broken too: a record whose stored verdict no longer
    parses reads as not judged, with no reasons, instead of crashing the screen."""
    import dataclasses

    from auditlens.device_app.app.session import history_judgement
    from auditlens.device_app.auditchain import AuditRecord

    fields = {f.name: "" for f in dataclasses.fields(AuditRecord)}
    fields.update(id=3, decision="retake", score=0.4, threshold=0.6, verdict_json="{truncated")
    record = AuditRecord(**fields)
    assert record.reasons == [] and record.verdict_value("bundle_id", "?") == "?"
    assert history_judgement(record) == "not judged: the photo could not be judged"
    fields.update(verdict_json='{"reasons": ["too dark: turn on more light"]}')
    assert history_judgement(AuditRecord(**fields)) == "not judged: too dark"
    fields.update(decision="match", score=0.9)
    assert history_judgement(AuditRecord(**fields)) == "score 0.900/0.600"


@needs_kivy
@pytest.mark.parametrize("crop", ["center", "full"])
def test_framing_guide_brackets_what_the_encoder_sees(demo, tmp_path, crop):
    """On a 4:3 photo the guide brackets the centred square for a 'center' bundle and the
    middle of the whole frame for a 'full' one: the box the encoder's first view keeps.
    A file the camera folder cannot decode shows no picture and says so."""
    from auditlens.catalog import open_catalog
    from auditlens.export.enroll import EnrollOptions, enroll

    root, plan = demo
    card = json.loads((root / "model.json").read_text())
    card["preprocess"]["crop"] = crop
    (tmp_path / "model.json").write_text(json.dumps(card))
    shutil.copy(root / "model.tflite", tmp_path / "model.tflite")
    bundle = enroll(open_catalog(shots.SAMPLE / "catalog.csv"), tmp_path / "bundle",
                    model=tmp_path / "model.tflite", options=EnrollOptions(progress=False))
    camera = tmp_path / "camera"
    camera.mkdir()
    photo = Image.open(Path(plan["camera_dir"]) / plan["match_photo"]).convert("RGB")
    photo.resize((640, 480)).save(camera / "1-wide.jpg")
    (camera / "2-broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    result = run_plan(tmp_path, dict(plan, mode="guide", bundle=str(bundle), camera_dir=str(camera),
                                     match_photo="1-wide.jpg"), "1280x800")
    info = result["guide"]
    assert info["crop"] == crop
    gx, gy, gw, gh = info["rect"]
    ix, iy, iw, ih = info["image"]
    assert iw / ih == pytest.approx(640 / 480, rel=1e-2)
    keep = min(0.84, info["zoom"])  # the guide keeps a small margin even for a plain view
    box_w, box_h = (iw, ih) if crop == "full" else (ih, ih)
    assert (gw, gh) == (pytest.approx(box_w * keep, rel=1e-3), pytest.approx(box_h * keep, rel=1e-3))
    assert gx - ix == pytest.approx((iw - gw) / 2) and gy - iy == pytest.approx((ih - gh) / 2)
    assert result["broken"] == {"texture": None, "label": "photo 2/2: 2-broken.jpg (cannot be read)"}


def test_an_auto_rotated_camera_follows_the_phone_turning(monkeypatch):
    """'auto' asks Android again at every frame: a phone turned from portrait (frames need
    90 degrees) to landscape (none) after the camera opened still gives upright frames."""
    from types import SimpleNamespace

    import auditlens.device_app.app.camera as camera_module

    landscape = Image.new("RGB", (4, 2), (0, 128, 0))  # a sensor frame, 4 wide and 2 high
    pixels = landscape.convert("RGBA").transpose(Image.Transpose.FLIP_TOP_BOTTOM).tobytes()
    display = {"degrees": 0}
    monkeypatch.setattr(camera_module, "android_frame_rotation",
                        lambda index=0: upright_rotation(90, display["degrees"]))
    camera = KivyCamera(rotation="auto")
    camera.widget = SimpleNamespace(texture=SimpleNamespace(size=(4, 2), pixels=pixels), play=False)
    assert camera.frame().size == (2, 4) and camera.rotation == 90  # portrait: turned upright
    display["degrees"] = 90  # the auditor turns the phone to landscape
    assert camera.frame().size == (4, 2) and camera.rotation == 0
    display["degrees"] = 0
    camera.start()
    assert camera.rotation == 90 and camera.widget.play
    fixed = KivyCamera(rotation=180)  # a rotation given by hand is never asked again
    fixed.widget = camera.widget
    assert fixed.frame().size == (4, 2) and fixed.rotation == 180


def test_no_camera_advice_fits_the_device():
    from auditlens.device_app.app.camera import no_camera_advice, request_camera_permission

    assert "Settings" in no_camera_advice("android") and "--camera-dir" not in no_camera_advice("android")
    assert "--camera-dir" in no_camera_advice("linux")
    if importlib.util.find_spec("android") is None:  # off Android there is nothing to ask
        asked = []
        assert request_camera_permission(asked.append) is False and asked == []


@needs_kivy
def test_a_verdict_the_second_look_decided_says_so(demo, tmp_path):
    from auditlens.device_app.bundle import ReferenceBundle
    from auditlens.evaluation.calibrate import rewrite_bundle

    root, plan = demo
    b = ReferenceBundle.load(plan["bundle"])
    decision = json.loads(json.dumps(b.decision))
    # a band over both photos' scores (a cosine plus the cell term: about -0.3 and 1.1 here)
    decision["threshold"] = 0.4
    decision["second_look"] = {"photo_shift": 0.15, "band": 1.0, "threshold": 0.4}
    looked = rewrite_bundle(b, tmp_path / "looked", decision)
    match, no_match, retake = run_plan(tmp_path, dict(plan, bundle=str(looked)))["verdicts"]
    verifier = Verifier(looked)
    camera = Path(plan["camera_dir"])
    for shown in (match, no_match):
        expect = verifier.verify((camera / shown["photo"]).read_bytes(), plan["product"])
        assert expect.first_score is not None and shown["decision"] == expect.decision
        assert shown["score"] == pytest.approx(expect.score, abs=1e-5)
        said = f"Close to the line at first (first score {expect.first_score:.3f} near threshold 0.400"
        assert any(t.startswith(said) for t in shown["texts"]), shown["texts"]
    assert retake["decision"] == "retake" and not any("Close to the line" in t for t in retake["texts"])


def test_records_from_before_the_device_key_are_said_in_history(demo, tmp_path):
    """The app holds its log to its key from the first record the key signed; the records
    before it are a note of the check, which History shows (amber) with its warnings."""
    pytest.importorskip("cryptography")
    from auditlens.device_app.signing import generate_keypair

    root, plan = demo
    photo = (Path(plan["camera_dir"]) / plan["match_photo"]).read_bytes()
    before = Session(Path(plan["bundle"]), tmp_path / "audit.db", auditor="Sam")
    before.load()
    try:
        before.verify(photo, plan["product"])
    finally:
        before.close()
    private, _ = generate_keypair(tmp_path / "keys", device=True)
    session = Session(Path(plan["bundle"]), tmp_path / "audit.db", auditor="Sam", log_key=private)
    session.load()
    try:
        assert session.verify(photo, plan["product"]).record_id == 2
        report = session.check_log()
    finally:
        session.close()
    assert report.records == 2 and report.notes and report.notes[0].startswith(
        "record 1 not held to the device keys")
