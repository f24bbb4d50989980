"""Signed packages and the coordinator's key registry (issue 15, part 2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import train_packages
from test_hostile import _refused, main_ok

from flexmoe.cli import main
from flexmoe.data.documents import DataSpec
from flexmoe.expert.manifest import MANIFEST_FILE, TENSORS_FILE
from flexmoe.expert.package import load_package
from flexmoe.expert.registry import KeyRegistry
from flexmoe.expert.signing import PASSPHRASE_ENV, SIGNATURE_FILE, read_private_key
from flexmoe.expert.spec import ExpertIdentity, ExpertSpec
from flexmoe.expert.train import EXPERT_DEFAULTS, train_expert
from flexmoe.io import read_json
from flexmoe.merge.layout import SLOTS_FILE


@pytest.fixture(scope="module")
def good(
    tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path, corpus_dir: Path
) -> list[Path]:
    return train_packages(tmp_path_factory.mktemp("good"), anchor_dir, corpus_dir)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A private key per owner of the good packages, and a stranger's."""
    root = tmp_path_factory.mktemp("keys")
    out = {}
    for owner in ("upper org", "again org", "stranger"):
        path = root / f"{owner.split()[0]}.key"
        with pytest.raises(SystemExit) as done:
            main(["keys", "generate", "--owner", owner, "--out", str(path)])
        assert done.value.code in (0, None)
        out[owner] = path
    return out


def _signed(good: list[Path], keys: dict[str, Path], root: Path) -> list[Path]:
    """Copies of the good packages, each signed by its owner with `expert sign`."""
    out = []
    for pkg, owner in zip(good, ("upper org", "again org"), strict=True):
        shutil.copytree(pkg, root / pkg.name)
        with pytest.raises(SystemExit) as done:
            main(["expert", "sign", str(root / pkg.name), "--signing-key", str(keys[owner])])
        assert done.value.code in (0, None)
        out.append(root / pkg.name)
    return out


def _registry(root: Path, keys: dict[str, Path], *owners: str) -> Path:
    path = root / "keys.sqlite"
    for owner in owners:
        with pytest.raises(SystemExit) as done:
            main(["keys", "register", str(path), str(keys[owner].with_suffix(".pub.json"))])
        assert done.value.code in (0, None)
    return path


def _merge(anchor_dir: Path, pkgs: list[Path], out: Path, registry: Path) -> list[str]:
    args = ["merge", "--anchor", str(anchor_dir), "--out", str(out), "--registry", str(registry)]
    for pkg in pkgs:
        args += ["--expert", str(pkg)]
    return args


def test_keygen_writes_a_private_key_only_its_owner_can_read(keys: dict[str, Path]) -> None:
    private = keys["upper org"]
    assert private.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in private.read_bytes()
    public = read_json(private.with_suffix(".pub.json"))
    assert public["owner"] == "upper org" and "PRIVATE" not in json.dumps(public)


