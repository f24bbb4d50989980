"""Helpers shared by the tests: synthetic texts and jsonl files."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
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


def train_packages(
    root: Path,
    anchor_dir: Path,
    corpus_dir: Path,
    licenses: tuple[str, str] = ("MIT", "MIT"),
    owners: tuple[str, str] = ("upper org", "again org"),
) -> list[Path]:
    """Two tiny owners' experts against ``anchor_dir``: ``upper`` (the upper-case corpus) and
    ``again`` (public text again), under ``licenses``, owned by ``owners``; a few steps each."""
    from dataclasses import replace

    import torch

    from flexmoe.data.documents import DataSpec
    from flexmoe.expert.spec import ExpertIdentity, ExpertSpec
    from flexmoe.expert.train import EXPERT_DEFAULTS, train_expert

    cfg = replace(EXPERT_DEFAULTS, steps=8, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1,
                  eval_every=0, checkpoint_every=0)  # fmt: skip
    out = []
    for name, files, license_id, owner in (
        ("upper", corpus_dir / "other.jsonl", licenses[0], owners[0]),
        ("again", corpus_dir / "public.jsonl", licenses[1], owners[1]),
    ):
        train_expert(
            ExpertSpec(
                anchor=anchor_dir,
                data=[DataSpec(name, (str(files),))],
                identity=ExpertIdentity(name=name, owner=owner, license=license_id),
                schedule=cfg,
            ),
            out=root / name,
            device=torch.device("cpu"),
            cache_dir=None,
            progress=False,
        )
        out.append(root / name)
    return out


ADMIN = "admin-" + "s" * 24  # the admin token of the servers the tests start


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def live(model_dir: Path, **kwargs: object) -> Iterator[str]:
    """``flexmoe serve``'s app for ``model_dir`` on 127.0.0.1 in a thread; yields its URL."""
    import threading
    import time

    import torch
    import uvicorn

    from flexmoe.serve.app import create_app
    from flexmoe.serve.http import server_config

    app = create_app(model_dir, device=torch.device("cpu"), admin_token=ADMIN, **kwargs)  # type: ignore[arg-type]
    server = uvicorn.Server(
        server_config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
