"""The CUDA path: device choice, bf16 autocast training, parity on the GPU. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_DIMS
from transformers import FlexOlmoConfig, FlexOlmoForCausalLM

from flexmoe.anchor import load_anchor, train_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.device import pick_device
from flexmoe.model.checkpoint import load_model
from flexmoe.training.config import TrainConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_auto_picks_cuda() -> None:
    assert pick_device("auto").type == "cuda"


def test_anchor_trains_on_cuda_with_bf16_autocast(tmp_path: Path, public_spec: DataSpec) -> None:
    cfg = TrainConfig(
        steps=20, batch_size=8, seq_len=32, warmup_steps=2, eval_every=10, checkpoint_every=0
    )
    manifest, result = train_anchor(
        data=[public_spec], out=tmp_path / "anchor", dims=TINY_DIMS, cfg=cfg,
        device=torch.device("cuda"), cache_dir=tmp_path / "cache", vocab_size=400, progress=False,
    )  # fmt: skip
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    anchor = load_anchor(tmp_path / "anchor")  # written in fp32 on the CPU, fingerprint intact
    assert next(anchor.model.parameters()).dtype == torch.float32
    assert anchor.manifest.fingerprint == manifest.fingerprint


def test_moe_parity_on_cuda(flex_cfg: FlexOlmoConfig, tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = FlexOlmoForCausalLM(flex_cfg).eval()
    with torch.no_grad():
        for layer in reference.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    reference.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").cuda()
    reference = reference.cuda()
    ids = torch.randint(2, flex_cfg.vocab_size, (3, 20), device="cuda")
    with torch.no_grad():
        assert (reference(ids).logits - ours(ids).logits).abs().max().item() <= 1e-4


def test_probe_and_soup_run_where_they_are_asked(
    anchor_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """A CPU model probed on CUDA is back on the CPU afterwards; the soup of an anchor on CUDA
    and packages loaded on the CPU builds (both crashed `expert train` / `eval baselines`)."""
    from helpers import train_packages

    from flexmoe.evaluate.baselines import soup
    from flexmoe.expert.package import load_package
    from flexmoe.model.probe import document_ffn_inputs

    anchor = load_anchor(anchor_dir)
    cpu = document_ffn_inputs(anchor.model, anchor.tokenizer, ["the union is strong"] * 3)
    gpu = document_ffn_inputs(
        anchor.model, anchor.tokenizer, ["the union is strong"] * 3, device=torch.device("cuda")
    )
    assert next(anchor.model.parameters()).device.type == "cpu"
    assert torch.allclose(cpu, gpu, atol=5e-2)  # bf16 autocast on CUDA
    packages = [load_package(p, anchor) for p in train_packages(tmp_path, anchor_dir, corpus_dir)]
    anchor.model.to("cuda")
    mixed = soup(anchor, packages)
    assert all(torch.isfinite(p).all() for p in mixed.parameters())


def cli_chain(root: Path, corpus_dir: Path, device: str) -> dict[str, Path]:
    """The whole CLI chain on ``device``: tokenizer, anchor (trained, then imported from a bf16
    copy), two experts (one with activation checkpointing), merge, generate, eval baselines,
    report, serve. Each step is its own process, as a user runs it; returns the outputs."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx
    from transformers import AutoModelForCausalLM

    public, owner = corpus_dir / "public.jsonl", corpus_dir / "other.jsonl"
    env = {**os.environ, "FLEXMOE_CACHE": str(root / "cache")}

    def cli(*args: str, module: str = "flexmoe") -> str:
        done = subprocess.run(
            [sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
            timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, f"{args[:2]}: {done.stderr[-3000:]}"
        return done.stdout

    small = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0",
             "--checkpoint-every", "0", "--device", device]  # fmt: skip
    cli("tokenizer", "train", "--data", f"public={public}", "--out", str(root / "tok"),
        "--vocab-size", "400")  # fmt: skip
    cli("anchor", "train", "--data", f"public={public}", "--tokenizer", str(root / "tok"),
        "--hidden-size", "32", "--num-layers", "2", "--num-heads", "4", "--intermediate-size",
        "64", *small, "--out", str(root / "anchor32"))  # fmt: skip
    AutoModelForCausalLM.from_pretrained(root / "anchor32", dtype=torch.bfloat16).save_pretrained(
        root / "hf"
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (root / "hf" / name).write_bytes((root / "anchor32" / name).read_bytes())
    cli("anchor", "import", str(root / "hf"), "--data", f"public={public}", "--device", device,
        "--out", str(root / "anchor"))  # fmt: skip
    packages = []
    for name, data, extra in (("upper", owner, ["--activation-checkpointing"]),
                              ("again", public, [])):  # fmt: skip
        cli("expert", "train", "--anchor", str(root / "anchor"), "--data", str(data), "--name",
            name, "--owner", f"{name} org", "--license", "MIT", *small, *extra,
            "--out", str(root / name))  # fmt: skip
        packages += ["--expert", str(root / name)]
    cli("merge", "--anchor", str(root / "anchor"), *packages, "--out", str(root / "merged"))
    said = cli("generate", str(root / "merged"), "the union", "--max-new-tokens", "8",
               "--attribution", "--device", device)  # fmt: skip
    assert "public" in said
    cli("eval", "baselines", "--anchor", str(root / "anchor"), *packages,
        str(root / "merged"), "--data", f"public={public}",
        "--max-documents", "8", "--seq-len", "32", "--device", device,
        "--out", str(root / "scores.json"))  # fmt: skip
    cli("report", str(root / "scores.json"), "--out", str(root / "report"), module="flexmoe_lab")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "flexmoe", "serve", str(root / "merged"), "--listen", f"127.0.0.1:{port}",
         "--device", device],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        answer = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                            json={"prompt": "the union", "max_tokens": 4}, timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
    finally:
        server.terminate()
        server.wait(30)
    return {"anchor": root / "anchor", "merged": root / "merged", "report": root / "report"}


def test_the_whole_cli_chain_runs_on_cuda(tmp_path: Path, corpus_dir: Path) -> None:
    """Issue 13's first deliverable: every step on the GPU, the bf16 source kept in bf16."""
    import json

    from flexmoe.model.checkpoint import checkpoint_sources

    out = cli_chain(tmp_path, corpus_dir, "cuda")
    assert json.loads((out["anchor"] / "flexmoe_anchor.json").read_text())["dtype"] == "bfloat16"
    assert {s.dtype for s in checkpoint_sources(out["merged"])} == {torch.bfloat16}
    assert (out["report"] / "report.md").is_file()
