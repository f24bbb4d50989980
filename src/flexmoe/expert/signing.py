"""Signed packages: an owner's Ed25519 key signs the package's manifest, which pins the sha256 of
every other file, so one signature covers the whole package.

An owner makes a key pair once (``flexmoe keys generate``): the private key stays with the owner
(PKCS#8 PEM, readable by its owner only, encrypted when ``FLEXMOE_KEY_PASSPHRASE`` is set); the
public key (a small JSON file) goes to the coordinator, who registers it
(:mod:`flexmoe.expert.registry`). ``expert train --signing-key`` and ``expert sign`` write
``signature.json`` beside the manifest. The signed message is a fixed domain prefix followed by the
manifest's exact bytes, so a signature made for anything else never verifies here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flexmoe.errors import FlexMoEError
from flexmoe.expert.identity import as_field, check_owner
from flexmoe.io import atomic_write_bytes, read_bounded, read_manifest_model, write_json

SIGNATURE_FILE = "signature.json"
PUBLIC_SUFFIX = ".pub.json"
PASSPHRASE_ENV = "FLEXMOE_KEY_PASSPHRASE"
_DOMAIN = b"flexmoe-expert-manifest-v1\x00"  # what a flexmoe signature signs, before the bytes
_MAX_KEY_FILE = 16 << 10

Base64 = Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z0-9+/=]+$")]


def _decode(value: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError(f"{what} is not base64") from None
    if len(raw) != size:
        raise ValueError(f"{what} is {len(raw)} bytes; Ed25519 uses {size}")
    return raw


def key_fingerprint(public: bytes) -> str:
    """How a key is named everywhere: sha256 of its 32 raw bytes, in hex."""
    return hashlib.sha256(public).hexdigest()


class _Keyed(BaseModel):
    """A JSON record that carries an Ed25519 public key (raw, base64)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1
    algorithm: Literal["ed25519"] = "ed25519"
    public_key: Base64

    @field_validator("public_key")
    @classmethod
    def _key(cls, value: str) -> str:
        _decode(value, 32, "public_key")
        return value

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.public_key)

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.raw)


class PublicKeyFile(_Keyed):
    """The public half of an owner's key, as handed to the coordinator."""

    kind: Literal["flexmoe-public-key"] = "flexmoe-public-key"
    owner: str

    @field_validator("owner")
    @classmethod
    def _owner(cls, value: str) -> str:
        return as_field(check_owner, "owner", value)


class Signature(_Keyed):
    """``signature.json``: who signed the manifest, and the signature."""

    kind: Literal["flexmoe-signature"] = "flexmoe-signature"
    signature: Base64

    @field_validator("signature")
    @classmethod
    def _signature(cls, value: str) -> str:
        _decode(value, 64, "signature")
        return value

    def verify(self, manifest: bytes, where: Path) -> None:
        """Raise unless this signature is the signing key's over exactly ``manifest``."""
        key = Ed25519PublicKey.from_public_bytes(self.raw)
        try:
            key.verify(base64.b64decode(self.signature), _DOMAIN + manifest)
        except InvalidSignature:
            raise FlexMoEError(
                where,
                "the signature does not match the manifest (changed after signing, or "
                "signed for another package)",
            ) from None


@dataclass(frozen=True)
class Signer:
    """A verified signer: the key's fingerprint, and its owner as the registry knows it (None
    when no registry was consulted)."""

    fingerprint: str
    owner: str | None

    def record(self) -> dict[str, str | None]:
        return {"fingerprint": self.fingerprint, "owner": self.owner}


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    return value.encode() if value else None


def generate_key(out: Path, owner: str, *, force: bool = False) -> PublicKeyFile:
    """A new Ed25519 key pair: the private key at ``out`` (mode 600), the public one beside it
    as ``<out without suffix>.pub.json``."""
    out = Path(out)
    owner = check_owner("--owner", owner)
    public_path = public_key_path(out)
    for path in (out, public_path):
        if path.exists() and not force:
            raise FlexMoEError(path, "already exists; choose another --out or pass --force")
    key = Ed25519PrivateKey.generate()
    passphrase = _passphrase()
    encryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    public = PublicKeyFile(owner=owner, public_key=base64.b64encode(raw).decode())
    write_json(public_path, public.model_dump())
    old = os.umask(0o077)  # the private key is never readable by others, not even briefly
    try:
        atomic_write_bytes(out, pem)
    finally:
        os.umask(old)
    os.chmod(out, 0o600)
    return public


def public_key_path(private: Path) -> Path:
    return Path(private).with_suffix(PUBLIC_SUFFIX)


def read_public_key(path: Path) -> PublicKeyFile:
    return read_manifest_model(Path(path), PublicKeyFile)


def read_private_key(path: Path) -> Ed25519PrivateKey:
    """An owner's private key; refused when others can read it, as ssh does."""
    path = Path(path)
    raw = read_bounded(path, max_bytes=_MAX_KEY_FILE)
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FlexMoEError(path, "private key is readable by others; chmod 600 it")
    try:
        key = serialization.load_pem_private_key(raw, password=_passphrase())
    except TypeError:
        raise FlexMoEError(
            path, f"the key is encrypted; set {PASSPHRASE_ENV} to its passphrase"
        ) from None
    except ValueError as e:
        raise FlexMoEError(path, f"not a readable private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FlexMoEError(path, "not an Ed25519 private key")
    return key


def sign_manifest(manifest: bytes, key: Ed25519PrivateKey) -> Signature:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Signature(
        public_key=base64.b64encode(raw).decode(),
        signature=base64.b64encode(key.sign(_DOMAIN + manifest)).decode(),
    )


def read_signature(package_dir: Path) -> Signature | None:
    """The package's signature, or None when it has none."""
    path = Path(package_dir) / SIGNATURE_FILE
    if not path.exists() and not path.is_symlink():
        return None
    return read_manifest_model(path, Signature)
