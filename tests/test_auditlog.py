"""The audit log: append-only, hash-chained, crash-safe, and `auditlens verify-log`."""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auditlens.cli import main as cli_main
from auditlens.device_app.auditchain import (
    GENESIS_HASH,
    canonical_bytes,
    record_hash,
    verify_export,
)
from auditlens.device_app.auditlog import MAX_PHOTO_SIDE, AuditLog
from auditlens.device_app.bundle import ReferenceBundle
from auditlens.device_app.imaging import load_image
from auditlens.device_app.quality import Quality
from auditlens.device_app.verifier import Candidate, Verdict, Verifier
from auditlens.errors import AuditChainError, AuditLogError

REPO = Path(__file__).resolve().parents[1]


def make_verdict(i: int = 0, decision: str = "match") -> Verdict:
    return Verdict(
        decision=decision, product_id=f"product-{i}", threshold=0.62,
        score=(0.7 if decision == "match" else 0.5) + i / 1000,  # agrees with the decision
        estimated_far=0.01, reasons=(f"reason {i}",), model_id="0123456789abcdef",
        photo_sha256="", quality=Quality(120.0, 0.01, 55.0, 30.0, ()),
        suggestions=(Candidate("other", "Other product", 0.7),) if decision == "no_match" else (),
    )


def jpeg(side=(64, 48), colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", side, colour).save(out, "JPEG")
    return out.getvalue()


@pytest.fixture
def log_path(tmp_path):
    return tmp_path / "audit.db"


def test_append_records_and_chain(log_path):
    photos = [jpeg(colour=(i * 40, 10, 10)) for i in range(5)]
    with AuditLog(log_path, device="phone-7") as log:
        ids = [log.append(make_verdict(i, "match" if i % 2 else "no_match"), photo=p,
                          auditor="A. Auditor") for i, p in enumerate(photos)]
        assert ids == [1, 2, 3, 4, 5]
        report = log.verify_chain()
        records = log.records()
        assert log.photo(3) == photos[2]

    assert report.records == 5 and report.triggers_intact
    assert report.head_hash == records[-1].record_hash
    assert records[0].prev_hash == GENESIS_HASH
    for prev, rec in zip(records, records[1:]):
        assert rec.prev_hash == prev.record_hash
    r = records[2]
    assert (r.product_id, r.decision, r.auditor, r.device) == ("product-2", "no_match", "A. Auditor", "phone-7")
    assert r.score == pytest.approx(0.502) and r.threshold == pytest.approx(0.62)
    assert r.model_id == "0123456789abcdef"
    assert r.photo_sha256 == r.captured_sha256 == hashlib.sha256(photos[2]).hexdigest()
    assert r.created_utc.endswith("Z")
    assert r.verdict["suggestions"][0]["product_id"] == "other"
    assert r.record_hash == hashlib.sha256(canonical_bytes(r.hashed_fields())).hexdigest()
    # WAL journal and full sync are what make a committed record survive a crash
    db = sqlite3.connect(log_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


def test_a_long_log_is_read_a_page_at_a_time_and_a_limit_reads_no_more(log_path, monkeypatch):
    """Showing the newest 20 of a year of records must not read the year: every query is
    bounded by the page size or the limit, in either order, and a record appended while
    the log is being read waits for the next reading."""
    monkeypatch.setattr(AuditLog, "PAGE_ROWS", 3)
    with AuditLog(log_path) as log:
        for i in range(10):
            log.append(make_verdict(i), photo=jpeg(colour=(i * 20, 10, 10)), auditor="A")
        fetched = []
        log._db.set_trace_callback(fetched.append)
        assert [r.id for r in log.records()] == list(range(1, 11))
        assert [r.id for r in log.records(newest_first=True)] == list(range(10, 0, -1))
        assert [r.id for r in log.records(newest_first=True, limit=2)] == [10, 9]
        assert [r.id for r in log.records(limit=7)] == list(range(1, 8))
        assert log.records(limit=0) == []
        pages = [q for q in fetched if q.startswith("SELECT id, created_utc")]
        assert pages and all(q.rstrip().endswith(("LIMIT 3", "LIMIT 2", "LIMIT 1")) for q in pages)
        assert len(pages) == 4 + 4 + 1 + 3  # 10 rows in pages of 3 (the last short), both ways
        log._db.set_trace_callback(None)

        reading = log.iter_records()
        assert next(reading).id == 1
        log.append(make_verdict(10), photo=jpeg(), auditor="A")  # not blocked by the reader
        assert [r.id for r in reading] == list(range(2, 11))  # as the log was when reading began
        with pytest.raises(ValueError, match="0 or more"):
            log.records(limit=-1)


def test_a_closed_log_says_so_whatever_is_asked_of_it(log_path, tmp_path):
    log = AuditLog(log_path)
    log.append(make_verdict(), photo=jpeg(), auditor="A")
    log.close()
    for ask in (len, lambda g: g.records(), lambda g: g.record(1), lambda g: g.photo(1),
                lambda g: g.log_id, lambda g: g.verify_chain(),
                lambda g: g.export_csv(tmp_path / "out.csv"),
                lambda g: g.holds(make_verdict(), jpeg())):
        with pytest.raises(AuditLogError, match="the audit log is closed"):
            ask(log)
    assert not (tmp_path / "out.csv").exists()


def test_synchronous_full(log_path):
    with AuditLog(log_path) as log:
        assert log._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_huge_photo_is_downscaled_but_its_hash_kept(log_path):
    big = io.BytesIO()
    Image.new("RGB", (4000, 3000), (10, 120, 200)).save(big, "PNG")
    big = big.getvalue()
    with AuditLog(log_path) as log:
        rid = log.append(make_verdict(), photo=big, auditor="x")
        stored = log.photo(rid)
        record = log.record(rid)
        log.verify_chain()
    im = Image.open(io.BytesIO(stored))
    assert im.format == "JPEG" and max(im.size) <= MAX_PHOTO_SIDE
    assert record.captured_sha256 == hashlib.sha256(big).hexdigest()
    assert record.photo_sha256 == hashlib.sha256(stored).hexdigest()


def test_update_and_delete_are_refused(log_path):
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i), photo=jpeg(), auditor="a")
    db = sqlite3.connect(log_path)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE records SET decision = 'match' WHERE id = 2")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM records WHERE id = 3")
    with pytest.raises(sqlite3.IntegrityError, match="header"):
        db.execute("UPDATE meta SET value = 'x' WHERE key = 'log_id'")
    # an insert that does not extend the chain (forged prev_hash, or a gap) is refused too
    row = db.execute("SELECT * FROM records WHERE id = 3").fetchone()
    cols = [c[1] for c in db.execute("PRAGMA table_info(records)")]
    forged = dict(zip(cols, row), id=4, prev_hash=GENESIS_HASH, record_hash="f" * 64)
    with pytest.raises(sqlite3.IntegrityError, match="extends its hash chain"):
        db.execute(f"INSERT INTO records ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                   [forged[c] for c in cols])
    db.close()
    with AuditLog(log_path) as log:
        assert log.verify_chain().records == 3


def _edit_by_hand(path: Path, sql: str) -> None:
    """What a tamperer does: open the file with the sqlite3 tool, drop the guards, edit."""
    script = ("DROP TRIGGER IF EXISTS records_append_only_update;"
              "DROP TRIGGER IF EXISTS records_append_only_delete;"
              "DROP TRIGGER IF EXISTS records_extend_chain;" + sql)
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", str(path), script], check=True)
    else:
        db = sqlite3.connect(path)
        db.executescript(script)
        db.close()


@pytest.mark.parametrize("sql, bad_id", [
    ("UPDATE records SET decision = 'match', score = 0.99 WHERE id = 3;", 3),
    ("UPDATE records SET auditor = 'someone else' WHERE id = 5;", 5),
    ("DELETE FROM records WHERE id = 2;", 3),
    ("UPDATE records SET photo = X'FFD8FFD9' WHERE id = 4;", 4),
    ("UPDATE records SET verdict_json = replace(verdict_json, 'reason', 'REASON') WHERE id = 1;", 1),
])
def test_hand_edit_breaks_the_chain_and_verify_log_names_the_record(log_path, sql, bad_id, capsys):
    with AuditLog(log_path) as log:
        for i in range(6):
            log.append(make_verdict(i, "no_match"), photo=jpeg(colour=(i * 30, 0, 0)), auditor="a")
    assert cli_main(["verify-log", str(log_path)]) == 0
    assert "OK, 6 records" in capsys.readouterr().out

    _edit_by_hand(log_path, sql)

    with AuditLog(log_path) as log, pytest.raises(AuditChainError, match=f"record {bad_id}:") as exc:
        log.verify_chain()
    assert exc.value.record_id == bad_id
    assert cli_main(["verify-log", str(log_path)]) == 4  # a broken chain, not an unreadable log
    err = capsys.readouterr().err
    assert f"record {bad_id}:" in err


def test_verify_log_cli_subprocess_names_the_edited_record(log_path, tmp_path):
    """The same through the installed console command, as an auditor's supervisor runs it."""
    with AuditLog(log_path) as log:
        for i in range(4):
            log.append(make_verdict(i), photo=jpeg(), auditor="a")
    _edit_by_hand(log_path, "UPDATE records SET product_id = 'product-x' WHERE id = 2;")
    proc = subprocess.run([sys.executable, "-m", "auditlens.cli", "verify-log", str(log_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 4
    assert "record 2:" in proc.stderr and "edited" in proc.stderr
    # a script tells tampering (4) from a log it could not read (2), and --json says which record
    as_json = subprocess.run([sys.executable, "-m", "auditlens.cli", "verify-log", str(log_path), "--json"],
                             capture_output=True, text=True)
    failure = json.loads(as_json.stdout)
    assert as_json.returncode == 4 and failure["ok"] is False and failure["record_id"] == 2
    missing = subprocess.run([sys.executable, "-m", "auditlens.cli", "verify-log", str(log_path) + ".gone",
                              "--json"], capture_output=True, text=True)
    missing_json = json.loads(missing.stdout)
    assert missing.returncode == 2 and missing_json["ok"] is False and missing_json["record_id"] is None
    assert "no audit log here" in missing_json["error"] and set(missing_json) == {"ok", "error", "record_id"}
    # an export that cannot be written (not an audit-log error): still one JSON object
    (tmp_path / "taken").write_text("a file, not a folder")
    with AuditLog(tmp_path / "intact.db"):
        pass
    blocked = subprocess.run([sys.executable, "-m", "auditlens.cli", "verify-log", str(tmp_path / "intact.db"), "--json",
                              "--export-csv", str(tmp_path / "taken" / "x.csv")], capture_output=True, text=True)
    blocked_json = json.loads(blocked.stdout)
    assert blocked.returncode == 2 and blocked_json["ok"] is False and set(blocked_json) == {"ok", "error", "record_id"}
    assert "auditlens: error:" in missing.stderr


def test_truncating_the_newest_records_changes_the_head_hash(log_path):
    """The chain cannot see its newest records cut off; the reported head hash can."""
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i), photo=jpeg(), auditor="a")
        head = log.verify_chain().head_hash
    _edit_by_hand(log_path, "DELETE FROM records WHERE id = 3;")
    with AuditLog(log_path) as log:
        report = log.verify_chain()
    assert report.records == 2 and report.head_hash != head
    assert not report.triggers_intact and report.warnings


def _rewrite_and_rehash(path: Path, record_id: int, *, careful: bool = True, **changes) -> None:
    """What a careful tamperer does: edit a record (its verdict too), then recompute its
    hash and the hash of every record after it, so that the chain alone verifies again."""
    _edit_by_hand(path, "")
    db = sqlite3.connect(path)
    cols = [c[1] for c in db.execute("PRAGMA table_info(records)")]
    rows = [dict(zip(cols, r)) for r in db.execute("SELECT * FROM records ORDER BY id")]
    prev = GENESIS_HASH if record_id == 1 else rows[record_id - 2]["record_hash"]
    for row in rows[record_id - 1:]:
        if row["id"] == record_id:
            row.update(changes)
        if row["id"] == record_id and careful:
            verdict = json.loads(row["verdict_json"])  # and the verdict says the same
            verdict.update({k: v for k, v in changes.items() if k in verdict})
            row["verdict_json"] = json.dumps(verdict, sort_keys=True, separators=(",", ":"))
        row["prev_hash"] = prev
        row["record_hash"] = prev = record_hash(row)
        db.execute(f"UPDATE records SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?",
                   [row[c] for c in cols] + [row["id"]])
    db.commit()
    db.close()


def test_a_kept_head_catches_a_rewrite_that_recomputed_every_hash(log_path, capsys):
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i, "no_match"), photo=jpeg(colour=(i * 50, 0, 0)), auditor="a")
        uploaded = log.verify_chain().head  # kept off the device when the log was uploaded
        log.append(make_verdict(3, "no_match"), photo=jpeg(), auditor="a")
    assert uploaded.startswith("3:")
    _rewrite_and_rehash(log_path, 2, decision="match", score=0.99)
    with AuditLog(log_path, create=False) as log:
        assert log.verify_chain().records == 4  # the chain alone cannot tell
        assert log.record(2).decision == "match"
        with pytest.raises(AuditChainError, match="record 3: its hash is not the one kept") as exc:
            log.verify_chain(anchors=[(3, uploaded.split(":")[1])])
    assert exc.value.record_id == 3
    assert cli_main(["verify-log", str(log_path), "--expect-head", uploaded]) == 4
    assert "rewritten and re-hashed" in capsys.readouterr().err


