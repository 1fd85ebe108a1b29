"""Audit records signed with the device's key: what a check given the device's public key
catches that the hash chain alone cannot (a record appended or re-hashed by someone with
the file and the code but without the key)."""

from __future__ import annotations

import csv
import json
import shlex
import sqlite3

import pytest

from auditlens.cli import main as cli_main
from auditlens.device_app.auditchain import GENESIS_HASH, record_hash, signed_message, verify_export
from auditlens.device_app.auditlog import AuditLog
from auditlens.device_app.signing import fingerprint, generate_keypair, signature_holds
from auditlens.errors import AuditChainError, AuditLogError

from .conftest import needs_signing
from .test_auditlog import _edit_by_hand, _rewrite_and_rehash, jpeg, make_verdict

pytestmark = needs_signing

SIGNATURE_GUARDS = ("signatures_append_only_update", "signatures_append_only_delete",
                    "signatures_of_the_newest")


@pytest.fixture
def device(tmp_path):
    """The device's key pair (device.key, device.pub)."""
    return generate_keypair(tmp_path / "device keys", device=True)


def _write(log_path, n, start=0, **kw):
    with AuditLog(log_path, **kw) as log:
        for i in range(start, start + n):
            log.append(make_verdict(i, "match" if i % 2 else "no_match"),
                       photo=jpeg(colour=(i * 30 % 256, 40, 0)), auditor="a")


def _append_by_hand(log_path, **changes):
    """What someone with the file and the code but not the key does: a record that extends
    the chain, inserted with the sqlite3 module (the chain's trigger lets it in)."""
    db = sqlite3.connect(log_path)
    db.row_factory = sqlite3.Row
    last = dict(db.execute("SELECT * FROM records ORDER BY id DESC LIMIT 1").fetchone() or {})
    row = {**last, "id": last.get("id", 0) + 1, "prev_hash": last.get("record_hash", GENESIS_HASH),
           "auditor": "mallory", **changes}
    row["record_hash"] = record_hash(row)
    db.execute(f"INSERT INTO records ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", list(row.values()))
    db.commit()
    db.close()


def _sql(log_path, sql):
    """A tamperer's edit of the signatures table (its guards dropped first)."""
    _edit_by_hand(log_path, "".join(f"DROP TRIGGER IF EXISTS {t};" for t in SIGNATURE_GUARDS) + sql)


def test_every_record_is_signed_and_checks_against_the_device_key(tmp_path, device, capsys):
    private, public = device
    log_path = tmp_path / "audit.db"
    _write(log_path, 4, signing_key=private)
    with AuditLog(log_path, create=False) as log:
        records = log.records()
        report = log.verify_chain(device_keys=[public])
        assert log.verify_chain().device_keys_checked is False
        log_id = log.log_id
    key = fingerprint(public.read_bytes())
    assert report.device_keys_checked and report.warnings == ()
    assert report.signed_by == ({"first_id": 1, "last_id": 4, "key": key},)
    for r in records:  # each signature is the device key's, over this log's id and the record's hash
        sig = bytes.fromhex(r.signature)
        assert signature_holds(signed_message(log_id, r.record_hash), sig, public.read_bytes())
        other = records[0] if r.id > 1 else records[1]
        assert not signature_holds(signed_message(log_id, other.record_hash), sig, public.read_bytes())
        assert not signature_holds(signed_message("0" * 32, r.record_hash), sig, public.read_bytes())

    assert cli_main(["verify-log", str(log_path), "--device-key", str(public)]) == 0
    out = capsys.readouterr().out
    assert f"records 1-4 signed by device key {key} (one of --device-key)" in out
    assert cli_main(["verify-log", str(log_path)]) == 0  # without the key: said, not claimed
    assert f"records 1-4 signed by key {key} (not checked against a device's key" in capsys.readouterr().out

    # the CSV names the signing key of each record, for people reading it in a spreadsheet
    table = tmp_path / "audit.csv"
    assert cli_main(["verify-log", str(log_path), "--export-csv", str(table)]) == 0
    capsys.readouterr()
    assert [row["signed_by"] for row in csv.DictReader(table.open(encoding="utf-8"))] == [key] * 4

    # the JSON upload carries the signatures and is checked the same way
    upload = tmp_path / "upload.json"
    assert cli_main(["verify-log", str(log_path), "--export-json", str(upload)]) == 0
    data = json.loads(upload.read_text(encoding="utf-8"))
    assert [d["signer"] for d in data["records"]] == [r.signer for r in records]
    assert verify_export(upload, device_keys=[public]).signed_by == report.signed_by
    data["records"][2]["signature"] = data["records"][1]["signature"]  # another record's
    upload.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(AuditChainError, match="record 3: its signature does not verify"):
        verify_export(upload)


