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
the key's signature of its header (:func:`export_signed_message`: the log's id, its head,
the guards' state and warnings, whether photos are in it, and when it was made), so that
the device vouches for where the upload ends: records removed from its end, or warnings
left out, no longer pass :func:`verify_export`.

Every append checkpoints the WAL into the ``.db`` file, so a copy of that file alone
normally holds every committed record (not when another connection was reading at that
moment, or the app was killed between commit and checkpoint: copy the ``-wal`` beside it).

This module is part of the engine: numpy/Pillow/stdlib only, no TensorFlow, no Kivy.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from auditlens.errors import AuditChainError, AuditlensError, AuditLogError, AuditRecordError
from auditlens.files import atomic_write, fsync_dir

LOG_FORMAT = "auditlens-audit-log"
LOG_VERSION = 1
GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first record."""
MAX_PHOTO_SIDE = 1600
"""Photos larger than this (either side, pixels) are stored as a JPEG downscaled to it."""
PHOTO_JPEG_QUALITY = 90

HASHED_FIELDS = (
    "id", "created_utc", "auditor", "device", "product_id", "decision", "score",
    "threshold", "model_id", "photo_sha256", "captured_sha256", "verdict_json", "prev_hash",
)
"""The fields a record's hash covers, in this order (the photo through its sha256)."""

_VERDICT_COLUMNS = ("product_id", "decision", "score", "threshold", "model_id")
"""Record columns that repeat a field of the record's verdict."""

CSV_COLUMNS = (
    "id", "created_utc", "auditor", "device", "product_id", "decision", "score", "threshold",
    "model_id", "photo_sha256", "captured_sha256", "reasons", "prev_hash", "record_hash",
    "signed_by",
)
_CSV_ONLY = ("reasons", "signed_by")
"""CSV columns made for people from other fields (the reasons joined, the signer's fingerprint)."""

PHOTO_CSV_COLUMNS = (
    "photo", "product_id", "decision", "score", "threshold", "record_id", "created_utc",
    "auditor", "photo_sha256",
)
"""Columns of ``photos.csv`` written by :meth:`AuditLog.export_photos`."""
_PHOTO_SUFFIX = {"image/jpeg": "jpg", "image/png": "png"}


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

_TRIGGERS = ("records_append_only_update", "records_append_only_delete", "records_extend_chain")
_SIGNATURE_TRIGGERS = ("signatures_append_only_update", "signatures_append_only_delete",
                       "signatures_of_the_newest")
"""Guards of the signatures table (which logs written before it existed get on their next
append, so their absence there is no sign of tampering)."""

_LIST_COLUMNS = ("id", "created_utc", "auditor", "device", "product_id", "decision", "score",
                 "threshold", "model_id", "photo_sha256", "captured_sha256", "verdict_json",
                 "prev_hash", "record_hash", "photo_mime")


@dataclass(frozen=True)
class AuditRecord:
    """One verification as the log keeps it (the photo itself: :meth:`AuditLog.photo`)."""

    id: int
    created_utc: str
    auditor: str
    device: str
    product_id: str
    decision: str
    score: float
    threshold: float
    model_id: str
    photo_sha256: str
    """sha256 of the photo bytes stored in the log."""
    captured_sha256: str
    """sha256 of the photo bytes as captured (differs from ``photo_sha256`` only when the
    capture was larger than :data:`MAX_PHOTO_SIDE` and was downscaled for storage)."""
    verdict_json: str
    prev_hash: str
    record_hash: str
    photo_mime: str = "image/jpeg"
    signer: str = ""
    """The public key (64 hex digits) of the device key that signed the record; "" unsigned."""
    signature: str = ""
    """Ed25519 signature (128 hex digits) of :func:`signed_message` of the log's id and the
    record's hash."""

    @property
    def verdict(self) -> dict:
        return json.loads(self.verdict_json)

    @property
    def reasons(self) -> list[str]:
        try:
            return list(self.verdict.get("reasons", []))
        except (ValueError, AttributeError):
            return []

    def hashed_fields(self) -> dict:
        return {name: getattr(self, name) for name in HASHED_FIELDS}

    def to_dict(self, *, verdict: bool = True) -> dict:
        d = {name: getattr(self, name) for name in CSV_COLUMNS if name not in _CSV_ONLY}
        d["photo_mime"] = self.photo_mime
        if self.signer or self.signature:
            d["signer"], d["signature"] = self.signer, self.signature
        if verdict:
            d["verdict"] = self.verdict
        return d