def _forge(path: Path, record_id: int, **changes) -> None:
    """A careless tamperer: change one record's columns but not its verdict, then re-hash."""
    _rewrite_and_rehash(path, record_id, careful=False, **changes)


@pytest.mark.parametrize(("changes", "message"), [
    ({"decision": "match", "score": 0.99}, "its decision ('match') is not its verdict's ('no_match')"),
    ({"product_id": "another-product"}, "its product_id ('another-product') is not its verdict's"),
    ({"threshold": 0.1}, "its threshold (0.1) is not its verdict's (0.62)"),
    ({"verdict_json": json.dumps({**make_verdict(1, "no_match").to_dict(), "decision": "match"},
                                 sort_keys=True)}, "its decision ('no_match') is not its verdict's"),
    ({"decision": "match"}, "its decision ('match') is not its verdict's"),
    ({"verdict_json": "[1, 2]"}, "its verdict is not a JSON object"),
])
def test_a_re_hashed_record_that_contradicts_itself_is_reported(log_path, changes, message, capsys):
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i, "no_match"), photo=jpeg(colour=(i * 50, 0, 0)), auditor="a")
    _forge(log_path, 2, **changes)
    with AuditLog(log_path, create=False) as log, pytest.raises(AuditChainError) as exc:
        log.verify_chain()
    assert exc.value.record_id == 2 and message in str(exc.value)
    assert "made or edited outside auditlens" in str(exc.value)
    assert cli_main(["verify-log", str(log_path)]) == 4
    assert "record 2:" in capsys.readouterr().err


def test_a_verdict_whose_score_refutes_its_decision_is_reported(log_path):
    with AuditLog(log_path) as log:
        log.append(make_verdict(0, "no_match"), photo=jpeg(), auditor="a")
    verdict = {**make_verdict(0, "no_match").to_dict(), "score": 0.9}  # at/above 0.62, no match
    _forge(log_path, 1, score=0.9, verdict_json=json.dumps(verdict, sort_keys=True))
    with AuditLog(log_path, create=False) as log, pytest.raises(
            AuditChainError, match="record 1: it holds a 'no_match' verdict whose score 0.9 is at "
                                   "or above its threshold 0.62"):
        log.verify_chain()


def test_times_that_go_backwards_are_a_warning_not_an_error(log_path, capsys):
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i), photo=jpeg(colour=(200, 30, 10 * i)), auditor="a")
        assert log.verify_chain().warnings == ()
    _forge(log_path, 3, created_utc="2020-01-01T00:00:00.000Z")  # e.g. a clock set back
    with AuditLog(log_path) as log:
        report = log.verify_chain()
    assert report.records == 3
    assert any("times go backwards 1 time(s), first: record 3 (2020-01-01T00:00:00.000Z) was "
               "written before record 2" in w for w in report.warnings)
    assert cli_main(["verify-log", str(log_path)]) == 0
    assert "warning: the records' times go backwards" in capsys.readouterr().out
    # a script that must not pass such a log unread asks for --strict: exit 5
    assert cli_main(["verify-log", str(log_path), "--strict"]) == 5
    assert "warning: the records' times go backwards" in capsys.readouterr().out
    upload = log_path.with_name("upload.json")
    with AuditLog(log_path) as log:
        log.export_json(upload)
    assert cli_main(["verify-log", str(upload), "--strict"]) == 5  # the export's warnings too
    assert capsys.readouterr().out.count("times go backwards") == 1
    clean = log_path.with_name("clean.db")
    with AuditLog(clean) as log:
        log.append(make_verdict(0), photo=jpeg(), auditor="a")
    assert cli_main(["verify-log", str(clean), "--strict"]) == 0


