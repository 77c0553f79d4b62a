"""Signed artifacts: a detached Ed25519 signature of an artifact's `dfj.json`, which pins every other
file by its sha256, so one signature vouches for the whole folder (verified with the files' checksums).

`dfj keygen KEY` writes a private key (PEM, readable by its owner only) and `KEY.pub`; `dfj sign ART
--key KEY` writes `ART/dfj.json.sig`; `dfj info --verify --public-key KEY.pub`, `load_judge(...,
public_key=...)` and `--require-signature KEY.pub` (judge, serve, bench) refuse an artifact whose
signature is missing or does not verify. Keys are read from the files named and nowhere else; nothing
here touches the network. Keys from `openssl genpkey -algorithm ed25519` work the same.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from dfj.manifest import MANIFEST_NAME, SIGNATURE_NAME, ArtifactError

ALGORITHM = "ed25519"


def _serialization():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # a core dependency; a broken environment says so
        raise ImportError(f"signing needs the cryptography package: pip install cryptography ({exc})") from None
    return serialization, ed25519


def generate_key(private: str | os.PathLike, *, overwrite: bool = False) -> tuple[Path, Path]:
    """A new Ed25519 key pair: `private` (PEM, mode 0600) and `private`.pub (PEM)."""
    serialization, ed25519 = _serialization()
    private, public = Path(private), Path(f"{private}.pub")
    for path in (private, public):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists (pass --force to replace it)")
    key = ed25519.Ed25519PrivateKey.generate()
    descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _private_key(path: str | os.PathLike):
    serialization, ed25519 = _serialization()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ArtifactError(f"{path}: not an Ed25519 private key")
    return key


def _public_key(path: str | os.PathLike):
    serialization, ed25519 = _serialization()
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ArtifactError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ArtifactError(f"{path}: not an Ed25519 public key")
    return key


def key_id(public_key) -> str:
    """sha256 of the raw public key: which key signed, said without the key."""
    serialization, _ = _serialization()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def sign(artifact: str | os.PathLike, key: str | os.PathLike) -> Path:
    """Write `artifact/dfj.json.sig`: the Ed25519 signature of the exact bytes of its dfj.json. The
    artifact's files are verified against dfj.json first: one signs only what one has checked."""
    from dfj.manifest import verify

    folder = Path(artifact)
    verify(folder)
    private = _private_key(key)
    manifest = (folder / MANIFEST_NAME).read_bytes()
    body = {"algorithm": ALGORITHM, "signed": MANIFEST_NAME, "key_id": key_id(private.public_key()),
            "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
            "signature": base64.b64encode(private.sign(manifest)).decode("ascii")}
    target = folder / SIGNATURE_NAME
    tmp = folder / (SIGNATURE_NAME + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def verify_signature(artifact: str | os.PathLike, public_key: str | os.PathLike) -> dict:
    """Check `artifact/dfj.json.sig` against `public_key`; an ArtifactError names the file and the fault.
    Only dfj.json is checked here: `dfj.manifest.verify` checks every file against it."""
    from cryptography.exceptions import InvalidSignature

    folder = Path(artifact)
    path = folder / SIGNATURE_NAME
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; the artifact is not signed (dfj sign {folder} --key KEY)")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
        signature = base64.b64decode(body["signature"], validate=True)
        algorithm = body["algorithm"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{path}: unreadable signature file ({exc})") from None
    if algorithm != ALGORITHM:
        raise ArtifactError(f"{path}: signed with {algorithm!r}; dfj verifies {ALGORITHM}")
    key = _public_key(public_key)
    if body.get("key_id") != key_id(key):
        raise ArtifactError(f"{path}: signed by another key ({body.get('key_id')}) than {public_key} ({key_id(key)})")
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        raise ArtifactError(f"{manifest}: missing; a signature vouches for it")
    try:
        key.verify(signature, manifest.read_bytes())
    except InvalidSignature:
        raise ArtifactError(f"{path}: the signature does not match {manifest} (dfj.json was changed after signing, "
                            "or the signature was)") from None
    return body