@dataclass(frozen=True)
class ChainReport:
    """What :meth:`AuditLog.verify_chain` checked."""

    path: str
    records: int
    head_hash: str
    """``record_hash`` of the newest record (the genesis hash for an empty log): keep it
    when the log is uploaded, to show later that no newest record was removed."""
    log_id: str
    triggers_intact: bool
    """False when the append-only triggers were removed (someone opened the file by hand)."""
    first_created_utc: str = ""
    last_created_utc: str = ""
    warnings: tuple[str, ...] = field(default_factory=tuple)
    signed_by: tuple[dict, ...] = field(default_factory=tuple, compare=False)
    """Runs of consecutive records signed by the same device key, oldest first:
    ``{"first_id", "last_id", "key"}`` (the key's fingerprint; "" for unsigned records)."""
    device_keys_checked: bool = False
    """The check was given the device keys (every record from the first signed one on was
    signed by one of them); False: signatures were only checked against the key they name."""
    judged_with: tuple[dict, ...] = field(default_factory=tuple, compare=False)
    """Runs of consecutive records judged with the same model, bundle and threshold, oldest
    first: ``{"first_id", "last_id", "model_id", "bundle_id", "threshold"}`` (the
    bundle id is "" for verdicts that do not name one); over the records this check read
    (a check ``since`` an earlier head reads only the newer ones)."""
    head_signed_by: str = ""
    """A JSON export whose header a device key signed: that key's fingerprint (its head,
    warnings and guards' state are then the device's word); "" otherwise."""
    exported_utc: str = ""
    """When the device made that signed export ("" for an unsigned one, or a log)."""
    photos_checked: bool = True
    """False for a JSON export made without its photos: the records' photo hashes were
    checked against nothing (not a warning: the hashes still bind each record's photo)."""

    @property
    def head(self) -> str:
        """``ID:HASH`` of the newest record, as ``verify-log --expect-head`` takes it."""
        return f"{self.records}:{self.head_hash}"

    def to_dict(self) -> dict:
        return {
            "path": self.path, "records": self.records, "head_hash": self.head_hash,
            "head": self.head,
            "log_id": self.log_id, "triggers_intact": self.triggers_intact,
            "first_created_utc": self.first_created_utc,
            "last_created_utc": self.last_created_utc, "warnings": list(self.warnings),
            "signed_by": [dict(run) for run in self.signed_by],
            "device_keys_checked": self.device_keys_checked,
            "judged_with": [dict(run) for run in self.judged_with],
            "head_signed_by": self.head_signed_by, "exported_utc": self.exported_utc,
            "photos_checked": self.photos_checked,
        }


def canonical_bytes(fields: dict) -> bytes:
    """The exact bytes a record's hash is computed over: JSON of :data:`HASHED_FIELDS`
    with sorted keys, no spaces, UTF-8 (floats in Python's shortest round-trip form)."""
    missing = [k for k in HASHED_FIELDS if k not in fields]
    if missing:
        raise AuditLogError(f"a record lacks the fields {missing}")
    body = {k: fields[k] for k in HASHED_FIELDS}
    body["id"] = int(body["id"])
    body["score"] = float(body["score"])
    body["threshold"] = float(body["threshold"])
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def record_hash(fields: dict) -> str:
    return hashlib.sha256(canonical_bytes(fields)).hexdigest()


def signed_message(log_id: str, record_hash_hex: str) -> bytes:
    """The bytes a device key signs for a record: the log's id (a record cannot pass for
    one of another log) and the record's hash, which covers every field and, through
    ``prev_hash``, every record before it."""
    return f"{LOG_FORMAT} {log_id} record {record_hash_hex}".encode("utf-8", "surrogateescape")


def export_signed_message(header: dict, *, photos: bool, exported_utc: str) -> bytes:
    """The bytes a device key signs for a JSON export: what its header says about the log
    (its id, its head, whether the append-only guards were intact, its warnings), whether
    the export carries the photos, and when it was made, as canonical JSON."""
    body = {"log_id": header.get("log_id"), "head": header.get("head"),
            "triggers_intact": header.get("triggers_intact"), "warnings": header.get("warnings"),
            "photos": photos, "exported_utc": exported_utc}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))  # ASCII: any text encodes
    return f"{LOG_FORMAT} export {text}".encode("ascii")


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
            "bytes that were verified")