def test_verify_log_says_which_model_bundle_and_threshold_judged_which_records(log_path, capsys):
    def verdict(model_id, bundle_id, threshold=0.62):
        return {**make_verdict().to_dict(), "model_id": model_id, "bundle_id": bundle_id,
                "threshold": threshold}

    with AuditLog(log_path) as log:
        for v in (verdict("m1", "b1"), verdict("m1", "b1"), verdict("m1", "b2"),  # re-enrolled
                  verdict("m1", "b2", 0.65), verdict("m2", "b3"), verdict("m2", "b3")):
            log.append(v, photo=jpeg(), auditor="a")
        log.append(make_verdict(), photo=jpeg(), auditor="a")  # a verdict naming no bundle
        runs = log.verify_chain().judged_with
    assert [(r["first_id"], r["last_id"], r["model_id"], r["bundle_id"], r["threshold"]) for r in runs] == [
        (1, 2, "m1", "b1", 0.62), (3, 3, "m1", "b2", 0.62), (4, 4, "m1", "b2", 0.65),
        (5, 6, "m2", "b3", 0.62), (7, 7, "0123456789abcdef", "", 0.62)]
    assert cli_main(["verify-log", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert "records 1-2 judged with model m1, bundle b1, threshold 0.6200" in out
    assert "record 4 judged with model m1, bundle b2, threshold 0.6500" in out
    assert "record 7 judged with model 0123456789abcdef, bundle (not named)" in out
    assert cli_main(["verify-log", str(log_path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["judged_with"]) == 5


def test_a_kept_head_catches_removed_newest_records(log_path, capsys):
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i), photo=jpeg(), auditor="a")
        head = log.verify_chain().head
    assert cli_main(["verify-log", str(log_path), "--expect-head", head]) == 0
    assert "record 3 still carries the hash kept for it" in capsys.readouterr().out
    _edit_by_hand(log_path, "DELETE FROM records WHERE id = 3;")
    assert cli_main(["verify-log", str(log_path), "--expect-head", head]) == 4
    assert "record 3, whose hash was kept, is gone" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # not ID:HASH
        cli_main(["verify-log", str(log_path), "--expect-head", "3"])
    assert "expected ID:HASH" in capsys.readouterr().err
    empty = log_path.with_name("empty.db")
    with AuditLog(empty) as log:
        first_head = log.verify_chain().head  # an empty log's head is kept as well
    assert first_head == f"0:{GENESIS_HASH}"
    assert cli_main(["verify-log", str(empty), "--expect-head", first_head]) == 0

    # an id beyond SQLite's integers names no record: said so, no internal error
    huge = 2**70
    with pytest.raises(SystemExit):
        cli_main(["verify-log", str(log_path), "--expect-head", f"{huge}:{'a' * 64}"])
    assert f"record id {huge} is larger than any log's" in capsys.readouterr().err
    with AuditLog(log_path) as log:
        for lookup in (log.record, log.photo):
            with pytest.raises(AuditLogError, match=f"no record {huge}"):
                lookup(huge)
        with pytest.raises(AuditChainError, match=f"record {huge}, whose hash was kept, is gone"):
            log.verify_chain(anchors=[(huge, "a" * 64)])
        with pytest.raises(AuditChainError, match=f"record {huge}: it is gone"):
            log.verify_chain(since=(huge, "a" * 64))


def test_a_check_since_an_earlier_head_reads_only_the_new_records(log_path):
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i, "no_match"), photo=jpeg(colour=(i * 50, 0, 0)), auditor="a")
        full = log.verify_chain()
        for i in range(3, 5):
            log.append(make_verdict(i, "no_match"), photo=jpeg(colour=(i * 50, 0, 0)), auditor="a")
        since = log.verify_chain(since=(full.records, full.head_hash))
        assert since == log.verify_chain()  # the same report as a full check
        assert since.records == 5 and since.first_created_utc == full.first_created_utc
    # a record after the earlier head edited by hand: caught
    _edit_by_hand(log_path, "UPDATE records SET auditor = 'x' WHERE id = 4;")
    with AuditLog(log_path, create=False) as log, pytest.raises(AuditChainError, match="record 4:"):
        log.verify_chain(since=(full.records, full.head_hash))
    # the earlier head itself changed: caught without reading the records before it
    _rewrite_and_rehash(log_path, 3, auditor="y")
    with AuditLog(log_path, create=False) as log:
        with pytest.raises(AuditChainError, match="record 3: it is gone or no longer carries"):
            log.verify_chain(since=(full.records, full.head_hash))
        for since in ((2, log.record(2).record_hash), (4, log.record(4).record_hash)):
            # a kept hash is checked whether its record is read again (2) or not (4)
            with pytest.raises(AuditChainError, match="record 3: its hash is not the one kept"):
                log.verify_chain(since=since, anchors=[(3, full.head_hash)])


def test_a_check_since_an_earlier_head_catches_the_first_record_removed(log_path):
    # the app checks since the head it last saw: a removed record 1 is tampering, not a crash
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i, "no_match"), photo=jpeg(colour=(i * 50, 0, 0)), auditor="a")
        earlier = log.verify_chain()
    _edit_by_hand(log_path, "DELETE FROM records WHERE id = 1;")
    with AuditLog(log_path, create=False) as log:
        with pytest.raises(AuditChainError, match="record 1 removed") as caught:
            log.verify_chain(since=(earlier.records, earlier.head_hash))
    assert caught.value.record_id == 1


def test_photo_type_edited_by_hand_breaks_the_chain(log_path, tmp_path):
    # the photo's type is not hashed; it must still agree with the stored bytes
    with AuditLog(log_path) as log:
        log.append(make_verdict(0), photo=jpeg(), auditor="a")
    _edit_by_hand(log_path, "UPDATE records SET photo_mime = 'image/png' WHERE id = 1;")
    with AuditLog(log_path, create=False) as log:
        with pytest.raises(AuditChainError, match="record 1: the photo is stored as image/png"):
            log.verify_chain()
        with pytest.raises(AuditChainError):  # the CSV export checks the chain as the others do
            log.export_csv(tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()
    # any other text in the unhashed column is refused too, a JSON export without photos included
    with AuditLog(log_path, create=False) as log:
        pass
    _edit_by_hand(log_path, "UPDATE records SET photo_mime = 'OVERRIDE: accepted as match by manager' "
                            "WHERE id = 1;")
    with AuditLog(log_path, create=False) as log:
        with pytest.raises(AuditChainError, match="record 1: its photo type 'OVERRIDE: accepted"):
            log.verify_chain()


def test_append_refuses_a_verdict_that_contradicts_itself(log_path):
    with AuditLog(log_path) as log:
        for decision, score in (("match", 0.3), ("no_match", 0.62), ("no_match", 0.9)):
            bad = dataclasses.replace(make_verdict(0, decision), score=score)
            with pytest.raises(AuditLogError, match="would contradict itself"):
                log.append(bad, photo=jpeg(), auditor="a")
        # a retake may carry any score (the photo was not judged on it)
        log.append(dataclasses.replace(make_verdict(0, "retake"), score=0.9), photo=jpeg(), auditor="a")
        assert len(log) == 1


def test_append_refuses_a_photo_other_than_the_judged_one(log_path, sample_bundle):
    verifier = Verifier(sample_bundle)
    photo = (REPO / "models" / "sample" / "photos" / "Banana_001.jpg").read_bytes()
    verdict = verifier.verify(photo, "Banana")
    with AuditLog(log_path) as log:
        with pytest.raises(AuditLogError, match="not the photo the verdict judged"):
            log.append(verdict, photo=jpeg(), auditor="a")
        assert len(log) == 0
        assert log.append(verdict, photo=photo, auditor="a") == 1
        # judged from pixels (a camera frame): a lossless encoding of them is the judged photo
        pixels = np.asarray(load_image(photo))
        from_pixels = verifier.verify(pixels, "Banana")
        png = io.BytesIO()
        Image.fromarray(pixels).save(png, "PNG")
        assert log.append(from_pixels, photo=png.getvalue(), auditor="a") == 2
        assert log.append(from_pixels, photo=photo, auditor="a") == 3  # decodes to them too
        with pytest.raises(AuditLogError, match="not the photo the verdict judged") as refused:
            log.append(from_pixels, photo=jpeg(), auditor="a")
        assert "a PNG of the pixels as judged: auditlens.device_app.imaging.load_image(image)" in str(refused.value)
        # a PIL image opened from an EXIF-rotated JPEG is judged upright: the log takes its
        # pixels as load_image gives them, not as the file stores them
        rotated = io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90 degrees to view
        Image.fromarray(pixels).save(rotated, "JPEG", exif=exif)
        opened = Image.open(io.BytesIO(rotated.getvalue()))
        judged = verifier.verify(opened, "Banana")
        as_stored, as_judged = io.BytesIO(), io.BytesIO()
        Image.open(io.BytesIO(rotated.getvalue())).convert("RGB").save(as_stored, "PNG")
        load_image(opened).save(as_judged, "PNG")
        with pytest.raises(AuditLogError, match="not the photo the verdict judged"):
            log.append(judged, photo=as_stored.getvalue(), auditor="a")
        assert log.append(judged, photo=as_judged.getvalue(), auditor="a") == 4


def test_names_a_spreadsheet_would_run_are_exported_to_csv_as_text(log_path, tmp_path):
    """An auditor or device named like a formula (CSV injection): the CSV exports write it
    with a leading apostrophe, which a spreadsheet shows instead of running; the JSON
    export and the chain keep the name as typed; a name with a hyphen inside is unchanged."""
    names = ['=HYPERLINK("http://example.invalid","click")', "@SUM(1+1)", "+1-2", "-x", "\tcmd", "Ann-Marie"]
    with AuditLog(log_path, device="=cmd|' /C calc'!A0") as log:
        for i, name in enumerate(names):
            log.append(make_verdict(i, "match"), photo=jpeg(colour=(200, 30 + i, 30)), auditor=name)
        log.export_csv(tmp_path / "out.csv")
        log.export_json(tmp_path / "out.json")
        log.export_photos(tmp_path / "photos")
    rows = list(csv.DictReader(open(tmp_path / "out.csv", newline="", encoding="utf-8")))
    assert [r["auditor"] for r in rows] == ["'" + n for n in names[:-1]] + ["Ann-Marie"]
    assert {r["device"] for r in rows} == {"'=cmd|' /C calc'!A0"}
    assert [r["score"] for r in rows] == [f"{0.7 + i / 1000:.6f}" for i in range(len(names))]  # numbers untouched
    photos = list(csv.DictReader(open(tmp_path / "photos" / "photos.csv", newline="", encoding="utf-8")))
    assert [r["auditor"] for r in photos] == [r["auditor"] for r in rows]
    data = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert [r["auditor"] for r in data["records"]] == names


def test_exports(log_path, tmp_path, capsys):
    with AuditLog(log_path) as log:
        log.append(make_verdict(1, "match"), photo=jpeg(), auditor="Åsa Öberg")
        log.append(make_verdict(2, "no_match"), photo=jpeg(), auditor="Bob, Jr.")
        log.append(make_verdict(3, "retake"), photo=jpeg(), auditor="c")
        log.export_csv(tmp_path / "out.csv")
        log.export_json(tmp_path / "out.json", photos=True)
        head = log.verify_chain().head_hash
    rows = list(csv.DictReader(open(tmp_path / "out.csv", newline="", encoding="utf-8")))
    assert [r["decision"] for r in rows] == ["match", "no_match", "retake"]
    assert [r["auditor"] for r in rows] == ["Åsa Öberg", "Bob, Jr.", "c"]
    assert rows[1]["reasons"] == "reason 2" and rows[2]["record_hash"] == head
    data = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert data["log"]["head_hash"] == head and data["log"]["records"] == 3
    assert data["records"][1]["verdict"]["decision"] == "no_match"
    assert data["records"][0]["photo_base64"]
    # an exported record's hash can be re-checked by whoever receives the export
    r0 = data["records"][0]
    fields = {k: r0[k] for k in ("id", "created_utc", "auditor", "device", "product_id", "decision",
                                 "score", "threshold", "model_id", "photo_sha256",
                                 "captured_sha256", "prev_hash")}
    fields["verdict_json"] = json.dumps(r0["verdict"], sort_keys=True, separators=(",", ":"),
                                        ensure_ascii=False)
    assert record_hash(fields) == r0["record_hash"]

    assert cli_main(["verify-log", str(log_path), "--export-csv", str(tmp_path / "c.csv"),
                     "--export-json", str(tmp_path / "j.json")]) == 0
    assert (tmp_path / "c.csv").read_text(encoding="utf-8") == (tmp_path / "out.csv").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "j.json").read_text())["log"]["records"] == 3


