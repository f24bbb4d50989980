"""Tokenizer training, offline loading by transformers, fingerprints, corrupt files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from helpers import make_texts
from transformers import AutoTokenizer

from flexmoe.data.tokenizer import (
    EOS_TOKEN,
    PAD_TOKEN,
    load_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)
from flexmoe.errors import FlexMoEError


def test_autotokenizer_loads_it_offline(tokenizer_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    assert tok.eos_token == EOS_TOKEN and tok.bos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.model_max_length == 64
    assert len(tok) == 400
    text = "the union of state and congress"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.split()) * 2  # merges were learned


def test_fingerprint_is_stable_and_sensitive(tmp_path: Path, tokenizer_dir: Path) -> None:
    a = tokenizer_fingerprint(load_tokenizer(tokenizer_dir))
    assert a == tokenizer_fingerprint(load_tokenizer(tokenizer_dir))
    other = train_tokenizer(make_texts(50, seed=9), tmp_path / "t", vocab_size=350)
    assert tokenizer_fingerprint(other) != a


def test_corrupt_tokenizer_file(tmp_path: Path, tokenizer_dir: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tokenizer_dir, bad)
    (bad / "tokenizer.json").write_text("{ not json")
    with pytest.raises(FlexMoEError, match="cannot load tokenizer"):
        load_tokenizer(bad)


def test_existing_output_is_refused(tokenizer_dir: Path) -> None:
    with pytest.raises(FlexMoEError, match="already exists"):
        train_tokenizer(["x y z"], tokenizer_dir, vocab_size=300)