def _sniffed_mime(data: bytes) -> str:
    """The image type the stored bytes themselves declare (JPEG, PNG, else unknown)."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    return "application/octet-stream"


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


_SURROGATES = re.compile("[\ud800-\udfff]")


def _text(value) -> str:
    """``value`` as text SQLite and the hash can take: characters UTF-8 cannot encode
    (bytes Python decoded with ``surrogateescape``, such as a Latin-1 ``$USER``) become
    U+FFFD, so the record is kept rather than lost."""
    return _SURROGATES.sub("\ufffd", str(value))


def _verdict_json(verdict_d: dict) -> str:
    return _text(json.dumps(verdict_d, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            default=str))


def _verdict_dict(verdict) -> dict:
    """The verdict as the log stores it: a dict whose fields that a record repeats as
    columns (:data:`_VERDICT_COLUMNS`) hold what the columns hold (text, floats), so that
    a record and its verdict always agree (a float16 score, an id that is not text)."""
    if isinstance(verdict, dict):
        d = dict(verdict)
    elif hasattr(verdict, "to_dict"):
        d = verdict.to_dict()
    else:
        raise AuditRecordError(f"cannot log a {type(verdict).__name__}: expected a Verdict")
    try:
        for name in _VERDICT_COLUMNS:
            if name in ("score", "threshold"):
                d[name] = float(d[name])
            elif name in d or name != "model_id":  # a verdict may name no model
                d[name] = _text(d[name])
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
                raise _chain_error(f"{self.path}: the log's header (the meta table) was removed; "
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
            raise _chain_error(f"{self.path}: the records table was removed (all records lost); "
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
            return ", ".join(_LIST_COLUMNS) + ", '', ''"
        return ", ".join(_LIST_COLUMNS) + "".join(
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
        contradiction = _contradiction(decision, score, threshold)
        if contradiction:
            raise AuditRecordError(f"cannot log {contradiction}: the record would contradict itself")
        _check_judged_photo(photo, str(verdict_d.get("photo_sha256") or ""))
        stored, mime = prepare_photo(photo)
        verdict_json = _verdict_json(verdict_d)
        fields = {
            "created_utc": "", "auditor": _text(auditor or ""),  # the time: inside the transaction
            "device": _text(self.device if device is None else device),
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
        """Raise :class:`AuditLogError` when an unsigned record (``signed`` False; default:
        unsigned when the log was opened without a key) cannot follow this log's newest
        record, which is signed: it would read as written outside auditlens to every check
        given the device's key (the app checks this on start)."""
        signer = "" if (self._signer is not None if signed is None else signed) else self.head_signer
        if signer:
            raise AuditLogError(
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
                (hashlib.sha256(bytes(photo)).hexdigest(), _verdict_json(_verdict_dict(verdict)))).fetchone()
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

    def record(self, record_id: int) -> AuditRecord:
        with self._open_db() as db:
            row = db.execute(f"SELECT {self._columns()} FROM records WHERE id = ?",
                             (int(record_id),)).fetchone()
        if row is None:
            raise AuditLogError(f"{self.path}: no record {record_id}")
        return AuditRecord(*row)

    def photo(self, record_id: int) -> bytes:
        """The stored photo of a record."""
        with self._open_db() as db:
            row = db.execute("SELECT photo FROM records WHERE id = ?", (int(record_id),)).fetchone()
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
        kept = _kept_hashes(anchors)
        trusted = _device_keys(device_keys)
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
                                       (start_id,)).fetchone()
                if row is None or row[0] != start_hash:
                    raise _chain_error(f"{self.path}: record {start_id}: it is gone or no longer "
                                       "carries the hash it had when last checked; the log was "
                                       "edited outside auditlens", start_id)
                last = row[1]
                first_row = self._db.execute("SELECT created_utc FROM records WHERE id = 1").fetchone()
                if first_row is None:  # the records checked before are no longer all there
                    raise _chain_error(f"{self.path}: record 1 removed; the log was edited outside "
                                       "auditlens", 1)
                first = first_row[0]
            def stored_hash(rid: int) -> str | None:
                row = self._db.execute("SELECT record_hash FROM records WHERE id = ?", (rid,)).fetchone()
                return None if row is None else row[0]

            _check_kept_heads(str(self.path), kept, stored_hash)
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
            walk = _ChainWalk(str(self.path), start_id, start_hash, first, last, log_id=self.log_id,
                              device_keys=trusted, signed_from=signed_from, first_signed=signed_before)
            for row in cursor:
                walk.add(AuditRecord(*row[:-1]), row[-1])
            total, lowest = self._db.execute(  # the rows the walk could see (appends go past it)
                "SELECT COUNT(*), MIN(id) FROM records WHERE id <= ?", (walk.count,)).fetchone()
            if total != walk.count:  # a row outside the chain (id 0 or below) the walk never read
                raise _chain_error(f"{self.path}: record {lowest}: it is outside the chain "
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
        fingerprint of the key that signed it, if one did). The whole chain is checked
        first, as for the other exports."""
        from auditlens.device_app.signing import fingerprint_hex

        path = self.check_export_path(path, ".csv")
        self.verify_chain()

        def write(f):
            writer = csv.writer(f)
            writer.writerow(CSV_COLUMNS)
            for r in self.iter_records():
                row = r.to_dict(verdict=False)
                row["reasons"] = " | ".join(r.reasons)
                row["signed_by"] = fingerprint_hex(r.signer) if r.signer else ""
                row["score"] = f"{r.score:.6f}"
                row["threshold"] = f"{r.threshold:.6f}"
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
            f.write(f'{{"format": {json.dumps(LOG_FORMAT)}, "version": {LOG_VERSION}, '
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
                writer = csv.writer(f)
                writer.writerow(PHOTO_CSV_COLUMNS)
                for r in self.iter_records():
                    photo = self.photo(r.id)
                    name = f"{r.id:06d}.{_PHOTO_SUFFIX.get(_sniffed_mime(photo), 'bin')}"
                    _write_synced(staging / name, photo)
                    writer.writerow([name, r.product_id, r.decision, f"{r.score:.6f}",
                                     f"{r.threshold:.6f}", r.id, r.created_utc, r.auditor,
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


def verify_export(path: str | os.PathLike, *, anchors: Sequence[tuple[int, str]] = (),
                  device_keys: Sequence[bytes | str | os.PathLike] = (),
                  signed_from: int = 1) -> ChainReport:
    """Check a JSON export (``verify-log --export-json``) as :meth:`AuditLog.verify_chain`
    checks a log: the chain of its records, each record's hash and signature, its photo
    when the export carries photos (``--photos``), and the head its header names;
    ``anchors``, ``device_keys`` and ``signed_from`` as for :meth:`~AuditLog.verify_chain`.
    An auditor given an upload checks it without the device's database. The whole file is
    read into memory.

    The header's ``warnings`` (the append-only guards found removed on the device) and
    ``triggers_intact`` are the device's word: repeated, not checked. An export made with
    the device's key carries its signature of them and of the head (``attestation``), which
    must then verify, with one of ``device_keys`` when they are given: records removed from
    its end, or warnings left out, are refused (:class:`AuditChainError`). An export
    without one gets a warning when its records are signed or ``device_keys`` are given:
    its end, and its warnings, could have been cut unnoticed (check the ``.db``, or against
    a kept head). The header's summary of the records (count, head hash, times, signers,
    settings) must be what the records give, and a JSON key written twice is refused."""
    import base64

    path = Path(path)
    try:
        data = json.loads(path.read_bytes(), object_pairs_hook=_refuse_repeated_keys)
    except OSError as exc:
        raise AuditLogError(f"{path}: cannot read it: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise AuditLogError(f"{path}: not an audit log export (not valid JSON: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != LOG_FORMAT:
        raise AuditLogError(f"{path}: not an auditlens audit log export")
    if type(data.get("version")) is not int or data["version"] != LOG_VERSION:  # not true
        raise AuditLogError(f"{path}: audit log export version {data.get('version')}, this "
                            f"auditlens reads version {LOG_VERSION}")
    header, records = data.get("log"), data.get("records")
    if not isinstance(header, dict) or not isinstance(records, list):
        raise AuditLogError(f"{path}: not an auditlens audit log export (no log header or records)")
    wrong = _malformed_header(header, data)
    if wrong:
        raise _chain_error(f"{path}: the export's header is not well formed ({wrong}); auditlens "
                           "never writes such an export, so it was edited", None)
    kept = _kept_hashes(anchors)
    walk = _ChainWalk(str(path), log_id=_text(header.get("log_id", "")),
                      device_keys=_device_keys(device_keys), signed_from=signed_from)
    hashes: dict[int, str] = {}
    # an export made with --photos carries every record's photo: each one is checked (an
    # export from before the "photos" flag says so by its first record)
    with_photos = data.get("photos", bool(records) and isinstance(records[0], dict)
                           and "photo_base64" in records[0])
    for n, d in enumerate(records, 1):
        try:
            verdict_json = d["verdict_json"] if "verdict_json" in d else _verdict_json(d["verdict"])
            record = AuditRecord(**{k: d[k] for k in _LIST_COLUMNS if k != "verdict_json"},
                                 verdict_json=verdict_json, signer=d.get("signer", ""),
                                 signature=d.get("signature", ""))
            if ("photo_base64" in d) != with_photos:
                raise ValueError("its photo is " + ("missing from an export made with its photos"
                                                    if with_photos else "in an export made without them"))
            photo = base64.b64decode(d["photo_base64"], validate=True) if with_photos else None
        except (KeyError, TypeError, ValueError) as exc:
            raise _chain_error(f"{path}: record {n} of the export is incomplete or unreadable "
                               f"({exc}); the export was edited", n) from exc
        walk.add(record, photo, photo_kept=with_photos)
        # what a reader of the export sees is the verdict object: it must be the hashed text's
        if "verdict" in d and _verdict_json(d["verdict"]) != _verdict_json(record.verdict):
            raise _chain_error(f"{path}: record {n}: its verdict is not the verdict its hash "
                               "covers; the export was edited", n)
        if record.id in kept:
            hashes[record.id] = record.record_hash
    claimed = header.get("head")
    if claimed != f"{walk.count}:{walk.head_hash}":
        raise _chain_error(f"{path}: the export's header names the head {claimed}, but its "
                           f"records end at {walk.count}:{walk.head_hash}; records were removed "
                           "from or added to the export", walk.count)
    report = walk.report(str(header.get("log_id", "")), bool(header.get("triggers_intact", True)),
                         tuple(str(w) for w in header.get("warnings") or ()))
    _check_header_agrees(str(path), header, report)
    _check_kept_heads(str(path), kept, hashes.get)
    signed_by, when, more = _check_attestation(str(path), data.get("attestation"), header,
                                               with_photos, walk)
    return dataclasses.replace(report, warnings=tuple(dict.fromkeys(report.warnings + more)),
                               head_signed_by=signed_by, exported_utc=when,
                               photos_checked=with_photos or not records)


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique: a reader that keeps the first of two "records"
    must not see another export than the one checked, which keeps the last."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {twice!r} appears twice in one object")
    return out


def _malformed_header(header: dict, data: dict) -> str:
    """What is wrong with the types of an export's header ("" when nothing is)."""
    for name in ("log_id", "head", "head_hash", "first_created_utc", "last_created_utc"):
        if name in header and not isinstance(header[name], str):
            return f"its {name} is {type(header[name]).__name__}, not text"
    warnings = header.get("warnings", [])
    if not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
        return "its warnings are not a list of text"
    for name, where in (("triggers_intact", header), ("photos", data)):
        if name in where and not isinstance(where[name], bool):
            return f"its {name} is {type(where[name]).__name__}, not true or false"
    if "records" in header and type(header["records"]) is not int:
        return f"its records is {type(header['records']).__name__}, not a whole number"
    return ""


