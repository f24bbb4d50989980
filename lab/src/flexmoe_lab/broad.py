"""A third demo corpus set whose public pool is broad: ten unrelated Debian text packages.

The other sets' public pools are narrow (speeches; a dictionary and fortune cookies), so every
owner's router row learns "my text versus that". Here the public text spans manual pages,
documentation, a reference book, coding standards, dictionaries, quotations, licences and a
lexicon, so a row learns "my text versus much of everything". The four owner domains are in none
of those packages: Go source code, German manual pages, formal mathematics, satire.

Each public package is thinned to about :data:`PUBLIC_BYTES` of text (every k-th document, so
that all of it is represented) and each owner to :data:`OWNER_BYTES`, so that no one package
decides the anchor. Packages are fetched with ``apt-get download`` and read, never installed.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import PurePosixPath

from flexmoe_lab import debian
from flexmoe_lab.debian import DebianPackage, deb_files, dictd_entries

PUBLIC_BYTES = 700_000
OWNER_BYTES = 6_000_000
PIECE_BYTES = 6_000

MANPAGES = DebianPackage("manpages", "6.03-2")
MANPAGES_DE = DebianPackage("manpages-de", "4.18.1-1")
WORDNET = DebianPackage("dict-wn", "1:3.0-37")
REFERENCE = DebianPackage("debian-reference-en", "2.100")
DEVREF = DebianPackage("developers-reference", "12.18")
STANDARDS = DebianPackage("gnu-standards", "2022.03.23-0.1")
BASH_DOC = DebianPackage("bash-doc", "5.2.15-2")
LICENCES = DebianPackage("ruby-licensee", "9.15.2-4")
JARGON = DebianPackage("jargon-text", "4.4.7-4.1")
GO_SRC = DebianPackage("golang-1.19-src", "1.19.8-2")

Documents = Iterator[tuple[str, str]]


def thinned(documents: Iterable[tuple[str, str]], budget: int) -> Documents:
    """Every k-th document, k the smallest that brings the total to at most about ``budget``
    bytes of UTF-8 text."""
    docs = list(documents)
    total = sum(len(text.encode("utf-8")) for _, text in docs)
    step = max(1, -(-total // budget))
    yield from docs[::step]


def pieces(doc_id: str, text: str, size: int = PIECE_BYTES) -> Documents:
    """``text`` cut at blank lines into pieces of about ``size`` characters (a paragraph longer
    than that stays whole), named ``doc_id#N``."""
    piece: list[str] = []
    length, count = 0, 0
    for paragraph in re.split(r"\n\s*\n", text):
        if not paragraph.strip():
            continue
        piece.append(paragraph.strip("\n"))
        length += len(paragraph) + 2
        if length >= size:
            yield f"{doc_id}#{count}", "\n\n".join(piece) + "\n"
            piece, length, count = [], 0, count + 1
    if piece:
        yield f"{doc_id}#{count}", "\n\n".join(piece) + "\n"


_ROFF_ESCAPES = {
    r"\-": "-",
    r"\(em": "—",
    r"\(en": "–",
    r"\(aq": "'",
    r"\(dq": '"',
    r"\(lq": "“",
    r"\(rq": "”",
    r"\(bu": "•",
    r"\e": "\\",
    r"\&": "",
    r"\~": " ",
    r"\ ": " ",
    r"\0": " ",
    r"\|": "",
    r"\^": "",
    r"\c": "",
}
_ROFF_ESCAPE = re.compile(
    "|".join(re.escape(k) for k in sorted(_ROFF_ESCAPES, key=len, reverse=True))
)
_ROFF_FONT = re.compile(r"\\f(?:\[[^\]]*\]|\(..|.)")
_ROFF_OTHER = re.compile(r"\\(?:\(..|\*(?:\(..|\[[^\]]*\]|.)|\[[^\]]*\]|[sn][+-]?\d|.)")
_ROFF_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "BI", "IB", "IR", "RB", "RI", "SM", "SB", "TQ"}
_ROFF_ARG = re.compile(r'"([^"]*)"|(\S+)')


