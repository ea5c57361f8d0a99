"""Node identity: created once (0600), the same id across restarts, clear errors for a bad key file."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from shoal.identity import (
    KEY_FILE_NAME,
    IdentityError,
    default_data_dir,
    load_or_create_identity,
    node_id_from_public_key,
    verify_signature,
)
from shoal.types import Ping


def test_created_with_owner_only_permissions(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    identity = load_or_create_identity(data_dir)
    key_file = data_dir / KEY_FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{32}", identity.node_id)
    assert [p.name for p in data_dir.iterdir()] == [KEY_FILE_NAME]  # no temporary file left behind


def test_same_id_across_restarts(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    second = load_or_create_identity(tmp_path)
    assert first.node_id == second.node_id
    assert first.public_key_bytes == second.public_key_bytes


def test_different_dirs_different_ids(tmp_path: Path) -> None:
    assert load_or_create_identity(tmp_path / "a").node_id != load_or_create_identity(tmp_path / "b").node_id


def test_node_id_derives_from_public_key(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)
    assert identity.node_id == node_id_from_public_key(identity.public_key_bytes)
    assert node_id_from_public_key(b"\x00" * 32) == "66687aadf862bd776c8fc18b8e9f8e20"


def test_node_id_is_valid_in_messages(tmp_path: Path) -> None:
    node_id = load_or_create_identity(tmp_path).node_id
    assert Ping(node_id=node_id, ping_id=1, sent_at=0.0).node_id == node_id


def test_signatures(tmp_path: Path) -> None:
    identity = load_or_create_identity(tmp_path)
    signature = identity.sign(b"hello")
    assert verify_signature(identity.public_key_bytes, signature, b"hello")
    assert not verify_signature(identity.public_key_bytes, signature, b"hellO")
    assert not verify_signature(b"short", signature, b"hello")
    other = load_or_create_identity(tmp_path / "other")
    assert not verify_signature(other.public_key_bytes, signature, b"hello")


@pytest.mark.parametrize(
    "content", [b"", b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_corrupt_key_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / KEY_FILE_NAME).write_bytes(content)
    with pytest.raises(IdentityError, match=rf"node key .*{KEY_FILE_NAME} is not a readable private key"):
        load_or_create_identity(tmp_path)
    assert (tmp_path / KEY_FILE_NAME).read_bytes() == content  # never overwritten


def test_key_of_another_type_is_refused(tmp_path: Path) -> None:
    pem = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / KEY_FILE_NAME).write_bytes(pem)
    with pytest.raises(IdentityError, match="not an Ed25519 key"):
        load_or_create_identity(tmp_path)


def test_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(IdentityError, match=r"cannot (read|write) node key .*: Not a directory"):
        load_or_create_identity(blocker / "data")


def test_default_data_dir() -> None:
    home = Path("/home/ada")
    assert default_data_dir({}, home) == Path("/home/ada/.local/share/shoal")
    assert default_data_dir({"XDG_DATA_HOME": "/srv/xdg"}, home) == Path("/srv/xdg/shoal")
    assert default_data_dir({"XDG_DATA_HOME": ""}, home) == Path("/home/ada/.local/share/shoal")
    assert default_data_dir({"XDG_DATA_HOME": "relative/dir"}, home) == Path("/home/ada/.local/share/shoal")