def _check_header_agrees(where: str, header: dict, found: ChainReport) -> None:
    """The header's summary of the records (their count, head hash, times, signers and
    settings) is what the records themselves give (``found``): a reader of the header
    alone must not be told another story than the one checked."""
    for name, value in (("records", found.records), ("head_hash", found.head_hash),
                        ("first_created_utc", found.first_created_utc),
                        ("last_created_utc", found.last_created_utc),
                        ("signed_by", [dict(run) for run in found.signed_by]),
                        ("judged_with", [dict(run) for run in found.judged_with])):
        if name in header and header[name] != value:
            raise _chain_error(f"{where}: the export's header gives its {name} as "
                               f"{json.dumps(header[name])[:120]}, but its records give "
                               f"{json.dumps(value)[:120]}; the header was edited", found.records)


def _well_formed_signature(signer, signature) -> bool:
    """A device key (64 hex digits) and an Ed25519 signature (128), as auditlens writes them."""
    return (isinstance(signer, str) and isinstance(signature, str)
            and bool(re.fullmatch(r"[0-9a-f]{64}", signer) and re.fullmatch(r"[0-9a-f]{128}", signature)))


def _check_attestation(where: str, attestation, header: dict, photos: bool,
                       walk: _ChainWalk) -> tuple[str, str, tuple[str, ...]]:
    """The fingerprint of the key that signed an export's header, when it was made, and
    the warnings about it; :class:`AuditChainError` for a signature that does not hold, or
    (with device keys) one no device key made."""
    from auditlens.device_app.signing import fingerprint_hex

    if attestation is None:
        if walk.first_signed is None and walk.device_keys is None:
            return "", "", ()
        return "", "", ("the export's header is not signed (it was exported without the device's "
                        "key): records removed from its end, or warnings left out of it, would "
                        "go unnoticed; check its head against one kept earlier (--expect-head), "
                        "or export on the device",)
    fail = walk.count  # the chain reads; what is wrong is the end the header names
    try:
        signer, signature, when = (attestation[k] for k in ("signer", "signature", "exported_utc"))
        if not (isinstance(when, str) and _well_formed_signature(signer, signature)):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise _chain_error(f"{where}: the export's attestation is not well formed; auditlens "
                           "never writes such an export, so it was edited", fail) from None
    key = fingerprint_hex(signer)
    if walk.device_keys is not None and signer not in walk.device_keys:
        raise _chain_error(f"{where}: the export's header is signed by the key {key}, not by the "
                           f"device keys given ({', '.join(walk.device_keys.values())}); it was "
                           "made by another device or outside auditlens", fail)
    holds = walk.holds(export_signed_message(header, photos=photos, exported_utc=when), signature, signer)
    if holds is None:
        return "", "", ("the export's header signature was not checked: the [sign] extra "
                        "(cryptography) is not installed",)
    if not holds:
        raise _chain_error(f"{where}: the export's header does not match the device's signature "
                           f"of it (key {key}): records were removed from or added to its end, "
                           "its warnings were changed, or its photos removed, after the device "
                           "made it, or the signature was taken from another export", fail)
    signers = {run["key"] for run in walk.signed_by}
    warnings = () if walk.device_keys is not None or key in signers else (
        f"the export's header is signed by the key {key}, which signed none of its records "
        "(check with --device-key)",)
    return key, when, warnings


