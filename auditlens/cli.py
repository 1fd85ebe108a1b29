"""The `auditlens` command: a thin layer over the library, one subcommand per task.

Exit status: 0 success (for ``verify``: MATCH), 1 NO MATCH, 3 RETAKE, 2 bad usage or
an input auditlens could not use (the message says which and why), 4 an audit log whose
hash chain is broken (``verify-log``), 5 a log that verifies but with warnings
(``verify-log --strict``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import os
import shlex
import socket
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from auditlens.device_app.signing import read_key_file
from auditlens.errors import AuditlensError, BundleError, UnknownProductError

EXIT_OK, EXIT_NO_MATCH, EXIT_ERROR, EXIT_RETAKE = 0, 1, 2, 3


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (thread counts, list lengths)."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


MAX_THREADS = 256
"""Most interpreter threads accepted: ``device_app.verifier.MAX_THREADS``, written out here
so that parsing a command line imports no numpy (a test keeps the two equal)."""


def thread_count(text: str) -> int:
    """argparse type: interpreter threads, 1 to :data:`MAX_THREADS`."""
    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"at most {MAX_THREADS} threads, not {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (counts that may be zero)."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def cosine_threshold(text: str) -> float:
    """argparse type: a decision threshold, a finite cosine in [-1, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not -1.0 <= value <= 1.0:  # also false for nan
        raise argparse.ArgumentTypeError(f"a cosine threshold lies in [-1, 1], not {text}")
    return value


def _shipped(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("auditlens.models") / name))


def default_bundle() -> Path:
    """The sample reference bundle shipped with auditlens."""
    return _shipped("sample_bundle")


def _add_bundle(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", "-b", type=Path, default=None,
                   help="reference bundle folder or .zip (default: the shipped sample bundle)")
    p.add_argument("--public-key", type=Path, default=None, metavar="KEY",
                   help="publisher's Ed25519 public key file: refuse unsigned or wrongly signed bundles")
    p.add_argument("--threads", type=thread_count, default=1, help="interpreter threads (default: 1)")


def _verifier(args, **overrides):
    from auditlens.device_app.verifier import Verifier, VerifierOptions

    key = read_key_file(args.public_key, "publisher's public key")
    verifier = Verifier(args.bundle or default_bundle(),
                        VerifierOptions(num_threads=args.threads, **overrides), public_key=key)
    signature = verifier.bundle.signature
    if signature == "unchecked":
        print("auditlens: warning: the bundle is signed but its signature was not checked: pass "
              "--public-key KEY to refuse a bundle someone else changed", file=sys.stderr)
    elif signature == "unsigned" and not _is_shipped_sample(verifier.bundle.path):
        print("auditlens: warning: the bundle is not signed: its files match its manifest, but "
              "nothing shows the manifest (threshold, hashes) is the publisher's; sign bundles "
              "(enroll --sign-key) and pass --public-key KEY", file=sys.stderr)
    if verifier.bundle.target_far is None:
        print(f"auditlens: warning: the bundle's threshold {verifier.threshold:.3f} is not "
              "calibrated, so no false-accept rate is known for it: run 'auditlens calibrate "
              "--bundle BUNDLE --photos LABELLED.csv' on labelled photos of its products",
              file=sys.stderr)
    return verifier


def _is_shipped_sample(path: Path) -> bool:
    """Whether ``path`` is the sample bundle shipped with auditlens (unsigned: a demo)."""
    try:
        return Path(path).resolve() == default_bundle().resolve()
    except OSError:
        return False


