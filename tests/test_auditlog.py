"""The audit log: append-only, hash-chained, crash-safe, and `auditlens verify-log`."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from auditlens.cli import main as cli_main
from auditlens.device_app.auditlog import (
    GENESIS_HASH,
    MAX_PHOTO_SIDE,
    AuditLog,
    canonical_bytes,
    record_hash,
)
from auditlens.device_app.quality import Quality
from auditlens.device_app.verifier import Candidate, Verdict
from auditlens.errors import AuditChainError, AuditLogError

REPO = Path(__file__).resolve().parents[1]


def make_verdict(i: int = 0, decision: str = "match") -> Verdict:
    return Verdict(
        decision=decision, product_id=f"product-{i}", score=0.5 + i / 1000, threshold=0.62,
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
    assert cli_main(["verify-log", str(log_path)]) == 2
    err = capsys.readouterr().err
    assert f"record {bad_id}:" in err


def test_verify_log_cli_subprocess_names_the_edited_record(log_path):
    """The same through the installed console command, as an auditor's supervisor runs it."""
    with AuditLog(log_path) as log:
        for i in range(4):
            log.append(make_verdict(i), photo=jpeg(), auditor="a")
    _edit_by_hand(log_path, "UPDATE records SET product_id = 'product-x' WHERE id = 2;")
    proc = subprocess.run([sys.executable, "-m", "auditlens.cli", "verify-log", str(log_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "record 2:" in proc.stderr and "edited" in proc.stderr


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
    assert record.captured_sha256 == hashlib.sha256(photo.read_bytes()).hexdigest()
