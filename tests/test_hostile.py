"""Hostile and malformed packages at the package boundary (issue 15).

Each variant is made from a good package, then run through ``flexmoe expert verify`` (or
``merge``) in-process: it must exit 2 with one line naming the package and the fault, no
traceback, no control character, within seconds, and nothing written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import train_packages
from safetensors.torch import load_file, save_file

from flexmoe.cli import main
from flexmoe.expert.manifest import MANIFEST_FILE, TENSORS_FILE
from flexmoe.io import sha256_file

Mutate = Callable[[Path, Path], None]  # (package copy, the other good package)


@pytest.fixture(scope="module")
def good(
    tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path, corpus_dir: Path
) -> list[Path]:
    return train_packages(tmp_path_factory.mktemp("good"), anchor_dir, corpus_dir)


def _manifest(pkg: Path) -> dict:  # type: ignore[type-arg]
    return json.loads((pkg / MANIFEST_FILE).read_text())


def _set(field: str, value: object) -> Mutate:
    def mutate(pkg: Path, other: Path) -> None:
        manifest = _manifest(pkg)
        target = manifest
        *parents, leaf = field.split(".")
        for part in parents:
            target = target[part]
        target[leaf] = value
        (pkg / MANIFEST_FILE).write_text(json.dumps(manifest))

    return mutate


def _raw(text: str | bytes) -> Mutate:
    def mutate(pkg: Path, other: Path) -> None:
        data = text.encode() if isinstance(text, str) else text
        (pkg / MANIFEST_FILE).write_bytes(data)

    return mutate


def _replace_in_manifest(old: str, new: str) -> Mutate:
    def mutate(pkg: Path, other: Path) -> None:
        raw = (pkg / MANIFEST_FILE).read_text()
        assert old in raw
        (pkg / MANIFEST_FILE).write_text(raw.replace(old, new, 1))

    return mutate


def _tensors(change: Callable[[dict[str, torch.Tensor]], None]) -> Mutate:
    def mutate(pkg: Path, other: Path) -> None:
        tensors = load_file(pkg / TENSORS_FILE)
        change(tensors)
        save_file(tensors, str(pkg / TENSORS_FILE))
        _rehash(pkg)

    return mutate


def _rehash(pkg: Path) -> None:
    manifest = _manifest(pkg)
    manifest["files"][TENSORS_FILE] = sha256_file(pkg / TENSORS_FILE)
    (pkg / MANIFEST_FILE).write_text(json.dumps(manifest))


def _scale(key: str, factor: float) -> Mutate:
    def change(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key] * factor

    return _tensors(change)


def _appended(extra: bytes) -> Mutate:
    def mutate(pkg: Path, other: Path) -> None:
        with open(pkg / TENSORS_FILE, "ab") as f:
            f.write(extra)
        _rehash(pkg)

    return mutate


def _long_tensor_name(pkg: Path, other: Path) -> None:
    tensors = load_file(pkg / TENSORS_FILE)
    tensors["x" * 2_000_000] = torch.zeros(1)
    save_file(tensors, str(pkg / TENSORS_FILE))
    _rehash(pkg)


def _many_entries(pkg: Path, other: Path) -> None:
    tensors = load_file(pkg / TENSORS_FILE)
    tensors.update({f"t{i}": torch.zeros(0) for i in range(20_000)})
    save_file(tensors, str(pkg / TENSORS_FILE))
    _rehash(pkg)


def _link_tensors(pkg: Path, other: Path) -> None:
    (pkg / TENSORS_FILE).unlink()
    (pkg / TENSORS_FILE).symlink_to(other / TENSORS_FILE)


def _link_manifest(pkg: Path, other: Path) -> None:
    outside = pkg.parent / "outside.json"
    shutil.copy(pkg / MANIFEST_FILE, outside)
    (pkg / MANIFEST_FILE).unlink()
    (pkg / MANIFEST_FILE).symlink_to(outside)


def _fifo(pkg: Path, other: Path) -> None:
    os.mkfifo(pkg / "pipe")


def _float64(pkg: Path, other: Path) -> None:
    tensors = {k: v.double() for k, v in load_file(pkg / TENSORS_FILE).items()}
    save_file(tensors, str(pkg / TENSORS_FILE))
    _rehash(pkg)


def _deep(depth: int) -> Mutate:
    return _raw("[" * depth + "]" * depth)


CONTROL = "\x1b[32m\x07"
VARIANTS: dict[str, tuple[Mutate, str]] = {
    # JSON itself
    "nested-100k": (_deep(100_000), "nested deeper than"),
    "nested-40": (_deep(40), "nested deeper than"),
    "int-100k-digits": (
        _replace_in_manifest('"steps": ', '"steps": ' + "9" * 100_000 + ', "x": '),
        "digits",
    ),
    "duplicate-name-key": (
        _replace_in_manifest('"name": ', '"name": "other", "name": '),
        "appears twice",
    ),
    "not-utf8": (_raw(b'{"name": "\xff\xfe"}'), "not valid JSON"),
    "not-json": (_raw("{name: upper"), "not valid JSON"),
    "a-list": (_raw("[1, 2]"), "field"),
    "empty-file": (_raw(""), "not valid JSON"),
    "huge-manifest": (_raw('{"description": "' + "x" * (17 << 20) + '"}'), "at most"),
    # fields: names and labels
    "name-escape": (_set("name", f"upper{CONTROL}"), "name"),
    "name-cyrillic": (_set("name", "uppеr"), "name"),
    "name-nbsp": (_set("name", "public\u00a0"), "name"),
    "name-newline-forgery": (_set("name", "x\npackage is sound"), "name"),
    "name-slash": (_set("name", "../../etc"), "name"),
    "name-empty": (_set("name", ""), "name"),
    "name-long": (_set("name", "a" * 65), "name"),
    "owner-control": (_set("owner", f"org{CONTROL}"), "owner"),
    "owner-2mb": (_set("owner", "o" * 2_000_000), "owner"),
    "owner-mixed-scripts": (_set("owner", "uppеr org"), "mixes scripts"),  # Cyrillic е
    "owner-greek-in-latin": (_set("owner", "Βank of Tests"), "mixes scripts"),  # Greek Β
    "license-control": (_set("license", "MIT\x1b]0;pwned\x07"), "license"),
    "license-not-spdx": (_set("license", "My-Own-License"), "not an SPDX license expression"),
    "license-broken-expression": (_set("license", "MIT AND ("), "not an SPDX license"),
    "description-10mb": (_set("description", "d" * 10_000_000), "description"),
    "created-10mb": (_set("created", "c" * 10_000_000), "created"),
    "created-escape": (_set("created", f"2026-01-01{CONTROL}"), "created"),
    "created-not-a-date": (_set("created", "yesterday"), "created"),
    # fields: numbers and structure
    "steps-negative": (_set("training.steps", -5), "steps"),
    "tokens-negative": (_set("training.tokens", -1), "tokens"),
    "loss-nan": (
        _replace_in_manifest('"final_train_loss": ', '"final_train_loss": NaN, "x": '),
        "final_train_loss",
    ),
    "loss-infinity": (
        _replace_in_manifest('"final_train_loss": ', '"final_train_loss": Infinity, "x": '),
        "final_train_loss",
    ),
    "loss-negative": (_set("training.final_train_loss", -3.0), "final_train_loss"),
    "seed-huge": (_set("training.seed", 10**20), "seed"),
    "hyperparameters-many": (
        _set("training.hyperparameters", {f"k{i}": i for i in range(500)}),
        "hyperparameters",
    ),
    "layers-zero": (_set("shapes.num_layers", 0), "num_layers"),
    "hidden-huge": (_set("shapes.hidden_size", 10**9), "hidden_size"),
    "dtype-unknown": (_set("shapes.dtype", "int8"), "dtype"),
    "schema-2": (_set("schema_version", 2), "schema_version"),
    "kind-wrong": (_set("kind", "flexmoe-anchor"), "kind"),
    "unknown-field": (_set("backdoor", True), "backdoor"),
    "fingerprint-not-hex": (_set("anchor_fingerprint", "z" * 64), "anchor_fingerprint"),
    "files-other": (_set("files", {"other.bin": "0" * 64}), "files"),
    "files-many": (_set("files", {f"f{i}": "0" * 64 for i in range(10)}), "files"),
    "router-init-other": (_set("router_init.method", "embedder"), "router rows made with"),
    "version-2mb": (_set("flexmoe_version", "v" * 2_000_000), "flexmoe_version"),
    # the tensors file
    "tensors-larger-than-shapes": (_appended(b"\0" * 10_000_000), "the manifest's shapes make"),
    "tensors-float64": (_float64, "the manifest's shapes make"),
    "tensor-name-2mb": (_long_tensor_name, "header of"),
    "header-20k-entries": (_many_entries, "header of"),
    "tensors-symlink": (_link_tensors, "not a regular file"),
    "manifest-symlink": (_link_manifest, "not a regular file"),
    "fifo-in-package": (_fifo, "not a regular file"),
    "router-x1e4": (_scale("layers.0.router", 1e4), "norm"),
    "router-x1e3": (_scale("layers.1.router", 1e3), "norm"),
    "down-x1e30": (_scale("layers.0.down_proj.weight", 1e30), "reaches"),
    "up-x1e3": (_scale("layers.1.up_proj.weight", 1e3), "reaches"),
    "gate-inf": (_scale("layers.0.gate_proj.weight", float("inf")), "NaN or Inf"),
    "bias-positive": (
        _tensors(lambda t: t.__setitem__("layers.0.bias", torch.tensor(3.0))),
        "positive",
    ),
    "tensor-missing": (_tensors(lambda t: t.pop("layers.1.down_proj.weight")), "missing"),
    "tensor-extra": (
        _tensors(lambda t: t.__setitem__("layers.9.router", torch.zeros(32))),
        "the manifest's shapes make",
    ),
    "tensor-half": (
        _tensors(lambda t: t.__setitem__("layers.0.router", t["layers.0.router"].half())),
        "dtype",
    ),
}


def _refused(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    took = time.perf_counter() - start
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, (out, err)
    assert took < 20, took
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flexmoe: error: "), err
    assert "Traceback" not in err and "sound" not in out
    assert not any(ord(c) < 32 or ord(c) == 127 for c in err.strip()), repr(err)
    assert len(lines[0]) <= 320
    return lines[0]


def main_ok(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code in (0, None)
    capsys.readouterr()  # progress and results, not checked here


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hostile_package_is_refused(
    variant: str, good: list[Path], anchor_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    mutate, words = VARIANTS[variant]
    bad = tmp_path / "pkg"
    shutil.copytree(good[0], bad)
    mutate(bad, good[1])
    line = _refused(["expert", "verify", str(bad), "--anchor", str(anchor_dir)], capsys)
    assert words in line, line
    assert "pkg" in line  # names the package
    out = tmp_path / "merged"
    _refused(["merge", "--anchor", str(anchor_dir), "--expert", str(good[1]), "--expert",
              str(bad), "--out", str(out)], capsys)  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".merged*"))  # nothing written


def test_a_renamed_copy_of_another_owners_expert_is_refused(
    good: list[Path], anchor_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A byte-identical copy of another owner's expert under a new name would keep routing to
    that owner's weights after the owner opts out."""
    copy = tmp_path / "copy"
    shutil.copytree(good[0], copy)
    _set("name", "stolen")(copy, good[1])
    _set("owner", "thief")(copy, good[1])
    line = _refused(["merge", "--anchor", str(anchor_dir), "--expert", str(good[0]), "--expert",
                     str(copy), "--out", str(tmp_path / "m")], capsys)  # fmt: skip
    assert "copy of 'upper'" in line
    merged = tmp_path / "merged"
    main_ok(
        ["merge", "--anchor", str(anchor_dir), "--expert", str(good[0]), "--out", str(merged)],
        capsys,
    )
    line = _refused(["merge", "add", str(merged), str(copy)], capsys)
    assert "copy of 'upper'" in line  # merge add refuses it too, from the model's own shards
    main_ok(["merge", "add", str(merged), str(good[1])], capsys)  # an honest expert joins
    for name in ("UPPER", "Public"):  # a name another slot has, up to case
        clash = tmp_path / name
        shutil.copytree(good[1], clash)
        _set("name", name)(clash, good[1])
        line = _refused(["merge", "--anchor", str(anchor_dir), "--expert", str(good[0]),
                         "--expert", str(clash), "--out", str(tmp_path / "m")], capsys)  # fmt: skip
        assert "already taken" in line