# -- enroll --------------------------------------------------------------------------
def _add_enroll(p: argparse.ArgumentParser) -> None:
    p.add_argument("catalog", help="folder of originals (file stem = product id), a CSV "
                   "(product_id,image[,name,group,kind,code]) or sqlite:///catalog.db")
    p.add_argument("--out", "-o", type=Path, required=True, help="bundle folder, or a path ending in .zip")
    p.add_argument("--model", "-m", type=Path, default=None,
                   help="TFLite encoder (default: the shipped model)")
    p.add_argument("--references", type=Path, default=None, metavar="LABELLED.csv",
                   help="extra approved photos per product (photo,product_id), enrolled beside the originals "
                   "(a photo scores against its product's best reference; the bundle then needs "
                   "'auditlens calibrate')")
    p.add_argument("--threshold", type=cosine_threshold, default=None,
                   help="decision threshold (default: the model card's calibrated one)")
    p.add_argument("--photo-zooms", type=_zooms, default=None, metavar="ZOOMS",
                   help="views a field photo is embedded as: centred zooms of its crop box, e.g. "
                   "0.7 (its middle 70%%) or 1,0.85 (two views, averaged) "
                   "(default: the model card's; other views need 'auditlens calibrate')")
    p.add_argument("--photo-mirror", action=argparse.BooleanOptionalAction, default=None,
                   help="add the mirror image of each view (default: the model card's)")
    p.add_argument("--photo-shift", type=photo_shift, default=None, metavar="SHARE",
                   help="also embed each zoom's box moved left, right, up and down by this share of "
                   "the crop box's side, e.g. 0.15 with zoom 0.7 (five times the encoder runs; "
                   "0: none; default: the model card's; other views need 'auditlens calibrate')")
    p.add_argument("--sign-key", type=Path, default=None, metavar="publisher.key",
                   help="Ed25519 private key (PEM) to sign the bundle")
    p.add_argument("--drop-signature", action="store_true",
                   help="replace a signed bundle at --out with an unsigned one (devices requiring "
                   "signatures refuse it); without it, replacing one needs --sign-key")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _zooms(text: str) -> tuple[float, ...]:
    from auditlens.device_app.preprocess import PreprocessSpec

    try:
        zooms = tuple(float(z) for z in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"zooms must be numbers separated by commas, not {text!r}") from None
    try:
        return PreprocessSpec(photo_zooms=zooms).photo_zooms
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def photo_shift(text: str) -> float:
    """argparse type: a photo view's shift, 0 to MAX_PHOTO_SHIFT of the crop box."""
    from auditlens.device_app.preprocess import MAX_PHOTO_SHIFT

    try:
        shift = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the shift must be a number, not {text!r}") from None
    if not 0.0 <= shift <= MAX_PHOTO_SHIFT:
        raise argparse.ArgumentTypeError(f"the shift must be within 0..{MAX_PHOTO_SHIFT}, not {shift:g}")
    return shift


def open_catalog_said(source):
    """:func:`~auditlens.catalog.open_catalog`, its notes (columns it did not read) said on
    stderr as warnings."""
    from auditlens.catalog import open_catalog

    catalog = open_catalog(source)
    for note in catalog.notes:
        print(f"auditlens: warning: {note}", file=sys.stderr)
    return catalog


def _run_enroll(args) -> int:
    from auditlens.catalog import read_labelled_photos, unchecked_verdicts
    from auditlens.export.enroll import EnrollOptions, enroll

    catalog = open_catalog_said(args.catalog)
    extras = read_labelled_photos(args.references) if args.references else ()
    unchecked = unchecked_verdicts(extras)
    if unchecked:
        print(f"auditlens: warning: --references {args.references}: {unchecked}", file=sys.stderr)
    out = enroll(catalog, args.out, model=args.model, extra_references=extras,
                 options=EnrollOptions(threshold=args.threshold, progress=not args.no_progress,
                                       photo_zooms=args.photo_zooms, photo_mirror=args.photo_mirror,
                                       photo_shift=args.photo_shift),
                 signing_key=read_key_file(args.sign_key, "publisher's private key"),
                 drop_signature=args.drop_signature,
                 warn=lambda message: print(f"auditlens: warning: {message}", file=sys.stderr))
    print(f"enrolled {len(catalog)} product{'' if len(catalog) == 1 else 's'} ({len(extras)} extra reference "
          f"photo{'' if len(extras) == 1 else 's'}) into {out}")
    return EXIT_OK


# -- verify / identify ---------------------------------------------------------------
def _add_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("photo", type=Path, help="the field photo (JPEG, PNG, WebP, ...)")
    p.add_argument("--product", "-p", required=True, help="product id the photo should show")
    _add_bundle(p)
    p.add_argument("--json", action="store_true",
                   help='print the full verdict as JSON (with --log, "logged": true and its "record_id", or '
                        'false); when the command fails after reading its arguments (exit 2) '
                        '{"ok": false, "error"}')
    p.add_argument("--log", type=Path, default=None, metavar="AUDIT.db",
                   help="append the verdict to this audit log (SQLite)")
    p.add_argument("--auditor", default=None, help="auditor name for the log (default: $USER, else the login name)")
    p.add_argument("--device", default=None,
                   help="device name for the log (default: this machine's host name)")
    p.add_argument("--log-key", type=Path, default=None, metavar="KEY",
                   help="sign the log's record with this device key (device.key of `auditlens "
                        "keygen --device`; needs the [sign] extra), so `verify-log --device-key` "
                        "can tell it was written on this device")


def _format_verdict(v) -> str:
    from auditlens.device_app.verifier import far_share

    line = f"{v.decision.upper().replace('_', ' '):8s} {v.product_id}  score {v.score:.3f} (threshold {v.threshold:.3f}"
    if v.estimated_far is not None and v.decision == "match":  # the risk of the acceptance: a
        # rejected or unjudged photo accepts nothing (its rate is in --json)
        share = far_share(v.estimated_far)
        line += (", above every calibration impostor" if share is None  # not a certainty
                 else f", est. false-accept {share}")
    line += ")"
    extra = [f"  - {r}" for r in v.reasons]
    if v.suggestions:
        heading = "looks more like" if v.outscored else "closest other products (none scores higher)"
        extra.append(f"  {heading}: " + ", ".join(f"{c.product_id} ({c.score:.3f})" for c in v.suggestions))
    return "\n".join([line, *extra])


