"""Tests for phibroker.signing: keys on disk, signed approval decisions and signed workflow files (no Redis)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phibroker.errors import InvalidInput, SignatureError
from phibroker.security import signing
from phibroker.security.signing import KeyPair

NOW = 1_700_000_000.0


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def key(tmp_path: Path) -> KeyPair:
    return signing.generate(tmp_path, "stryk")


def _decision(key: KeyPair, **changes: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(approval="ap-1", workflow="wf-1", task="deploy", decision="approve", expires=NOW + 60)
    return signing.sign_decision(key, **{**args, **changes})


# --- keys ------------------------------------------------------------------------------------------------


def test_generate_writes_private_0600_in_0700_dir_and_public_line(tmp_path: Path, key: KeyPair) -> None:
    directory = tmp_path / signing.KEY_DIR
    assert _mode(directory) == 0o700
    assert _mode(directory / "stryk.key") == 0o600
    assert (directory / "stryk.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (directory / "stryk.pub").read_text() == f"stryk {key.public_hex}\n"
    assert len(key.public_hex) == 64 and len(key.fingerprint) == 16
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_generate_refuses_overwrite_unless_asked(tmp_path: Path, key: KeyPair) -> None:
    with pytest.raises(SignatureError, match="already exists"):
        signing.generate(tmp_path, "stryk")
    assert signing.load(tmp_path, "stryk").public_hex == key.public_hex
    new = signing.generate(tmp_path, "stryk", overwrite=True)
    assert new.public_hex != key.public_hex
    assert signing.load(tmp_path, "stryk").public_hex == new.public_hex
    assert _mode(tmp_path / signing.KEY_DIR / "stryk.key") == 0o600


@pytest.mark.parametrize("name", ["", "a/b", "../x", "a b", "é"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(SignatureError, match="bad key name"):
        signing.generate(tmp_path, name)


def test_load_round_trips_and_refuses_missing_or_garbage(tmp_path: Path, key: KeyPair) -> None:
    loaded = signing.load(tmp_path, "stryk")
    assert (loaded.name, loaded.public_hex, loaded.fingerprint) == (key.name, key.public_hex, key.fingerprint)
    with pytest.raises(SignatureError, match="no key 'nobody'"):
        signing.load(tmp_path, "nobody")
    (tmp_path / signing.KEY_DIR / "junk.key").write_text("not a key")
    with pytest.raises(SignatureError, match="cannot read key"):
        signing.load(tmp_path, "junk")
    assert issubclass(SignatureError, InvalidInput) and SignatureError.exit_code == 2


def test_load_or_create_creates_once(tmp_path: Path) -> None:
    first, created = signing.load_or_create(tmp_path, "ana")
    again, created_again = signing.load_or_create(tmp_path, "ana")
    assert (created, created_again) == (True, False)
    assert first.public_hex == again.public_hex


def test_load_or_create_restores_a_missing_pub(tmp_path: Path, key: KeyPair) -> None:
    (tmp_path / signing.KEY_DIR / "stryk.pub").unlink()
    signing.load_or_create(tmp_path, "stryk")
    assert signing.local_public_keys(tmp_path) == {"stryk": key.public_hex}


def test_default_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIBROKER_APPROVER", "Jo Doe/ops")
    assert signing.default_name() == "Jo_Doe_ops"
    monkeypatch.delenv("PHIBROKER_APPROVER")
    monkeypatch.setattr(signing.getpass, "getuser", lambda: "DOMAIN\\kim")
    assert signing.default_name() == "DOMAIN_kim"


def test_local_public_keys_reads_at_call_time_and_skips_junk(tmp_path: Path) -> None:
    assert signing.local_public_keys(tmp_path) == {}
    a = signing.generate(tmp_path, "a")
    assert signing.local_public_keys(tmp_path) == {"a": a.public_hex}
    b = signing.generate(tmp_path, "b")  # made after the first read: seen by the next one
    directory = tmp_path / signing.KEY_DIR
    (directory / "junk.pub").write_text("junk nothex\n")
    (directory / "other.pub").write_text(f"b {b.public_hex}\n")  # a name that is not its file's
    assert signing.local_public_keys(tmp_path) == {"a": a.public_hex, "b": b.public_hex}


def test_parse_public(key: KeyPair) -> None:
    assert signing.parse_public(f"stryk {key.public_hex.upper()}\n") == ("stryk", key.public_hex)


@pytest.mark.parametrize(
    "text",
    ["", "stryk", "stryk " + "ab" * 31, "stryk " + "ab" * 33, "stryk " + "zz" * 32, "a/b " + "ab" * 32, "a b c"],
)
def test_parse_public_refuses_malformed(text: str) -> None:
    with pytest.raises(SignatureError):
        signing.parse_public(text)


# --- decisions -------------------------------------------------------------------------------------------


def test_signed_decision_is_accepted(key: KeyPair) -> None:
    body = _decision(key, comment="looks good")
    assert set(body) == {*signing._DECISION_FIELDS, "signature"}
    assert (body["wf"], body["approver"], body["key"]) == ("wf-1", "stryk", key.public_hex)
    trusted = {"stryk": key.public_hex}
    signing.verify_decision(body, trusted, NOW)
    signing.verify_decision(json.loads(json.dumps(body)), trusted, NOW)  # survives the wire
    signing.verify_decision(_decision(key, decision="reject", reason="no"), trusted, NOW)
    signing.verify_decision({**body, "expires": int(body["expires"])}, trusted, NOW)


def test_sign_refuses_unknown_decision(key: KeyPair) -> None:
    with pytest.raises(SignatureError, match="neither"):
        _decision(key, decision="maybe")


def test_forged_signature_is_refused(tmp_path: Path, key: KeyPair) -> None:
    mallory = signing.generate(tmp_path / "elsewhere", "stryk")  # same name, different key
    forged = {**_decision(mallory), "key": key.public_hex}
    with pytest.raises(SignatureError, match="bad signature"):
        signing.verify_decision(forged, {"stryk": key.public_hex}, NOW)


@pytest.mark.parametrize(
    "name,value",
    [("decision", "reject"), ("task", "other"), ("wf", "wf-2"), ("expires", NOW + 3600), ("approval", "ap-2")],
)
def test_tampered_field_is_refused(key: KeyPair, name: str, value: Any) -> None:
    with pytest.raises(SignatureError, match="bad signature"):
        signing.verify_decision({**_decision(key), name: value}, {"stryk": key.public_hex}, NOW)


def test_expired_decision_is_refused(key: KeyPair) -> None:
    body = _decision(key)
    signing.verify_decision(body, {"stryk": key.public_hex}, body["expires"])  # the last valid instant
    with pytest.raises(SignatureError, match="expired"):
        signing.verify_decision(body, {"stryk": key.public_hex}, body["expires"] + 0.001)


def test_untrusted_name_and_other_key_are_refused(tmp_path: Path, key: KeyPair) -> None:
    other = signing.generate(tmp_path, "other")
    with pytest.raises(SignatureError, match="untrusted key.*not in the trust list"):
        signing.verify_decision(_decision(key), {"other": other.public_hex}, NOW)
    with pytest.raises(SignatureError, match="untrusted key.*not the one trusted"):
        signing.verify_decision(_decision(key), {"stryk": other.public_hex}, NOW)


@pytest.mark.parametrize("name", [*signing._DECISION_FIELDS, "signature"])
def test_missing_field_is_refused(key: KeyPair, name: str) -> None:
    body = _decision(key)
    del body[name]
    with pytest.raises(SignatureError, match=f"missing field '{name}'"):
        signing.verify_decision(body, {"stryk": key.public_hex}, NOW)


@pytest.mark.parametrize(
    "name,value",
    [
        ("wf", 1),
        ("task", None),
        ("expires", "soon"),
        ("expires", True),
        ("comment", 3),
        ("signature", b"x"),
        ("key", []),
    ],
)
def test_wrong_type_is_refused(key: KeyPair, name: str, value: Any) -> None:
    with pytest.raises(SignatureError, match=f"field '{name}' has the wrong type"):
        signing.verify_decision({**_decision(key), name: value}, {"stryk": key.public_hex}, NOW)


@pytest.mark.parametrize("name,value", [("expires", float("nan")), ("decision", "maybe"), ("signature", "zz")])
def test_malformed_values_are_refused(key: KeyPair, name: str, value: Any) -> None:
    with pytest.raises(SignatureError):
        signing.verify_decision({**_decision(key), name: value}, {"stryk": key.public_hex}, NOW)


_FIELD_KEYS = st.sampled_from([*signing._DECISION_FIELDS, "signature"])
_HYPOTHESIS_KEY = KeyPair("stryk", signing.Ed25519PrivateKey.generate())


@settings(max_examples=200, deadline=None)
@given(name=_FIELD_KEYS, text=st.text(max_size=20), number=st.floats(allow_nan=False, allow_infinity=False))
def test_flipping_any_field_fails_verification(name: str, text: str, number: float) -> None:
    key = _HYPOTHESIS_KEY
    body = _decision(key, comment="c", reason=None)
    if name == "expires":
        new: Any = number if number != body["expires"] else number + 1
    elif name == "signature":
        new = body["signature"][:-1] + ("0" if body["signature"][-1] != "0" else "1")
    elif name == "decision":
        new = "reject"
    else:
        new = text if text != body[name] else text + "x"
    with pytest.raises(SignatureError):
        signing.verify_decision({**body, name: new}, {"stryk": key.public_hex}, NOW)


# --- workflow files --------------------------------------------------------------------------------------


@pytest.fixture
def signed(tmp_path: Path, key: KeyPair) -> Path:
    path = tmp_path / "flow.yaml"
    path.write_text("name: flow\ntasks: {}\n")
    assert signing.sign_file(key, path) == tmp_path / "flow.yaml.sig"
    return path


def test_signed_file_verifies(signed: Path, key: KeyPair) -> None:
    trusted = {"stryk": key.public_hex}
    assert signing.verify_file(signed, trusted) == "stryk"
    sig = json.loads(signing.sig_path(signed).read_text())
    assert set(sig) == {"signer", "key", "sha256", "file", "signature"}
    assert signing.verify_file_bytes(signed.read_bytes(), sig, trusted) == "stryk"


def test_a_signature_document_with_text_past_ascii_is_refused_not_an_error(signed: Path, key: KeyPair) -> None:
    """What a .sig (or a run's stored signature) says is anyone's text: past ASCII it is a refusal,
    not a TypeError from the constant-time comparison."""
    sig = json.loads(signing.sig_path(signed).read_text())
    with pytest.raises(SignatureError, match="tampered"):
        signing.verify_file_bytes(signed.read_bytes(), {**sig, "sha256": "é" * 64}, {"stryk": key.public_hex})
    with pytest.raises(SignatureError, match="untrusted key"):
        signing.verify_file_bytes(signed.read_bytes(), sig, {"stryk": "é" * 64})


def test_tampered_file_is_refused(signed: Path, key: KeyPair) -> None:
    signed.write_text("name: flow\ntasks: {evil: {}}\n")
    with pytest.raises(SignatureError, match="tampered"):
        signing.verify_file(signed, {"stryk": key.public_hex})


def test_missing_sig_is_refused(signed: Path, key: KeyPair) -> None:
    signing.sig_path(signed).unlink()
    with pytest.raises(SignatureError, match="unsigned: no flow.yaml.sig"):
        signing.verify_file(signed, {"stryk": key.public_hex})


def test_untrusted_signer_is_refused(tmp_path: Path, signed: Path, key: KeyPair) -> None:
    other = signing.generate(tmp_path, "other")
    with pytest.raises(SignatureError, match="untrusted key"):
        signing.verify_file(signed, {"other": other.public_hex})
    with pytest.raises(SignatureError, match="untrusted key"):
        signing.verify_file(signed, {"stryk": other.public_hex})


@pytest.mark.parametrize("name", ["signer", "sha256", "file"])
def test_edited_sig_is_refused(tmp_path: Path, signed: Path, key: KeyPair, name: str) -> None:
    sig_file = signing.sig_path(signed)
    sig = json.loads(sig_file.read_text())
    if name == "sha256":  # re-pointed at an edited file: the digest matches, the signature does not
        signed.write_text("edited\n")
        sig["sha256"] = signing.hashlib.sha256(b"edited\n").hexdigest()
    else:
        sig[name] = "x" + sig[name]
    sig_file.write_text(json.dumps(sig))
    trusted = {"stryk": key.public_hex, "xstryk": key.public_hex}
    with pytest.raises(SignatureError, match="bad signature"):
        signing.verify_file(signed, trusted)


def test_renamed_file_and_malformed_sig_are_refused(signed: Path, key: KeyPair) -> None:
    trusted = {"stryk": key.public_hex}
    moved = signed.with_name("other.yaml")
    signed.rename(moved)
    signing.sig_path(signed).rename(signing.sig_path(moved))
    with pytest.raises(SignatureError, match="made for 'flow.yaml'"):
        signing.verify_file(moved, trusted)
    signing.sig_path(moved).write_text("[1]")
    with pytest.raises(SignatureError, match="not a JSON object"):
        signing.verify_file(moved, trusted)
    signing.sig_path(moved).write_text("{")
    with pytest.raises(SignatureError, match="not JSON"):
        signing.verify_file(moved, trusted)
    with pytest.raises(SignatureError, match="missing field 'sha256'"):
        signing.verify_file_bytes(b"", {"signer": "stryk", "key": key.public_hex}, trusted)