def load_signing_key(key):
    """The device's private key, and its public key as hex (raises :class:`AuditLogError`
    for a key that cannot sign)."""
    from auditlens.device_app.signing import load_private_key, public_hex

    private = _read_key(key, load_private_key, "the device key",
                        "cannot sign the audit log's records with this key")
    return private, public_hex(private.public_key())


def _device_keys(keys: Sequence[bytes | str | os.PathLike]) -> dict[str, str] | None:
    """The devices' public keys a check holds records to, as hex -> fingerprint; None for
    no keys (signatures are then checked against the key they name)."""
    if not keys:
        return None
    from auditlens.device_app.signing import (
        fingerprint_hex,
        load_public_key,
        public_hex,
        require_cryptography,
    )

    require_cryptography()  # a missing [sign] extra is said as such, not as a bad key
    raws = [public_hex(_read_key(key, load_public_key, "the device's public key",
                                 "not a device's public key")) for key in keys]
    return {raw: fingerprint_hex(raw) for raw in raws}


def _read_key(key, loader, what: str, unusable: str):
    """``loader`` of ``key`` (a path's bytes, or the key itself); :class:`AuditLogError`
    naming the file once for a file that cannot be read (``what`` it should hold) or a key
    that is not of this kind (``unusable``)."""
    from auditlens.errors import BundleSignatureError

    is_path = isinstance(key, os.PathLike)
    try:
        return loader(Path(key).read_bytes() if is_path else key)
    except OSError as exc:
        raise AuditLogError(f"{key}: cannot read {what}: {exc.strerror or exc}") from exc
    except BundleSignatureError as exc:
        raise AuditLogError(f"{f'{key}: ' if is_path else ''}{unusable}: {exc}") from exc


