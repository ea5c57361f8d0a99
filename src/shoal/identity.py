"""Node identity: an Ed25519 key pair kept in the node's data directory, so a restarted node is the same
node. The NodeId is derived from the public key: the first 16 bytes of sha256(raw public key), in hex.

The key file is created once with mode 0600 (written to a temporary file, then renamed into place, so a
crash never leaves half a key). A file that exists but does not hold a key raises `IdentityError` naming
the file: the node must not silently become someone else.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal.types.ids import NodeId

KEY_FILE_NAME = "node_key.pem"


class IdentityError(Exception):
    """The node's key file cannot be read or written."""


@dataclass(frozen=True)
class NodeIdentity:
    private_key: Ed25519PrivateKey

    @property
    def public_key_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @property
    def node_id(self) -> NodeId:
        return node_id_from_public_key(self.public_key_bytes)

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data)


def node_id_from_public_key(public_key: bytes) -> NodeId:
    return NodeId(hashlib.sha256(public_key).digest()[:16].hex())


def verify_signature(public_key: bytes, signature: bytes, data: bytes) -> bool:
    """Whether `signature` is `public_key`'s signature of `data` (False for a malformed key or signature)."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


def load_or_create_identity(data_dir: Path) -> NodeIdentity:
    """The identity stored in `data_dir`, created there on first use."""
    path = data_dir / KEY_FILE_NAME
    try:
        pem = path.read_bytes()
    except FileNotFoundError:
        return _create(path)
    except OSError as error:
        raise IdentityError(f"cannot read node key {path}: {error.strerror or error}") from error
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise IdentityError(
            f"node key {path} is not a readable private key ({error}); restore it from a backup, or delete it "
            "to start this node under a new identity"
        ) from error
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"node key {path} holds a {type(key).__name__}, not an Ed25519 key")
    return NodeIdentity(key)


def _create(path: Path) -> NodeIdentity:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        # link, not rename: if another process created the key meanwhile, keep theirs (one identity per dir)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return load_or_create_identity(path.parent)
    except OSError as error:
        raise IdentityError(f"cannot write node key {path}: {error.strerror or error}") from error
    finally:
        temporary.unlink(missing_ok=True)
    return NodeIdentity(key)


def default_data_dir(environ: Mapping[str, str], home: Path) -> Path:
    """$XDG_DATA_HOME/shoal, or ~/.local/share/shoal. The CLI passes os.environ and Path.home()."""
    xdg_data_home = environ.get("XDG_DATA_HOME", "")
    # the XDG spec says to ignore a relative path here
    if xdg_data_home and Path(xdg_data_home).is_absolute():
        return Path(xdg_data_home) / "shoal"
    return home / ".local" / "share" / "shoal"
