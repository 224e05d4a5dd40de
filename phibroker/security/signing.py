"""Ed25519 keys, signed approval decisions and signed workflow files.

An approval lets a workflow do something a person must vouch for, and a workflow file decides what runs;
both must be provably from a trusted person and bound to exactly what they approve, so a decision cannot
be forged, replayed onto another task, altered, or kept past its expiry, and a file cannot change after
it was signed. Pure: files and crypto only, no Redis.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from phibroker.errors import SignatureError
from phibroker.wire import same_digest

KEY_DIR = "keys"
DECISIONS = ("approve", "reject")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_HEX_SIG = re.compile(r"[0-9a-fA-F]{128}")


@dataclass(frozen=True)
class KeyPair:
    """An approver's name and private key; the public half is what others trust."""

    name: str
    private: Ed25519PrivateKey = field(repr=False)

    @property
    def public_hex(self) -> str:
        """The raw 32-byte public key as hex: the form trust lists and signatures carry."""
        return self.private.public_key().public_bytes_raw().hex()

    @property
    def fingerprint(self) -> str:
        """A short id to compare keys by eye: the first 16 hex chars of sha256(public key)."""
        return hashlib.sha256(self.private.public_key().public_bytes_raw()).hexdigest()[:16]

    def sign(self, data: bytes) -> str:
        """Hex Ed25519 signature of DATA."""
        return self.private.sign(data).hex()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SignatureError(f"bad key name {name!r}: use letters, digits, '_', '.' or '-'")
    return name


def _paths(home: Path, name: str) -> tuple[Path, Path]:
    directory = Path(home) / KEY_DIR
    return directory / f"{_check_name(name)}.key", directory / f"{name}.pub"


def _write_private(path: Path, data: bytes, overwrite: bool) -> None:
    """Write a 0600 file atomically; without overwrite, os.link fails if another process made it first."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise SignatureError(f"key {path} already exists (overwrite it explicitly)") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _write_public(key: KeyPair, path: Path) -> None:
    path.write_text(f"{key.name} {key.public_hex}\n", encoding="utf-8")


def generate(home: Path, name: str, overwrite: bool = False) -> KeyPair:
    """Create NAME's key pair in HOME/keys: the private key readable by its owner alone."""
    key_path, pub_path = _paths(home, name)
    if key_path.exists() and not overwrite:
        raise SignatureError(f"key {key_path} already exists (overwrite it explicitly)")
    key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(key_path.parent, 0o700)
    key = KeyPair(name, Ed25519PrivateKey.generate())
    pem = key.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_private(key_path, pem, overwrite)
    _write_public(key, pub_path)
    return key


def load(home: Path, name: str) -> KeyPair:
    """NAME's key pair from HOME/keys; a missing or unreadable key is a SignatureError."""
    key_path, _ = _paths(home, name)
    try:
        private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise SignatureError(f"no key {name!r} in {key_path.parent} (run `phibroker keys generate`)") from None
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"cannot read key {key_path}: {e}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise SignatureError(f"key {key_path} is not an Ed25519 key")
    return KeyPair(name, private)


def load_or_create(home: Path, name: str) -> tuple[KeyPair, bool]:
    """NAME's key, created on first use so a first try needs no setup; returns (key, created)."""
    key_path, pub_path = _paths(home, name)
    if not key_path.exists():
        try:
            return generate(home, name), True
        except SignatureError:
            if not key_path.exists():  # anything but losing a race with another process
                raise
    key = load(home, name)
    if not pub_path.exists():  # so a coordinator without a trust list finds it
        _write_public(key, pub_path)
    return key, False


def default_name() -> str:
    """The approver's name: $PHIBROKER_APPROVER, else the login name, reduced to [A-Za-z0-9_.-]."""
    raw = os.environ.get("PHIBROKER_APPROVER") or getpass.getuser()
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw).strip(".") or "approver"


def parse_public(text: str) -> tuple[str, str]:
    """A "<name> <hex>" line, as in a .pub file, as (name, lowercase hex)."""
    parts = text.split()
    if len(parts) != 2:
        raise SignatureError(f"bad public key {text.strip()[:80]!r}: expected '<name> <64 hex chars>'")
    name, hexkey = parts
    _check_name(name)
    if not _HEX_KEY.fullmatch(hexkey):
        raise SignatureError(f"bad public key for {name!r}: expected 64 hex chars, got {hexkey[:80]!r}")
    return name, hexkey.lower()


def local_public_keys(home: Path) -> dict[str, str]:
    """Name -> public hex for every HOME/keys/*.pub, read now; malformed or misnamed files are skipped."""
    keys: dict[str, str] = {}
    for path in sorted((Path(home) / KEY_DIR).glob("*.pub")):
        try:
            name, hexkey = parse_public(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SignatureError):
            continue
        if name == path.stem:
            keys[name] = hexkey
    return keys


