"""``auditlens verify-log``: check an audit log or an upload of one, and export it.

The command-line front end of :mod:`auditlens.device_app.auditlog`: it reads the log
read-only (or a JSON export of it), prints what :meth:`AuditLog.verify_chain` or
:func:`verify_export` found, and writes the CSV, JSON and photo exports. A broken chain
exits with :data:`EXIT_CHAIN_BROKEN`, an intact one with warnings under ``--strict`` with
:data:`EXIT_WARNINGS`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from auditlens.device_app.auditchain import (
    GENESIS_HASH,
    MAX_RECORD_ID,
    ChainReport,
    id_range,
    is_export,
    log_file_kind,
    verify_export,
)
from auditlens.device_app.auditlog import AuditLog
from auditlens.errors import AuditChainError, AuditlensError, AuditLogError


def add_arguments(p) -> None:
    p.add_argument("log", type=Path, metavar="AUDIT.db",
                   help="the audit log to check, or a JSON export of one (--export-json), "
                        "checked the same way; the --export-* options need the log itself")
    p.add_argument("--export-csv", type=Path, metavar="F", help="also write the records as CSV")
    p.add_argument("--export-json", type=Path, metavar="F",
                   help="also write the records and verdicts as JSON (with the chain's head hash)")
    p.add_argument("--photos", action="store_true", help="include the photos (base64) in --export-json")
    p.add_argument("--export-photos", type=Path, metavar="DIR",
                   help="also write every photo as a file in a new folder DIR, with photos.csv "
                        "(photo,product_id,decision,score,...): once checked by hand, the labelled "
                        "photos that `auditlens calibrate` and `enroll --references` take")
    p.add_argument("--expect-head", action="append", default=[], type=_anchor, metavar="ID:HASH",
                   help="a head this log reported earlier (printed as 'head', kept when the log "
                        "was uploaded): the record ID must still carry HASH, which catches records "
                        "removed or rewritten and re-hashed since then; may be repeated")
    p.add_argument("--device-key", action="append", default=[], type=Path, metavar="PUB",
                   help="public key of a device that writes this log (device.pub of `auditlens keygen "
                        "--device`); may be repeated: every record must be signed by one of these "
                        "keys (needs the [sign] extra)")
    p.add_argument("--log-key", type=Path, default=None, metavar="KEY",
                   help="with --export-json: sign the export's header (its head, its warnings) "
                        "with this device key (device.key), as the app does, so that records cut "
                        "from its end are caught (needs the [sign] extra)")
    p.add_argument("--signed-from", type=_record_id, default=1, metavar="ID",
                   help="with --device-key: the device got its key when it had written records "
                        "1..ID-1, so those may be unsigned (they are reported; default 1: every "
                        "record must be signed)")
    p.add_argument("--json", action="store_true",
                   help='print the report as JSON, with "ok"; on a failure {"ok": false, "error", '
                        '"record_id"} (exit status 4 for a broken chain, 2 for any other error)')
    p.add_argument("--strict", action="store_true",
                   help=f"exit {EXIT_WARNINGS} when the chain verifies but with warnings (the "
                        "append-only guards removed by hand, times that go backwards), for "
                        "scripts that must not pass such a log unread")


EXIT_CHAIN_BROKEN = 4
"""`auditlens verify-log`'s exit status when the log reads but its chain is broken (a record
edited, removed or reordered, or a kept head no longer matched); 2 is any other error (no
such file, not an audit log, a bad argument), 0 an intact chain."""

EXIT_WARNINGS = 5
"""`auditlens verify-log --strict`'s exit status for an intact chain that came with warnings."""


JUDGED_WITH_SHOWN = 12
"""Runs of model, bundle and threshold ``verify-log`` lists (the newest; ``--json``: all)."""


def _print_judged_with(runs: Sequence[dict]) -> None:
    """Which model, bundle and threshold judged which records."""
    if len(runs) > JUDGED_WITH_SHOWN:
        print(f"  ... {len(runs) - JUDGED_WITH_SHOWN} earlier changes of model, bundle or "
              "threshold (--json lists them all)")
    shown = runs[-JUDGED_WITH_SHOWN:]
    digits = _distinguishing_digits([run["threshold"] for run in shown])
    for run in shown:
        ids = id_range(run["first_id"], run["last_id"])
        print(f"  {ids} judged with model {run['model_id'] or '(none)'}, bundle "
              f"{run['bundle_id'] or '(not named)'}, threshold {run['threshold']:.{digits}f}")


def _print_signed_by(report: ChainReport) -> None:
    """Which device key signed which records (nothing for a log no key ever signed)."""
    runs = report.signed_by
    if not any(run["key"] for run in runs):
        return
    if len(runs) > JUDGED_WITH_SHOWN:
        print(f"  ... {len(runs) - JUDGED_WITH_SHOWN} earlier changes of signing key (--json lists them all)")
    for run in runs[-JUDGED_WITH_SHOWN:]:
        ids = id_range(run["first_id"], run["last_id"])
        if not run["key"]:
            print(f"  {ids} not signed")
        elif report.device_keys_checked:
            print(f"  {ids} signed by device key {run['key']} (one of --device-key)")
        else:
            print(f"  {ids} signed by key {run['key']} (not checked against a device's key: "
                  "pass --device-key)")


def _distinguishing_digits(values: Sequence[float]) -> int:
    """Decimals to print ``values`` with: 4, or as many more as it takes for different
    values not to print alike (0.62 as float32 and as float64)."""
    distinct = set(values)
    for digits in range(4, 18):
        if len({f"{v:.{digits}f}" for v in distinct}) == len(distinct):
            return digits
    return 17