def _kept_hashes(anchors: Sequence[tuple[int, str]]) -> dict[int, str]:
    """``(record id, record hash)`` heads kept from earlier checks, as id -> lower-case hash
    (the empty log's head, id 0, holds no record to check)."""
    return {int(rid): str(digest).lower() for rid, digest in anchors if int(rid) > 0}


def _check_kept_heads(where: str, kept: dict[int, str], hash_of: Callable[[int], str | None]) -> None:
    """Each record whose hash was kept (``kept``: id -> hash) must still be there
    (``hash_of`` its id gives its hash, None when it is gone) and carry that hash."""
    for rid in sorted(kept):
        digest = hash_of(rid)
        if digest is None:
            raise _chain_error(f"{where}: record {rid}, whose hash was kept, is gone; the newest "
                               "records were removed", rid)
        if digest != kept[rid]:
            raise _chain_error(f"{where}: record {rid}: its hash is not the one kept for it "
                               f"({kept[rid][:12]}...); records up to it were rewritten and "
                               "re-hashed after that hash was kept", rid)


def is_export(path: Path) -> bool:
    """Whether ``path`` is a JSON export rather than a SQLite log (by its first bytes)."""
    try:
        with open(path, "rb") as f:
            start = f.read(64)
    except OSError:
        return False
    return not start.startswith(b"SQLite format 3") and start.removeprefix(
        b"\xef\xbb\xbf").lstrip()[:1] == b"{"  # a UTF-8 BOM, if an editor added one


def _wrong_types(record: AuditRecord) -> str:
    """What in ``record`` is not of the type its column holds ("" when nothing is): a
    string score would compare as text, an id "3" would pass for 3."""
    for name in (f.name for f in dataclasses.fields(record)):
        value = getattr(record, name)
        want = int if name == "id" else float if name in ("score", "threshold") else str
        if isinstance(value, bool) or not isinstance(value, (int, float) if want is float else want):
            return f"its {name} is {type(value).__name__} {value!r}, not {want.__name__}"
    return ""


