"""Shared fixtures: a small synthetic corpus, a tiny tokenizer, tiny models, a tiny anchor."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import WORDS, make_texts, write_jsonl
from transformers import FlexOlmoConfig, Olmo2Config

from flexmoe.data.documents import DataSpec
from flexmoe.data.tokenizer import train_tokenizer
from flexmoe.model.config import ModelDims, flex_config, olmo2_config

if os.environ.get("PYTEST_XDIST_WORKER"):
    # make test runs one worker per core: one thread each, for the tests and what they start
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_jsonl(root / "public.jsonl", make_texts(120, seed=1))
    write_jsonl(root / "other.jsonl", make_texts(60, seed=2, words=[w.upper() for w in WORDS]))
    return root


@pytest.fixture(scope="session")
def public_spec(corpus_dir: Path) -> DataSpec:
    return DataSpec(domain="public", paths=(str(corpus_dir / "public.jsonl"),))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    texts = make_texts(120, seed=1) + make_texts(60, seed=2, words=[w.upper() for w in WORDS])
    train_tokenizer(texts, out, vocab_size=400, model_max_length=64)
    return out


TINY_DIMS = ModelDims(
    hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_seq_len=64
)


@pytest.fixture
def olmo2_cfg() -> Olmo2Config:
    return olmo2_config(TINY_DIMS, vocab_size=96, bos_token_id=0, eos_token_id=0, pad_token_id=1)


@pytest.fixture
def flex_cfg(olmo2_cfg: Olmo2Config) -> FlexOlmoConfig:
    return flex_config(olmo2_cfg, num_experts=4, top_k=2)


@pytest.fixture(scope="session")
def anchor_dir(tmp_path_factory: pytest.TempPathFactory, public_spec: DataSpec) -> Path:
    """A tiny trained anchor (a few steps), shared by the tests that only read it."""
    from flexmoe.anchor import train_anchor
    from flexmoe.training.config import TrainConfig

    root = tmp_path_factory.mktemp("anchor")
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=4, eval_every=20,
                      checkpoint_every=0, eval_batches=2)  # fmt: skip
    train_anchor(
        data=[public_spec], out=root / "anchor", dims=TINY_DIMS, cfg=cfg,
        device=torch.device("cpu"), cache_dir=root / "cache", vocab_size=400, progress=False,
    )  # fmt: skip
    return root / "anchor"


MARKUP = "<img src=x onerror=alert(1)> & co"  # an owner's name the package checks allow


@pytest.fixture(scope="session")
def ui_model(tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path, corpus_dir: Path) -> Path:
    """A merged model ``tiny`` of two tiny experts, ``upper`` (owner ``upper org``) and
    ``again``, whose owner's name is markup: for the page's tests (copy it before changing)."""
    from helpers import train_packages

    from flexmoe.merge.build import build_merged
    from flexmoe.merge.plan import plan_merge

    root = tmp_path_factory.mktemp("ui")
    packages = train_packages(root, anchor_dir, corpus_dir, owners=("upper org", MARKUP))
    build_merged(plan_merge(anchor_dir, packages, top_k=2), root / "tiny", progress=False)
    return root / "tiny"
