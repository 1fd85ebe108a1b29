"""The on-device audit log: every verification, append-only and tamper-evident.

One SQLite file (WAL journal, ``synchronous=FULL``, so a record is on disk when
:meth:`AuditLog.append` returns and a crash or power cut never loses a committed record)
holds one row per verification: the photo (downscaled to at most
:data:`MAX_PHOTO_SIDE` pixels if it is larger), its sha256, the product id, score,
threshold, decision, model id, UTC time, auditor, device and the verdict as JSON.

Tamper evidence: every record carries the sha256 of the record before it
(``prev_hash``) and its own hash (``record_hash``) over a canonical serialisation of all
its fields, the photo's sha256 included. Triggers make ``UPDATE`` and ``DELETE`` fail
and refuse an insert that does not extend the chain, so the API can only append; an
edit made by hand (drop the triggers, change a row with the ``sqlite3`` tool) breaks the
chain, and :meth:`AuditLog.verify_chain` (``auditlens verify-log``) names the first
record that no longer verifies (``verify-log`` opens the file read-only, and refuses a
database without the log's header or records table).

What a chain cannot show by itself: the removal of the newest records, and an edit whose
author also recomputed the hashes of the edited record and of every record after it (the
hash is a plain sha256 over a documented serialisation; anyone with the file and this
code can do it). Both are caught against a hash kept elsewhere: keep the head that
:meth:`verify_chain` reports (``ID:HASH``; it is in every export) when a log is uploaded,
and check the log against it next time (``verify-log --expect-head ID:HASH``,
``verify_chain(anchors=...)``): a record at or before a kept head can then no longer be
changed, removed or re-hashed unnoticed.

A record appended after the last kept head by someone with the file and this code verifies
like any other, unless it contradicts itself (columns that differ from its verdict, a
decision its score refutes), which :meth:`~AuditLog.verify_chain` reports as made outside
auditlens, or the device signs its records: a log opened with the device's Ed25519 key
(``AuditLog(path, signing_key=...)``, ``auditlens keygen --device``) stores beside each
record the key's signature of the log's id and the record's hash (the ``signatures``
table), and a check given the device's public key (``verify_chain(device_keys=...)``,
``verify-log --device-key``) refuses any record that this key did not sign: a record
written, or edited and re-hashed, without the device's private key no longer passes. A
log whose first records were written before the device had a key is checked from the
record the auditor names (``signed_from``, ``--signed-from``): the records before it are
reported unsigned, and nothing but the auditor's knowledge of when the key was installed
protects them (a tamperer can strip signatures and rewrite them). Once a log holds signed
records, an append without a key is refused. The key signs whatever the device is made to
append: it proves where a record was written, not that the photo shows the shelf.

A JSON export made with the key (the app's, ``verify-log --export-json --log-key``) carries
the key's signature of its header
(:func:`~auditlens.device_app.auditchain.export_signed_message`: the log's id, its head, the
guards' state and warnings, whether photos are in it, and when it was made), so that the
device vouches for where the upload ends: records removed from its end, or warnings left
out, no longer pass :func:`~auditlens.device_app.auditchain.verify_export`.

Every append checkpoints the WAL into the ``.db`` file, so a copy of that file alone
normally holds every committed record (not when another connection was reading at that
moment, or the app was killed between commit and checkpoint: copy the ``-wal`` beside it).

The record format and the chain checks, which a JSON export goes through too, are in
:mod:`auditlens.device_app.auditchain`.

This module is part of the engine: numpy/Pillow/stdlib only, no TensorFlow, no Kivy.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

from auditlens.device_app.auditchain import (
    CSV_COLUMNS,
    EXPORT_VERSION,
    GENESIS_HASH,
    LOG_FORMAT,
    LOG_VERSION,
    MAX_RECORD_ID,
    PHOTO_SUFFIX,
    RECORD_COLUMNS,
    VERDICT_COLUMNS,
    AuditRecord,
    ChainReport,
    ChainWalk,
    chain_error,
    check_kept_heads,
    export_signed_message,
    kept_hashes,
    load_signing_key,
    record_hash,
    signed_message,
    sniffed_mime,
    spreadsheet_text,
    storable_text,
    trusted_keys,
    verdict_contradiction,
    verdict_text,
)
from auditlens.errors import AuditChainError, AuditLogError, AuditLogKeyError, AuditRecordError
from auditlens.files import atomic_write, fsync_dir

MAX_PHOTO_SIDE = 1600
"""Photos larger than this (either side, pixels) are stored as a JPEG downscaled to it."""
PHOTO_JPEG_QUALITY = 90

PHOTO_CSV_COLUMNS = (
    "photo", "product_id", "decision", "score", "threshold", "record_id", "created_utc",
    "auditor", "photo_sha256",
)
"""Columns of ``photos.csv`` written by :meth:`AuditLog.export_photos`."""


def _unchangeable(table: str, name: str, changed: str, deleted: str) -> str:
    """Triggers ``{name}_update`` and ``{name}_delete`` that refuse to change or delete a
    row of ``table``, with these messages."""
    return "".join(f"""
CREATE TRIGGER IF NOT EXISTS {name}_{op.lower()} BEFORE {op} ON {table}
BEGIN
    SELECT RAISE(ABORT, '{message}');