def test_printed_fields_cannot_drive_the_terminal(
    good: list[Path], anchor_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A description is free text, shown by verify: escaped, and a bad package's directory name
    cannot forge a second line."""
    pkg = tmp_path / "described"
    shutil.copytree(good[0], pkg)
    _set("description", f"ours{CONTROL}\nline two")(pkg, good[1])
    with pytest.raises(SystemExit) as done:
        main(["expert", "verify", str(pkg), "--anchor", str(anchor_dir)])
    assert done.value.code == 0
    out, _ = capsys.readouterr()
    assert "package is sound" in out and "\x1b" not in out and "\x07" not in out
    forged = tmp_path / "x\npackage is sound\x1b[0m"
    shutil.copytree(good[0], forged)
    _raw("{")(forged, good[1])
    line = _refused(["expert", "verify", str(forged), "--anchor", str(anchor_dir)], capsys)
    assert "\\n" in line and "\\x1b" in line


@pytest.mark.parametrize("variant", ["router-x1e4", "router-x1e3", "down-x1e30", "up-x1e3"])
def test_merge_add_bounds_values_by_the_models_public_expert(
    variant: str, good: list[Path], anchor_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """``merge add`` reads no anchor: the model's slot 0 (the anchor's feed-forward and r_0)
    bounds the new package's router rows and weights instead."""
    merged = tmp_path / "merged"
    main_ok(["merge", "--anchor", str(anchor_dir), "--expert", str(good[1]), "--out",
             str(merged)], capsys)  # fmt: skip
    mutate, words = VARIANTS[variant]
    bad = tmp_path / "pkg"
    shutil.copytree(good[0], bad)
    mutate(bad, good[1])
    before = sorted(p.name for p in merged.iterdir())
    line = _refused(["merge", "add", str(merged), str(bad)], capsys)
    assert words in line and "pkg" in line, line
    assert sorted(p.name for p in merged.iterdir()) == before


