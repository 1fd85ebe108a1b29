"""The audit log never loses a committed record: kill -9 during a burst of writes, two
processes verifying and logging at once, a full disk. After each, the hash chain verifies
and every record the writer saw committed is there, intact.

Counts are small by default (CI); ``AUDITLENS_ROBUST_FULL=1`` runs the counts reported in
docs/robustness.md. Figures are printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from auditlens.device_app.auditlog import AuditLog
from auditlens.errors import AuditLogError

FULL = os.environ.get("AUDITLENS_ROBUST_FULL") == "1"
KILL_TRIALS = 40 if FULL else 4
CONCURRENT_RECORDS = 500 if FULL else 40


def _verdict(i: int) -> dict:
    score = 0.5 + (i % 50) / 100
    return {"product_id": f"product-{i % 6}", "decision": "match" if score >= 0.6 else "no_match",
            "score": score, "threshold": 0.6, "model_id": "test-model",
            "reasons": [f"record {i}"]}


WRITER = r"""
import io, json, os, sys
import numpy as np
from PIL import Image
from auditlens.device_app.auditlog import AuditLog
path, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(abs(hash(tag)) % 2**32)
with AuditLog(path) as log:
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        verdict = {"product_id": "product-%d" % (i % 6), "decision": "match", "score": 0.9,
                   "threshold": 0.6, "model_id": "m", "reasons": [tag, str(i)]}
        rid = log.append(verdict, photo=buf.getvalue(), auditor="%s-%d" % (tag, i))
        print(json.dumps([rid, "%s-%d" % (tag, i)]), flush=True)   # committed: append returned
"""


def _committed(stdout: str) -> list[tuple[int, str]]:
    out = []
    for line in stdout.splitlines():
        try:
            rid, auditor = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        out.append((int(rid), auditor))
    return out


def _check(path: Path, committed: list[tuple[int, str]]) -> int:
    with AuditLog(path) as log:
        report = log.verify_chain()
        by_id = {r.id: r for r in log.records()}
    for rid, auditor in committed:
        assert rid in by_id, f"committed record {rid} lost"
        assert by_id[rid].auditor == auditor
    assert report.records == len(by_id)
    return report.records


@pytest.mark.skipif(not FULL, reason="its quick form is tests/test_auditlog.py's kill -9 test; "
                    "AUDITLENS_ROBUST_FULL=1 runs 40 trials here")
def test_kill_9_during_burst(tmp_path):
    """A writer appending as fast as it can is killed with SIGKILL at a random moment,
    KILL_TRIALS times on the same log; after each kill the chain verifies and every
    record the writer had seen committed is there."""
    path = tmp_path / "audit.db"
    rng = random.Random(20260101)
    committed_total, trials_with_writes = [], 0
    for trial in range(KILL_TRIALS):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), f"t{trial}", "100000"],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        first = proc.stdout.readline()  # the writer is up and has committed a record
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        committed = _committed(first + stdout)
        trials_with_writes += bool(committed)
        committed_total.extend(committed)
        records = _check(path, committed_total)
    assert trials_with_writes == KILL_TRIALS
    assert records >= len(committed_total)
    print(f"\nkill -9: {KILL_TRIALS} trials, {len(committed_total)} records acknowledged, "
          f"{records} in the log, 0 lost, chain verifies")


@pytest.mark.skipif(not FULL, reason="its quick form is tests/test_auditlog.py's two-process test; "
                    "AUDITLENS_ROBUST_FULL=1 runs 500 appends each here")
def test_two_processes_append_concurrently(tmp_path):
    path = tmp_path / "audit.db"
    AuditLog(path).close()  # created once, so both writers race on appends only
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(CONCURRENT_RECORDS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag in ("a", "b")]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    committed = [c for out, _ in outs for c in _committed(out)]
    assert len(committed) == 2 * CONCURRENT_RECORDS
    assert len({rid for rid, _ in committed}) == len(committed)  # no id handed out twice
    assert _check(path, committed) == 2 * CONCURRENT_RECORDS
    print(f"\nconcurrent: 2 processes x {CONCURRENT_RECORDS} appends, "
          f"{2 * CONCURRENT_RECORDS} records, chain verifies")


def test_two_processes_verifying_and_logging(tmp_path, bundle_dir, catalog_dir):
    """Two `auditlens verify --log` runs at once on the same log."""
    path = tmp_path / "audit.db"
    photos = sorted(catalog_dir.glob("*.jpg"))[:2]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "auditlens.cli", "verify", "--bundle", str(bundle_dir), "--product",
         photo.stem, "--log", str(path), "--auditor", f"auditor-{i}", str(photo)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i, photo in enumerate(photos)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode in (0, 1, 3), err
    with AuditLog(path) as log:
        assert log.verify_chain().records == 2
        assert {r.auditor for r in log.records()} == {"auditor-0", "auditor-1"}


FULL_DISK = r"""
import io, json, resource, signal, sys
import numpy as np
from PIL import Image
from auditlens.device_app.auditlog import AuditLog
from auditlens.errors import AuditLogError
path, limit = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # writes fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
rng = np.random.default_rng(7)
with AuditLog(path) as log:
    for i in range(10000):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(buf, "PNG")
        verdict = {"product_id": "p", "decision": "match", "score": 0.9, "threshold": 0.6,
                   "model_id": "m"}
        try:
            rid = log.append(verdict, photo=buf.getvalue(), auditor="full-%d" % i)
        except AuditLogError as exc:
            print(json.dumps(["error", str(exc)]), flush=True)
            break
        except BaseException as exc:
            print(json.dumps(["crash", repr(exc)]), flush=True)
            raise
        print(json.dumps([rid, "full-%d" % i]), flush=True)
"""


def test_full_disk(tmp_path):
    """RLIMIT_FSIZE makes the disk 'full' mid-burst: append raises AuditLogError (not an
    OSError or sqlite3 error), every record acknowledged before survives, the chain
    verifies, and once space is back the log takes new records."""
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        for i in range(3):
            log.append(_verdict(i), photo=b"photo %d" % i, auditor=f"pre-{i}")
    limit = 1_000_000
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(path), str(limit)],
                          capture_output=True, text=True, timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert lines and lines[-1][0] == "error", (lines[-1:], proc.stderr[-2000:])
    assert "could not write" in lines[-1][1] or "cannot" in lines[-1][1]
    committed = [(rid, a) for rid, a in lines[:-1]] + [(i + 1, f"pre-{i}") for i in range(3)]
    assert len(committed) > 3  # some records fitted before the disk filled up
    records = _check(path, committed)
    with AuditLog(path) as log:  # space is back: the log goes on
        rid = log.append(_verdict(9), photo=b"after", auditor="after")
        assert log.verify_chain().records == records + 1 == rid
    print(f"\nfull disk: {len(committed)} records acknowledged before EFBIG, {records} in the "
          f"log, append raised AuditLogError, chain verifies, log usable afterwards")


def test_corrupted_file_is_an_audit_log_error(tmp_path):
    path = tmp_path / "audit.db"
    with AuditLog(path) as log:
        for i in range(20):
            log.append(_verdict(i), photo=os.urandom(3000), auditor="x")
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    with pytest.raises(AuditLogError):
        with AuditLog(path) as log:
            log.verify_chain()
    (tmp_path / "junk.db").write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(AuditLogError):
        AuditLog(tmp_path / "junk.db")
