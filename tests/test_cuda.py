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