def test_a_record_appended_without_the_device_key_is_refused(tmp_path, device, capsys):
    """Someone with the file and the code appends a record: the chain verifies, the key
    does not."""
    private, public = device
    log_path = tmp_path / "audit.db"
    _write(log_path, 3, signing_key=private)
    _append_by_hand(log_path)  # consistent with itself: the last verdict again, by "mallory"
    with AuditLog(log_path, create=False) as log:
        warned = log.verify_chain()
        with pytest.raises(AuditChainError, match="record 4: it is not signed, though record 1 before it is") as exc:
            log.verify_chain(device_keys=[public])
    assert exc.value.record_id == 4
    assert any("not signed though record 1 before them is, first: record 4" in w for w in warned.warnings)
    assert cli_main(["verify-log", str(log_path), "--device-key", str(public)]) == 4
    assert "record 4: it is not signed" in capsys.readouterr().err


def test_a_signed_log_takes_no_unsigned_append(tmp_path, device):
    """Opened without the key (a script, the app started without --log-key), a signed log
    refuses to append, before anything is written: one unsigned record would fail every
    later check with the device's key."""
    private, public = device
    log_path = tmp_path / "audit.db"
    _write(log_path, 2, signing_key=private)
    with AuditLog(log_path) as log:
        with pytest.raises(AuditLogError, match="newest record is signed with the key ed25519:.*open it with that device key"):
            log.append(make_verdict(5), photo=jpeg(), auditor="a")
        assert len(log) == 2
    _write(log_path, 1, start=2, signing_key=private)  # with the key, the log goes on
    with AuditLog(log_path, create=False) as log:
        assert log.verify_chain(device_keys=[public]).records == 3


def test_a_record_signed_with_another_key_is_refused(tmp_path, device):
    private, public = device
    stranger, stranger_public = generate_keypair(tmp_path / "stranger", device=True)
    log_path = tmp_path / "audit.db"
    _write(log_path, 2, signing_key=private)
    _write(log_path, 1, start=2, signing_key=stranger)
    with AuditLog(log_path, create=False) as log:
        with pytest.raises(AuditChainError, match=f"record 3: it is signed by the key "
                                                  f"{fingerprint(stranger_public.read_bytes())}, not by"):
            log.verify_chain(device_keys=[public])
        report = log.verify_chain(device_keys=[public, stranger_public])  # a device re-keyed
    assert [run["last_id"] for run in report.signed_by] == [2, 3]


def test_a_re_hashed_record_no_longer_carries_a_valid_signature(tmp_path, device, capsys):
    """The edit a plain chain cannot show (a record changed and every hash after it
    recomputed) breaks the signature of the edited record, with or without device keys."""
    private, public = device
    log_path = tmp_path / "audit.db"
    _write(log_path, 3, signing_key=private)
    _rewrite_and_rehash(log_path, 2, decision="no_match", score=0.3)
    with AuditLog(log_path, create=False) as log:
        assert log.record(2).decision == "no_match"
        with pytest.raises(AuditChainError, match="record 2: its signature does not verify with the key it names"):
            log.verify_chain()
    assert cli_main(["verify-log", str(log_path)]) == 4
    assert "changed after it was written" in capsys.readouterr().err