class _ChainWalk:
    """The checks each record of a chain must pass, record after record, oldest first:
    its id and ``prev_hash`` follow the record before, its hash covers its fields, its
    photo (when there) matches its sha256, and it agrees with its own verdict. Used on a
    log (:meth:`AuditLog.verify_chain`) and on a JSON export (:func:`verify_export`)."""

    def __init__(self, where: str, start_id: int = 0, start_hash: str = GENESIS_HASH,
                 first_utc: str = "", last_utc: str = "", *, log_id: str = "",
                 device_keys: dict[str, str] | None = None, signed_from: int = 1,
                 first_signed: int | None = None) -> None:
        self.where = where
        self.head_hash, self.count = start_hash, start_id
        self.first_utc, self.last_utc = first_utc, last_utc
        self.backwards: list[str] = []
        self.runs: list[dict] = []
        self.log_id = log_id
        """The log's id, which each signature covers."""
        self.device_keys = device_keys
        """hex -> fingerprint of the keys every record from ``signed_from`` on, and from the
        first signed one on, must be signed by; None: a signature is checked against the key
        it names."""
        self.signed_from = max(1, int(signed_from))
        self.first_signed = first_signed
        """Id of the first signed record so far (before ``start_id`` too)."""
        self.signed_by: list[dict] = []
        self.unsigned_after: list[int] = []
        """Unsigned records after a signed one (without device keys: a warning)."""
        self.unchecked = 0
        """Signatures not checked: the [sign] extra is not installed (no device keys given)."""
        self._keys: dict[str, object] = {}

    def _fail(self, rid: int, why: str) -> AuditChainError:
        return _chain_error(f"{self.where}: record {rid}: {why}", rid)

    def add(self, record: AuditRecord, photo: bytes | None, *, photo_kept: bool = True) -> None:
        """Check ``record`` (and ``photo``, the stored bytes; ``photo_kept=False``: a copy
        without photos, nothing to compare) as the next record of the chain."""
        rid, expected = record.id, self.count + 1
        wrong = _wrong_types(record)
        if wrong:
            raise self._fail(expected, f"{wrong}; auditlens never writes such a record, so it "
                                       "was made or edited outside auditlens")
        if rid != expected:
            missing = f"record {expected}" if rid == expected + 1 else f"records {expected}..{rid - 1}"
            raise self._fail(rid, f"the chain is broken before it ({missing} removed); the log "
                                  "was edited outside auditlens")
        if record.prev_hash != self.head_hash:
            raise self._fail(rid, f"its prev_hash does not match record {rid - 1}; a record was "
                                  "edited, removed or reordered")
        try:
            recomputed = record_hash(record.hashed_fields())
        except (TypeError, ValueError) as exc:
            raise self._fail(rid, f"unreadable fields ({exc})") from exc
        if recomputed != record.record_hash:
            raise self._fail(rid, "its contents do not match its hash; the record was edited "
                                  "after it was written")
        if photo_kept:
            if photo is None or hashlib.sha256(bytes(photo)).hexdigest() != record.photo_sha256:
                raise self._fail(rid, "the stored photo does not match the photo's sha256; the "
                                      "photo was replaced after it was written")
            if record.photo_mime in _PHOTO_SUFFIX and _sniffed_mime(bytes(photo)) != record.photo_mime:
                raise self._fail(rid, f"the photo is stored as {record.photo_mime} but its bytes "
                                      "are not; the record was edited after it was written")
        try:
            verdict = json.loads(record.verdict_json)
        except ValueError:
            verdict = None
        disagreement = _disagreement(record, verdict)
        if disagreement:
            raise self._fail(rid, f"{disagreement}; auditlens never writes such a record, so it "
                                  "was made or edited outside auditlens")
        self._check_signature(record)
        setting = {"model_id": record.model_id, "bundle_id": _text(verdict.get("bundle_id", "")),
                   "threshold": record.threshold}
        if self.runs and self.runs[-1]["last_id"] == rid - 1 and all(
                self.runs[-1][k] == v for k, v in setting.items()):
            self.runs[-1]["last_id"] = rid
        else:
            self.runs.append({"first_id": rid, "last_id": rid, **setting})
        if self.last_utc and record.created_utc < self.last_utc:
            self.backwards.append(f"record {rid} ({record.created_utc}) was written before "
                                  f"record {rid - 1} ({self.last_utc})")
        self.head_hash, self.count = record.record_hash, rid
        self.first_utc = self.first_utc or record.created_utc
        self.last_utc = record.created_utc

    def _check_signature(self, record: AuditRecord) -> None:
        """The record's signature holds for the key it names, that key is one of the
        device keys (when given), and a record from ``signed_from`` on, or after a signed
        one, is signed."""
        from auditlens.device_app.signing import fingerprint_hex

        rid, signer = record.id, record.signer
        if signer or record.signature:
            if not _well_formed_signature(signer, record.signature):
                raise self._fail(rid, "its signature or the key it names is not well formed; "
                                      "auditlens never writes such a record, so it was edited "
                                      "outside auditlens")
            key = fingerprint_hex(signer)
            held_to_keys = self.device_keys is not None and (
                rid >= self.signed_from or self.first_signed is not None)
            if held_to_keys and signer not in self.device_keys:
                given = ", ".join(self.device_keys.values())
                hint = "" if self.first_signed else (
                    f" (no record before it is signed by them either: if {key} is this device's "
                    "key, the wrong public key was given)")
                raise self._fail(rid, f"it is signed by the key {key}, not by the device keys "
                                      f"given ({given}); it was written by another device or "
                                      f"outside auditlens{hint}")
            holds = self._signature_holds(record)
            if holds is False:
                raise self._fail(rid, f"its signature does not verify with the key it names ({key}); "
                                      "the record or its signature was changed after it was written")
            if self.device_keys is None or signer in self.device_keys:
                self.first_signed = self.first_signed or rid
        else:
            key = ""
            if self.device_keys is not None and self.first_signed is not None:
                raise self._fail(rid, f"it is not signed, though record {self.first_signed} "
                                      "before it is: it was written without the device's key, "
                                      "or its signature was removed, outside auditlens")
            if self.device_keys is not None and rid >= self.signed_from:
                raise self._fail(rid, f"it is not signed, and every record from {self.signed_from} "
                                      "on must be signed by the device keys given: it was written "
                                      "without the device's key, or its signature was removed (if "
                                      "your own records say the device got its key at a later "
                                      "record, pass that record's id as --signed-from ID)")
            if self.first_signed is not None:
                self.unsigned_after.append(rid)
        if self.signed_by and self.signed_by[-1]["key"] == key and self.signed_by[-1]["last_id"] == rid - 1:
            self.signed_by[-1]["last_id"] = rid
        else:
            self.signed_by.append({"first_id": rid, "last_id": rid, "key": key})

    def _signature_holds(self, record: AuditRecord) -> bool | None:
        """Whether the record's signature verifies with the key it names (None: not checked)."""
        holds = self.holds(signed_message(self.log_id, record.record_hash), record.signature,
                           record.signer)
        self.unchecked += holds is None
        return holds

    def holds(self, message: bytes, signature_hex: str, signer_hex: str) -> bool | None:
        """Whether ``signature_hex`` of ``message`` verifies with the key ``signer_hex``
        (both well formed); None when it cannot be checked here (no `cryptography`, and no
        device keys were asked for)."""
        from auditlens.device_app.signing import load_public_key, signature_holds

        if signer_hex not in self._keys:
            if self.device_keys is None and importlib.util.find_spec("cryptography") is None:
                return None
            try:
                self._keys[signer_hex] = load_public_key(signer_hex)
            except AuditlensError:  # 64 hex digits that are no point of the curve
                return False
        return signature_holds(message, bytes.fromhex(signature_hex), self._keys[signer_hex])

    def report(self, log_id: str, triggers_intact: bool, warnings: tuple[str, ...]) -> ChainReport:
        unsigned_start = min(self.count + 1, self.first_signed or self.signed_from)
        if self.device_keys is not None and unsigned_start > 1:
            warnings += (f"{id_range(1, unsigned_start - 1)} not held to the device keys, as "
                         f"--signed-from {self.signed_from} allows: written before the device had "
                         "its key, or their signatures were removed or replaced; only the records "
                         "from the first one the device keys signed on are held to them",)
        if self.unsigned_after:
            warnings += (f"{len(self.unsigned_after)} record(s) are not signed though record "
                         f"{self.first_signed} before them is, first: record {self.unsigned_after[0]}; "
                         "the device stopped signing, or they were written outside auditlens "
                         "(check with --device-key)",)
        if self.unchecked:
            warnings += (f"{self.unchecked} record signature(s) were not checked: the [sign] "
                         "extra (cryptography) is not installed",)
        if self.backwards:
            warnings += (
                f"the records' times go backwards {len(self.backwards)} time(s), first: "
                f"{self.backwards[0]}; the device's clock was set back, or records were written "
                "outside auditlens",)
        return ChainReport(self.where, self.count, self.head_hash, log_id, triggers_intact,
                           self.first_utc, self.last_utc, tuple(dict.fromkeys(warnings)),  # an export's
                           tuple(self.signed_by), self.device_keys is not None,  # header may
                           tuple(self.runs))  # already carry what the walk found


