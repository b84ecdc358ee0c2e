"""Optional Ed25519 signatures of bundles: a device can refuse every bundle its owner did not sign.

``manifest.sig`` (JSON, beside ``manifest.json``) signs the manifest's ``manifest_sha256``: the digest of its
canonical body, which seals the classes, the preprocessing, the tolerances, the precisions and the sha256 of
every file the bundle holds. So one signature covers the whole bundle.

The ``cryptography`` package does the work; it is imported only when a key is used
(``pip install 'edgeconv-runtime[sign]'``).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from .errors import EdgeconvError
from .fileio import atomic_write_bytes, atomic_write_json
from .manifest import MANIFEST_NAME, SIGNATURE_NAME, is_sha256, read_regular_bytes

SIGNATURE_FORMAT = "edgeconv.signature"
ALGORITHM = "ed25519"
MESSAGE_PREFIX = b"edgeconv.bundle manifest_sha256 "  # what is signed: this prefix and the digest's 64 hex characters
MAX_KEY_BYTES = 16 << 10
MAX_SIGNATURE_BYTES = 16 << 10
INSTALL_HINT = "bundle signing needs the cryptography package: pip install 'edgeconv-runtime[sign]' (or pip install cryptography)"

KeyLike = Union[str, "os.PathLike[str]", Any]


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:
        raise EdgeconvError(INSTALL_HINT) from exc
    return serialization, ed25519, InvalidSignature


def message(digest: str) -> bytes:
    return MESSAGE_PREFIX + digest.encode("ascii")


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise EdgeconvError(f"{what} {path} not found ({exc.strerror}); create a key pair with `edgeconv-runtime keygen NAME`") from exc
    if st.st_size > MAX_KEY_BYTES or not os.path.isfile(path):
        raise EdgeconvError(f"{what} {path} is not a PEM key file; create a key pair with `edgeconv-runtime keygen NAME`")
    return Path(path).read_bytes()


def public_key_id(key) -> str:
    """The key's fingerprint: sha256 of its 32 raw bytes, first 16 hex characters."""
    serialization, _, _ = _crypto()
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: KeyLike):
    """An Ed25519 private key from a PEM file (unencrypted PKCS#8, as `keygen` writes); one-line errors."""
    return _load_key(path, private=True)


def load_public_key(path: KeyLike):
    """An Ed25519 public key from a PEM file (or an Ed25519PublicKey as is); one-line errors."""
    return _load_key(path, private=False)


def _load_key(path: KeyLike, private: bool):
    serialization, ed25519, _ = _crypto()
    want = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if isinstance(path, want):
        return path
    what = "signing key" if private else "public key"
    data = _read_key_file(Path(path), what)
    try:
        key = serialization.load_pem_private_key(data, password=None) if private else serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        if private:
            detail = " ".join(str(exc).split())[:100]
            raise EdgeconvError(f"signing key {path} is not an unencrypted PEM private key ({detail}); "
                                "create one with `edgeconv-runtime keygen NAME`") from exc
        hint = " (that is the private key: pass NAME.pub.pem)" if b"PRIVATE KEY" in data else ""
        raise EdgeconvError(f"public key {path} is not a PEM public key{hint}; `edgeconv-runtime keygen NAME` writes NAME.pub.pem") from exc
    if not isinstance(key, want):
        raise EdgeconvError(f"{what} {path} is a {type(key).__name__}, not an Ed25519 key; create one with `edgeconv-runtime keygen NAME`")
    return key


def keygen(name: KeyLike, force: bool = False) -> tuple:
    """Write a new key pair: NAME.pem (private, mode 0600) and NAME.pub.pem (public); returns their paths and the key id.

    Both are written atomically; existing files are refused unless ``force``.
    """
    serialization, ed25519, _ = _crypto()
    base = Path(name)
    if base.suffix == ".pem":
        base = base.with_suffix("")
    private, public = base.with_name(base.name + ".pem"), base.with_name(base.name + ".pub.pem")
    for p in (private, public):
        if (p.exists() or p.is_symlink()) and not force:
            raise EdgeconvError(f"{p} already exists; choose another NAME or pass --force to replace the key pair")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(private, pem, mode=0o600)
    atomic_write_bytes(public, pub)
    return private, public, public_key_id(key.public_key())


