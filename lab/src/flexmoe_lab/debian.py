"""A second demo corpus set, from Debian packages: fetched with ``apt-get download``, read, never
installed or run.

public: the GNU Collaborative International Dictionary of English (``dict-gcide``) and fortune
cookies (``fortunes``: quotations, poems, science, people, ...); owners: ``computing`` (the Free
On-line Dictionary of Computing, ``dict-foldoc``), ``mathematics`` (the Metamath set.mm
database, ``metamath-databases``), ``policy`` (the Debian Policy Manual, ``debian-policy``) and
``satire`` (Ambrose Bierce's The Devil's Dictionary, ``dict-devil``). A ``.deb`` is an ar archive
whose ``data.tar.*`` member holds the files; only those members are read.
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flexmoe.errors import FlexMoEError

_AR_MAGIC = b"!<arch>\n"
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@dataclass(frozen=True)
class DebianPackage:
    """One pinned Debian package."""

    name: str
    version: str

    @property
    def label(self) -> str:
        return f"{self.name}={self.version}"


GCIDE = DebianPackage("dict-gcide", "0.48.5+nmu2")
FORTUNES = DebianPackage("fortunes", "1:1.99.1-7.3")
FOLDOC = DebianPackage("dict-foldoc", "20230119-1")
METAMATH = DebianPackage("metamath-databases", "0.0.0~20210101.git55fe226-2")
POLICY = DebianPackage("debian-policy", "4.6.2.0")
DEVIL = DebianPackage("dict-devil", "1.0-13.1")


def fetch_deb(package: DebianPackage, *, timeout: float = 300.0) -> bytes:
    """The package's ``.deb`` as bytes, fetched by ``apt-get download`` (nothing installed)."""
    if shutil.which("apt-get") is None:
        raise FlexMoEError(package.label, "this corpus set needs apt-get (a Debian-based system)")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(
                ["apt-get", "download", package.label],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise FlexMoEError(
                package.label, f"apt-get download timed out after {timeout} s"
            ) from e
        debs = sorted(Path(tmp).glob("*.deb"))
        if done.returncode != 0 or len(debs) != 1:
            reason = (done.stderr.strip().splitlines() or ["no .deb written"])[-1]
            raise FlexMoEError(package.label, f"apt-get download failed ({reason})")
        return debs[0].read_bytes()


def deb_files(blob: bytes, wanted: re.Pattern[str]) -> Iterator[tuple[str, bytes]]:
    """``(path, content)`` of the regular files of a ``.deb`` whose path matches ``wanted``."""
    if not blob.startswith(_AR_MAGIC):
        raise FlexMoEError("<deb>", "not an ar archive")
    pos = len(_AR_MAGIC)
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        body = blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are 2-byte aligned
        if not name.startswith("data.tar"):
            continue
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            for member in sorted(tar.getmembers(), key=lambda m: m.name):
                path = member.name.removeprefix("./")
                if member.isfile() and wanted.fullmatch(path):
                    f = tar.extractfile(member)
                    if f is not None:
                        yield path, f.read()
        return
    raise FlexMoEError("<deb>", "no data.tar member")


def _b64_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def dictd_entries(blob: bytes, name: str) -> Iterator[tuple[str, str]]:
    """``(headword, definition)`` of a dictd dictionary in a ``.deb`` (index + dictzip data);
    the database's own ``00-database-*`` entries are skipped."""
    files = dict(
        deb_files(blob, re.compile(rf"usr/share/dictd/{re.escape(name)}\.(index|dict\.dz)"))
    )
    index = files[f"usr/share/dictd/{name}.index"].decode("utf-8", errors="replace")
    data = gzip.decompress(files[f"usr/share/dictd/{name}.dict.dz"])
    seen: set[int] = set()
    for line in index.splitlines():
        parts = line.split("\t")
        if (
            len(parts) < 3
            or parts[0].startswith("00-database")
            or parts[0].startswith("00database")
        ):
            continue
        start, length = _b64_number(parts[1]), _b64_number(parts[2])
        if start in seen:  # one entry under several headwords
            continue
        seen.add(start)
        yield parts[0], data[start : start + length].decode("utf-8", errors="replace")


def _grouped(
    items: Iterator[tuple[str, str]], size: int, keep_every: int = 1
) -> Iterator[tuple[str, str]]:
    """Consecutive items joined into documents of ``size``; every ``keep_every``-th document."""
    group: list[tuple[str, str]] = []
    count = 0
    for item in items:
        group.append(item)
        if len(group) == size:
            if count % keep_every == 0:
                yield group[0][0], "\n".join(text.strip() for _, text in group) + "\n"
            group, count = [], count + 1
    if group and count % keep_every == 0:
        yield group[0][0], "\n".join(text.strip() for _, text in group) + "\n"


def read_gcide(blob: bytes) -> Iterator[tuple[str, str]]:
    """Runs of 40 consecutive dictionary entries, every 6th run (about 6 MB of text)."""
    yield from ((f"gcide:{k}", v) for k, v in _grouped(dictd_entries(blob, "gcide"), 40, 6))


def read_fortunes(blob: bytes) -> Iterator[tuple[str, str]]:
    """Fortune files split at ``%`` lines; 20 cookies a document."""
    for path, content in deb_files(blob, re.compile(r"usr/share/games/fortunes/[a-z-]+")):
        cookies = re.split(r"^%\n", content.decode("utf-8", errors="replace"), flags=re.MULTILINE)
        topic = Path(path).name
        items = ((f"fortunes:{topic}:{i}", c) for i, c in enumerate(cookies) if c.strip())
        yield from _grouped(items, 20)


def read_foldoc(blob: bytes) -> Iterator[tuple[str, str]]:
    return dictd_entries(blob, "foldoc")


def read_devil(blob: bytes) -> Iterator[tuple[str, str]]:
    return dictd_entries(blob, "devil")


def read_policy(blob: bytes) -> Iterator[tuple[str, str]]:
    """The Debian Policy Manual's plain-text edition, one document per numbered section."""
    [(_, content)] = deb_files(blob, re.compile(r"usr/share/doc/debian-policy/policy\.txt\.gz"))
    text = gzip.decompress(content).decode("utf-8", errors="replace")
    heading = re.compile(r"^(\d+(?:\.\d+)*)\. \S.*\n[=\-~*^]{3,}\n", flags=re.MULTILINE)
    marks = list(heading.finditer(text))
    for here, after in zip(marks, [*marks[1:], None], strict=True):
        body = text[here.start() : after.start() if after else len(text)]
        if len(body.strip()) > 200:
            yield f"policy:{here.group(1)}", body


_MM_BLOCK = re.compile(r"\$\((?:(?!\$\)).)*\$\)\s*(\S+)\s+\$[pa]\s.*?\$\.", re.DOTALL)


def read_metamath(blob: bytes) -> Iterator[tuple[str, str]]:
    """set.mm: each theorem or axiom with the comment before it; 12 a document, every 4th
    document (about 8 MB), so that every part of the database is represented."""
    [(_, content)] = deb_files(blob, re.compile(r"usr/share/metamath/databases/set\.mm"))
    text = content.decode("utf-8", errors="replace")
    blocks = ((m.group(1), m.group(0)) for m in _MM_BLOCK.finditer(text))
    yield from ((f"set.mm:{k}", v) for k, v in _grouped(blocks, 12, 4))