def _log_verdict(args, verdict) -> int:
    """Append ``verdict`` to ``--log`` and return its record id; any failure is an
    :class:`AuditLogError` that says the verdict was not logged."""
    import hashlib

    from auditlens.device_app.auditlog import AuditLog, default_auditor
    from auditlens.errors import AuditLogError

    try:
        photo = args.photo.read_bytes()
    except OSError as exc:
        raise AuditLogError(f"{args.photo}: {exc.strerror or exc}; this verdict was NOT logged") from exc
    if hashlib.sha256(photo).hexdigest() != verdict.photo_sha256:
        raise AuditLogError(f"{args.photo} changed after it was verified; nothing was logged")
    auditor = default_auditor() if args.auditor is None else args.auditor
    if not auditor:
        print("auditlens: warning: the log records no auditor: pass --auditor NAME", file=sys.stderr)
    empty = args.log.is_file() and args.log.stat().st_size == 0  # emptied: said as a new log is
    new_log = empty or not args.log.exists()
    try:
        with AuditLog(args.log, signing_key=args.log_key) as log:
            if log.guards_restored:
                print(f"auditlens: warning: {args.log}: the log's append-only guards had been "
                      f"removed outside auditlens ({', '.join(log.guards_restored)}); they are "
                      "back, and the log keeps a note of it: check its records with "
                      f"'auditlens verify-log {shlex.quote(str(args.log))}'", file=sys.stderr)
            record_id = log.append(verdict, photo=photo, auditor=auditor,
                                   device=socket.gethostname() if args.device is None else args.device)
    except (AuditlensError, OSError) as exc:  # the verdict is on screen: say it is not on record
        detail = exc if isinstance(exc, AuditlensError) else f"{args.log}: {exc.strerror or exc}"
        raise AuditLogError(f"{detail}; this verdict was NOT logged") from exc
    if new_log:  # a mistyped --log would start a second chain: said, not silent
        print(f"auditlens: started a new audit log {args.log} with this verdict"
              + (" (the file was empty: if it held a log, that log is gone)" if empty else ""), file=sys.stderr)
    return record_id


def _run_verify(args) -> int:
    verifier = _verifier(args)
    for given, what in ((args.auditor is not None, "--auditor is recorded"),
                        (args.log_key is not None, "--log-key signs records")):
        if given and not args.log:
            print(f"auditlens: warning: {what} only in an audit log; add --log AUDIT.db", file=sys.stderr)
    if args.log and args.log_key is not None:
        from auditlens.device_app.auditchain import load_signing_key

        load_signing_key(args.log_key)  # a key that cannot sign is said before the photo is judged
    verdict = verifier.verify(args.photo, args.product)
    # the verdict is shown before it is logged: a log that cannot be written (an error,
    # exit status 2) does not hide it from the auditor. With --json it is one document,
    # printed once the log has (or has not) taken it
    if not args.json:
        print(_format_verdict(verdict), flush=True)
    elif not args.log:
        print(json.dumps(verdict.to_dict(), indent=1), flush=True)
    if args.log:
        try:
            record_id = _log_verdict(args, verdict)
        except AuditlensError as exc:
            if args.json:
                print(json.dumps({**verdict.to_dict(), "logged": False, "ok": False, "error": str(exc)},
                                 indent=1), flush=True)
                args.json_printed = True  # _fail prints no second document
            raise
        if args.json:
            print(json.dumps({**verdict.to_dict(), "logged": True, "record_id": record_id}, indent=1), flush=True)
        else:  # ties what the auditor saw to its record in the log
            print(f"  logged as record {record_id} of {args.log}", flush=True)
    return {"match": EXIT_OK, "no_match": EXIT_NO_MATCH}.get(verdict.decision, EXIT_RETAKE)


def _add_identify(p: argparse.ArgumentParser) -> None:
    p.add_argument("photo", type=Path, help="the field photo")
    p.add_argument("--top", "-k", type=positive_int, default=5, help="how many products to list (default: 5)")
    _add_bundle(p)
    p.add_argument("--json", action="store_true",
                   help='print JSON; when the command fails after reading its arguments (exit 2) '
                        '{"ok": false, "error"}')


