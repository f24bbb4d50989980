"""Documents, deduplication, deterministic splits, packing and its cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import make_texts, write_jsonl

from flexmoe.data.documents import DataSpec, parse_data, read_documents
from flexmoe.data.packing import pack_documents
from flexmoe.data.split import Split, SplitFractions, split_documents, split_of
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexMoEError


def _spec(domain: str, *paths: Path, **kw: str) -> DataSpec:
    return DataSpec(domain=domain, paths=tuple(str(p) for p in paths), **kw)


def test_reads_txt_jsonl_parquet_dirs_and_globs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta document")
    write_jsonl(tmp_path / "c.jsonl", ["gamma", "delta"], ids=True)
    pq.write_table(pa.table({"body": ["epsilon", "zeta"]}), tmp_path / "d.parquet")
    assert [d.text for d in read_documents(_spec("x", tmp_path / "a.txt"))] == ["alpha document"]
    by_dir = read_documents(_spec("x", tmp_path / "sub"))
    assert [d.text for d in by_dir] == ["beta document"]
    jsonl = read_documents(_spec("x", tmp_path / "c.jsonl", id_field="id"))
    assert [(d.doc_id, d.text) for d in jsonl] == [("d0", "gamma"), ("d1", "delta")]
    parquet = read_documents(_spec("x", tmp_path / "d.parquet", text_field="body"))
    assert [d.text for d in parquet] == ["epsilon", "zeta"]
    globbed = read_documents(_spec("x", tmp_path / "**" / "*.txt"))
    assert sorted(d.text for d in globbed) == ["alpha document", "beta document"]


def test_one_data_syntax() -> None:
    """DOMAIN=FILES or FILES; comma lists and repeats add up; bare files take the default."""
    (spec,) = parse_data(["legal=a.jsonl, b/"])
    assert spec.domain == "legal" and spec.paths == ("a.jsonl", "b/")
    (spec,) = parse_data(["legal=a.jsonl", "legal=b.jsonl,a.jsonl"])
    assert spec.paths == ("a.jsonl", "b.jsonl")
    (spec,) = parse_data(["a.jsonl,b.jsonl", "c/"], default_domain="public")
    assert spec.domain == "public" and spec.paths == ("a.jsonl", "b.jsonl", "c/")
    specs = parse_data(["data/legal.jsonl", "med=m/*.txt"])
    assert [(s.domain, s.paths) for s in specs] == [
        ("legal", ("data/legal.jsonl",)),
        ("med", ("m/*.txt",)),
    ]
    (spec,) = parse_data(["runs/a=b/x.jsonl"], default_domain="public")  # '=' inside a path
    assert spec.domain == "public" and spec.paths == ("runs/a=b/x.jsonl",)
    with pytest.raises(FlexMoEError, match="--public-data: no files"):
        parse_data(["public=,"], option="--public-data")
    with pytest.raises(FlexMoEError, match="DOMAIN=FILES or FILES"):
        parse_data(["=a.jsonl"])


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "empty.txt: file is empty"),
        ("latin.txt", b"caf\xe9", "latin.txt: not UTF-8 (byte 0xe9 at offset 3)"),
        ("bad.jsonl", b'{"text": "ok"}\n{not json}\n', "bad.jsonl:2: line is not JSON"),
        ("nofield.jsonl", b'{"body": "x"}\n', "nofield.jsonl:1: no 'text' field"),
        ("notstr.jsonl", b'{"text": 3}\n', "notstr.jsonl:1: field 'text' is not a string"),
        ("x.csv", b"a,b", "unsupported file type"),
    ],
)
def test_bad_files_name_the_file_and_fault(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(FlexMoEError) as exc:
        read_documents(_spec("x", path))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_missing_file_and_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(FlexMoEError, match="file not found"):
        read_documents(_spec("x", tmp_path / "missing.jsonl"))
    with pytest.raises(FlexMoEError, match="matches no file"):
        read_documents(_spec("x", tmp_path / "*.jsonl"))


def test_parquet_missing_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(FlexMoEError, match="no column 'text'"):
        read_documents(_spec("x", tmp_path / "d.parquet"))


def test_dedupe_and_split_are_deterministic_and_order_free(tmp_path: Path) -> None:
    texts = make_texts(400, seed=7)
    write_jsonl(tmp_path / "a.jsonl", texts[:200] + texts[:50])  # 50 exact duplicates
    write_jsonl(tmp_path / "b.jsonl", texts[200:])
    forward = split_documents(
        read_documents(_spec("d", tmp_path / "a.jsonl", tmp_path / "b.jsonl"))
    )
    backward = split_documents(
        read_documents(_spec("d", tmp_path / "b.jsonl", tmp_path / "a.jsonl"))
    )
    for split in Split:
        assert [d.text for d in forward.get(split)] == [d.text for d in backward.get(split)]
    sizes = {s: len(forward.get(s)) for s in Split}
    assert sum(sizes.values()) == 400
    assert (
        330 <= sizes[Split.TRAIN] <= 390 and sizes[Split.TEST] > 5 and sizes[Split.VALIDATION] > 5
    )
    # The split depends only on (domain, id): pinned values, the same on every machine.
    pinned = {f"doc-{i}": str(split_of("legal", f"doc-{i}", SplitFractions())) for i in range(40)}
    assert pinned["doc-4"] == "validation" and pinned["doc-32"] == "test"
    assert sum(v == "train" for v in pinned.values()) == 38
    assert {split_of("d", f"doc-{i}", SplitFractions(0.0, 0.0, 1.0)) for i in range(20)} == {
        Split.TEST
    }


def test_split_fractions_validated() -> None:
    with pytest.raises(FlexMoEError, match="sum to 1"):
        SplitFractions(0.5, 0.1, 0.1)


def test_pack_separates_documents_with_eos_and_caches(tmp_path: Path, tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    docs = read_documents(_spec("d", write_jsonl(tmp_path / "a.jsonl", ["the union", "of state"])))
    stream = pack_documents(docs, tok, cache_dir=tmp_path / "cache")
    eos = tok.eos_token_id
    first = tok("the union", add_special_tokens=False)["input_ids"]
    second = tok("of state", add_special_tokens=False)["input_ids"]
    assert list(stream.tokens) == [eos, *first, eos, *second, eos]
    assert stream.num_bytes == len("the union") + len("of state") and stream.num_docs == 2
    assert isinstance(stream.tokens, np.memmap)
    files = sorted((tmp_path / "cache").iterdir())
    mtimes = [os.stat(f).st_mtime_ns for f in files]
    again = pack_documents(docs, tok, cache_dir=tmp_path / "cache")
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes  # reused, not rewritten
    assert list(again.tokens) == list(stream.tokens)
    meta = json.loads(next(f for f in files if f.suffix == ".json").read_text())
    assert meta["num_tokens"] == len(stream.tokens)


def test_pack_cache_key_changes_with_content(tmp_path: Path, tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    a = read_documents(_spec("d", write_jsonl(tmp_path / "a.jsonl", ["the union"])))
    b = read_documents(_spec("d", write_jsonl(tmp_path / "b.jsonl", ["the state"])))
    pack_documents(a, tok, cache_dir=tmp_path / "cache")
    pack_documents(b, tok, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_blocks_overlap_by_one_token(tmp_path: Path, tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tokenizer_dir)
    docs = read_documents(_spec("d", write_jsonl(tmp_path / "a.jsonl", make_texts(5, seed=3))))
    stream = pack_documents(docs, tok)
    seq = 16
    b0, b1 = stream.block(0, seq), stream.block(1, seq)
    assert len(b0) == seq + 1 and b0[-1] == b1[0]
    assert stream.num_blocks(seq) == (len(stream.tokens) - 1) // seq
