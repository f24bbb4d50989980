"""Owners' node keys: Flower's SuperNode authentication, so that no node speaks for another owner.

Each owner makes an EC key pair (NIST P-384, OpenSSH format, as Flower's SuperNodes take it) with
``flexmoe fed keygen`` and sends the public half to the coordinator. ``fed serve --node-key
NAME=PUBLIC`` starts the SuperLink with authentication on and registers each key under its
owner's expert name (``flwr supernode register``): a SuperNode whose key is not registered
cannot connect, and the coordinator refuses a reply from a registered node that answers for
another owner than its key's.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from flexmoe.errors import FlexMoEError
from flexmoe.io import atomic_write_bytes

CURVE = ec.SECP384R1


def public_node_key_path(private: Path) -> Path:
    return Path(f"{private}.pub")


def generate_node_key(out: Path, *, force: bool = False) -> Path:
    """A new key pair: the private key at ``out`` (readable by its owner only) and the public
    key at ``out.pub``; returns the public key's path."""
    out = Path(out)
    public = public_node_key_path(out)
    for path in (out, public):
        if path.exists() and not force:
            raise FlexMoEError(path, "already exists; pass --force to replace it")
    key = ec.generate_private_key(CURVE())
    private_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    atomic_write_bytes(out, private_bytes)
    os.chmod(out, 0o600)
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    atomic_write_bytes(public, line + b" flexmoe-node\n")
    return public


def check_public_node_key(path: Path) -> None:
    """``path`` holds an EC public key on a NIST curve, in OpenSSH format."""
    path = Path(path)
    if not path.is_file():
        raise FlexMoEError(path, "node key not found")
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as e:
        raise FlexMoEError(
            path, "not an OpenSSH public key (make one with `flexmoe fed keygen`)"
        ) from e
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FlexMoEError(path, "not an EC public key (make one with `flexmoe fed keygen`)")


def check_private_node_key(path: Path) -> None:
    """``path`` holds an EC private key in OpenSSH format, readable by its owner only."""
    path = Path(path)
    if not path.is_file():
        raise FlexMoEError(path, "node key not found")
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), None)
    except (ValueError, UnsupportedAlgorithm, TypeError) as e:
        raise FlexMoEError(path, "not an unencrypted OpenSSH private key") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise FlexMoEError(path, "not an EC private key (make one with `flexmoe fed keygen`)")


def register_nodes(
    flwr: str, federation: str, keys: dict[str, Path], env: dict[str, str]
) -> dict[int, str]:
    """Register each owner's public key with the running SuperLink (``flwr supernode
    register``); returns the node id Flower gave each, and its owner."""
    nodes: dict[int, str] = {}
    for name, path in keys.items():
        command = [flwr, "supernode", "register", str(Path(path).resolve()), federation]
        command += ["--name", name, "--format", "json"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        found = _node_id(done.stdout)
        if done.returncode != 0 or found is None:
            said = (done.stdout + done.stderr).strip().splitlines()
            raise FlexMoEError(path, f"could not register the node key: {said[-1] if said else ''}")
        if found in nodes:
            raise FlexMoEError(path, f"the same key as {nodes[found]}'s")
        nodes[found] = name
    return nodes


def _node_id(output: str) -> int | None:
    """The node id in ``flwr supernode register --format json``'s output."""
    for line in output.splitlines()[::-1]:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict) and data.get("node-id") is not None:
            return int(data["node-id"])
    try:
        data = json.loads(output)
    except json.JSONDecodeError:
        return None
    found = data.get("node-id") if isinstance(data, dict) else None
    return int(found) if found is not None else None
