"""Extraction audit: a model over-trained on a few documents reproduces them; the anchor does not."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import make_texts

from flexmoe.anchor import load_anchor
from flexmoe.data.documents import Document
from flexmoe.data.packing import pack_documents
from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.extraction import AuditSettings, audit_extraction, sample_passages
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import train

CPU = torch.device("cpu")


def test_over_trained_model_is_caught_and_the_anchor_is_not(anchor_dir: Path) -> None:
    anchor = load_anchor(anchor_dir)
    texts = [" ".join(t.split()[:24]) for t in make_texts(3, seed=7)]
    docs = [Document("secret", f"s{i}", t) for i, t in enumerate(texts)]
    settings = AuditSettings(documents=3, samples=2, prefix_tokens=10, suffix_tokens=10)
    passages = sample_passages(docs, anchor.tokenizer, settings)
    assert len(passages) == 3 and all(len(p.prefix) == len(p.suffix) == 10 for p in passages)
    assert sample_passages(docs, anchor.tokenizer, settings) == passages  # seeded

    base = audit_extraction(anchor.model, anchor.tokenizer, passages, settings, name="anchor",
                            device=CPU)  # fmt: skip
    assert base.rate == 0.0 and base.mean_best_similarity < 0.9

    memorised = copy.deepcopy(anchor.model)
    stream = pack_documents(docs * 7, anchor.tokenizer)  # many epochs, at shifting offsets
    cfg = TrainConfig(steps=200, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=5,
                      weight_decay=0.0, eval_every=0, checkpoint_every=0)  # fmt: skip
    result = train(memorised, train_stream=stream, val_stream=None, cfg=cfg, device=CPU,
                   checkpoint_dir=None, progress=False)  # fmt: skip
    assert result.final_train_loss < 0.1  # it has learned the documents by heart
    over = audit_extraction(memorised, anchor.tokenizer, passages, settings, name="over-trained",
                            device=CPU)  # fmt: skip
    assert over.rate >= 2 / 3, over
    assert over.documents == 3 and over.samples_per_document == 2


def test_bad_settings_and_short_documents(anchor_dir: Path) -> None:
    anchor = load_anchor(anchor_dir)
    with pytest.raises(FlexMoEError, match="--samples"):
        AuditSettings(samples=0)
    with pytest.raises(FlexMoEError, match="no document has the 64 tokens"):
        sample_passages([Document("d", "x", "too short")], anchor.tokenizer, AuditSettings())


def test_audit_command(
    anchor_dir: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The audit in this process (its scores), and a missing file refused by a process of its
    own, in one line."""
    import json
    import subprocess
    import sys

    from flexmoe.cli import main

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "flexmoe", "audit", "extraction", *args],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    with pytest.raises(SystemExit) as done:
        main(
            [
                "audit",
                "extraction",
                str(anchor_dir),
                "--docs",
                str(corpus_dir / "public.jsonl"),
                "--documents",
                "3",
                "--samples",
                "2",
                "--prefix-tokens",
                "8",
                "--suffix-tokens",
                "8",
                "--json",
                "--device",
                "cpu",
            ]
        )
    assert done.value.code in (0, None)
    [row] = json.loads(capsys.readouterr().out)
    assert row["documents"] == 3 and row["samples_per_document"] == 2 and 0 <= row["rate"] <= 1
    bad = run(str(anchor_dir), "--docs", str(corpus_dir / "missing.jsonl"))
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing.jsonl" in bad.stderr
