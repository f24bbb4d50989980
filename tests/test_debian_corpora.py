"""The Debian corpus set's readers on small .deb archives built here (no network or apt)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from flexmoe.errors import FlexMoEError
from flexmoe_lab import broad, debian
from flexmoe_lab import corpora as demo


def _deb(files: dict[str, bytes]) -> bytes:
    """An ar archive with debian-binary, control.tar.gz and data.tar.xz, as dpkg writes one."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", gzip.compress(b"")),
        ("data.tar.xz", data.getvalue()),
    ]
    out = bytearray(b"!<arch>\n")
    for name, body in members:
        header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n"
        out += header.encode("ascii") + body + (b"\n" if len(body) % 2 else b"")
    return bytes(out)


def _b64(value: int) -> str:
    digits = ""
    while True:
        digits = debian._B64[value % 64] + digits
        value //= 64
        if not value:
            return digits


def _dictd(name: str, entries: list[tuple[str, str]]) -> dict[str, bytes]:
    body, index = b"", []
    for headword, text in [("00-database-url", "http://example"), *entries]:
        data = text.encode()
        index.append(f"{headword}\t{_b64(len(body))}\t{_b64(len(data))}")
        body += data
    return {
        f"usr/share/dictd/{name}.index": ("\n".join(index) + "\n").encode(),
        f"usr/share/dictd/{name}.dict.dz": gzip.compress(body),
    }


def test_dictd_entries_in_order_without_database_entries() -> None:
    blob = _deb(_dictd("foldoc", [("ALGOL", "ALGOL\n\n   <language> Algorithmic language.\n"),
                                  ("awk", "awk\n\n   <tool> A pattern language.\n")]))  # fmt: skip
    assert list(debian.read_foldoc(blob)) == [
        ("ALGOL", "ALGOL\n\n   <language> Algorithmic language.\n"),
        ("awk", "awk\n\n   <tool> A pattern language.\n"),
    ]


def test_gcide_groups_runs_of_entries() -> None:
    entries = [(f"w{i}", f"W{i} \\w{i}\\ a word.\n") for i in range(41)]
    docs = list(debian.read_gcide(_deb(_dictd("gcide", entries))))
    assert [doc_id for doc_id, _ in docs] == ["gcide:w0"]  # run 0 kept, run 1 (w40) skipped
    assert docs[0][1].count("\n") == 40


def test_fortunes_split_at_percent_lines_and_skip_index_files() -> None:
    cookies = "".join(f"Cookie {i}.\n\t\t-- Someone\n%\n" for i in range(25))
    blob = _deb({
        "usr/share/games/fortunes/science": cookies.encode(),
        "usr/share/games/fortunes/science.dat": b"\x00\x01binary",
    })  # fmt: skip
    docs = list(debian.read_fortunes(blob))
    assert [d for d, _ in docs] == ["fortunes:science:0", "fortunes:science:20"]
    assert docs[0][1].startswith("Cookie 0.\n\t\t-- Someone\nCookie 1.")
    assert "Cookie 24." in docs[1][1] and "%" not in docs[1][1]


def test_policy_one_document_per_section() -> None:
    text = "Title\n*****\n\n" + "".join(
        f"{n}. Section {n}\n{'=' * 12}\n\n" + "Packages must do things. " * 20 + "\n\n"
        for n in ("1.1", "1.2")
    )
    blob = _deb({"usr/share/doc/debian-policy/policy.txt.gz": gzip.compress(text.encode())})
    docs = list(debian.read_policy(blob))
    assert [d for d, _ in docs] == ["policy:1.1", "policy:1.2"]
    assert docs[1][1].startswith("1.2. Section 1.2\n")


def test_metamath_keeps_each_statement_with_its_comment() -> None:
    statements = "".join(
        f"$( Theorem {i} says something. $)\n  th{i} $p |- ( ph -> ph ) $= ( wi ) AB $.\n\n"
        for i in range(13)
    )
    blob = _deb({"usr/share/metamath/databases/set.mm": ("$( header $)\n" + statements).encode()})
    docs = list(debian.read_metamath(blob))
    assert [d for d, _ in docs] == ["set.mm:th0"]  # 12 a document; every 4th document kept
    assert docs[0][1].startswith("$( Theorem 0 says something. $)\n  th0 $p")
    assert "th11 $p" in docs[0][1] and "th12" not in docs[0][1]


def test_not_a_deb_is_one_line() -> None:
    with pytest.raises(FlexMoEError, match="not an ar archive"):
        list(debian.read_foldoc(b"PK\x03\x04 a zip"))