def _record_id(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a record id, 1 or more")
    return int(text)


def _anchor(text: str) -> tuple[int, str]:
    rid, _, digest = text.strip().partition(":")  # 0:GENESIS is an empty log's head
    if not (rid.isdigit() and re.fullmatch(r"[0-9a-fA-F]{64}", digest)) or (
            int(rid) == 0 and digest != GENESIS_HASH):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ID:HASH, a record id and its 64-hex-digit record hash "
            "(the 'head' line of an earlier verify-log)")
    if int(rid) > MAX_RECORD_ID:
        raise argparse.ArgumentTypeError(f"{text!r}: record id {rid} is larger than any log's "
                                         f"(at most {MAX_RECORD_ID})")
    return int(rid), digest.lower()


def run(args) -> int:
    """Check the log (and export it); a broken chain exits with :data:`EXIT_CHAIN_BROKEN`, so a
    script tells tampering from a log it could not read."""
    try:
        return _check_and_export(args)
    except (AuditlensError, OSError) as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": str(exc), "record_id": getattr(exc, "record_id", None)},
                             indent=2))
            args.json_printed = True  # the command line's handler prints no second object
        if not isinstance(exc, AuditChainError):
            raise  # one line on stderr and exit 2, as every command
        print(f"auditlens: error: {exc}", file=sys.stderr)
        return EXIT_CHAIN_BROKEN


def _check_and_export(args) -> int:
    if args.signed_from != 1 and not args.device_key:
        raise AuditLogError("--signed-from says from which record on the device keys must have "
                            "signed; give them with --device-key PUB")
    for given, what in ((args.photos, "--photos adds the photos to"),
                        (args.log_key is not None, "--log-key signs the header of")):
        if given and not args.export_json:
            raise AuditLogError(f"{what} --export-json; give --export-json F")
    if is_export(args.log):
        if args.export_csv or args.export_json or args.export_photos:
            raise AuditLogError(f"{args.log} is a JSON export: exports are made from the log "
                                "itself (the .db file)")
        report = verify_export(args.log, anchors=args.expect_head, device_keys=args.device_key,
                               signed_from=args.signed_from)
        _print_report(args, report)
        return _exit_status(args, report)
    if args.log.suffix.lower() == ".csv" and args.log.is_file() and log_file_kind(args.log) != "sqlite":
        raise AuditLogError(f"{args.log} looks like a CSV export, which carries no hashes or signatures "
                            "and cannot be checked: check the log itself (the .db file) or a JSON "
                            "export of it (--export-json)")
    with AuditLog(args.log, create=False, signing_key=args.log_key) as log:
        for target, suffix in ((args.export_csv, ".csv"), (args.export_json, ".json")):
            if target:  # before anything is written
                log.check_export_path(target, suffix)
        if args.export_photos:
            log.check_photo_folder(args.export_photos)
        _check_exports_apart(args)
        # AuditChainError -> exit 4, record named
        report = log.verify_chain(anchors=args.expect_head, device_keys=args.device_key,
                                  signed_from=args.signed_from)
        if args.export_csv:
            log.export_csv(args.export_csv)
        if args.export_json:
            log.export_json(args.export_json, photos=args.photos)
        if args.export_photos:
            log.export_photos(args.export_photos)
    _print_report(args, report)
    if not args.json:
        for what, p in (("CSV", args.export_csv), ("JSON", args.export_json),
                        ("photos and photos.csv", args.export_photos)):
            if p:
                print(f"  exported {what} to {p}")
    return _exit_status(args, report)


def _check_exports_apart(args) -> None:
    """Refuse exports that would land on each other: the CSV and the JSON as one file (the
    second would replace the first), or either inside the photo export's new folder."""
    files = [(flag, Path(os.path.realpath(p))) for flag, p in (("--export-csv", args.export_csv),
                                                             ("--export-json", args.export_json)) if p]
    if len(files) == 2 and files[0][1] == files[1][1]:
        raise AuditLogError(f"--export-csv and --export-json both name {args.export_csv}; give each its own file")
    if args.export_photos:
        folder = Path(os.path.realpath(args.export_photos))
        for flag, path in files:
            if path.is_relative_to(folder):
                raise AuditLogError(f"{flag} {path} lies inside --export-photos {args.export_photos}, which "
                                    "must be a new folder; write it elsewhere")


def _exit_status(args, report: ChainReport) -> int:
    return EXIT_WARNINGS if args.strict and report.warnings else 0


def _print_report(args, report: ChainReport) -> None:
    if args.json:
        print(json.dumps({"ok": True, **report.to_dict(), "notes": list(report.notes)}, indent=2))
    else:
        print(f"{report.path}: OK, {report.records} records, hash chain intact")
        print(f"  log id     {report.log_id}")
        print(f"  head       {report.head}")
        for rid, _ in args.expect_head:
            print(f"  record {rid} still carries the hash kept for it")
        if report.records:
            print(f"  from {report.first_created_utc} to {report.last_created_utc}")
        if not report.photos_checked:
            print("  photos     not in this export (made without --photos): the records' photo "
                  "hashes were checked against no photo")
        if report.head_signed_by:
            checked = (" (one of --device-key)" if report.device_keys_checked
                       else " (not checked against a device's key: pass --device-key)")
            print(f"  exported   {report.exported_utc}; its head and warnings signed by device key "
                  f"{report.head_signed_by}{checked}")
        _print_signed_by(report)
        _print_judged_with(report.judged_with)
        for n in report.notes:
            print(f"  note: {n}")
        for w in report.warnings:
            print(f"  warning: {w}")