@pytest.mark.parametrize("sql, message", [
    ("UPDATE signatures SET signature = replace(signature, substr(signature, 1, 1), "
     "CASE substr(signature, 1, 1) WHEN 'a' THEN 'b' ELSE 'a' END) WHERE record_id = 2;",
     "record 2: its signature does not verify"),
    ("UPDATE signatures SET signature = 'zz' WHERE record_id = 1;", "record 1: its signature or the key it names is not well formed"),
    ("DELETE FROM signatures WHERE record_id = 3;", "record 3: it is not signed, though record 1"),
    ("DELETE FROM signatures;", "record 1: it is not signed, and every record from 1 on must be signed"),
])
def test_signatures_edited_by_hand_are_caught(tmp_path, device, sql, message):
    private, public = device
    log_path = tmp_path / "audit.db"
    _write(log_path, 3, signing_key=private)
    _sql(log_path, sql)
    with AuditLog(log_path, create=False) as log, pytest.raises(AuditChainError, match=message):
        log.verify_chain(device_keys=[public])


def test_a_signature_cannot_be_added_or_changed_through_sqlite(tmp_path, device):
    private, _ = device
    log_path = tmp_path / "audit.db"
    _write(log_path, 2)
    db = sqlite3.connect(log_path)
    for sql, words in (("INSERT INTO signatures VALUES (1, 'aa', 'bb')", "only the newest record can be signed"),
                       ("UPDATE signatures SET signature = 'x'", None),
                       ("DELETE FROM signatures", None)):
        if words:
            with pytest.raises(sqlite3.IntegrityError, match=words):
                db.execute(sql)
        else:
            db.execute(sql)  # an empty table: nothing to change, so nothing refused
    db.close()
    _write(log_path, 1, start=2, signing_key=private)
    db = sqlite3.connect(log_path)
    with pytest.raises(sqlite3.IntegrityError, match="signatures cannot be changed"):
        db.execute("UPDATE signatures SET signature = 'x'")
    with pytest.raises(sqlite3.IntegrityError, match="signatures cannot be deleted"):
        db.execute("DELETE FROM signatures")
    db.close()


def test_a_log_from_before_signatures_gets_them_without_a_false_alarm(tmp_path, device, capsys):
    """A log written before the signatures table existed: it reads as unsigned, and the
    first append with a key adds the table without reporting its guards as removed. Its
    unsigned records pass a check with the device's key only when the auditor says the key
    came later (--signed-from)."""
    private, public = device
    log_path = tmp_path / "audit.db"
    _write(log_path, 2)
    db = sqlite3.connect(log_path)
    db.execute("DROP TABLE signatures")  # its triggers go with it: such a log as it is on disk
    db.close()
    with AuditLog(log_path, create=False) as log:
        old = log.verify_chain()
        assert [r.signer for r in log.records()] == ["", ""]
        with pytest.raises(AuditChainError, match="record 1: it is not signed, and every record from 1 on"):
            log.verify_chain(device_keys=[public])
    assert old.signed_by == ({"first_id": 1, "last_id": 2, "key": ""},)
    _write(log_path, 2, start=2, signing_key=private)
    with AuditLog(log_path, create=False) as log:
        with pytest.raises(AuditChainError, match="record 1: it is not signed.*pass that record's id as --signed-from ID"):
            log.verify_chain(device_keys=[public])
        with pytest.raises(AuditChainError, match="record 2: it is not signed, and every record from 2 on"):
            log.verify_chain(device_keys=[public], signed_from=2)
        report = log.verify_chain(device_keys=[public], signed_from=3)
    assert report.triggers_intact and report.warnings == ()
    # what --signed-from asked to allow is a note, which --strict passes
    assert report.notes == ("records 1-2 not held to the device keys, as --signed-from 3 allows: "
                            "written before the device had its key, or their signatures were "
                            "removed or replaced; only the records from the first one the device "
                            "keys signed on are held to them",)
    assert cli_main(["verify-log", str(log_path), "--device-key", str(public), "--signed-from", "3",
                     "--strict"]) == 0
    assert "  note: records 1-2 not held to the device keys" in capsys.readouterr().out
    # no signed record, and a --signed-from past the log's end: a log whose signed records
    # were all cut off looks like this, so it is said, not passed in silence
    _write(tmp_path / "unsigned.db", 2)
    with AuditLog(tmp_path / "unsigned.db", create=False) as log:
        cut = log.verify_chain(device_keys=[public], signed_from=3)
    assert any(w.startswith("no record is signed by the device keys: the log ends at record 2, before "
                            "record 3 (--signed-from)") for w in cut.warnings), cut.warnings