def _run_identify(args) -> int:
    """The closest products, each saying whether it clears the threshold; a photo that
    cannot be judged as the best of them (too dark, blurred, a copy of its original) is
    said so and exits 3, as verify's RETAKE does."""
    verifier = _verifier(args)
    capture = verifier.prepare(args.photo)
    candidates = verifier.identify(capture, args.top)
    retake = verifier.retake_reasons(capture, candidates[0].product_id)
    if args.json:
        print(json.dumps([{**c.__dict__, "passes_threshold": c.score >= verifier.threshold,
                           "threshold": verifier.threshold, "retake": retake} for c in candidates], indent=1))
    else:
        # a photo that must be retaken is not judged: no product is said to clear the threshold
        print(f"threshold {verifier.threshold:.3f} "
              + ("(not applied: retake the photo)" if retake else "(* clears it)"))
        for rank, c in enumerate(candidates, 1):
            mark = "*" if c.score >= verifier.threshold and not retake else " "
            print(f"{rank:2d}. {c.score:6.3f}{mark} {c.product_id}  ({c.name})")
        for reason in retake:
            print(f"RETAKE: {reason}")
    return EXIT_RETAKE if retake else EXIT_OK


# -- score ---------------------------------------------------------------------------
def _add_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, type=Path, metavar="PAIRS.csv",
                   help="CSV with columns photo,product_id (photo paths relative to the CSV)")
    p.add_argument("--out", "-o", required=True, type=Path,
                   help="CSV written with columns photo,product_id,score,verdict,error,reasons,"
                   "threshold,first_score (reasons: why the verdict, e.g. what a RETAKE must fix; "
                   "'; '-separated; threshold: the one the score was judged against, a second "
                   "look's own when first_score, near the bundle's threshold, took one)")
    _add_bundle(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


@contextlib.contextmanager
def _sigterm_interrupts():
    """While inside, SIGTERM asks the command to stop as Ctrl-C does, so a long command
    keeps its partial results: yields an event that the handler sets, for the command's
    loop to check and raise KeyboardInterrupt at a point of its choosing (an exception
    raised from the handler could land anywhere, in a library's cleanup included). The
    handler before is restored after. Only in the main thread, where Python allows signal
    handlers."""
    import signal
    import threading

    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    before = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    try:
        yield stopped
    finally:
        signal.signal(signal.SIGTERM, before)


def _score_pairs(pairs, verifier, rows: list[list[str]], progress: bool, stopped) -> tuple[int, int]:
    """Score each pair into ``rows`` (the photo as the pairs file wrote it, so the rows join
    back to it); each photo is decoded and embedded once; KeyboardInterrupt between pairs
    once ``stopped`` is set (SIGTERM). Returns (photos, errors)."""
    from tqdm import tqdm

    captures: dict[str, object] = {}
    errors = 0
    enrolled = {p.product_id for p in verifier.bundle.products}
    claims: dict[str, set[str]] = {}  # the products each photo is paired with
    for pair in pairs:
        claims.setdefault(pair.photo, set()).add(pair.product_id)
    for pair in tqdm(pairs, desc="scoring", unit="pair", disable=not progress):
        if stopped.is_set():
            raise KeyboardInterrupt
        try:
            capture = captures.get(pair.photo)
            if capture is None:
                try:
                    capture = verifier.prepare(pair.photo)
                    verifier.embed(capture)
                    if any(verifier.takes_second_look(verifier.capture_score(capture, p))
                           for p in claims[pair.photo] & enrolled):
                        verifier.embed_second_look(capture)  # before its pixels go
                    capture.release_pixels()  # memory stays flat over 10k photos
                except AuditlensError as exc:
                    capture = exc  # remembered: a bad photo is decoded once too
                captures[pair.photo] = capture
            if isinstance(capture, AuditlensError):
                raise capture
            v = verifier.verify(capture, pair.product_id)
            rows.append([pair.given or pair.photo, pair.product_id, f"{v.score:.5f}", v.decision, "",
                         "; ".join(v.reasons), f"{v.threshold:.5f}",
                         "" if v.first_score is None else f"{v.first_score:.5f}"])
        except AuditlensError as exc:
            errors += 1
            rows.append([pair.given or pair.photo, pair.product_id, "", "error", str(exc), "", "", ""])
    return len(captures), errors


def _keep_rows(out: Path, write, what: str) -> None:
    """``write`` the rows scored so far to OUT.partial.csv beside OUT or, when that fails
    too (the disk is full), in the temporary folder, and say where they are."""
    import tempfile

    name = f"{out.stem}.partial{out.suffix}"
    failure: OSError | None = None
    for partial in (out.with_name(name), Path(tempfile.gettempdir()) / name):
        try:
            write(partial)
        except OSError as exc:
            failure = exc
            continue
        print(f"auditlens: {what}; those rows are in {partial}", file=sys.stderr)
        return
    where = f"{failure.filename}: " if failure.filename else ""
    print(f"auditlens: {what}; those rows could not be kept either ({where}{failure.strerror or failure})",
          file=sys.stderr)


def _run_score(args) -> int:
    from auditlens.catalog import read_labelled_photos
    from auditlens.files import atomic_write, check_output_file

    check_output_file(args.out, inputs=(args.pairs,))
    verifier = _verifier(args)
    pairs = read_labelled_photos(args.pairs)
    rows: list[list[str]] = []

    def write(path: Path) -> None:
        with atomic_write(path, newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["photo", "product_id", "score", "verdict", "error", "reasons", "threshold",
                             "first_score"])
            writer.writerows(rows)

    try:
        with _sigterm_interrupts() as stopped:  # `timeout`, systemd and CI cancel with SIGTERM, not Ctrl-C
            photos, errors = _score_pairs(pairs, verifier, rows, not args.no_progress, stopped)
    except BaseException:  # interrupted, or a fault: keep what was scored, apart from OUT
        _keep_rows(args.out, write, f"stopped after {len(rows)} of {len(pairs)} pairs")
        raise
    try:
        write(args.out)
    except OSError:  # a full disk, a folder made read-only while scoring
        _keep_rows(args.out, write, f"scored {len(rows)} pairs, but could not write {args.out}")
        raise
    print(f"{len(pairs) - errors} of {len(pairs)} pairs scored ({photos} distinct photos"
          + (f"; {errors} could not be: see their error column" if errors else "") + f") into {args.out}")
    return EXIT_OK if not errors else EXIT_ERROR


# -- info ----------------------------------------------------------------------------
def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", type=Path, nargs="?", default=None, help="bundle folder or .zip (default: the sample)")
    p.add_argument("--bundle", "-b", dest="bundle_option", type=Path, default=None, metavar="BUNDLE",
                   help="the same, as the other commands take it")
    p.add_argument("--public-key", type=Path, default=None, metavar="KEY",
                   help="check the signature with this Ed25519 public key file")
    p.add_argument("--json", action="store_true",
                   help='print the manifest as JSON; when the command fails after reading its '
                        'arguments (exit 2) {"ok": false, "error"}')
    p.add_argument("--products", action="store_true",
                   help="also list every product: its id (what verify --product takes), name, kind, group "
                        "and number of references (with --json: a 'products' list)")


def _product_rows(bundle) -> list[dict]:
    """The bundle's products as ``info --products`` lists them."""
    return [{"product_id": p.product_id, "name": p.name, "kind": p.kind, "group": p.group,
             "references": len(p.references)} for p in bundle.products]


def _run_info(args) -> int:
    from auditlens.device_app.bundle import ReferenceBundle
    from auditlens.device_app.rivals import missing_note
    from auditlens.device_app.verifier import Verifier

    key = read_key_file(args.public_key, "publisher's public key")
    if args.bundle and args.bundle_option and args.bundle != args.bundle_option:
        from auditlens.errors import BundleError

        raise BundleError(f"two bundles given ({args.bundle}, {args.bundle_option}); give one")
    b = ReferenceBundle.load(args.bundle or args.bundle_option or default_bundle(), public_key=key)
    Verifier(b)  # runs the model on the bundle's probe: a model and references that differ are refused here too
    m = b.manifest
    if args.json:
        shown = {k: v for k, v in m.items() if k != "probe"}
        # not part of the manifest: what this command found about its signature
        shown["signature"] = {"present": b.has_signature, "checked_by": b.signed_by}
        if args.products:
            shown["products"] = _product_rows(b)
        print(json.dumps(shown, indent=1))
        return EXIT_OK
    d = b.decision  # the manifest's, or without rivals the bundle does not all hold
    size = len(b.model_content)
    print(f"bundle     {b.path}  (id {b.bundle_id}, format {m['format_version']}, made "
          f"{m.get('created', '?')}, auditlens {m.get('auditlens_version', '?')})")
    signature = {
        "checked": f"; manifest signed by {b.signed_by}, signature checked",
        "unchecked": "; manifest.sig present but NOT checked (pass --public-key to check it)",
        "unsigned": "; not signed, so nothing protects the manifest itself (threshold, hashes)",
    }[b.signature]
    print(f"integrity  {len(m['files'])} files, every sha256 verified{signature}")
    print(f"model      {b.model_id}  ({size / 1024:.0f} KiB, input {b.spec.input_size}px {b.spec.crop}, "
          f"latent {m['latent_dim']}-d; reproduces the references' probe latent)")
    print(f"products   {len(b.products)}  ({len(b.references)} reference images"
          f"{'' if args.products else '; --products lists them'})")
    print(f"photos     {_describe_views(b.spec)}")
    cal = f"calibrated for false-accept rate {b.target_far:.2%} on {d.get('calibrated_on')}" if b.target_far is not None else "not calibrated"
    print(f"threshold  {d['threshold']:.4f}  ({cal})")
    if b.second_look:
        look = b.second_look
        print(f"           first scores within {look.band:g} of it take a second look: "
              f"{5 * b.spec.num_views} views (each box also moved by {100 * look.photo_shift:.3g}%), "
              f"threshold {look.threshold:.4f}")
    if b.cells_weight:
        print(f"           scores: cosine + {b.cells_weight:.4f} x the cell score's z against a cohort of "
              f"{len(b.cohort)} originals (feature-map cells)")
    if b.rival_weight:
        print(f"           scores less {b.rival_weight:g} x what another product beats the claim by (rivals)")
    elif m["decision"].get("rivals"):
        print(f"           warning: {missing_note(m['decision'], (p.product_id for p in b.products))}")
    for w in d.get("warnings") or ():
        print(f"           warning: {w}")
    kinds = Counter(p.kind or "(no kind)" for p in b.products)
    print("kinds      " + ", ".join(f"{k}: {n}" for k, n in sorted(kinds.items())))
    if args.products:
        rows = _product_rows(b)
        head = {"product_id": "product id", "name": "name", "kind": "kind", "group": "group",
                "references": "refs"}
        rows = [{k: r[k] if r[k] != "" else "-" for k in head} for r in rows]  # a blank column reads as a gap
        widths = {k: max(len(head[k]), *(len(str(r[k])) for r in rows)) for k in head}
        print()
        for r in [head, *rows]:
            print("  ".join(f"{str(r[k]):{widths[k]}s}" for k in head).rstrip())
    return EXIT_OK


def _describe_views(spec) -> str:
    """How a field photo is embedded: its views (one encoder run each), averaged. A zoom is
    the share of the crop's side a centred box keeps (0.7: the middle 70% of each side)."""
    frame = "centred square" if spec.crop == "center" else "whole frame"
    zooms = [f"the {frame}" if z == 1.0 else f"the middle {100 * z:.3g}% (of each side) of the {frame}"
             for z in spec.photo_zooms]
    n = spec.num_views
    shifted = len(zooms) > 1 or spec.photo_shift
    each = "each " if len(zooms) > 1 else ""
    shift = (f", {each}also moved left, right, up and down by {100 * spec.photo_shift:.3g}% of "
             f"the {frame}'s side" if spec.photo_shift else "")
    mirror = ("" if not spec.photo_mirror else
              ", each with its mirror image" if shifted else ", and its mirror image")
    return (f"each embedded as {n} view{'s, averaged' if n != 1 else ''}: "
            + ", ".join(zooms) + shift + mirror)


# -- demo ----------------------------------------------------------------------------
def _add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bundle", type=Path, default=None, help=argparse.SUPPRESS)


def _run_demo(args) -> int:
    from auditlens.catalog import read_labelled_photos
    from auditlens.device_app.verifier import Verifier

    bundle = args.bundle or default_bundle()
    verifier = Verifier(bundle)
    ids = [p.product_id for p in verifier.bundle.products]
    photos = [p for p in read_labelled_photos(_shipped("sample") / "photos.csv") if p.product_id in ids]
    if not photos or len(ids) < 2:
        raise BundleError(f"{bundle}: the demo needs a bundle with at least two products, among them "
                          "the sample photos' products (the shipped sample bundle has them)")
    print(f"auditlens demo: {len(photos)} sample field photos against the {len(ids)}-product "
          f"sample bundle (model {verifier.bundle.model_id}, threshold {verifier.threshold:.3f})\n")
    wp = max(len("photo"), *(len(Path(p.photo).name) for p in photos))
    wc = max(len("claimed product"), *map(len, ids))
    print(f"{'photo':{wp}s} {'claimed product':{wc}s} {'truth':6s} {'verdict':9s} {'score':>6s}")
    accepted = rejected = 0
    for i, photo in enumerate(photos):
        capture = verifier.prepare(photo.photo)
        wrong = ids[(ids.index(photo.product_id) + 1 + i) % len(ids)]
        if wrong == photo.product_id:
            wrong = ids[(ids.index(photo.product_id) + 1) % len(ids)]
        for claimed in (photo.product_id, wrong):
            v = verifier.verify(capture, claimed)
            same = claimed == photo.product_id
            accepted += same and v.matched
            rejected += not same and not v.matched
            ok = v.matched == same
            print(f"{Path(photo.photo).name:{wp}s} {claimed:{wc}s} {'same' if same else 'other':6s} "
                  f"{v.decision.upper().replace('_', ' '):9s} {v.score:6.3f}"
                  f"{'' if v.first_score is None else ' (second look)'}{'' if ok else '  (wrong)'}")
    n = len(photos)
    far = verifier.bundle.target_far
    print(f"\ngenuine photos accepted: {accepted}/{n}; photos of another product rejected: {rejected}/{n}"
          + (f"\n(the threshold is calibrated for a {far:.0%} false-accept rate"
             + ("" if verifier.bundle.far_measured else
                f" on the {verifier.bundle.decision['products'].get('count', '?')} products of the model's "
                "calibration; on these it is not measured")
             + ": strict on purpose, a wrong product passing an audit costs more than a retake)" if far else ""))
    named = f" --bundle {shlex.quote(str(args.bundle))}" if args.bundle else ""
    print(f"\nVerify your own photo with:\n  auditlens verify{named} --product {ids[0]} PHOTO.jpg")
    return EXIT_OK


def _add_import_grocery(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", type=Path, help="folder of the Grocery Store Dataset (the one holding "
                   "classes.csv, train.txt, val.txt and optionally test.txt)")
    p.add_argument("--out", "-o", type=Path, required=True,
                   help="folder for catalog.csv, train.csv, val.csv and test.csv (when the dataset has "
                        "test.txt); a test.csv of an earlier import is removed when this dataset has none")
    p.add_argument("--absolute-paths", action="store_true",
                   help="write absolute image and photo paths (default: relative to the --out folder, "
                        "so the dataset and the CSVs can move together)")


def _run_import_grocery(args) -> int:
    from auditlens.datasets import import_grocery

    import_grocery(args.root, args.out, absolute_paths=args.absolute_paths, verbose=True)
    return EXIT_OK


# -- the command table -----------------------------------------------------------------
Hook = tuple[str, str, str] | tuple[Callable, Callable]
COMMANDS: dict[str, tuple[str, Hook]] = {
    "demo": ("verify the shipped sample photos against the sample bundle", (_add_demo, _run_demo)),
    "verify": ("does PHOTO show product ID? prints MATCH / NO MATCH / RETAKE", (_add_verify, _run_verify)),
    "identify": ("which enrolled products does PHOTO resemble most?", (_add_identify, _run_identify)),
    "score": ("batch-score photo,product_id pairs into a CSV", (_add_score, _run_score)),
    "enroll": ("embed a catalogue's originals into a reference bundle", (_add_enroll, _run_enroll)),
    "info": ("show and verify a reference bundle", (_add_info, _run_info)),
    "train": ("train an encoder on a catalogue (needs auditlens[train])",
              ("auditlens.training.train", "add_train_arguments", "run_train")),
    "teacher-features": ("a pretrained model's features of the training images, to distil "
                         "into the encoder (needs auditlens[train])",
                         ("auditlens.training.teacher", "add_arguments", "run")),
    "soup": ("average the weights of encoders trained from the same --seed into one (needs auditlens[train])",
             ("auditlens.training.soup", "add_arguments", "run")),
    "export": ("convert a trained encoder to int8 TFLite and check its drift (needs auditlens[train])",
               ("auditlens.export.quantize", "add_export_arguments", "run_export")),
    "keygen": ("make an Ed25519 key pair to sign reference bundles, or with --device a device's "
               "audit records (needs the [sign] extra)",
               ("auditlens.device_app.signing", "add_keygen_arguments", "run_keygen")),
    "import-grocery": ("write catalogue and photo CSVs for a Grocery Store Dataset copy",
                       (_add_import_grocery, _run_import_grocery)),
    "evaluate": ("measure a bundle on labelled photos: EER, TAR@FAR, AUC, top-k, plots, JSON",
                 ("auditlens.evaluation.evaluate", "add_arguments", "run")),
    "calibrate": ("set a bundle's decision threshold for a target false-accept rate",
                  ("auditlens.evaluation.calibrate", "add_arguments", "run")),
    "app": ("run the field app (Kivy): pick, capture, verify, keep the audit log (needs auditlens[app])",
            ("auditlens.device_app.app.main", "add_arguments", "run")),
    "verify-log": ("check an audit log's hash chain; export it as CSV/JSON",
                   ("auditlens.device_app.verify_log", "add_arguments", "run")),
}


_EXIT_STATUS = {
    "verify": "Exit status: 0 MATCH, 1 NO MATCH, 3 RETAKE (the photo cannot be judged; the reasons "
              "say what to do), 2 error.",
    "identify": "Exit status: 0, 3 when the photo cannot be judged (the reasons say what to do), 2 error.",
    "score": "Exit status: 0, 2 when any pair could not be scored (its row says why), 130 when stopped "
             "(Ctrl-C or SIGTERM; the rows scored so far go to OUT.partial.csv).",
}
"""The exit codes of the commands scripts branch on, in their --help."""


# the extra that installs each optional package a command may import late
_EXTRAS = {"tensorflow": "train", "keras": "train", "matplotlib": "eval", "kivy": "app",
           "cryptography": "sign", "cv2": "bench", "imagehash": "bench", "skimage": "bench"}


def _missing_extra(command: str, exc: ImportError) -> str:
    package = (exc.name or "").split(".")[0]
    extra = _EXTRAS.get(package)
    if extra is None:
        return f"`auditlens {command}` could not import a module it needs: {exc}"
    hint = " (or pass --no-plots)" if command == "evaluate" and extra == "eval" else ""
    return (f"`auditlens {command}` needs {package}, which is not installed: install the "
            f"[{extra}] extra (pip install '.[{extra}]' in an auditlens checkout){hint}")


def _resolve(hook: Hook) -> tuple[Callable, Callable]:
    if callable(hook[0]):
        return hook  # type: ignore[return-value]
    module, add, run = hook  # type: ignore[misc]
    mod = importlib.import_module(module)
    return getattr(mod, add), getattr(mod, run)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="auditlens",
        description="Offline product verification for field audits: does a photo show the "
                    "product in the catalogue?",
        epilog="Exit status: 0 success/MATCH, 1 NO MATCH, 3 RETAKE, 2 error, 4 audit log "
               "chain broken (verify-log), 5 warnings (verify-log --strict). "
               "Run `auditlens COMMAND --help` for a command's options.",
    )
    import auditlens

    parser.add_argument("--version", action="version", version=f"auditlens {auditlens.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (summary, hook) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary, epilog=_EXIT_STATUS.get(name))
        if command == name:
            # only the chosen command's module is imported: `verify` never loads TensorFlow
            try:
                add, _ = _resolve(hook)
            except ImportError as exc:
                p.set_defaults(_missing=_missing_extra(name, exc))
                continue
            add(p)
        p.set_defaults(_command=name)
    return parser


_TENSORFLOW_COMMANDS = {"train", "teacher-features", "soup", "export"}


def _is_tensorflow_notice(line: bytes) -> bool:
    """TensorFlow's start-up lines: absl's note that logging is not set up yet, the INFO
    lines printed meanwhile (oneDNN, CPU instructions; "I0000 ...") and the CPU line's
    continuation."""
    return line.startswith((b"WARNING: All log messages before absl::InitializeLog()",
                            b"I0000 ", b"To enable the following instructions:"))


def _quiet_tensorflow() -> None:
    """Import TensorFlow without its start-up notices, and keep its C++ INFO and WARNING
    lines (the graph optimiser's cost model logs "Error in PredictCost()" for ops it cannot
    cost, harmless) from landing above a training's progress bar. A TF_CPP_MIN_LOG_LEVEL
    of the user's own is left alone, and so is all of it with AUDITLENS_DEBUG set."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    from auditlens.device_app.interpreter import without_stderr_lines

    with contextlib.suppress(ImportError), without_stderr_lines(_is_tensorflow_notice):
        import tensorflow  # noqa: F401  (a missing extra is reported by the command itself)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"auditlens: error: {args._missing}", file=sys.stderr)
        return EXIT_ERROR
    from auditlens.device_app.interpreter import drop_runtime_notice

    drop_runtime_notice()  # this process is ours: the runtime's notice is not a verdict's
    if args._command in _TENSORFLOW_COMMANDS and not os.environ.get("AUDITLENS_DEBUG"):
        _quiet_tensorflow()
    _, run = _resolve(COMMANDS[args._command][1])
    try:
        with warnings.catch_warnings():
            if not os.environ.get("AUDITLENS_DEBUG"):
                # Pillow warns about damaged files ("Truncated File Read") before auditlens
                # reports them in one line of its own; the warning adds only a source line
                warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
            return int(run(args) or 0)
    except AuditlensError as exc:
        shipped = isinstance(exc, UnknownProductError) and getattr(args, "bundle", False) is None
        return _fail(args, f"{exc}" + (" (the shipped sample bundle: no --bundle was given)" if shipped else ""))
    except BrokenPipeError:  # `auditlens demo | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
        return 128 + 13  # as a shell reports a process ended by SIGPIPE
    except OSError as exc:  # a file named on the command line is missing or unreadable
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(args, f"{where}{exc.strerror or exc}")
    except KeyboardInterrupt:
        print("auditlens: interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:  # an optional extra the command reached for is not installed
        return _fail(args, _missing_extra(args._command, exc))
    except Exception as exc:  # a bug: still exit 2, never 1 (which scripts read as NO MATCH)
        if os.environ.get("AUDITLENS_DEBUG"):
            raise
        return _fail(args, f"{type(exc).__name__}: {exc} (set AUDITLENS_DEBUG=1 for the traceback)",
                     "internal error")


def _fail(args, message: str, what: str = "error") -> int:
    """One line on stderr, and with --json a ``{"ok": false, "error": ...}`` object on stdout
    (a script reading stdout gets JSON on failure too), unless the command printed its own
    (``args.json_printed``: verify's verdict said not logged, verify-log's naming the
    record); exit 2."""
    print(f"auditlens: {what}: {message}", file=sys.stderr)
    if getattr(args, "json", False) and not getattr(args, "json_printed", False):
        print(json.dumps({"ok": False, "error": message}, indent=1), flush=True)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