def test_good_signatures_merge_and_the_slot_table_records_the_signer(
    good: list[Path], keys: dict[str, Path], anchor_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    pkgs = _signed(good, keys, tmp_path)
    registry = _registry(tmp_path, keys, "upper org", "again org")
    main_ok(["expert", "verify", str(pkgs[0]), "--anchor", str(anchor_dir),
             "--registry", str(registry)], capsys)  # fmt: skip
    merged = tmp_path / "merged"
    main_ok(_merge(anchor_dir, pkgs, merged, registry), capsys)
    table = read_json(merged / SLOTS_FILE)
    assert table["signatures_required"] is True
    signers = [s["signer"] for s in table["slots"]]
    assert signers[0] is None
    assert [s["owner"] for s in signers[1:]] == ["upper org", "again org"]
    with KeyRegistry(registry) as reg:
        known = {k.owner: k.fingerprint for k in reg.list()}
    assert signers[1]["fingerprint"] == known["upper org"]
    with pytest.raises(SystemExit):
        main(["members", "list", str(merged)])
    out = capsys.readouterr().out
    assert known["again org"][:16] in out and "signed by" in out


def test_verify_shows_the_signature(
    good: list[Path], keys: dict[str, Path], anchor_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    pkgs = _signed(good, keys, tmp_path)
    registry = _registry(tmp_path, keys, "upper org")
    with pytest.raises(SystemExit):
        main(["expert", "verify", str(pkgs[0]), "--anchor", str(anchor_dir),
              "--registry", str(registry)])  # fmt: skip
    out = capsys.readouterr().out
    assert "of upper org: valid, registered, live" in out and "package is sound" in out
    with pytest.raises(SystemExit):
        main(["expert", "verify", str(good[0]), "--anchor", str(anchor_dir)])
    assert "unsigned" in capsys.readouterr().out


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("manifest byte", "signature does not match the manifest"),
        ("tensors byte", "sha256 does not match the manifest"),
        ("signature byte", "signature does not match the manifest"),
        ("other owner's key", "signed by 'again org''s key, but the manifest's owner is"),
        ("unregistered key", "which is not in the key registry"),
        ("revoked key", "revoked on"),
        ("unsigned", "unsigned package"),
        ("signature of another package", "signature does not match the manifest"),
    ],
)
def test_a_bad_signature_is_refused_at_verify_merge_and_merge_add(
    case: str, words: str, good: list[Path], keys: dict[str, Path], anchor_dir: Path,
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    pkgs = _signed(good, keys, tmp_path)
    registry = _registry(tmp_path, keys, "upper org", "again org")
    bad = pkgs[0]
    if case == "manifest byte":
        raw = (bad / MANIFEST_FILE).read_bytes()
        _flip_byte(bad / MANIFEST_FILE, raw.index(b"upper org") + 1)  # "upper org" -> "uqper org"
    elif case == "tensors byte":
        _flip_byte(bad / TENSORS_FILE, (bad / TENSORS_FILE).stat().st_size - 3)
    elif case == "signature byte":
        signature = read_json(bad / SIGNATURE_FILE)
        value = signature["signature"]
        signature["signature"] = ("B" if value[0] != "B" else "C") + value[1:]
        (bad / SIGNATURE_FILE).write_text(json.dumps(signature))
    elif case == "other owner's key":
        main_ok(["expert", "sign", str(bad), "--signing-key", str(keys["again org"])], capsys)
    elif case == "unregistered key":
        main_ok(["expert", "sign", str(bad), "--signing-key", str(keys["stranger"])], capsys)
    elif case == "revoked key":
        with KeyRegistry(registry) as reg:
            target = next(k for k in reg.list() if k.owner == "upper org")
        main_ok(["keys", "revoke", str(registry), target.fingerprint[:12]], capsys)
    elif case == "unsigned":
        (bad / SIGNATURE_FILE).unlink()
    elif case == "signature of another package":
        shutil.copy(pkgs[1] / SIGNATURE_FILE, bad / SIGNATURE_FILE)
    line = _refused(["expert", "verify", str(bad), "--anchor", str(anchor_dir),
                     "--registry", str(registry)], capsys)  # fmt: skip
    assert words in line, line
    out = tmp_path / "merged"
    line = _refused(_merge(anchor_dir, [pkgs[1], bad], out, registry), capsys)
    assert words in line, line
    assert not out.exists() and not list(tmp_path.glob(".merged*"))
    main_ok(_merge(anchor_dir, [pkgs[1]], out, registry), capsys)
    before = sorted(p.name for p in out.iterdir())
    line = _refused(["merge", "add", str(out), str(bad), "--registry", str(registry)], capsys)
    assert words in line, line
    assert sorted(p.name for p in out.iterdir()) == before


def test_policy_and_merge_add_keep_to_the_registry(
    good: list[Path], keys: dict[str, Path], anchor_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    pkgs = _signed(good, keys, tmp_path)
    registry = _registry(tmp_path, keys, "upper org", "again org")
    merged = tmp_path / "merged"
    main_ok(_merge(anchor_dir, [pkgs[0]], merged, registry), capsys)
    line = _refused(["merge", "add", str(merged), str(pkgs[1])], capsys)
    assert "--registry" in line  # a model merged against a registry stays under it
    main_ok(["merge", "add", str(merged), str(pkgs[1]), "--registry", str(registry)], capsys)
    table = read_json(merged / SLOTS_FILE)
    assert table["slots"][2]["signer"]["owner"] == "again org"
    # The policy can take unsigned packages; a signed one is still checked.
    main_ok(["keys", "list", str(registry), "--allow-unsigned"], capsys)
    loose = tmp_path / "loose"
    main_ok(_merge(anchor_dir, [good[0]], loose, registry), capsys)
    assert read_json(loose / SLOTS_FILE)["slots"][1]["signer"] is None
    with pytest.raises(SystemExit):
        main(["keys", "list", str(registry)])
    assert "unsigned packages: taken" in capsys.readouterr().out
    line = _refused(["merge", "--anchor", str(anchor_dir), "--out", str(tmp_path / "x"),
                     "--registry", str(tmp_path / "missing.sqlite"), "--expert",
                     str(pkgs[0])], capsys)  # fmt: skip
    assert "key registry not found" in line
    line = _refused(["keys", "register", str(registry),
                     str(keys["upper org"].with_suffix(".pub.json"))], capsys)  # fmt: skip
    assert "already registered" in line


def test_expert_train_signs_its_package(
    keys: dict[str, Path], anchor_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    cfg = replace(EXPERT_DEFAULTS, steps=2, batch_size=2, seq_len=32, warmup_steps=1,
                  eval_every=0, checkpoint_every=0)  # fmt: skip
    out = tmp_path / "pkg"
    train_expert(
        ExpertSpec(
            anchor=anchor_dir,
            data=[DataSpec("upper", (str(corpus_dir / "other.jsonl"),))],
            identity=ExpertIdentity(name="upper", owner="upper org", license="MIT"),
            schedule=cfg,
        ),
        out=out,
        device=torch.device("cpu"),
        cache_dir=None,
        progress=False,
        signing_key=keys["upper org"],
    )
    registry = _registry(tmp_path, keys, "upper org")
    with KeyRegistry(registry) as reg:
        package = load_package(out, registry=reg)
    assert package.signer is not None and package.signer.owner == "upper org"


def test_private_keys_are_guarded(keys: dict[str, Path], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from flexmoe.errors import FlexMoEError
    from flexmoe.expert.signing import generate_key

    loose = tmp_path / "loose.key"
    shutil.copy(keys["upper org"], loose)
    os.chmod(loose, 0o644)
    with pytest.raises(FlexMoEError, match="readable by others"):
        read_private_key(loose)
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse battery staple")
    locked = tmp_path / "locked.key"
    generate_key(locked, "locked org")
    assert b"ENCRYPTED" in locked.read_bytes()
    read_private_key(locked)
    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(FlexMoEError, match=PASSPHRASE_ENV):
        read_private_key(locked)
    with pytest.raises(FlexMoEError, match="already exists"):
        generate_key(locked, "locked org")


_WRITER = """
import sys
from flexmoe.expert.registry import KeyRegistry
from flexmoe.expert.signing import generate_key, read_public_key
from pathlib import Path
root = Path(sys.argv[2])
with KeyRegistry(Path(sys.argv[1]), create=True) as reg:
    for i in range(10_000):
        generate_key(root / f"k{i}.key", f"owner {i}")
        info = reg.register(read_public_key(root / f"k{i}.pub.json"))
        if i % 2:
            reg.revoke(info.fingerprint)
        print(info.fingerprint, i % 2, flush=True)  # committed before it is printed
"""


def test_the_registry_survives_kill_9(tmp_path: Path) -> None:
    """Registrations and revocations committed before a SIGKILL are all there after it, and
    the file is sound."""
    registry = tmp_path / "keys.sqlite"
    (tmp_path / "k").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(registry), str(tmp_path / "k")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    committed = []
    deadline = time.monotonic() + 60
    while len(committed) < 25 and time.monotonic() < deadline:
        committed.append(proc.stdout.readline().split())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(committed) == 25
    with sqlite3.connect(registry) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with KeyRegistry(registry) as reg:
        for fingerprint, revoked in committed:
            info = reg.get(fingerprint)
            assert info is not None and bool(info.revoked) == (revoked == "1")