def roff_text(source: str) -> str:
    """The words of a man page: requests dropped, the text arguments of font and heading
    macros kept, escapes resolved (a plain reading, not a typesetter)."""
    lines = []
    for line in source.splitlines():
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts or parts[0] not in _ROFF_TEXT_MACROS or len(parts) == 1:
                continue
            args = [a or b for a, b in _ROFF_ARG.findall(parts[1])]
            joiner = " " if parts[0] in {"SH", "SS", "B", "I", "SM", "SB", "TQ"} else ""
            line = joiner.join(args)
            if parts[0] in {"SH", "SS"}:
                lines.append("")
        line = _ROFF_ESCAPE.sub(lambda m: _ROFF_ESCAPES[m.group(0)], _ROFF_FONT.sub("", line))
        lines.append(_ROFF_OTHER.sub("", line))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def read_man_pages(blob: bytes, directory: str, prefix: str) -> Documents:
    """Each gzipped man page under ``directory`` as plain text; ``.so`` redirects skipped."""
    wanted = re.compile(rf"{re.escape(directory)}/man\d/[^/]+\.gz")
    for path, content in deb_files(blob, wanted):
        source = gzip.decompress(content).decode("utf-8", errors="replace")
        if source.lstrip().startswith(".so "):
            continue
        text = roff_text(source)
        if len(text) > 200:
            yield f"{prefix}:{PurePosixPath(path).name.removesuffix('.gz')}", text


def read_gzipped_text(blob: bytes, path: str, prefix: str) -> Documents:
    """One gzipped plain-text file of a package, in pieces (see :func:`pieces`)."""
    [(_, content)] = deb_files(blob, re.compile(re.escape(path)))
    yield from pieces(prefix, gzip.decompress(content).decode("utf-8", errors="replace"))


def read_info(blob: bytes, path: str, prefix: str) -> Documents:
    """A gzipped Info manual, one document per node (the ``^_`` separated parts) with more
    than a line of text; the tag table and indirect tables are skipped."""
    [(_, content)] = deb_files(blob, re.compile(re.escape(path)))
    text = gzip.decompress(content).decode("utf-8", errors="replace")
    for i, node in enumerate(text.split("\x1f")):
        body = node.strip("\n")
        if body.startswith(("Tag Table:", "Indirect:", "End Tag Table")) or body.count("\n") < 3:
            continue
        yield f"{prefix}:{i}", body + "\n"


_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n+", re.DOTALL)


def read_licences(blob: bytes) -> Documents:
    """The licence texts of choosealicense.com vendored in ``ruby-licensee``, without their
    YAML front matter."""
    wanted = re.compile(r".*/vendor/choosealicense\.com/_licenses/[^/]+\.txt")
    for path, content in deb_files(blob, wanted):
        text = _FRONT_MATTER.sub("", content.decode("utf-8", errors="replace"))
        yield f"licence:{PurePosixPath(path).stem}", text


def read_wordnet(blob: bytes) -> Documents:
    """WordNet's dictd database, 20 consecutive entries a document."""
    entries = ((f"wn:{k}", v) for k, v in dictd_entries(blob, "wn"))
    yield from debian._grouped(entries, 20)


_GO_SKIP = re.compile(r"(^|/)(testdata|vendor)/|_test\.go$")


def read_go(blob: bytes) -> Documents:
    """The Go standard library's sources (``src/``), tests and vendored code left out."""
    wanted = re.compile(r"usr/share/go-1\.19/src/.+\.go")
    for path, content in deb_files(blob, wanted):
        rel = path.removeprefix("usr/share/go-1.19/src/")
        if not _GO_SKIP.search(rel):
            yield from pieces(f"go:{rel}", content.decode("utf-8", errors="replace"), 12_000)


def from_packages(
    budget: int, *parts: tuple[DebianPackage, Callable[[bytes], Documents]]
) -> Callable[[], Documents]:
    """A domain's documents: each package fetched, read and thinned to ``budget`` bytes."""

    def documents() -> Documents:
        for package, read in parts:
            yield from thinned(read(debian.fetch_deb(package)), budget)

    return documents


PUBLIC_PARTS: tuple[tuple[DebianPackage, Callable[[bytes], Documents]], ...] = (
    (debian.GCIDE, debian.read_gcide),
    (WORDNET, read_wordnet),
    (debian.FORTUNES, debian.read_fortunes),
    (MANPAGES, lambda b: read_man_pages(b, "usr/share/man", "man")),
    (
        REFERENCE,
        lambda b: read_gzipped_text(
            b, "usr/share/debian-reference/debian-reference.en.txt.gz", "debref"
        ),
    ),
    (
        DEVREF,
        lambda b: read_gzipped_text(
            b, "usr/share/developers-reference/developers-reference.txt.gz", "devref"
        ),
    ),
    (
        STANDARDS,
        lambda b: read_gzipped_text(
            b, "usr/share/doc/gnu-standards/standards.text.gz", "standards"
        ),
    ),
    (BASH_DOC, lambda b: read_info(b, "usr/share/info/bash.info.gz", "bash")),
    (LICENCES, read_licences),
    (JARGON, lambda b: read_gzipped_text(b, "usr/share/doc/jargon-text/jargon.txt.gz", "jargon")),
)