def _exported(log_path: Path, tmp_path: Path, photos: bool = True) -> tuple[Path, dict, str]:
    with AuditLog(log_path) as log:
        for i, decision in enumerate(("match", "no_match", "match")):
            log.append(make_verdict(i, decision), photo=jpeg(colour=(i * 60, 90, 0)), auditor="a")
        path = log.export_json(tmp_path / f"upload{int(photos)}.json", photos=photos)
        head = log.verify_chain().head
    return path, json.loads(path.read_text(encoding="utf-8")), head


def _verify_edited(tmp_path: Path, data: dict, *args: str) -> int:
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(data), encoding="utf-8")
    return cli_main(["verify-log", str(edited), *args])


def test_verify_log_checks_a_json_export_without_the_database(log_path, tmp_path, capsys):
    path, data, head = _exported(log_path, tmp_path)
    log_path.unlink()  # the auditor has the upload only
    assert cli_main(["verify-log", str(path), "--expect-head", head]) == 0
    out = capsys.readouterr().out
    assert f"{path}: OK, 3 records, hash chain intact" in out and f"head       {head}" in out
    assert "records 1-3 judged with model 0123456789abcdef" in out and "warning" not in out
    older = {**data, "records": [{k: v for k, v in r.items() if k != "verdict_json"}
                                 for r in data["records"]]}  # an export made before verdict_json
    assert _verify_edited(tmp_path, older) == 0
    capsys.readouterr()

    def edited(n: int, **changes) -> dict:
        records = [dict(r) for r in data["records"]]
        records[n].update(changes)
        return {**data, "records": records}

    swapped = base64.b64encode(jpeg(colour=(1, 2, 3))).decode()
    for bad, why in ((edited(1, score=0.99), "record 2: its contents do not match its hash"),
                     (edited(2, photo_base64=swapped), "record 3: the stored photo does not match"),
                     ({**data, "records": data["records"][:2]}, "the export's header names the head 3:"),
                     ({**data, "records": data["records"][1:]}, "record 2: the chain is broken before it"),
                     (edited(0, verdict_json="{}"), "record 1: its contents do not match its hash"),
                     (edited(1, photo_mime="OVERRIDE"), "record 2: its photo type 'OVERRIDE' is none")):
        assert _verify_edited(tmp_path, bad) == 4, why
        assert why in capsys.readouterr().err
    forged_score = edited(0, score="1e-05", threshold="0.5", decision="match")
    forged_score["records"][0]["verdict"] = {**data["records"][0]["verdict"], "score": "1e-05",
                                              "threshold": "0.5", "decision": "match"}
    for bad, why in ((edited(0, id="1"), "record 1: its id is str '1', not int"),
                     (forged_score, "record 1: its score is str '1e-05', not float"),
                     (edited(1, verdict={**data["records"][1]["verdict"], "product_id": "EVIL"}),
                      "record 2: its verdict is not the verdict its hash covers"),
                     (edited(0, photo_base64=None) | {"records": [
                         {k: v for k, v in data["records"][0].items() if k != "photo_base64"},
                         *data["records"][1:]]},
                      "record 1 of the export is incomplete or unreadable (its photo is missing "
                      "from an export made with its photos)")):
        assert _verify_edited(tmp_path, bad) == 4, why
        assert why in capsys.readouterr().err
    assert _verify_edited(tmp_path, data, "--expect-head", "2:" + "a" * 64) == 4
    assert "record 2: its hash is not the one kept for it" in capsys.readouterr().err

    no_photos, _, _ = _exported(tmp_path / "other.db", tmp_path, photos=False)
    assert cli_main(["verify-log", str(no_photos)]) == 0
    out = capsys.readouterr().out
    assert "photos     not in this export (made without --photos)" in out and "warning" not in out
    assert verify_export(no_photos).photos_checked is False
    assert cli_main(["verify-log", str(path), "--export-csv", str(tmp_path / "x.csv")]) == 2
    assert "is a JSON export: exports are made from the log itself" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text('{"format": "auditlens-audit-log", "records": [', encoding="utf-8")
    assert cli_main(["verify-log", str(tmp_path / "broken.json")]) == 2
    assert "not an audit log export (not valid JSON" in capsys.readouterr().err


def test_photos_without_a_json_export_is_refused(log_path, tmp_path, capsys):
    with AuditLog(log_path) as log:
        log.append(make_verdict(0, "match"), photo=jpeg(colour=(10, 200, 0)), auditor="a")
    assert cli_main(["verify-log", str(log_path), "--photos"]) == 2
    assert "--photos adds the photos to --export-json" in capsys.readouterr().err
    assert cli_main(["verify-log", str(log_path), "--photos", "--export-json", str(tmp_path / "j.json")]) == 0
    assert json.loads((tmp_path / "j.json").read_text())["records"][0]["photo_base64"]