END;""" for op, message in (("UPDATE", changed), ("DELETE", deleted)))


_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    id              INTEGER PRIMARY KEY,
    created_utc     TEXT NOT NULL,
    auditor         TEXT NOT NULL,
    device          TEXT NOT NULL,
    product_id      TEXT NOT NULL,
    decision        TEXT NOT NULL,
    score           REAL NOT NULL,
    threshold       REAL NOT NULL,
    model_id        TEXT NOT NULL,
    photo_sha256    TEXT NOT NULL,
    captured_sha256 TEXT NOT NULL,
    verdict_json    TEXT NOT NULL,
    prev_hash       TEXT NOT NULL,
    record_hash     TEXT NOT NULL UNIQUE,
    photo_mime      TEXT NOT NULL,
    photo           BLOB NOT NULL
);{_unchangeable("records", "records_append_only", "the audit log is append-only: records cannot be changed",
                 "the audit log is append-only: records cannot be deleted")}
CREATE TRIGGER IF NOT EXISTS records_extend_chain BEFORE INSERT ON records
WHEN NEW.id IS NOT (SELECT COALESCE(MAX(id), 0) + 1 FROM records)
  OR NEW.prev_hash IS NOT COALESCE((SELECT record_hash FROM records ORDER BY id DESC LIMIT 1),
                                   '{GENESIS_HASH}')
BEGIN
    SELECT RAISE(ABORT, 'the audit log only accepts a record that extends its hash chain');
END;
CREATE TABLE IF NOT EXISTS signatures (
    record_id       INTEGER PRIMARY KEY,
    public_key      TEXT NOT NULL,
    signature       TEXT NOT NULL
);{_unchangeable("signatures", "signatures_append_only", "the audit log is append-only: signatures "
                 "cannot be changed", "the audit log is append-only: signatures cannot be deleted")}
CREATE TRIGGER IF NOT EXISTS signatures_of_the_newest BEFORE INSERT ON signatures
WHEN NEW.record_id IS NOT (SELECT MAX(id) FROM records)
BEGIN
    SELECT RAISE(ABORT, 'only the newest record can be signed, as it is written');
END;{_unchangeable("meta", "meta_read_only", "the audit log header cannot be changed",
                   "the audit log header cannot be changed")}
"""

_TRIGGERS = ("records_append_only_update", "records_append_only_delete", "records_extend_chain",
             "meta_read_only_update", "meta_read_only_delete")
"""Guards every log has had from its first version (the header's too: its log id is what a
signed record's signature covers besides the record)."""
_SIGNATURE_TRIGGERS = ("signatures_append_only_update", "signatures_append_only_delete",
                       "signatures_of_the_newest")
"""Guards of the signatures table (which logs written before it existed get on their next
append, so their absence there is no sign of tampering)."""



def prepare_photo(photo: bytes, max_side: int = MAX_PHOTO_SIDE) -> tuple[bytes, str]:
    """The bytes to store for a photo and their MIME type: the photo itself, or a JPEG
    downscaled to ``max_side`` when it is larger (or when it is not JPEG/PNG).

    A re-encoded photo is decoded as the verifier decodes it
    (:func:`~auditlens.device_app.imaging.load_image`: EXIF orientation applied,
    transparency on white, 16-bit scaled), so the evidence shows what was verified."""
    from PIL import Image

    from auditlens.device_app.imaging import load_image

    try:
        with Image.open(io.BytesIO(photo)) as image:
            fmt = (image.format or "").upper()
            if max(image.size) <= max_side and fmt in ("JPEG", "PNG"):
                return photo, "image/jpeg" if fmt == "JPEG" else "image/png"
        rgb = load_image(photo, draft=(max_side, max_side))
    except Exception:  # noqa: BLE001 - an undecodable photo is still evidence: keep it as is
        return photo, "application/octet-stream"
    rgb.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=PHOTO_JPEG_QUALITY, optimize=True)
    return out.getvalue(), "image/jpeg"


def _check_judged_photo(photo: bytes, judged_sha256: str) -> None:
    """Raise :class:`AuditLogError` unless ``photo`` is the photo a verdict judged: the same
    bytes, or for a verdict judged from decoded pixels (a camera frame, an array), a
    lossless encoding of those pixels (PNG). A verdict without ``photo_sha256`` (one made
    by hand) is not checked."""
    if not judged_sha256 or hashlib.sha256(photo).hexdigest() == judged_sha256:
        return
    from auditlens.device_app.imaging import load_image

    try:
        pixels = load_image(photo).tobytes()
    except Exception:  # noqa: BLE001 - undecodable: it cannot be the judged photo either
        pixels = b""
    if hashlib.sha256(pixels).hexdigest() != judged_sha256:
        raise AuditRecordError(
            "the photo given to the log is not the photo the verdict judged (its sha256 "
            f"differs from the verdict's photo_sha256 {judged_sha256[:12]}...); log the "
            "bytes that were verified, or for a photo handed over as pixels (a PIL image, an "
            "array) a PNG of the pixels as judged: auditlens.device_app.imaging.load_image(image), "
            "EXIF orientation applied")


