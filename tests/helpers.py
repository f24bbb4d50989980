"""Helpers shared by the tests: synthetic texts and jsonl files."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "union state congress nation people government year country public war peace law"
).split()


def make_texts(n: int, seed: int, words: list[str] | None = None) -> list[str]:
    rng = random.Random(seed)
    vocab = words or WORDS
    return [
        " ".join(rng.choice(vocab) for _ in range(rng.randint(40, 120))) + "." for _ in range(n)
    ]


def write_jsonl(path: Path, texts: list[str], *, ids: bool = False) -> Path:
    rows = [{"id": f"d{i}", "text": t} if ids else {"text": t} for i, t in enumerate(texts)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path