def sign_bundle(root: KeyLike, key: KeyLike) -> Path:
    """Write ``root/manifest.sig``: the Ed25519 signature of the bundle's (checked) manifest digest."""
    from .manifest import read_manifest

    key = load_private_key(key)
    manifest = read_manifest(root)  # refuses a manifest that does not match its own digest: never sign a tampered one
    digest = manifest.digest
    signature = key.sign(message(digest))
    doc = {"format": SIGNATURE_FORMAT, "algorithm": ALGORITHM, "manifest_sha256": digest,
           "key_id": public_key_id(key.public_key()), "signature": base64.b64encode(signature).decode("ascii")}
    path = Path(root) / SIGNATURE_NAME
    atomic_write_json(path, doc)
    return path


def check_signature(root: KeyLike, digest: str, public_key: KeyLike) -> str:
    """Refuse (one line) a bundle whose ``manifest.sig`` is missing, or does not sign ``digest`` with ``public_key``.

    Returns the key id. ``digest`` is the manifest's own, already checked against its body.
    """
    _, _, InvalidSignature = _crypto()
    key = load_public_key(public_key)
    kid = public_key_id(key)
    root = Path(root)
    where = f"bundle {root}"
    path = root / SIGNATURE_NAME
    if not os.path.lexists(path):
        raise EdgeconvError(f"{where} is not signed (no {SIGNATURE_NAME}) and a signature by key {kid} is required; "
                            f"export it with `edgeconv export --sign-key KEY.pem`")
    raw = read_regular_bytes(path, SIGNATURE_NAME, root, MAX_SIGNATURE_BYTES)
    try:
        doc = json.loads(raw.decode("utf-8"))
        sig = base64.b64decode(doc["signature"], validate=True)
        ok_doc = doc.get("format") == SIGNATURE_FORMAT and doc.get("algorithm") == ALGORITHM and is_sha256(doc.get("manifest_sha256"))
    except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
        ok_doc = False
    if not ok_doc:
        raise EdgeconvError(f"{SIGNATURE_NAME} in {root} is not an edgeconv Ed25519 signature; re-sign the bundle (`edgeconv export --sign-key`)")
    if doc["manifest_sha256"] != digest:
        raise EdgeconvError(f"{SIGNATURE_NAME} in {root} signs another manifest than its {MANIFEST_NAME} (the bundle changed after it was "
                            "signed); refusing it: re-export and sign it again")
    if doc.get("key_id") not in (None, kid):
        raise EdgeconvError(f"{where} is signed by key {str(doc.get('key_id'))[:16]}, not by the trusted key {kid}; "
                            "refusing it: sign it with the owner's key")
    try:
        key.verify(sig, message(digest))
    except InvalidSignature:
        raise EdgeconvError(f"{SIGNATURE_NAME} in {root} is not a valid signature by key {kid}; refusing the bundle "
                            "(sign it with the owner's key)") from None
    return kid


_default_public_key: Optional[Any] = None


def set_trusted_key(public_key: Optional[KeyLike]) -> None:
    """The process-wide key every bundle opened without an explicit ``public_key`` must be signed by
    (``--public-key`` sets it for the whole command: serve, bench, stream); None: signatures are not required."""
    global _default_public_key
    _default_public_key = None if public_key is None else load_public_key(public_key)


def trusted_key() -> Optional[Any]:
    return _default_public_key


__all__ = ["check_signature", "keygen", "load_private_key", "load_public_key", "public_key_id", "set_trusted_key", "sign_bundle", "trusted_key"]