def _cut_short(path: Path) -> tuple[int, int] | None:
    """(the file's size, the size its SQLite header declares) when a SQLite file is shorter
    than its header says it is (truncated after it was written), else None."""
    try:
        with open(path, "rb") as fh:
            header = fh.read(100)
        size = os.path.getsize(path)
    except OSError:
        return None
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        return None
    if header[92:96] != header[24:28]:  # the declared size is stale (written by an old SQLite)
        return None
    page_size = int.from_bytes(header[16:18], "big")
    declared = (65536 if page_size == 1 else page_size) * int.from_bytes(header[28:32], "big")
    return (size, declared) if size < declared else None


def default_auditor() -> str:
    """The auditor name a log records when none is given: $USER, else the login name, else
    "" (no such name on this system)."""
    if os.environ.get("USER"):
        return os.environ["USER"]
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - KeyError/OSError, or ImportError (no pwd on Windows)
        return ""


def utc_now() -> str:
    """The current UTC time as records carry it: ``2026-12-04T16:30:00.779Z``."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _verdict_dict(verdict) -> dict:
    """The verdict as the log stores it: a dict whose fields that a record repeats as
    columns (:data:`VERDICT_COLUMNS`) hold what the columns hold (text, floats), so that
    a record and its verdict always agree (a float16 score, an id that is not text)."""
    if isinstance(verdict, dict):
        d = dict(verdict)
    elif hasattr(verdict, "to_dict"):
        d = verdict.to_dict()
    else:
        raise AuditRecordError(f"cannot log a {type(verdict).__name__}: expected a Verdict")
    try:
        for name in VERDICT_COLUMNS:
            if name in ("score", "threshold"):
                d[name] = float(d[name])
            elif name in d or name != "model_id":  # a verdict may name no model
                d[name] = storable_text(d[name])
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditRecordError(f"the verdict lacks a field the log needs: {exc!r}") from exc
    return d


class AuditLog:
    """An append-only, hash-chained SQLite log of verifications.

    Use it as a context manager::

        with AuditLog("audit.db") as log:
            record_id = log.append(verdict, photo=jpeg_bytes, auditor="A. Smith")
            log.verify_chain()

    One instance may be shared between threads (appends are serialised with a lock),
    and several processes may append to the same file at once (each append is one
    ``BEGIN IMMEDIATE`` transaction that reads the chain's head and extends it).
    """

    def __init__(self, path: str | os.PathLike, *, create: bool = True, device: str = "",
                 timeout: float = 30.0, signing_key: bytes | str | os.PathLike | None = None) -> None:
        """``signing_key``: the device's Ed25519 private key (``device.key`` of ``auditlens
        keygen --device``, PEM, raw or hex): every record appended is signed with it (needs
        the [sign] extra)."""
        self.path = Path(path)
        self.device = device
        self._signer = None if signing_key is None else load_signing_key(signing_key)
        if not create and not self.path.is_file():
            raise AuditLogError(f"{self.path}: no audit log here")
        if create:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file where a folder of the path goes, no permission
                in_the_way = next((p for p in self.path.parents if p.exists() and not p.is_dir()), None)
                why = (f"{in_the_way} is a file, not a folder" if in_the_way
                       else exc.strerror or str(exc))
                raise AuditLogError(f"{self.path}: cannot make the log's folder: {why}") from exc
        self.read_only = not create  # opened to verify: the file is never changed
        self._lock = threading.RLock()
        self._db = None
        self._writable = False
        """Opened as a log to append to (not read-only, schema checked and in place)."""
        self.guards_restored: tuple[str, ...] = ()
        """The append-only guards this opening found removed and put back (a permanent note
        of it stays in the log, and :meth:`verify_chain` warns of it): tell the user now."""
        # Two processes opening a new log at once: switching it to WAL can meet the other's
        # lock without SQLite waiting for it ("database is locked"); try again until timeout.
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._open(create, timeout)
                return
            except sqlite3.DatabaseError as exc:
                self.close()
                locked = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
                cut = None if locked else _cut_short(self.path)
                if cut:  # records lost, not a file of another kind: tampering's exit status
                    raise AuditChainError(
                        f"{self.path}: the log file is cut short ({cut[0]:,} of the {cut[1]:,} bytes "
                        f"its header declares): records were lost or removed ({exc})") from exc
                if not locked or time.monotonic() >= deadline:
                    raise AuditLogError(f"{self.path}: not a usable audit log: {exc}") from exc
                time.sleep(random.uniform(0.01, 0.1))
            except BaseException:
                self.close()
                raise

    def _open(self, create: bool, timeout: float) -> None:
        if create:
            self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None,
                                       check_same_thread=False)
        else:
            self._db = self._connect_read_only(timeout)
        self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        self._check_schema()  # refuse another application's database before touching it
        if create:
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise AuditLogError(f"{self.path}: cannot switch the log to WAL mode (got {mode})")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._init_schema()
            self._writable = True

    # -- lifecycle -----------------------------------------------------------------
    def _connect_read_only(self, timeout: float) -> sqlite3.Connection:
        """A connection that cannot change the file (``mode=ro``). On read-only media
        SQLite cannot open a WAL database whose ``-shm`` file is absent; when there is no
        ``-wal`` to read either, the file alone is the whole log, and it is opened
        ``immutable``."""
        uri = self.path.resolve().as_uri()

        def connect(query: str) -> sqlite3.Connection:
            return sqlite3.connect(f"{uri}?{query}", uri=True, timeout=timeout,
                                   isolation_level=None, check_same_thread=False)

        db = connect("mode=ro")
        try:
            db.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError as exc:
            db.close()
            wal = Path(f"{self.path.resolve()}-wal")
            message = str(exc).lower()
            if ("unable to open" not in message and "readonly" not in message) or (
                    wal.exists() and wal.stat().st_size):
                raise
        return connect("mode=ro&immutable=1")

    def _check_schema(self) -> dict:
        """The log's header (``{}`` for an empty database about to become a log); raise
        :class:`AuditLogError` for a database that is not an audit log, and
        :class:`AuditChainError` for a log whose header or records table was removed."""
        objects = self._db.execute("SELECT type, name FROM sqlite_master").fetchall()
        if not objects and not self.read_only:
            return {}
        tables = {name for kind, name in objects if kind == "table"}
        if "meta" not in tables:
            if "records" in tables:
                raise chain_error(f"{self.path}: the log's header (the meta table) was removed; "
                                   "the log was edited outside auditlens", None)
            raise AuditLogError(f"{self.path}: not an auditlens audit log")
        try:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise AuditLogError(f"{self.path}: not an auditlens audit log ({exc})") from exc
        if meta.get("format") != LOG_FORMAT:
            raise AuditLogError(f"{self.path}: not an auditlens audit log")
        if meta.get("version") != str(LOG_VERSION):
            raise AuditLogError(f"{self.path}: audit log version {meta.get('version')}, "
                                f"this auditlens reads version {LOG_VERSION}")
        if "records" not in tables:
            raise chain_error(f"{self.path}: the records table was removed (all records lost); "
                               "the log was edited outside auditlens", None)
        return meta

    def _init_schema(self) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                meta = self._check_schema()  # again: another process may have created it
                present = {r[0] for r in self._db.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'trigger'")}
                missing = sorted(set(self._guards()) - present) if meta else []
                # statements one by one: executescript() would commit on its own
                for statement in _split_sql(_SCHEMA):
                    self._db.execute(statement)
                if not meta:
                    import uuid

                    self._db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)", [
                        ("format", LOG_FORMAT), ("version", str(LOG_VERSION)),
                        ("log_id", uuid.uuid4().hex), ("created_utc", utc_now()),
                    ])
                elif missing:
                    # someone removed the append-only guards: put them back, and keep a
                    # permanent note of it (inserting is the one thing the log allows)
                    self._db.execute("INSERT INTO meta(key, value) VALUES (?, ?)",
                                     (f"guards_restored:{utc_now()}", ",".join(missing)))
                self._db.execute("COMMIT")
                self.guards_restored = tuple(missing)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _has_signatures_table(self) -> bool:
        """Whether the log has its signatures table (asked each time: a log written before it
        existed gets it on its next append, perhaps by another process; read-only, it has
        none and its records are unsigned)."""
        with self._open_db() as db:  # a closed log says so
            return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                              "name = 'signatures'").fetchone() is not None

    def _guards(self) -> tuple[str, ...]:
        """The triggers this log must have: the signatures table's too once it has one."""
        return _TRIGGERS + (_SIGNATURE_TRIGGERS if self._has_signatures_table() else ())

    @property
    def signer(self) -> str:
        """Fingerprint of the device key this log signs its appends with ("" when none)."""
        from auditlens.device_app.signing import fingerprint_hex

        return fingerprint_hex(self._signer[1]) if self._signer else ""

    def _columns(self) -> str:
        """The select list of an :class:`AuditRecord` (its signature from the signatures
        table, "" where there is none)."""
        if not self._has_signatures_table():
            return ", ".join(RECORD_COLUMNS) + ", '', ''"
        return ", ".join(RECORD_COLUMNS) + "".join(
            f", COALESCE((SELECT {c} FROM signatures WHERE record_id = records.id), '')"
            for c in ("public_key", "signature"))

    @contextlib.contextmanager
    def _open_db(self) -> Iterator[sqlite3.Connection]:
        """The connection, held under the lock; a closed log says so."""
        with self._lock:
            if self._db is None:
                raise AuditLogError(f"{self.path}: the audit log is closed")
            yield self._db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                if self._writable:  # never a database refused on opening
                    self._checkpoint()
                self._db.close()
                self._db = None  # type: ignore[assignment]

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def log_id(self) -> str:
        with self._open_db() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'log_id'").fetchone()
        return row[0] if row else ""

    # -- writing -------------------------------------------------------------------
    def append(self, verdict, *, photo: bytes, auditor: str, device: str | None = None,
               sign: bool = True) -> int:
        """Write one verification; returns its record id once it is durably committed.
        ``sign=False`` writes it unsigned though the log has a key (a verdict held before the
        device had one), which only a log whose newest record is unsigned accepts."""
        if not isinstance(photo, (bytes, bytearray, memoryview)):
            raise AuditRecordError("the photo must be given as bytes")
        photo = bytes(photo)
        verdict_d = _verdict_dict(verdict)
        product_id, decision = verdict_d["product_id"], verdict_d["decision"]
        score, threshold = verdict_d["score"], verdict_d["threshold"]
        model_id = verdict_d.get("model_id", "")
        for name, value in (("score", score), ("threshold", threshold)):
            if not math.isfinite(value):
                raise AuditRecordError(f"cannot log a verdict whose {name} is {value}: the log "
                                       "only stores finite numbers")
        contradiction = verdict_contradiction(decision, score, threshold)
        if contradiction:
            raise AuditRecordError(f"cannot log {contradiction}: the record would contradict itself")
        _check_judged_photo(photo, str(verdict_d.get("photo_sha256") or ""))
        stored, mime = prepare_photo(photo)
        verdict_json = verdict_text(verdict_d)
        fields = {
            "created_utc": "", "auditor": storable_text(auditor or ""),  # the time: inside the transaction
            "device": storable_text(self.device if device is None else device),
            "product_id": product_id, "decision": decision, "score": score,
            "threshold": threshold, "model_id": model_id,
            "photo_sha256": hashlib.sha256(stored).hexdigest(),
            "captured_sha256": hashlib.sha256(photo).hexdigest(),
            "verdict_json": verdict_json,
        }
        with self._open_db():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    head = self._db.execute(
                        "SELECT id, record_hash FROM records ORDER BY id DESC LIMIT 1").fetchone()
                    signer = self._signer if sign else None
                    self.check_can_append(signed=signer is not None)
                    fields["id"] = (head[0] + 1) if head else 1
                    fields["prev_hash"] = head[1] if head else GENESIS_HASH
                    # stamped once the log is locked: appends from several threads or
                    # processes keep their times in the order of the chain
                    fields["created_utc"] = utc_now()
                    digest = record_hash(fields)
                    self._db.execute(
                        "INSERT INTO records (id, created_utc, auditor, device, product_id, decision,"
                        " score, threshold, model_id, photo_sha256, captured_sha256, verdict_json,"
                        " prev_hash, record_hash, photo_mime, photo)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (fields["id"], fields["created_utc"], fields["auditor"], fields["device"],
                         product_id, decision, score, threshold, model_id, fields["photo_sha256"],
                         fields["captured_sha256"], verdict_json, fields["prev_hash"], digest,
                         mime, sqlite3.Binary(stored)))
                    if signer is not None:
                        key, public = signer
                        self._db.execute(
                            "INSERT INTO signatures (record_id, public_key, signature) VALUES (?, ?, ?)",
                            (fields["id"], public, key.sign(signed_message(self.log_id, digest)).hex()))
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise AuditLogError(f"{self.path}: could not write the audit record: {exc}") from exc
            self._checkpoint()
        return int(fields["id"])

    def check_can_append(self, *, signed: bool | None = None) -> None:
        """Raise :class:`AuditLogKeyError` when an unsigned record (``signed`` False; default:
        unsigned when the log was opened without a key) cannot follow this log's newest
        record, which is signed: it would read as written outside auditlens to every check
        given the device's key (the app checks this on start)."""
        signer = "" if (self._signer is not None if signed is None else signed) else self.head_signer
        if signer:
            raise AuditLogKeyError(
                f"{self.path}: this log's newest record is signed with the key {signer}; open it "
                "with that device key to append (--log-key device.key; AuditLog(signing_key=...)): "
                "an unsigned record would fail every check with the device's public key")

    def first_signed_by(self, public_hex: str) -> int | None:
        """Id of the first record the key (64 hex digits) signed; None when it signed none."""
        if not self._has_signatures_table():
            return None
        with self._open_db() as db:
            return db.execute("SELECT MIN(record_id) FROM signatures WHERE public_key = ?",
                              (public_hex,)).fetchone()[0]

    @property
    def has_signed_records(self) -> bool:
        """Whether any record of this log is signed (verdicts held before the device had a
        key may then no longer join it unsigned)."""
        if not self._has_signatures_table():
            return False
        with self._open_db() as db:
            return db.execute("SELECT 1 FROM signatures LIMIT 1").fetchone() is not None

    @property
    def head_signer(self) -> str:
        """Fingerprint of the key that signed the newest record ("" when it is unsigned, or
        the log is empty): a log signed so far takes records only with a key."""
        from auditlens.device_app.signing import fingerprint_hex

        if not self._has_signatures_table():
            return ""
        with self._open_db() as db:
            row = db.execute("SELECT public_key FROM signatures WHERE record_id = "
                             "(SELECT MAX(id) FROM records)").fetchone()
        return fingerprint_hex(row[0]) if row else ""

    def _checkpoint(self) -> None:
        """Copy committed records from the ``-wal`` file into the ``.db`` file (PASSIVE: it
        never waits for a reader, where TRUNCATE would sit out the busy timeout), so that a
        copy of the ``.db`` file alone (evidence taken off a device whose app was killed)
        normally holds every record. The record is committed before this; a checkpoint
        that cannot finish now (another connection is reading an older snapshot, or the
        app is killed first) is finished by a later one, so copy the ``-wal`` file too."""
        with contextlib.suppress(sqlite3.Error):
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def holds(self, verdict, photo: bytes) -> bool:
        """Whether this verdict of this photo is already in the log (a verdict carries the
        time it was judged, so a second capture of the same photo is a different one)."""
        with self._open_db() as db:
            row = db.execute(
                "SELECT 1 FROM records WHERE captured_sha256 = ? AND verdict_json = ? LIMIT 1",
                (hashlib.sha256(bytes(photo)).hexdigest(), verdict_text(_verdict_dict(verdict)))).fetchone()
        return row is not None

    # -- reading -------------------------------------------------------------------
    def __bool__(self) -> bool:  # an empty log is still an open log
        return True

    def __len__(self) -> int:
        with self._open_db() as db:
            return int(db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    PAGE_ROWS = 500
    """Records read per query while iterating: a long log is never held in memory whole."""

    def iter_records(self, *, newest_first: bool = False, limit: int | None = None) -> Iterator[AuditRecord]:
        """The records (without photo bytes) in the log when iteration starts, oldest first
        unless ``newest_first``, at most ``limit``; read :attr:`PAGE_ROWS` at a time, each
        page under the lock, so writers wait for one page, not for the whole reading."""
        if limit is not None and int(limit) < 0:
            raise ValueError(f"limit must be 0 or more, not {limit}")
        columns = self._columns()
        with self._open_db() as db:
            last = db.execute("SELECT MAX(id) FROM records").fetchone()[0]
        if last is None:
            return
        left = None if limit is None else int(limit)
        after = last + 1 if newest_first else 0  # the id the next page starts past
        while left is None or left > 0:
            size = self.PAGE_ROWS if left is None else min(self.PAGE_ROWS, left)
            with self._open_db() as db:
                rows = db.execute(
                    f"SELECT {columns} FROM records WHERE id < ? AND id > 0 ORDER BY id DESC LIMIT ?"
                    if newest_first else
                    f"SELECT {columns} FROM records WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                    (after, size) if newest_first else (after, last, size)).fetchall()
            yield from (AuditRecord(*row) for row in rows)
            if len(rows) < size:
                return
            after = rows[-1][0]
            if left is not None:
                left -= len(rows)

    def records(self, *, newest_first: bool = False, limit: int | None = None) -> list[AuditRecord]:
        """The records (without photo bytes), oldest first unless ``newest_first``."""
        return list(self.iter_records(newest_first=newest_first, limit=limit))

    def _fetch_record(self, columns: str, record_id: int) -> tuple | None:
        """``columns`` of record ``record_id``; None when no record has that id (one past
        SQLite's integers included)."""
        if not 0 < int(record_id) <= MAX_RECORD_ID:
            return None
        with self._open_db() as db:
            return db.execute(f"SELECT {columns} FROM records WHERE id = ?", (int(record_id),)).fetchone()

    def record(self, record_id: int) -> AuditRecord:
        row = self._fetch_record(self._columns(), record_id)
        if row is None:
            raise AuditLogError(f"{self.path}: no record {record_id}")
        return AuditRecord(*row)

    def photo(self, record_id: int) -> bytes:
        """The stored photo of a record."""
        row = self._fetch_record("photo", record_id)
        if row is None:
            raise AuditLogError(f"{self.path}: no record {record_id}")
        return bytes(row[0])

    # -- checking ------------------------------------------------------------------
    def verify_chain(self, *, anchors: Sequence[tuple[int, str]] = (),
                     since: tuple[int, str] | None = None,
                     device_keys: Sequence[bytes | str | os.PathLike] = (),
                     signed_from: int = 1) -> ChainReport:
        """Check the whole log; raise :class:`AuditChainError` naming the first record
        that was edited, removed or reordered, or whose photo was swapped.

        ``anchors``: ``(record id, record hash)`` pairs kept from earlier reports (the head
        at each upload): each record must still carry its kept hash, which also catches a
        rewrite that recomputed every hash after an edit, and the removal of records.

        ``since``: the head (``(records, head_hash)``) of a check this process made
        before: only the records after it are read and hashed, and that head record must
        still carry its hash (the database-wide ``quick_check`` is skipped too). Records
        up to it are taken as checked; a full check (the default, every export) reads them
        all again.

        ``device_keys``: the public keys of the devices that write this log (``device.pub``
        files, PEM, raw or hex): every record must carry a signature by one of them, but for
        those before ``signed_from`` (a device that got its key after it had written them;
        they are then reported unsigned) that come before the first signed record. Without
        them, a signature is checked against the key it names (needs the [sign] extra;
        without it, a warning says signatures went unchecked)."""
        kept = kept_hashes(anchors)
        trusted = trusted_keys(device_keys)
        start_id, start_hash = (0, GENESIS_HASH) if not since or int(since[0]) <= 0 else (
            int(since[0]), str(since[1]).lower())
        with self._open_db():
            if not start_id:
                try:
                    check = self._db.execute("PRAGMA quick_check").fetchall()
                except sqlite3.DatabaseError as exc:
                    raise AuditLogError(f"{self.path}: the database is corrupted: {exc}") from exc
                if [r[0] for r in check] != ["ok"]:
                    raise AuditLogError(f"{self.path}: the database is corrupted: "
                                        + "; ".join(str(r[0]) for r in check[:5]))
            self._check_schema()  # the header and the records table are still there
            triggers = {r[0] for r in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'trigger'")}
            first = last = ""
            if start_id:
                row = self._db.execute("SELECT record_hash, created_utc FROM records WHERE id = ?",
                                       (start_id,)).fetchone() if start_id <= MAX_RECORD_ID else None
                if row is None or row[0] != start_hash:
                    raise chain_error(f"{self.path}: record {start_id}: it is gone or no longer "
                                       "carries the hash it had when last checked; the log was "
                                       "edited outside auditlens", start_id)
                last = row[1]
                first_row = self._db.execute("SELECT created_utc FROM records WHERE id = 1").fetchone()
                if first_row is None:  # the records checked before are no longer all there
                    raise chain_error(f"{self.path}: record 1 removed; the log was edited outside "
                                       "auditlens", 1)
                first = first_row[0]
            def stored_hash(rid: int) -> str | None:
                if rid > MAX_RECORD_ID:  # no record has it
                    return None
                row = self._db.execute("SELECT record_hash FROM records WHERE id = ?", (rid,)).fetchone()
                return None if row is None else row[0]

            check_kept_heads(str(self.path), kept, stored_hash)
            signed_before = None
            if start_id and self._has_signatures_table():
                keys = list(trusted) if trusted is not None else None
                signed_before = self._db.execute(
                    "SELECT MIN(record_id) FROM signatures WHERE record_id <= ?" + (
                        "" if keys is None else f" AND public_key IN ({', '.join('?' * len(keys))})"),
                    (start_id, *(keys or ()))).fetchone()[0]
            cursor = self._db.execute(
                f"SELECT {self._columns()}, photo FROM records WHERE id > ? ORDER BY id ASC",
                (start_id,))
            walk = ChainWalk(str(self.path), start_id, start_hash, first, last, log_id=self.log_id,
                              device_keys=trusted, signed_from=signed_from, first_signed=signed_before)
            if start_id:  # a MATCH after the head on a photo an earlier MATCH judged is said too
                walk.matched_photos = dict(self._db.execute(
                    "SELECT photo_sha256, MIN(id) FROM records WHERE decision = 'match' AND id <= ? "
                    "GROUP BY photo_sha256", (start_id,)).fetchall())
            for row in cursor:
                walk.add(AuditRecord(*row[:-1]), row[-1])
            total, lowest = self._db.execute(  # the rows the walk could see (appends go past it)
                "SELECT COUNT(*), MIN(id) FROM records WHERE id <= ?", (walk.count,)).fetchone()
            if total != walk.count:  # a row outside the chain (id 0 or below) the walk never read
                raise chain_error(f"{self.path}: record {lowest}: it is outside the chain "
                                   f"({total} rows, the chain runs 1..{walk.count}); it was "
                                   "added outside auditlens", lowest)
            restored = [k.split(":", 1)[1] for (k,) in self._db.execute(
                "SELECT key FROM meta WHERE key LIKE 'guards_restored:%' ORDER BY key")]
            guards = set(self._guards())
        intact = guards <= triggers and not restored
        warnings = tuple(
            f"the append-only guards had been removed outside auditlens (found and restored "
            f"at {when}); the records still verify, but the file was opened by hand"
            for when in restored)
        if not guards <= triggers:
            warnings += ("the append-only guards are missing: the file was opened by hand",)
        return walk.report(self.log_id, intact, warnings)

    # -- export --------------------------------------------------------------------
    def check_export_path(self, path: str | os.PathLike, file_suffix: str = "") -> Path:
        """``path`` as a Path; raise :class:`AuditLogError` when it is the log itself or
        one of its SQLite files (``-wal``, ``-shm``, ``-journal``): writing an export
        there would destroy the log; or, for an export to a file (``file_suffix``), when
        it is a folder."""
        path = Path(path)
        target = path.resolve()
        own = set()
        for log in (self.path.absolute(), self.path.resolve()):
            own |= {log, *(log.with_name(log.name + s) for s in ("-wal", "-shm", "-journal"))}
        if target in own or (target.exists() and any(
                p.exists() and os.path.samefile(target, p) for p in own)):
            raise AuditLogError(f"{path}: refusing to export over the audit log {self.path} "
                                "or one of its SQLite files; choose another export path")
        if file_suffix and path.is_dir():
            raise AuditLogError(f"{path} is a folder: name the export file, e.g. "
                                f"{path / ('audit' + file_suffix)}")
        return path

    def export_csv(self, path: str | os.PathLike) -> Path:
        """One row per record (no photo bytes; the photo's sha256 identifies it; the
        fingerprint of the key that signed it, if one did; the verdict's bundle id and,
        when a second look decided, its first score). The whole chain is checked first,
        as for the other exports. An auditor's or device's name that a spreadsheet would
        run as a formula is written with a leading apostrophe (:func:`spreadsheet_text`)."""
        from auditlens.device_app.signing import fingerprint_hex

        path = self.check_export_path(path, ".csv")
        self.verify_chain()

        def write(f):
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(CSV_COLUMNS)
            for r in self.iter_records():
                row = r.to_dict(verdict=False)
                row["reasons"] = spreadsheet_text(" | ".join(r.reasons))
                for name in ("auditor", "device"):
                    row[name] = spreadsheet_text(row[name])
                row["signed_by"] = fingerprint_hex(r.signer) if r.signer else ""
                row["score"] = f"{r.score:.6f}"
                row["threshold"] = f"{r.threshold:.6f}"
                row["bundle_id"] = spreadsheet_text(storable_text(r.verdict_value("bundle_id", "")))
                for name in ("first_score", "first_threshold"):
                    value = r.verdict_value(name)
                    row[name] = f"{value:.6f}" if isinstance(value, float) else ""
                writer.writerow([row[c] for c in CSV_COLUMNS])
        return _write_atomically(path, write, newline="")

    def export_json(self, path: str | os.PathLike, *, photos: bool = False) -> Path:
        """The records with their verdicts (and the photos, base64, if ``photos``), plus
        the chain's head hash, for upload. A log opened with the device's key signs the
        export's header (``"attestation"``: :func:`export_signed_message`)."""
        import base64

        path = self.check_export_path(path, ".json")
        header = self.verify_chain().to_dict()
        attestation = ""
        # the records the header's head covers: one appended since is in the next export
        newest = header["records"]
        if self._signer is not None:
            key, public = self._signer
            when = utc_now()
            signature = key.sign(export_signed_message(header, photos=photos, exported_utc=when))
            attestation = json.dumps({"signer": public, "signature": signature.hex(), "exported_utc": when})
            attestation = f'"attestation": {attestation}, '

        def write(f):
            f.write(f'{{"format": {json.dumps(LOG_FORMAT)}, "version": {EXPORT_VERSION}, '
                    f'"log": {json.dumps(header)}, "photos": {json.dumps(photos)}, '
                    f'{attestation}"records": [\n')
            for i, r in enumerate(self.iter_records(limit=newest)):
                d = r.to_dict()
                d["verdict_json"] = r.verdict_json  # the hashed text, for verify_export
                if photos:
                    d["photo_base64"] = base64.b64encode(self.photo(r.id)).decode("ascii")
                f.write(("" if i == 0 else ",\n") + json.dumps(d, ensure_ascii=False))
            f.write("\n]}\n")
        return _write_atomically(path, write)

    def check_photo_folder(self, folder: str | os.PathLike) -> Path:
        folder = self.check_export_path(folder)
        if folder.exists() or folder.is_symlink():
            raise AuditLogError(f"{folder} exists: the photo export makes a new folder; name one")
        if not folder.parent.is_dir():
            raise AuditLogError(f"{folder}: the folder {folder.parent} does not exist")
        return folder

    def export_photos(self, folder: str | os.PathLike) -> Path:
        """Every record's photo as a file in ``folder`` (``000001.jpg``, ...) beside
        ``photos.csv``: ``photo,product_id`` first, the columns `auditlens calibrate
        --photos` and `auditlens enroll --references` read, then the record's verdict, score
        and id. Photos of field audits are what a threshold for the products actually
        audited is calibrated on, once someone has checked each label (drop the rows
        whose photo does not show its product).

        The whole hash chain, photos included, is checked first, as for the JSON export
        (a label or photo edited by hand must not reach calibrate or enroll). ``folder`` must not exist yet: it is filled in a
        hidden sibling, flushed to disk and renamed into place, so it holds the whole
        export or nothing. A photo whose bytes are neither JPEG nor PNG (one that could not be
        decoded when it was logged, stored as it came) gets a ``.bin`` file, which `calibrate`
        skips as unreadable and `enroll` refuses: drop its row."""
        import shutil
        import tempfile

        folder = self.check_photo_folder(folder)
        self.verify_chain()
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            with (staging / "photos.csv").open("w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f, lineterminator="\n")
                writer.writerow(PHOTO_CSV_COLUMNS)
                for r in self.iter_records():
                    photo = self.photo(r.id)
                    name = f"{r.id:06d}.{PHOTO_SUFFIX.get(sniffed_mime(photo), 'bin')}"
                    _write_synced(staging / name, photo)
                    writer.writerow([name, r.product_id, r.decision, f"{r.score:.6f}",
                                     f"{r.threshold:.6f}", r.id, r.created_utc, spreadsheet_text(r.auditor),
                                     r.photo_sha256])
                f.flush()
                os.fsync(f.fileno())
            for item in (staging, *staging.iterdir()):
                os.chmod(item, 0o755 if item.is_dir() else 0o644)
            fsync_dir(staging)
            os.replace(staging, folder)
            fsync_dir(folder.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return folder


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _split_sql(script: str) -> list[str]:
    """Split the schema into statements (triggers contain ``;`` inside BEGIN..END)."""
    statements, current = [], []
    for line in script.strip().splitlines():
        current.append(line)
        text = "\n".join(current).strip()
        if text.endswith(";") and (not text.upper().startswith("CREATE TRIGGER")
                                   or text.upper().endswith("END;")):
            statements.append(text)
            current = []
    return statements


def _write_atomically(path: Path, write, newline: str | None = None) -> Path:
    with atomic_write(path, newline=newline) as f:  # 0644, like every other output
        write(f)
    return path