def test_without_apt_get_the_error_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(debian.shutil, "which", lambda _: None)
    with pytest.raises(FlexMoEError, match=r"dict-foldoc=.*needs apt-get"):
        debian.fetch_deb(debian.FOLDOC)


def test_unknown_corpus_set_is_refused() -> None:
    with pytest.raises(FlexMoEError, match="unknown corpus set 'news'; choose demo, debian, broad"):
        demo.corpus_set("news")


def test_debian_set_fetches_every_package_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every domain written from the packages' files; owners and the opt-out owner declared."""
    fake = {
        "dict-gcide": _deb(_dictd("gcide", [("Word", "Word \\Word\\ n.\n")])),
        "fortunes": _deb({"usr/share/games/fortunes/people": b"A person.\n%\n"}),
        "dict-foldoc": _deb(_dictd("foldoc", [("awk", "awk: a tool\n")])),
        "metamath-databases": _deb(
            {"usr/share/metamath/databases/set.mm": b"$( c $)\n ax $a |- ph $.\n"}
        ),
        "debian-policy": _deb(
            {
                "usr/share/doc/debian-policy/policy.txt.gz": gzip.compress(
                    ("1.1. Scope\n==========\n\n" + "Policy text. " * 30).encode()
                )
            }
        ),
        "dict-devil": _deb(_dictd("devil", [("LIFE", "LIFE, n. A spiritual pickle.\n")])),
    }
    fetched: list[str] = []

    def fake_fetch(package: debian.DebianPackage, *, timeout: float = 300.0) -> bytes:
        fetched.append(package.name)
        return fake[package.name]

    monkeypatch.setattr(debian, "fetch_deb", fake_fetch)
    files = demo.fetch_corpora(demo.DEBIAN, tmp_path, log=lambda _: None)
    assert sorted(fetched) == sorted(fake)
    assert [d.name for d in demo.DEBIAN.owners] == ["computing", "mathematics", "policy", "satire"]
    assert demo.DEBIAN.opt_out in {d.name for d in demo.DEBIAN.owners}
    lines = {
        name: [json.loads(x) for x in path.read_text().splitlines()] for name, path in files.items()
    }
    assert [d["id"] for d in lines["public"]] == ["gcide:Word", "fortunes:people:0"]
    assert lines["satire"] == [{"id": "LIFE", "text": "LIFE, n. A spiritual pickle.\n"}]
    assert lines["mathematics"][0]["id"] == "set.mm:ax"
    assert json.loads((tmp_path / "manifest.json").read_text())["set"] == "debian"


def test_roff_text_keeps_the_words_of_a_man_page() -> None:
    source = (
        '.\\" a comment\n.TH pipe 7 2022-12-04 "Linux man-pages"\n.SH NAME\npipe \\- overview\n'
        '.SH DESCRIPTION\nA pipe has a\n.I read end\nand a\n.IR "write end" .\n.PP\n'
        "See \\fBpipe\\fP(2) and\n.BR fifo (7)\nfor \\(lqmore\\(rq.\n"
    )
    assert broad.roff_text(source) == (
        "NAME\npipe - overview\n\nDESCRIPTION\nA pipe has a\nread end\nand a\nwrite end.\n"
        "See pipe(2) and\nfifo(7)\nfor “more”.\n"
    )


def test_man_pages_skip_redirects_and_stubs() -> None:
    page = ".SH NAME\nls \\- Verzeichnisinhalte auflisten\n" + "Ein Satz über Dateien.\n" * 12
    blob = _deb({
        "usr/share/man/de/man1/ls.1.gz": gzip.compress(page.encode()),
        "usr/share/man/de/man1/dir.1.gz": gzip.compress(b".so man1/ls.1\n"),
        "usr/share/man/de/man1/tiny.1.gz": gzip.compress(b".SH NAME\ntiny\n"),
        "usr/share/man/man1/ls.1.gz": gzip.compress(b"English, not this directory\n" * 20),
    })  # fmt: skip
    docs = list(broad.read_man_pages(blob, "usr/share/man/de", "de"))
    assert [d for d, _ in docs] == ["de:ls.1"]
    assert docs[0][1].startswith("NAME\nls - Verzeichnisinhalte auflisten\n")


def test_thinned_keeps_every_kth_document_within_the_budget() -> None:
    docs = [(str(i), "x" * 100) for i in range(10)]
    assert [d for d, _ in broad.thinned(docs, 1000)] == [str(i) for i in range(10)]
    assert [d for d, _ in broad.thinned(docs, 300)] == ["0", "4", "8"]  # 1000 bytes -> every 4th


