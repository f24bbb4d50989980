"""The Debian corpus set's readers on small .deb archives built here (no network or apt)."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from flexmoe.errors import FlexMoEError
from flexmoe.experiment import corpora as demo
from flexmoe.experiment import debian


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
    with pytest.raises(FlexMoEError, match="unknown corpus set 'news'; choose demo, debian"):
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