@pytest.mark.parametrize("owner", ["upper\u00a0org", "ｕｐｐｅｒ org", "Upper  Org"])
def test_an_owner_spelled_like_another_is_refused(
    owner: str, good: list[Path], anchor_dir: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """One owner, one spelling: a no-break space, full-width letters or other case would make
    a second 'upper org' that reads the same in every table."""
    pkg = tmp_path / "pkg"
    shutil.copytree(good[1], pkg)
    _set("owner", owner)(pkg, good[1])
    line = _refused(["merge", "--anchor", str(anchor_dir), "--expert", str(good[0]), "--expert",
                     str(pkg), "--out", str(tmp_path / "m")], capsys)  # fmt: skip
    assert "looks like 'upper org'" in line, line
    merged = tmp_path / "merged"
    main_ok(["merge", "--anchor", str(anchor_dir), "--expert", str(good[0]), "--out",
             str(merged)], capsys)  # fmt: skip
    line = _refused(["merge", "add", str(merged), str(pkg)], capsys)
    assert "looks like 'upper org'" in line, line


def _sparse_4gb(pkg: Path, other: Path) -> None:
    """A 4 GB tensors file (sparse: no disk used) whose manifest hash is left as it was."""
    with open(pkg / TENSORS_FILE, "r+b") as f:
        f.truncate(4 << 30)


_PEAK = """
import resource, sys, time
from flexmoe.cli import main
anchor, good, *bad = sys.argv[1:]
def run(pkg):
    start = time.perf_counter()
    try:
        main(["expert", "verify", pkg, "--anchor", anchor])
    except SystemExit as e:
        code = e.code
    return code, time.perf_counter() - start
run(good)  # everything imported and the anchor read once: the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for pkg in bad:
    code, took = run(pkg)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(pkg, code, f"{took:.2f}", grown, flush=True)
"""


def test_heavy_variants_are_refused_in_bounded_memory_and_time(
    good: list[Path], anchor_dir: Path, tmp_path: Path
) -> None:
    """The variants that once cost hundreds of MB or many seconds (a 17 MB manifest, a 2 MB
    tensor name, 20,000 header entries, 100,000 levels of nesting or digits, a tensors file
    of 4 GB) are each refused within 5 s and 64 MB over the process's peak reading a good
    package, measured in a process of their own."""
    import subprocess
    import sys

    cases = {
        "huge-manifest": VARIANTS["huge-manifest"][0],
        "tensor-name-2mb": VARIANTS["tensor-name-2mb"][0],
        "header-20k-entries": VARIANTS["header-20k-entries"][0],
        "nested-100k": VARIANTS["nested-100k"][0],
        "int-100k-digits": VARIANTS["int-100k-digits"][0],
        "tensors-4gb": _sparse_4gb,
    }
    paths = []
    for name, mutate in cases.items():
        shutil.copytree(good[0], tmp_path / name)
        mutate(tmp_path / name, good[1])
        paths.append(str(tmp_path / name))
    done = subprocess.run(
        [sys.executable, "-c", _PEAK, str(anchor_dir), str(good[0]), *paths],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(str(tmp_path))]
    assert len(rows) == len(cases), done.stdout
    for pkg, code, took, grown_kb in rows:
        assert code == "2", pkg
        assert float(took) < 5, (pkg, took)
        assert int(grown_kb) < 64 << 10, (pkg, int(grown_kb) >> 10, "MB")