def test_pieces_cut_at_blank_lines() -> None:
    text = "\n\n".join(f"Paragraph {i}. " + "word " * 20 for i in range(5))
    parts = list(broad.pieces("book", text, size=250))
    assert [d for d, _ in parts] == ["book#0", "book#1"]  # 115 characters a paragraph
    assert parts[0][1].startswith("Paragraph 0.") and "Paragraph 2." in parts[0][1]
    assert parts[1][1].startswith("Paragraph 3.") and parts[1][1].count("Paragraph") == 2


def test_info_nodes_without_tag_tables() -> None:
    info = "Header\n\x1f\nFile: bash.info,  Node: Top\n\nBash\n****\nThe shell.\n\x1f\n"
    info += "Tag Table:\nNode: Top\x7f1\n1\n2\n\x1f\nEnd Tag Table\n"
    blob = _deb({"usr/share/info/bash.info.gz": gzip.compress(info.encode())})
    docs = list(broad.read_info(blob, "usr/share/info/bash.info.gz", "bash"))
    assert docs == [("bash:1", "File: bash.info,  Node: Top\n\nBash\n****\nThe shell.\n")]


def test_licences_without_front_matter_and_go_without_tests() -> None:
    root = "usr/share/rubygems-integration/all/gems/licensee-9.15.2/vendor/choosealicense.com"
    blob = _deb({f"{root}/_licenses/mit.txt": b"---\ntitle: MIT\n---\n\nMIT License\n\nText.\n"})
    assert list(broad.read_licences(blob)) == [("licence:mit", "MIT License\n\nText.\n")]
    src = "usr/share/go-1.19/src"
    blob = _deb({
        f"{src}/bytes/buffer.go": b"package bytes\n",
        f"{src}/bytes/buffer_test.go": b"package bytes_test\n",
        f"{src}/go/testdata/a.go": b"package a\n",
        f"{src}/vendor/golang.org/x/net/a.go": b"package a\n",
    })  # fmt: skip
    assert list(broad.read_go(blob)) == [("go:bytes/buffer.go#0", "package bytes\n")]


def test_broad_set_reads_ten_public_packages_and_four_owners_outside_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dictd = {"dict-gcide": "gcide", "dict-wn": "wn", "dict-devil": "devil"}
    fetched: list[str] = []

    def fake_fetch(package: debian.DebianPackage, *, timeout: float = 300.0) -> bytes:
        """Every package holds a little text where its reader looks."""
        fetched.append(package.name)
        if package.name in dictd:
            return _deb(_dictd(dictd[package.name], [(package.name, f"{package.name} text\n")]))
        page = gzip.compress(b".SH NAME\nname \\- a page\n" + b"Some words of a page.\n" * 12)
        text = gzip.compress(f"{package.name}: text.\n".encode())
        return _deb({
            "usr/share/games/fortunes/people": b"A person.\n%\n",
            "usr/share/man/man7/pipe.7.gz": page,
            "usr/share/man/de/man1/ls.1.gz": page,
            "usr/share/debian-reference/debian-reference.en.txt.gz": text,
            "usr/share/developers-reference/developers-reference.txt.gz": text,
            "usr/share/doc/gnu-standards/standards.text.gz": text,
            "usr/share/doc/jargon-text/jargon.txt.gz": text,
            "usr/share/info/bash.info.gz": gzip.compress(b"\x1fNode: Top\n\nBash\nshell\n"),
            "usr/share/rubygems-integration/vendor/choosealicense.com/_licenses/mit.txt": b"MIT\n",
            "usr/share/go-1.19/src/bytes/buffer.go": b"package bytes\n",
            "usr/share/metamath/databases/set.mm": b"$( c $)\n ax $a |- ph $.\n",
        })  # fmt: skip

    monkeypatch.setattr(debian, "fetch_deb", fake_fetch)
    files = demo.fetch_corpora(demo.BROAD, tmp_path, log=lambda _: None)
    public = [package.name for package, _ in broad.PUBLIC_PARTS]
    owners = ["golang-1.19-src", "manpages-de", "metamath-databases", "dict-devil"]
    assert len(set(public)) == 10 and sorted(fetched) == sorted([*public, *owners])
    assert [d.name for d in demo.BROAD.owners] == ["go", "german", "mathematics", "satire"]
    for owner in demo.BROAD.owners:  # no owner's package is in the public pool
        assert not set(owner.source.split()) & set(demo.BROAD.public.source.split())
    ids = [json.loads(x)["id"] for x in files["public"].read_text().splitlines()]
    prefixes = {i.split(":")[0].split("#")[0] for i in ids}
    assert prefixes == {
        "gcide", "wn", "fortunes", "man", "debref", "devref", "standards", "bash",
        "licence", "jargon",
    }  # fmt: skip
    assert files["german"].read_text().count('"id"') == 1