def _contradiction(decision: str, score: float, threshold: float) -> str:
    """What is wrong with a verdict whose decision its own score and threshold refute
    ("" when nothing is)."""
    if (decision, score >= threshold) not in (("match", False), ("no_match", True)):
        return ""
    return (f"a {decision!r} verdict whose score {score} is "
            f"{'below' if decision == 'match' else 'at or above'} its threshold {threshold}")


def _disagreement(record: AuditRecord, verdict) -> str:
    """Why a record with this (parsed) verdict, hashed as it is, cannot have been written
    by :meth:`AuditLog.append` ("" when it can): its columns differ from its own verdict,
    or the verdict's decision contradicts its score. A record made outside auditlens and
    hashed to fit the chain would pass the hash checks; this catches one made carelessly."""
    if not isinstance(verdict, dict):
        return "its verdict is not a JSON object"
    for name in _VERDICT_COLUMNS:
        column, value = getattr(record, name), verdict.get(name, "" if name == "model_id" else None)
        try:
            # logs written before append stored the verdict's fields as the columns hold
            # them have a float32 score's short text in the JSON
            same = (math.isclose(float(value), column, rel_tol=1e-6, abs_tol=1e-9)
                    if isinstance(column, float) else _text(value) == column)
        except (TypeError, ValueError):
            same = False
        if not same:
            return f"its {name} ({column!r}) is not its verdict's ({value!r})"
    contradiction = _contradiction(record.decision, record.score, record.threshold)
    return f"it holds {contradiction}" if contradiction else ""


def _chain_error(message: str, record_id: int | None) -> AuditChainError:
    exc = AuditChainError(message)
    exc.record_id = record_id  # type: ignore[attr-defined]
    return exc


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


def id_range(first: int, last: int) -> str:
    """'record 3' or 'records 3-7', as reports name a run of records."""
    return f"record {first}" if first == last else f"records {first}-{last}"