def test_export_photos_gives_labelled_photos_the_other_commands_read(tmp_path, capsys):
    """Field photos from the log, as files with photo,product_id rows: `calibrate` and
    `enroll --references` take the export as it is."""
    from auditlens.catalog import read_labelled_photos

    sample = REPO / "models" / "sample"
    rows = list(csv.DictReader(open(sample / "photos.csv", newline="")))[:4]
    log_path = tmp_path / "audit.db"
    for row in rows:
        assert cli_main(["verify", "--product", row["product_id"], str(sample / row["photo"]),
                         "--log", str(log_path), "--auditor", "field"]) in (0, 1, 3)
    out = tmp_path / "export"
    assert cli_main(["verify-log", str(log_path), "--export-photos", str(out)]) == 0
    assert f"exported photos and photos.csv to {out}" in capsys.readouterr().out
    exported = read_labelled_photos(out / "photos.csv")
    assert [p.product_id for p in exported] == [r["product_id"] for r in rows]
    for photo, row in zip(exported, rows):  # small JPEGs are kept byte for byte
        assert Path(photo.photo).read_bytes() == (sample / row["photo"]).read_bytes()
    table = list(csv.DictReader(open(out / "photos.csv", newline="", encoding="utf-8")))
    assert {r["decision"] for r in table} <= {"match", "no_match", "retake"} and table[0]["auditor"] == "field"
    assert cli_main(["calibrate", "--bundle", str(REPO / "models" / "sample_bundle"), "--photos",
                     str(out / "photos.csv"), "--target-far", "0.05", "--dry-run", "--no-progress"]) == 0
    assert cli_main(["enroll", str(sample / "catalog.csv"), "--references", str(out / "photos.csv"),
                     "--out", str(tmp_path / "b"), "--no-progress"]) == 0

    capsys.readouterr()

    # a photo logged as NO MATCH under the product claimed for it: the unreviewed export
    # still names that product, and both readers say so before it becomes a reference
    other = next(r for r in csv.DictReader(open(sample / "photos.csv", newline=""))
                 if r["product_id"] != rows[0]["product_id"])
    assert cli_main(["verify", "--product", other["product_id"], str(sample / rows[0]["photo"]),
                     "--log", str(log_path), "--auditor", "field"]) == 1
    assert cli_main(["verify-log", str(log_path), "--export-photos", str(tmp_path / "unchecked")]) == 0
    assert [p.decision for p in read_labelled_photos(tmp_path / "unchecked" / "photos.csv")][-1] == "no_match"
    capsys.readouterr()
    assert cli_main(["enroll", str(sample / "catalog.csv"), "--references",
                     str(tmp_path / "unchecked" / "photos.csv"), "--out", str(tmp_path / "b2"), "--no-progress"]) == 0
    assert "1 rows are audit-log verdicts other than MATCH (1 NO MATCH)" in capsys.readouterr().err
    assert cli_main(["calibrate", "--bundle", str(REPO / "models" / "sample_bundle"), "--photos",
                     str(tmp_path / "unchecked" / "photos.csv"), "--target-far", "0.05", "--dry-run",
                     "--no-progress"]) == 0
    assert "verdicts other than MATCH (1 NO MATCH)" in capsys.readouterr().err

    # exports that would land on each other: refused before any of them is written
    same = tmp_path / "same.out"
    assert cli_main(["verify-log", str(log_path), "--export-csv", str(same), "--export-json", str(same)]) == 2
    assert "--export-csv and --export-json both name" in capsys.readouterr().err and not same.exists()
    inside = tmp_path / "ph3"
    assert cli_main(["verify-log", str(log_path), "--export-csv", str(inside / "a.csv"),
                     "--export-photos", str(inside)]) == 2
    assert "lies inside --export-photos" in capsys.readouterr().err and not inside.exists()

    # an existing folder, even an empty one, is refused before anything is written
    (tmp_path / "empty").mkdir()
    for target in (out, tmp_path / "empty"):
        assert cli_main(["verify-log", str(log_path), "--export-photos", str(target)]) == 2
        assert "the photo export makes a new folder" in capsys.readouterr().err
    # a label or a photo edited by hand stops the export (used on its own, without
    # verify-log's check) and leaves no folder behind, not even a partial one
    for n, sql in enumerate(("UPDATE records SET product_id = 'Banana' WHERE id = 2;",
                             "UPDATE records SET photo = X'FFD8FFD9' WHERE id = 2;")):
        shutil.copy(log_path, tmp_path / f"edited{n}.db")
        _edit_by_hand(tmp_path / f"edited{n}.db", sql)
        with AuditLog(tmp_path / f"edited{n}.db") as log, pytest.raises(AuditChainError, match="record 2"):
            log.export_photos(tmp_path / "again")
    assert not (tmp_path / "again").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_missing_or_foreign_file(tmp_path, capsys):
    assert cli_main(["verify-log", str(tmp_path / "nope.db")]) == 2
    assert "no audit log" in capsys.readouterr().err
    other = tmp_path / "other.db"
    db = sqlite3.connect(other)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.execute("INSERT INTO meta VALUES ('format', 'something-else')")
    db.commit()
    db.close()
    with pytest.raises(AuditLogError, match="not an auditlens audit log"):
        AuditLog(other)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(AuditLogError):
        AuditLog(garbage)


# -- crash safety: kill -9 during a burst of appends ------------------------------------
WRITER = textwrap.dedent("""
    import sys, io, hashlib
    from auditlens.device_app.auditlog import AuditLog
    from auditlens.device_app.quality import Quality
    from auditlens.device_app.verifier import Verdict
    path, start, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    q = Quality(100.0, 0.0, 50.0, 20.0, ())
    with AuditLog(path) as log:
        i = start
        while True:
            photo = (f"{tag}-{i}-".encode() * 500)  # stored as is (not an image)
            v = Verdict("match", f"p-{tag}-{i}", 0.9, 0.5, None, ("ok",), "m", "", q)
            rid = log.append(v, photo=photo, auditor=tag)
            # printed only after append() returned: the record is committed
            print(rid, f"p-{tag}-{i}", hashlib.sha256(photo).hexdigest(), flush=True)
            i += 1
""")


def _start_writer(tmp_path, log_path, start, tag):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    return subprocess.Popen([sys.executable, str(script), str(log_path), str(start), tag],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_during_a_burst_loses_no_committed_record(tmp_path, log_path):
    committed: dict[int, tuple[str, str]] = {}
    trials, per_trial = 4, 25
    for trial in range(trials):
        proc = _start_writer(tmp_path, log_path, trial * 10_000, f"t{trial}")
        seen = 0
        deadline = time.monotonic() + 60
        while seen < per_trial + trial * 7:  # vary the moment of the kill
            line = proc.stdout.readline()
            assert line, f"writer died: {proc.stderr.read()}"
            rid, pid, sha = line.split()
            committed[int(rid)] = (pid, sha)
            seen += 1
            assert time.monotonic() < deadline
        os.kill(proc.pid, signal.SIGKILL)  # mid-burst: the next append is in flight
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()

        # evidence copied as the .db file alone (no -wal beside it) holds every record
        # committed: each append moves its record into the .db file before it returns
        alone = tmp_path / f"copy{trial}" / "audit.db"
        alone.parent.mkdir()
        shutil.copyfile(log_path, alone)
        with AuditLog(alone, create=False) as copy:
            assert copy.verify_chain().records >= len(committed)

        with AuditLog(log_path) as log:
            report = log.verify_chain()  # no corruption, chain intact
            records = {r.id: r for r in log.records()}
        assert report.records >= len(committed)
        for rid, (pid, sha) in committed.items():  # every committed record is there, intact
            assert records[rid].product_id == pid
            assert records[rid].photo_sha256 == sha
    assert len(committed) >= trials * per_trial
    with AuditLog(log_path) as log:
        db_check = log._db.execute("PRAGMA integrity_check").fetchone()[0]
    assert db_check == "ok"


def test_two_processes_appending_at_once_keep_one_chain(tmp_path, log_path):
    AuditLog(log_path).close()  # create the schema first
    procs = [_start_writer(tmp_path, log_path, 0, tag) for tag in ("a", "b")]
    counts = {"a": 0, "b": 0}
    deadline = time.monotonic() + 60
    while min(counts.values()) < 15:
        for tag, proc in zip(("a", "b"), procs):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            counts[tag] += 1
        assert time.monotonic() < deadline
    for proc in procs:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    with AuditLog(log_path) as log:
        report = log.verify_chain()
        auditors = {r.auditor for r in log.records()}
    assert report.records >= 30 and auditors == {"a", "b"}


def test_cli_verify_with_log_appends_a_record(tmp_path, capsys):
    bundle = REPO / "models" / "sample_bundle"
    photos = REPO / "models" / "sample" / "photos.csv"
    if not bundle.is_dir() or not photos.is_file():
        pytest.skip("no shipped sample bundle")
    row = next(csv.DictReader(open(photos, newline="")))
    photo = REPO / "models" / "sample" / row["photo"]
    log_path = tmp_path / "audit.db"
    rc = cli_main(["verify", "--bundle", str(bundle), "--product", row["product_id"], str(photo),
                   "--log", str(log_path), "--auditor", "cli-user"])
    assert rc in (0, 1, 3)
    with AuditLog(log_path) as log:
        (record,) = log.records()
        assert log.verify_chain().records == 1
    assert record.product_id == row["product_id"] and record.auditor == "cli-user"
    assert record.device == socket.gethostname() != ""  # the machine that judged it
    assert record.verdict["bundle_id"] == ReferenceBundle.load(bundle).bundle_id
    assert len(record.verdict["bundle_id"]) == 16
    assert record.captured_sha256 == hashlib.sha256(photo.read_bytes()).hexdigest()
    err = capsys.readouterr().err
    assert "warning" not in err  # a new log is said once (a mistyped --log starts a second chain)
    assert f"started a new audit log {log_path} with this verdict" in err
    assert cli_main(["verify", "--bundle", str(bundle), "--product", row["product_id"], str(photo),
                     "--log", str(log_path), "--auditor", "cli-user"]) == rc
    again = capsys.readouterr()
    assert "started a new audit log" not in again.err
    assert f"  logged as record 2 of {log_path}" in again.out  # what was seen, tied to its record
    with AuditLog(log_path) as log:
        assert log.verify_chain().records == 2
    # a log file emptied (to zero bytes) is started anew as a missing one is, and said so
    emptied = tmp_path / "emptied.db"
    emptied.write_bytes(b"")
    assert cli_main(["verify", "--bundle", str(bundle), "--product", row["product_id"], str(photo),
                     "--log", str(emptied), "--auditor", "cli-user"]) == rc
    assert (f"started a new audit log {emptied} with this verdict (the file was empty: if it held a "
            "log, that log is gone)") in capsys.readouterr().err

    # without --log there is nowhere to record the auditor: say so, still verify
    rc = cli_main(["verify", "--bundle", str(bundle), "--product", row["product_id"], str(photo),
                   "--auditor", "cli-user"])
    assert rc in (0, 1, 3)
    assert "--auditor is recorded only in an audit log; add --log" in capsys.readouterr().err

    # a log whose guards were dropped by hand gets them back on the next append, and the
    # auditor writing that record is told at once, not only by a later verify-log
    _edit_by_hand(log_path, "")
    for attempt in range(2):
        rc = cli_main(["verify", "--bundle", str(bundle), "--product", row["product_id"], str(photo),
                       "--log", str(log_path), "--auditor", "cli-user"])
        said = capsys.readouterr().err
        assert rc in (0, 1, 3)
        assert ("the log's append-only guards had been removed outside auditlens (records_append_only_delete, "
                "records_append_only_update, records_extend_chain); they are back" in said) == (attempt == 0), said
    with AuditLog(log_path) as log:
        report = log.verify_chain()
    assert report.records == 4 and report.triggers_intact is False


# -- exports never overwrite the log -------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("option", ["--export-csv", "--export-json"])
@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
def test_export_onto_the_log_or_its_sidecars_is_refused(log_path, option, suffix, capsys):
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i), photo=jpeg(colour=(i * 60, 0, 0)), auditor="a")
        head = log.verify_chain().head_hash
    target = Path(f"{log_path}{suffix}")
    assert cli_main(["verify-log", str(log_path), option, str(target)]) == 2
    captured = capsys.readouterr()
    assert "refusing to export over the audit log" in captured.err and "OK" not in captured.out
    with AuditLog(log_path, create=False) as log:
        report = log.verify_chain()
    assert (report.records, report.head_hash) == (3, head)


