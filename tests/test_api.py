"""The public Python API's example (docs/examples/consortium.py, shown in docs/api.md) runs as
a user runs it: a script beside a folder of jsonl files, start to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import WORDS, make_texts, write_jsonl

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "consortium.py"


def test_the_api_example_trains_merges_federates_and_scores(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "public.jsonl", make_texts(80, seed=1))
    write_jsonl(corpus / "law.jsonl", make_texts(40, seed=2, words=[w.upper() for w in WORDS]))
    write_jsonl(corpus / "code.jsonl", make_texts(40, seed=3, words=[w[::-1] for w in WORDS]))
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    scored = [line for line in done.stdout.splitlines() if "bits per byte" in line]
    assert [line.split(":")[0] for line in scored] == ["public", "law", "code"]
    assert all(0 < float(line.split()[1]) < 20 for line in scored)
    assert (tmp_path / "work" / "federated" / "config.json").is_file()
    api = (EXAMPLE.parents[1] / "api.md").read_text()
    assert "examples/consortium.py" in api and "ExpertSpec" in api