def _canonical(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _trust_hint(name: str, key_hex: str, replaces: bool = False) -> str:
    """The command that trusts the key a refused signature was made with: what the operator types next."""
    if not _HEX_KEY.fullmatch(key_hex):
        return ""
    when = f"if it is {name}'s new key" if replaces else "to trust it"
    return f"; {when}: phibroker keys trust {name} {key_hex.lower()}"


def _verify(trusted: Mapping[str, str], name: str, key_hex: str, signature: str, data: bytes) -> None:
    """Check that NAME is trusted with exactly KEY_HEX and that SIGNATURE over DATA is theirs."""
    trusted_hex = trusted.get(name)
    if trusted_hex is None:
        raise SignatureError(f"untrusted key: {name!r} is not in the trust list{_trust_hint(name, key_hex)}")
    if not _HEX_KEY.fullmatch(key_hex) or not same_digest(trusted_hex.lower(), key_hex.lower()):
        hint = _trust_hint(name, key_hex, replaces=True)
        raise SignatureError(f"untrusted key: signed by a key that is not the one trusted for {name!r}{hint}")
    if not _HEX_SIG.fullmatch(signature):
        raise SignatureError(f"bad signature: not a hex Ed25519 signature (by {name!r})")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex)).verify(bytes.fromhex(signature), data)
    except InvalidSignature:
        raise SignatureError(f"bad signature: forged or altered since {name!r} signed it") from None


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in body:
        raise SignatureError(f"missing field {name!r}")
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SignatureError(f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


_DECISION_FIELDS: dict[str, type | tuple[type, ...]] = {
    "approval": str,
    "wf": str,
    "task": str,
    "decision": str,
    "approver": str,
    "key": str,
    "expires": (int, float),
    "comment": (str, type(None)),
    "reason": (str, type(None)),
}


def _decision_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    fields = {name: _field(body, name, kind) for name, kind in _DECISION_FIELDS.items()}
    if not math.isfinite(fields["expires"]):
        raise SignatureError("field 'expires' is not a finite number")
    fields["expires"] = float(fields["expires"])  # 1700000000 and 1700000000.0 sign alike
    if fields["decision"] not in DECISIONS:
        raise SignatureError(f"decision {fields['decision']!r} is neither 'approve' nor 'reject'")
    return fields


def sign_decision(
    key: KeyPair,
    *,
    approval: str,
    workflow: str,
    task: str,
    decision: str,
    expires: float,
    comment: str | None = None,
    reason: str | None = None,
) -> dict[str, Any]:
    """A decision signed by KEY, bound to one approval request of one task of one workflow until EXPIRES."""
    body: dict[str, Any] = {
        "approval": approval,
        "wf": workflow,
        "task": task,
        "decision": decision,
        "approver": key.name,
        "key": key.public_hex,
        "expires": expires,
        "comment": comment,
        "reason": reason,
    }
    fields = _decision_fields(body)
    return {**fields, "signature": key.sign(_canonical(fields))}


def verify_decision(body: Mapping[str, Any], trusted: Mapping[str, str], now: float) -> None:
    """Accept a decision only if well-formed, signed by the key trusted for its approver, and unexpired.

    Fields beyond the signed ones are ignored (not covered); accepting it once is the caller's job.
    """
    fields = _decision_fields(body)
    _verify(trusted, fields["approver"], fields["key"], _field(body, "signature", str), _canonical(fields))
    if now > fields["expires"]:
        raise SignatureError(f"expired: the decision on approval {fields['approval']!r} is past its expiry")


def sig_path(path: Path) -> Path:
    """Where a workflow file's detached signature lives: <file>.sig next to it."""
    return path.with_name(path.name + ".sig")


def _file_fields(signer: str, key_hex: str, digest: str, name: str) -> dict[str, str]:
    return {"signer": signer, "key": key_hex, "sha256": digest, "file": name}


def sign_file(key: KeyPair, path: Path) -> Path:
    """Sign PATH's exact bytes and name into <path>.sig; returns the .sig path."""
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise SignatureError(f"cannot read {path}: {e.strerror}") from None
    fields = _file_fields(key.name, key.public_hex, digest, path.name)
    out = sig_path(path)
    out.write_text(json.dumps({**fields, "signature": key.sign(_canonical(fields))}, indent=2) + "\n")
    return out


def verify_file_bytes(content: bytes, signature: Mapping[str, Any], trusted: Mapping[str, str]) -> str:
    """Check CONTENT against a .sig document; returns the signer's name."""
    signer, key_hex, digest, name, sig = (
        _field(signature, f, str) for f in ("signer", "key", "sha256", "file", "signature")
    )
    if not same_digest(digest.lower(), hashlib.sha256(content).hexdigest()):  # the digest is what a file says
        raise SignatureError("tampered: the file changed since it was signed")
    _verify(trusted, signer, key_hex, sig, _canonical(_file_fields(signer, key_hex, digest, name)))
    return str(signer)


def verify_file(path: Path, trusted: Mapping[str, str]) -> str:
    """Check PATH against <path>.sig (made for a file of the same name); returns the signer's name."""
    sig_file = sig_path(path)
    try:
        content = path.read_bytes()
        raw = sig_file.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        if Path(str(e.filename)) == sig_file:
            raise SignatureError(f"unsigned: no {sig_file.name}") from None
        raise SignatureError(f"cannot read {path}: no such file") from None
    except OSError as e:
        raise SignatureError(f"cannot read {e.filename}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SignatureError(f"bad signature: {sig_file.name} is not UTF-8 text") from None
    try:
        signature = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SignatureError(f"bad signature: {sig_file.name} is not JSON ({e.msg})") from None
    if not isinstance(signature, dict):
        raise SignatureError(f"bad signature: {sig_file.name} is not a JSON object")
    signer = verify_file_bytes(content, signature, trusted)
    if signature["file"] != path.name:
        raise SignatureError(f"bad signature: {sig_file.name} was made for {signature['file']!r}, not {path.name!r}")
    return signer