@pytest.mark.parametrize("option, suffix", [("--export-csv", ".csv"), ("--export-json", ".json")])
def test_export_to_a_folder_names_the_folder(log_path, tmp_path, option, suffix, capsys):
    with AuditLog(log_path) as log:
        log.append(make_verdict(), photo=jpeg(), auditor="a")
    folder = tmp_path / "exports"
    folder.mkdir()
    assert cli_main(["verify-log", str(log_path), option, str(folder)]) == 2
    err = capsys.readouterr().err
    assert f"{folder} is a folder: name the export file, e.g. {folder / ('audit' + suffix)}" in err
    assert list(folder.iterdir()) == []


def test_a_log_path_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "logs").write_text("not a folder")
    for path in (tmp_path / "logs" / "audit.db", tmp_path / "logs" / "day1" / "audit.db"):
        with pytest.raises(AuditLogError, match=f"cannot make the log's folder: {tmp_path / 'logs'} "
                                                "is a file, not a folder"):
            AuditLog(path)


def test_export_through_a_link_to_the_log_is_refused(log_path, tmp_path):
    with AuditLog(log_path) as log:
        log.append(make_verdict(), photo=jpeg(), auditor="a")
        (tmp_path / "sym.csv").symlink_to(log_path)
        os.link(log_path, tmp_path / "hard.json")
        for export, target in ((log.export_csv, log_path), (log.export_json, log_path),
                               (log.export_csv, tmp_path / "sym.csv"),
                               (log.export_json, tmp_path / "hard.json"),
                               (log.export_csv, Path(f"{log_path}-wal"))):
            with pytest.raises(AuditLogError, match="refusing to export over the audit log"):
                export(target)
        assert log.verify_chain().records == 1


def test_exports_are_written_0644(log_path, tmp_path):
    with AuditLog(log_path) as log:
        log.append(make_verdict(), photo=jpeg(), auditor="a")
        csv_path = log.export_csv(tmp_path / "out.csv")
        json_path = log.export_json(tmp_path / "out.json")
    assert cli_main(["verify-log", str(log_path), "--export-csv", str(tmp_path / "c.csv"),
                     "--export-json", str(tmp_path / "j.json")]) == 0
    for p in (csv_path, json_path, tmp_path / "c.csv", tmp_path / "j.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# -- the stored photo is the photo that was verified ----------------------------------------
def _stored(log_path: Path, photo: bytes) -> tuple[bytes, Image.Image]:
    with AuditLog(log_path) as log:
        rid = log.append(make_verdict(), photo=photo, auditor="a")
        stored = log.photo(rid)
        assert log.verify_chain().records == rid
    im = Image.open(io.BytesIO(stored))
    im.load()
    return stored, im


def _as_verified(photo: bytes, size: tuple[int, int]) -> np.ndarray:
    """The pixels the verifier decodes, at the stored size."""
    image = load_image(photo)
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float64)


def test_large_exif_rotated_jpeg_is_stored_upright(log_path):
    real = Image.open(REPO / "models" / "sample" / "photos" / "Banana_001.jpg").convert("RGB")
    sideways = real.resize((4000, 3000), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was held upright: display rotated 90 degrees clockwise
    out = io.BytesIO()
    sideways.save(out, "JPEG", quality=92, exif=exif)
    photo = out.getvalue()

    _, im = _stored(log_path, photo)
    assert im.format == "JPEG" and im.size == (1200, 1600)  # portrait, as shown and verified
    assert im.getexif().get(0x0112) in (None, 1)  # no orientation left to apply twice
    got = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert np.abs(got - _as_verified(photo, im.size)).mean() < 4
    unrotated = np.asarray(sideways.resize((1600, 1200)).rotate(-90, expand=True), dtype=np.float64)
    assert np.abs(got - unrotated).mean() < 4


def test_large_transparent_png_is_stored_on_white(log_path):
    rgba = np.zeros((2000, 2400, 4), dtype=np.uint8)  # transparent black...
    rgba[700:1300, 900:1500] = (200, 20, 20, 255)  # ...around an opaque red product
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, "PNG")
    photo = out.getvalue()

    _, im = _stored(log_path, photo)
    assert im.size == (1600, 1333)
    got = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert got[:200].min() > 240  # the background the verifier saw: white, not black
    assert np.abs(got[666, 800] - (200, 20, 20)).max() < 12
    assert np.abs(got - _as_verified(photo, im.size)).mean() < 3


def test_large_16_bit_grey_png_is_scaled_not_white(log_path):
    ramp = np.linspace(0, 65535, 2200).round().astype(np.uint16)
    grey = np.tile(ramp, (1800, 1))
    out = io.BytesIO()
    Image.fromarray(grey).save(out, "PNG")
    photo = out.getvalue()
    assert Image.open(io.BytesIO(photo)).mode.startswith("I")

    _, im = _stored(log_path, photo)
    got = np.asarray(im.convert("L"), dtype=np.float64)
    assert got[:, :100].mean() < 20 and got[:, -100:].mean() > 235
    assert abs(got[:, 780:820].mean() - 255 * 800 / 1600) < 8  # a ramp, not pure white
    assert np.abs(got - _as_verified(photo, im.size)[..., 0]).mean() < 3


def test_small_photos_are_stored_byte_exact(log_path):
    """The documented contract: a JPEG or PNG up to MAX_PHOTO_SIDE is kept as captured."""
    real = (REPO / "models" / "sample" / "photos" / "Carrots_001.jpg").read_bytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = io.BytesIO()
    Image.open(io.BytesIO(real)).save(rotated, "JPEG", exif=exif)
    for photo in (real, rotated.getvalue()):
        stored, im = _stored(log_path, photo)
        assert stored == photo and im.format == "JPEG"


# -- verifying never changes the file, and refuses what is not an audit log ----------------
def _foreign_db(path: Path) -> Path:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE products (id TEXT PRIMARY KEY, name TEXT)")
    db.executemany("INSERT INTO products VALUES (?, ?)", [("p1", "Milk"), ("p2", "Oats")])
    db.commit()
    db.close()
    return path


def _schema(path: Path) -> list:
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        return sorted(db.execute("SELECT type, name FROM sqlite_master").fetchall()) + [
            db.execute("PRAGMA journal_mode").fetchone()[0]]
    finally:
        db.close()


def test_verify_log_refuses_a_foreign_database_and_leaves_it_alone(tmp_path, capsys):
    foreign = _foreign_db(tmp_path / "foreign.db")
    before, schema = _sha(foreign), _schema(foreign)
    assert cli_main(["verify-log", str(foreign)]) == 2
    captured = capsys.readouterr()
    assert "not an auditlens audit log" in captured.err and "OK" not in captured.out
    with pytest.raises(AuditLogError, match="not an auditlens audit log"):
        AuditLog(foreign, create=False)
    with pytest.raises(AuditLogError, match="not an auditlens audit log"):
        AuditLog(foreign)  # opening to append does not turn it into a log either
    assert _sha(foreign) == before and _schema(foreign) == schema
    assert schema[-1] == "delete"  # not switched to WAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.db"]