def test_an_incremental_check_remembers_the_first_signed_record(tmp_path, device):
    private, public = device
    log_path = tmp_path / "audit.db"
    _write(log_path, 2, signing_key=private)
    with AuditLog(log_path) as log:
        head = log.verify_chain(device_keys=[public])
        _append_by_hand(log_path)
        with pytest.raises(AuditChainError, match="record 3: it is not signed, though record 1"):
            log.verify_chain(since=(head.records, head.head_hash), device_keys=[public])


def test_keys_of_the_wrong_kind_are_clear_errors(tmp_path, device, capsys):
    private, public = device
    log_path = tmp_path / "audit.db"
    with pytest.raises(AuditLogError, match="cannot sign the audit log's records with this key: this is a public key"):
        AuditLog(log_path, signing_key=public)
    assert not log_path.exists()  # refused before the log was made
    _write(log_path, 1, signing_key=private)
    assert cli_main(["verify-log", str(log_path), "--device-key", str(private)]) == 2
    assert "not a device's public key: this is a private key" in capsys.readouterr().err


def test_cli_verify_signs_its_record_and_keygen_says_how(tmp_path, sample_bundle, sample_photos, capsys):
    keys = tmp_path / "device keys"  # a space: the printed commands must run as shown
    assert cli_main(["keygen", "--device", "--out", str(keys)]) == 0
    printed = capsys.readouterr().out
    assert (keys / "device.key").stat().st_mode & 0o777 == 0o600
    sign_line = next(line for line in printed.splitlines() if "--log-key" in line)
    check_line = next(line for line in printed.splitlines() if "--device-key" in line)
    assert shlex.split(sign_line.split("`")[1])[-1] == str(keys / "device.key")
    assert shlex.split(check_line.split("`")[1])[-1] == str(keys / "device.pub")

    photo = sample_photos[0]
    log_path = tmp_path / "audit.db"
    rc = cli_main(["verify", str(photo.photo), "--product", photo.product_id, "--bundle", str(sample_bundle),
                   "--log", str(log_path), "--log-key", str(keys / "device.key"), "--auditor", "a"])
    assert rc in (0, 1)
    capsys.readouterr()
    assert cli_main(["verify-log", str(log_path), "--device-key", str(keys / "device.pub"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device_keys_checked"] and report["signed_by"][0]["key"] == fingerprint(
        (keys / "device.pub").read_bytes())


def test_a_rewritten_history_the_device_signed_on_top_of_is_refused(tmp_path, device):
    """A tamperer rewrites record 2, re-hashes, wipes the signatures, rebuilds the guards;
    the device, none the wiser, signs its next record onto that history. Every record must
    be signed (unless the auditor says the key came later), so the check refuses it."""
    private, public = device
    log_path = tmp_path / "audit.db"
    _write(log_path, 3, signing_key=private)
    _rewrite_and_rehash(log_path, 2, decision="match", score=0.99)
    _sql(log_path, "DROP TABLE signatures;")
    _write(log_path, 1, start=3, signing_key=private)  # the device's next, genuine record
    with AuditLog(log_path, create=False) as log:
        assert log.record(2).decision == "match" and log.record(4).signer
        with pytest.raises(AuditChainError, match="record 1: it is not signed, and every record from 1 on"):
            log.verify_chain(device_keys=[public])


def test_a_row_outside_the_chain_is_caught(tmp_path, device):
    """A row given id 0 (guards dropped, then put back) is never part of the walk from
    record 1: the check counts the rows, and History does not list it."""
    private, public = device
    log_path = tmp_path / "audit.db"
    _write(log_path, 2, signing_key=private)
    _edit_by_hand(log_path, "INSERT INTO records SELECT 0, created_utc, 'mallory', device, product_id, decision, "
                            "score, threshold, model_id, photo_sha256, captured_sha256, verdict_json, "
                            "prev_hash, 'x' || record_hash, photo_mime, photo FROM records WHERE id = 1;")
    with AuditLog(log_path) as log:  # reopened to append: the guards are back
        assert [r.id for r in log.records(newest_first=True)] == [2, 1]
        with pytest.raises(AuditChainError, match=r"record 0: it is outside the chain \(3 rows, the chain runs 1..2\)"):
            log.verify_chain()


def test_signatures_are_bound_to_the_log(tmp_path, device):
    """Each signature covers the log's id: another log of the same device cannot pass for
    this one by taking its id, in the database or in an export's header."""
    private, public = device
    log_path = tmp_path / "audit.db"
    _write(log_path, 2, signing_key=private)
    upload = tmp_path / "upload.json"
    with AuditLog(log_path, create=False) as log:
        log.export_json(upload)
    data = json.loads(upload.read_text(encoding="utf-8"))
    data["log"]["log_id"] = "f" * 32
    upload.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(AuditChainError, match="record 1: its signature does not verify"):
        verify_export(upload, device_keys=[public])
    _edit_by_hand(log_path, "DROP TRIGGER meta_read_only_update; UPDATE meta SET value = 'ffff' WHERE key = 'log_id';")
    with AuditLog(log_path, create=False) as log, pytest.raises(AuditChainError, match="record 1: its signature"):
        log.verify_chain()


def test_a_record_appended_while_the_log_is_checked_is_no_tampering(tmp_path, monkeypatch):
    """Another process appends while verify_chain walks the log (the app writing while an
    auditor checks): the new record is not part of that check, not a row outside the chain."""
    from auditlens.device_app import auditchain

    log_path = tmp_path / "audit.db"
    _write(log_path, 3)
    walked = auditchain.ChainWalk.add
    other = AuditLog(log_path)

    def add_then_another_appends(self, record, photo, **kw):
        walked(self, record, photo, **kw)
        if record.id == 3:
            other.append(make_verdict(7), photo=jpeg(colour=(1, 2, 3)), auditor="b")

    monkeypatch.setattr(auditchain.ChainWalk, "add", add_then_another_appends)
    with AuditLog(log_path, create=False) as log:
        assert log.verify_chain().records == 3
    other.close()
    monkeypatch.undo()
    with AuditLog(log_path, create=False) as log:
        assert log.verify_chain().records == 4


def test_signed_from_is_refused_without_device_keys(tmp_path, capsys):
    log_path = tmp_path / "audit.db"
    _write(log_path, 1)
    assert cli_main(["verify-log", str(log_path), "--signed-from", "2"]) == 2
    assert "give them with --device-key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["verify-log", str(log_path), "--signed-from", "0"])
    assert "expected a record id, 1 or more" in capsys.readouterr().err


def _signed_upload(tmp_path, device, capsys, n=4):
    """A signed log of ``n`` records and its JSON export made with the device key, as
    `verify-log --export-json --log-key` (and the app) makes it."""
    private, _ = device
    log_path, upload = tmp_path / "audit.db", tmp_path / "upload.json"
    _write(log_path, n, signing_key=private)
    assert cli_main(["verify-log", str(log_path), "--export-json", str(upload), "--photos",
                     "--log-key", str(private)]) == 0
    capsys.readouterr()
    return log_path, upload


def _edit_upload(upload, edit):
    data = json.loads(upload.read_text(encoding="utf-8"))
    edit(data)
    upload.write_text(json.dumps(data), encoding="utf-8")


def _cut_newest(data):
    """What someone with the upload and the code does to hide the newest verdict: the last
    record dropped and the header's head set to the record before it."""
    data["records"].pop()
    last = data["records"][-1]
    data["log"].update(head=f"{last['id']}:{last['record_hash']}", head_hash=last["record_hash"],
                       records=last["id"], last_created_utc=last["created_utc"])
    for runs in (data["log"]["signed_by"], data["log"]["judged_with"]):
        if runs[-1]["first_id"] > last["id"]:
            runs.pop()
        runs[-1]["last_id"] = last["id"]


def test_a_signed_export_vouches_for_its_end(tmp_path, device, capsys):
    """The device signs the export's header: its head is the device's word, so records cut
    from the end of the upload are caught without a head kept from an earlier upload."""
    _, public = device
    _, upload = _signed_upload(tmp_path, device, capsys)
    key = fingerprint(public.read_bytes())
    report = verify_export(upload, device_keys=[public])
    assert report.head_signed_by == key and report.exported_utc and report.warnings == ()
    assert cli_main(["verify-log", str(upload), "--device-key", str(public)]) == 0
    assert (f"its head and warnings signed by device key {key} (one of --device-key)"
            in capsys.readouterr().out)

    cut = tmp_path / "cut.json"
    cut.write_bytes(upload.read_bytes())
    _edit_upload(cut, _cut_newest)
    for keys in ([public], []):  # with the device's key, and against the key it names
        with pytest.raises(AuditChainError, match="header does not match the device's signature") as exc:
            verify_export(cut, device_keys=keys)
        assert exc.value.record_id == 3
    assert cli_main(["verify-log", str(cut), "--device-key", str(public)]) == 4

    # the guards' state and warnings are signed too, and whether the photos are in it
    for edit in (lambda d: d["log"].update(triggers_intact=False),
                 lambda d: d["log"].update(warnings=["the clock was set back"]),
                 lambda d: [d.update(photos=False)] + [r.pop("photo_base64") for r in d["records"]]):
        edited = tmp_path / "edited.json"
        edited.write_bytes(upload.read_bytes())
        _edit_upload(edited, edit)
        with pytest.raises(AuditChainError, match="its warnings were changed, or its photos removed"):
            verify_export(edited, device_keys=[public])


def test_an_unsigned_or_foreign_export_header_is_said(tmp_path, device, capsys):
    """Stripping the attestation leaves a warning (and --strict fails); one made with another
    key is refused against the device's key and said without it."""
    _, public = device
    log_path, upload = _signed_upload(tmp_path, device, capsys)
    stripped = tmp_path / "stripped.json"
    stripped.write_bytes(upload.read_bytes())
    _edit_upload(stripped, lambda d: d.pop("attestation"))
    _edit_upload(stripped, _cut_newest)  # now unnoticed but for the warning
    report = verify_export(stripped, device_keys=[public])
    assert report.head_signed_by == "" and report.records == 3
    assert any("the export's header is not signed" in w for w in report.warnings)
    assert cli_main(["verify-log", str(stripped), "--device-key", str(public), "--strict"]) == 5
    capsys.readouterr()

    other_private, other_public = generate_keypair(tmp_path / "other", device=True)
    foreign = tmp_path / "foreign.json"
    assert cli_main(["verify-log", str(log_path), "--export-json", str(foreign),
                     "--log-key", str(other_private)]) == 0
    with pytest.raises(AuditChainError, match="header is signed by the key .* not by the device keys"):
        verify_export(foreign, device_keys=[public])
    other = fingerprint(other_public.read_bytes())
    assert any(f"signed by the key {other}, which signed none of its records" in w
               for w in verify_export(foreign).warnings)

    # a log nobody signed exports without an attestation and without a warning about it
    plain = tmp_path / "plain.db"
    _write(plain, 2)
    assert cli_main(["verify-log", str(plain), "--export-json", str(tmp_path / "plain.json")]) == 0
    assert not any("header" in w for w in verify_export(tmp_path / "plain.json").warnings)
    assert cli_main(["verify-log", str(plain), "--log-key", str(other_private)]) == 2
    assert "--log-key signs the header of --export-json" in capsys.readouterr().err


def test_a_malformed_attestation_is_an_edit(tmp_path, device, capsys):
    _, public = device
    _, upload = _signed_upload(tmp_path, device, capsys)
    _edit_upload(upload, lambda d: d["attestation"].update(signature="zz"))
    with pytest.raises(AuditChainError, match="attestation is not well formed"):
        verify_export(upload, device_keys=[public])


def test_an_export_says_what_it_holds_and_its_header_must_agree(tmp_path, device, capsys, monkeypatch):
    """The header's summary, the photos flag and the JSON itself are checked before anything
    is believed: a reader of the header must not be told another story than the one checked."""
    private, public = device
    log_path, upload = _signed_upload(tmp_path, device, capsys)
    cases = [
        (lambda d: d["log"].update(records=99), "header gives its records as 99, but its records give 4"),
        (lambda d: d["log"].update(head_hash="0" * 64), "header gives its head_hash"),
        (lambda d: d["log"]["judged_with"].clear(), "header gives its judged_with as"),
        (lambda d: d["log"].update(warnings=5), "not well formed \\(its warnings are not a list of text\\)"),
        (lambda d: d["log"].update(warnings=["\ud800"]), "does not match the device's signature"),
        (lambda d: d.update(photos="yes"), "its photos is str, not true or false"),
        (lambda d: d["records"][0].pop("photo_base64"), "record 1 .*its photo is missing from an export made with"),
    ]
    for edit, message in cases:
        edited = tmp_path / "edited.json"
        edited.write_bytes(upload.read_bytes())
        _edit_upload(edited, edit)
        with pytest.raises(AuditChainError, match=message):
            verify_export(edited, device_keys=[public])
    # a second "records" before the checked one: a reader keeping the first would see 3
    text = upload.read_text(encoding="utf-8")
    doubled = tmp_path / "doubled.json"
    doubled.write_text(text.replace('"records": [', '"records": [], "records": [', 1), encoding="utf-8")
    with pytest.raises(AuditLogError, match="the key 'records' appears twice"):
        verify_export(doubled)
    doubled.write_bytes(upload.read_bytes())
    _edit_upload(doubled, lambda d: d.update(version=True))  # equal to 1 in Python, not in JSON
    with pytest.raises(AuditLogError, match="audit log export version True"):
        verify_export(doubled)

    # honest edge cases: an empty signed log exported with --photos verifies
    empty = tmp_path / "empty.db"
    with AuditLog(empty, signing_key=private) as log:
        log.export_json(tmp_path / "empty.json", photos=True)
    report = verify_export(tmp_path / "empty.json", device_keys=[public])
    assert report.records == 0 and report.head_signed_by == fingerprint(public.read_bytes())
    # ... and an unsigned export held to device keys is said to be, even with no signed record
    with AuditLog(empty) as log:
        log.export_json(tmp_path / "unsigned.json")
    assert any("header is not signed" in w for w in verify_export(tmp_path / "unsigned.json",
                                                                   device_keys=[public]).warnings)

    # a record appended while the export is made goes to the next export, not past the head
    original = AuditLog.verify_chain

    def appended_meanwhile(self, *args, **kwargs):
        report = original(self, *args, **kwargs)
        with AuditLog(log_path, signing_key=private) as other:
            other.append(make_verdict(9, "match"), photo=jpeg(), auditor="b")
        return report

    monkeypatch.setattr(AuditLog, "verify_chain", appended_meanwhile)
    with AuditLog(log_path, signing_key=private) as log:
        log.export_json(tmp_path / "raced.json", photos=True)
    monkeypatch.undo()
    assert verify_export(tmp_path / "raced.json", device_keys=[public]).records == 4
    with AuditLog(log_path, create=False) as log:
        assert len(log) == 5