def test_a_foreign_wal_database_refused_on_opening_is_not_checkpointed(tmp_path):
    """Refusing another application's WAL database must not move its -wal into it."""
    foreign = tmp_path / "app.db"
    db = sqlite3.connect(foreign)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA wal_autocheckpoint = 0")
    db.execute("CREATE TABLE products (id TEXT PRIMARY KEY, name TEXT)")
    db.executemany("INSERT INTO products VALUES (?, ?)", [(f"p{i}", "x" * 100) for i in range(50)])
    db.commit()  # left open: the rows stay in app.db-wal
    wal = foreign.with_name("app.db-wal")
    before = (_sha(foreign), _sha(wal))
    with pytest.raises(AuditLogError, match="not an auditlens audit log"):
        AuditLog(foreign)
    assert (_sha(foreign), _sha(wal)) == before
    db.close()


def test_closing_does_not_wait_for_a_reader(log_path):
    """The checkpoint on close is the kind that gives way to a reader: closing must not sit
    out the busy timeout (30 s) while another connection reads an older snapshot."""
    with AuditLog(log_path) as log:
        log.append(make_verdict(0), photo=jpeg(), auditor="a")
    reader = sqlite3.connect(log_path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT COUNT(*) FROM records").fetchone()
    log = AuditLog(log_path)
    log.append(make_verdict(1), photo=jpeg(), auditor="a")
    statements: list[str] = []
    log._db.set_trace_callback(statements.append)
    log.close()
    checkpoints = [s for s in statements if "wal_checkpoint" in s]
    # PASSIVE gives way to the reader; TRUNCATE or RESTART would wait out the busy timeout
    assert checkpoints == ["PRAGMA wal_checkpoint(PASSIVE)"]
    reader.execute("COMMIT")
    reader.close()
    with AuditLog(log_path, create=False) as log:
        assert log.verify_chain().records == 2


def test_verdicts_with_odd_types_are_logged_as_their_columns_read(log_path, capsys):
    """A float16 or float32 score, a threshold from numpy, an id that is not text: the
    record's verdict holds what its columns hold, so the log verifies."""
    odd = [{**make_verdict(0).to_dict(), "score": np.float16(0.7), "threshold": np.float32(0.62)},
           {**make_verdict(1).to_dict(), "product_id": ("a", "b")},
           {**make_verdict(2).to_dict(), "score": np.float64(0.8), "threshold": 0.62}]
    with AuditLog(log_path) as log:
        for v in odd:
            log.append(v, photo=jpeg(), auditor="a")
        report = log.verify_chain()
        assert log.record(1).verdict["score"] == log.record(1).score == float(np.float16(0.7))
        assert log.record(2).product_id == log.record(2).verdict["product_id"] == "('a', 'b')"
        assert log.holds(odd[1], jpeg())  # the held-verdict check sees it as logged
    assert report.records == 3
    # thresholds 0.62 as float32 and as float64 differ: they must not print alike
    assert [r["threshold"] for r in report.judged_with] == [float(np.float32(0.62)), 0.62]
    assert cli_main(["verify-log", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert "threshold 0.620000005\n" in out and "threshold 0.620000000\n" in out


def test_empty_database_is_no_log_to_verify_but_can_become_one(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(AuditLogError, match="not an auditlens audit log"):
        AuditLog(empty, create=False)
    assert empty.stat().st_size == 0
    with AuditLog(empty) as log:
        log.append(make_verdict(), photo=jpeg(), auditor="a")
    with AuditLog(empty, create=False) as log:
        assert log.verify_chain().records == 1


def test_cli_verify_with_log_refuses_a_catalogue_database(tmp_path, capsys):
    bundle = REPO / "models" / "sample_bundle"
    photos = REPO / "models" / "sample" / "photos.csv"
    if not bundle.is_dir() or not photos.is_file():
        pytest.skip("no shipped sample bundle")
    row = next(csv.DictReader(open(photos, newline="")))
    catalog = _foreign_db(tmp_path / "catalog.db")
    before = _sha(catalog)
    rc = cli_main(["verify", "--bundle", str(bundle), "--product", row["product_id"],
                   str(REPO / "models" / "sample" / row["photo"]), "--log", str(catalog)])
    assert rc == 2
    captured = capsys.readouterr()
    assert "not an auditlens audit log" in captured.err and "this verdict was NOT logged" in captured.err
    assert row["product_id"] in captured.out and "score" in captured.out  # the verdict is not lost
    assert _sha(catalog) == before and _schema(catalog)[-1] == "delete"
    # a log path under a file: the same one line, the verdict shown and said to be unlogged
    rc = cli_main(["verify", "--bundle", str(bundle), "--product", row["product_id"],
                   str(REPO / "models" / "sample" / row["photo"]), "--log", str(catalog / "audit.db")])
    captured = capsys.readouterr()
    assert rc == 2 and "score" in captured.out and captured.err.count("\n") == 1
    assert captured.err.startswith(f"auditlens: error: {catalog / 'audit.db'}")
    assert captured.err.rstrip().endswith("this verdict was NOT logged")
    # with --json: one document, the verdict said not logged, and the same line on stderr
    args = ["verify", "--bundle", str(bundle), "--product", row["product_id"],
            str(REPO / "models" / "sample" / row["photo"]), "--json"]
    rc = cli_main([*args, "--log", str(catalog)])
    captured = capsys.readouterr()
    shown = json.loads(captured.out)  # a second document would not parse
    assert rc == 2 and shown["logged"] is False and shown["ok"] is False
    assert shown["product_id"] == row["product_id"] and "this verdict was NOT logged" in shown["error"]
    assert captured.err.rstrip().endswith("this verdict was NOT logged")
    # ... and when the log takes it, "logged": true
    rc = cli_main([*args, "--log", str(tmp_path / "audit.db"), "--auditor", "A. Smith"])
    shown = json.loads(capsys.readouterr().out)
    assert rc in (0, 1, 3) and shown["logged"] is True and shown["record_id"] == 1 and "ok" not in shown


def test_verify_log_does_not_change_the_log(log_path, capsys):
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i), photo=jpeg(), auditor="a")
    _edit_by_hand(log_path, "")  # the guards dropped, no record touched
    before = _sha(log_path)
    assert cli_main(["verify-log", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert "OK, 3 records" in out and "append-only guards are missing" in out
    with AuditLog(log_path, create=False) as log:
        report = log.verify_chain()
        with pytest.raises(AuditLogError, match="could not write"):
            log.append(make_verdict(), photo=jpeg(), auditor="a")
    assert not report.triggers_intact  # not quietly restored by a verification
    assert _sha(log_path) == before


def test_a_log_file_cut_short_is_tampering_not_an_unreadable_file(log_path, tmp_path, capsys):
    """A log truncated after it was written (records lost at its end, or most of it) exits
    as a broken chain (4), saying how much of the file is missing; a file that is no log at
    all stays an unreadable log (2)."""
    with AuditLog(log_path) as log:
        for i in range(12):
            log.append(make_verdict(i), photo=jpeg(colour=(i * 20, 0, 0)), auditor="a")
    size = log_path.stat().st_size
    for keep in (size - 4096, size // 2, 4096):
        cut = tmp_path / f"cut-{keep}.db"
        cut.write_bytes(log_path.read_bytes()[:keep])
        assert cli_main(["verify-log", str(cut)]) == 4
        said = capsys.readouterr().err
        assert f"the log file is cut short ({keep:,} of the {size:,} bytes its header declares)" in said
    (tmp_path / "photo.db").write_bytes(jpeg())
    assert cli_main(["verify-log", str(tmp_path / "photo.db")]) == 2
    assert cli_main(["verify-log", str(log_path)]) == 0


@pytest.mark.parametrize("trigger", ["meta_read_only_update", "meta_read_only_delete"])
def test_a_header_guard_dropped_by_hand_is_warned_about(log_path, trigger, capsys):
    """The header's guards count among the append-only guards: one dropped (to rewrite the
    log id or its creation time) is reported as the records' guards are."""
    with AuditLog(log_path) as log:
        log.append(make_verdict(), photo=jpeg(), auditor="a")
    db = sqlite3.connect(log_path)
    db.executescript(f"DROP TRIGGER {trigger};" + (
        " UPDATE meta SET value = '2020-01-01T00:00:00+00:00' WHERE key = 'created_utc';"
        if trigger.endswith("update") else ""))
    db.close()
    assert cli_main(["verify-log", str(log_path)]) == 0
    assert "append-only guards are missing" in capsys.readouterr().out
    assert cli_main(["verify-log", str(log_path), "--strict"]) == 5


def test_verify_log_on_read_only_media(tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    log_path = media / "audit.db"
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i), photo=jpeg(colour=(200, 30, 10 * i)), auditor="a")
    assert sorted(os.listdir(media)) == ["audit.db"]  # closed cleanly: no -wal, no -shm
    cmd = [sys.executable, "-m", "auditlens.cli", "verify-log", "--json", str(log_path)]
    if os.geteuid() == 0:  # root writes through file modes: mount the folder read-only
        mount = 'mount --bind -o ro "$0" "$0" && ! touch "$0/probe" 2>/dev/null && exec "$@"'
        if not shutil.which("unshare") or subprocess.run(
                ["unshare", "-m", "sh", "-c", mount, str(media), "true"],
                capture_output=True).returncode != 0:
            pytest.skip("cannot mount a read-only folder here")
        cmd = ["unshare", "-m", "sh", "-c", mount, str(media), *cmd]
    else:
        log_path.chmod(0o444)
        media.chmod(0o555)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    finally:
        media.chmod(0o755)
        log_path.chmod(0o644)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["records"] == 3 and report["triggers_intact"] and not report["warnings"]
    assert sorted(os.listdir(media)) == ["audit.db"]


@pytest.mark.parametrize("table, message", [("records", "records table was removed"),
                                            ("meta", "header")])
def test_dropped_table_is_reported_as_tampering(log_path, table, message, capsys):
    with AuditLog(log_path) as log:
        for i in range(3):
            log.append(make_verdict(i), photo=jpeg(), auditor="a")
    _edit_by_hand(log_path, f"DROP TABLE {table};")
    assert cli_main(["verify-log", str(log_path)]) == 4
    captured = capsys.readouterr()
    assert message in captured.err and "OK" not in captured.out
    for create in (False, True):  # nor does opening to append start a new, empty chain
        with pytest.raises(AuditChainError, match=message):
            AuditLog(log_path, create=create)
    assert table not in {r[1] for r in _schema(log_path)[:-1]}


# -- what the log cannot store is replaced or refused, never a crash ------------------------
def test_undecodable_text_is_stored_with_replacement(log_path, tmp_path):
    auditor = os.fsdecode(b"m\xfcller")  # $USER in Latin-1, as Python decodes it
    assert auditor == "m\udcfcller"
    verdict = make_verdict().to_dict()
    verdict["reasons"] = [os.fsdecode(b"caf\xe9")]
    with AuditLog(log_path, device=os.fsdecode(b"t\xe9l\xe9phone")) as log:
        rid = log.append(verdict, photo=jpeg(), auditor=auditor)
        record = log.record(rid)
        assert log.verify_chain().records == 1
        log.export_csv(tmp_path / "out.csv")
        log.export_json(tmp_path / "out.json")
    assert record.auditor == "m\ufffdller" and record.device == "t\ufffdl\ufffdphone"
    assert record.reasons == ["caf\ufffd"]
    assert record.decision == verdict["decision"] and record.score == verdict["score"]
    rows = list(csv.DictReader(open(tmp_path / "out.csv", newline="", encoding="utf-8")))
    assert rows[0]["auditor"] == "m\ufffdller"
    data = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert data["records"][0]["auditor"] == "m\ufffdller"


def test_cli_verify_with_a_latin1_user_logs_the_verdict(tmp_path, monkeypatch, capsys):
    bundle = REPO / "models" / "sample_bundle"
    photos = REPO / "models" / "sample" / "photos.csv"
    if not bundle.is_dir() or not photos.is_file():
        pytest.skip("no shipped sample bundle")
    row = next(csv.DictReader(open(photos, newline="")))
    monkeypatch.setenv("USER", os.fsdecode(b"m\xfcller"))
    log_path = tmp_path / "audit.db"
    rc = cli_main(["verify", "--bundle", str(bundle), "--product", row["product_id"],
                   str(REPO / "models" / "sample" / row["photo"]), "--log", str(log_path)])
    assert rc in (0, 1, 3), capsys.readouterr().err
    with AuditLog(log_path, create=False) as log:
        (record,) = log.records()
        assert log.verify_chain().records == 1
    assert record.auditor == "m\ufffdller" and record.product_id == row["product_id"]


def test_cli_verify_does_not_log_a_photo_that_changed_after_it_was_judged(tmp_path, monkeypatch, capsys):
    """The log keeps the bytes that were verified: a file replaced between the verdict and
    the log write (another app saving over it) is refused, and the verdict still shown."""
    from auditlens.device_app.verifier import Verifier

    photo = tmp_path / "photo.jpg"
    photo.write_bytes((REPO / "models" / "sample" / "photos" / "Banana_001.jpg").read_bytes())
    judged = Verifier.verify

    def verify_then_overwrite(self, source, product_id):
        verdict = judged(self, source, product_id)
        photo.write_bytes((REPO / "models" / "sample" / "photos" / "Banana_002.jpg").read_bytes())
        return verdict

    monkeypatch.setattr(Verifier, "verify", verify_then_overwrite)
    log_path = tmp_path / "audit.db"
    rc = cli_main(["verify", "--product", "Banana", str(photo), "--log", str(log_path), "--auditor", "a"])
    captured = capsys.readouterr()
    assert rc == 2 and "changed after it was verified; nothing was logged" in captured.err
    assert "Banana" in captured.out and "score" in captured.out
    assert not log_path.exists()


@pytest.mark.parametrize("field_name, value", [("score", float("nan")), ("threshold", float("nan")),
                                               ("score", float("inf")), ("threshold", float("-inf"))])
def test_non_finite_score_or_threshold_is_refused(log_path, field_name, value):
    verdict = make_verdict().to_dict()
    verdict[field_name] = value
    with AuditLog(log_path) as log:
        with pytest.raises(AuditLogError, match=f"{field_name} is .*finite"):
            log.append(verdict, photo=jpeg(), auditor="a")
        assert len(log) == 0  # nothing written
        assert log.append(make_verdict(), photo=jpeg(), auditor="a") == 1
        assert log.verify_chain().records == 1


def test_appends_from_several_threads_keep_one_chain_in_time_order(log_path):
    # One AuditLog shared by threads (a service verifying in parallel): every verdict is
    # recorded once, the chain verifies, and times never go backwards along it.
    from concurrent.futures import ThreadPoolExecutor

    with AuditLog(log_path) as log:
        def append(i):
            return log.append(make_verdict(i, "no_match"), photo=jpeg(colour=(i % 250, 0, 0)), auditor="a")

        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(append, range(60)))
        assert sorted(ids) == list(range(1, 61))
        assert log.verify_chain().records == 60
        times = [log.record(i).created_utc for i in range(1, 61)]
    assert times == sorted(times)


def test_records_that_name_no_auditor_are_flagged_by_the_check(log_path, capsys):
    """The command line lets a verdict through without an auditor (with a warning as it
    writes it); the check says which records name nobody, and --strict fails on them."""
    with AuditLog(log_path) as log:
        log.append(make_verdict(0), photo=jpeg(), auditor="A. Smith")
        log.append(make_verdict(1), photo=jpeg(colour=(9, 9, 9)), auditor="  ")
        report = log.verify_chain()
    assert "1 record(s) name no auditor, first: record 2; who made those verifications is not on record" \
        in report.warnings
    assert cli_main(["verify-log", str(log_path), "--strict"]) == 5
    assert "name no auditor" in capsys.readouterr().out


def test_a_csv_export_given_to_verify_log_is_said_to_be_uncheckable(log_path, tmp_path, capsys):
    """A CSV export carries no hashes: verify-log says so and names what can be checked,
    instead of 'not a usable audit log: file is not a database'."""
    with AuditLog(log_path) as log:
        log.append(make_verdict(0), photo=jpeg(), auditor="a")
        log.export_csv(tmp_path / "audit.csv")
    assert cli_main(["verify-log", str(tmp_path / "audit.csv")]) == 2
    err = capsys.readouterr().err
    assert "looks like a CSV export, which carries no hashes or signatures and cannot be checked" in err
    renamed = tmp_path / "log-named.csv"  # a log that merely has the suffix is still checked
    renamed.write_bytes(log_path.read_bytes())
    assert cli_main(["verify-log", str(renamed)]) == 0


def test_one_photo_passing_several_verifications_is_a_warning(log_path, capsys):
    """A MATCH on a photo an earlier MATCH already judged: one photo standing for several
    audits (a NO MATCH or RETAKE verified again is routine and not flagged)."""
    with AuditLog(log_path) as log:
        log.append(make_verdict(0), photo=jpeg(), auditor="a")
        log.append(make_verdict(1, "no_match"), photo=jpeg(colour=(0, 90, 0)), auditor="a")
        log.append(make_verdict(2, "no_match"), photo=jpeg(colour=(0, 90, 0)), auditor="a")
        assert log.verify_chain().warnings == ()
        log.append(make_verdict(3), photo=jpeg(colour=(0, 90, 0)), auditor="a")  # first MATCH of it
        head = log.verify_chain()
        log.append(make_verdict(4), photo=jpeg(), auditor="b")
        log.append(make_verdict(5), photo=jpeg(), auditor="c")
        report = log.verify_chain()
        # a check since the head kept before them remembers the MATCHes it did not read again
        since = log.verify_chain(since=(head.records, head.head_hash))
    assert since.warnings == report.warnings
    assert report.warnings == ("2 MATCH record(s) judged a photo an earlier MATCH had judged, first: "
                               "record 5, on record 1's photo; one photo passed several verifications: "
                               "check that each audit photographed its product",)
    assert cli_main(["verify-log", str(log_path), "--strict"]) == 5
    assert "one photo passed several verifications" in capsys.readouterr().out
