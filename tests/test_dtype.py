"""bf16 end to end: a bf16 source stays bf16 in the anchor, the packages and the merged model
(half the bytes), fingerprints stay exact, transformers loads the result with no remote code and
matches flexmoe's logits; and the streaming writer and hash agree with safetensors' own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import train_packages
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Olmo2ForCausalLM

from flexmoe.anchor import import_anchor, load_anchor, open_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.errors import FlexMoEError
from flexmoe.expert.manifest import TENSORS_FILE
from flexmoe.expert.package import load_package
from flexmoe.merge.build import build_merged
from flexmoe.merge.edit import remove_expert
from flexmoe.merge.layout import load_merged
from flexmoe.merge.plan import plan_merge
from flexmoe.model.checkpoint import checkpoint_sources, tensors_sha256
from flexmoe.model.stream import TensorSource, sha256_sources, write_safetensors

CPU = torch.device("cpu")


def _dtypes(model_dir: Path) -> set[torch.dtype]:
    return {s.dtype for s in checkpoint_sources(model_dir)}


def _weight_bytes(model_dir: Path) -> int:
    """Bytes of tensor data (the files' headers aside, which dominate at test sizes)."""
    return sum(s.nbytes for s in checkpoint_sources(model_dir))


def _package_bytes(package: Path) -> int:
    return sum(t.nbytes for t in load_file(package / TENSORS_FILE).values())


@pytest.fixture(scope="module")
def bf16_source(tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path) -> Path:
    """The tiny anchor saved by transformers in bf16, as a user's bf16 checkpoint would be."""
    out = tmp_path_factory.mktemp("bf16") / "hf"
    AutoModelForCausalLM.from_pretrained(anchor_dir, dtype=torch.bfloat16).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(anchor_dir / name, out)
    return out


def test_bf16_end_to_end(
    bf16_source: Path, tmp_path: Path, public_spec: DataSpec, corpus_dir: Path
) -> None:
    bf16 = tmp_path / "anchor-bf16"
    fp32 = tmp_path / "anchor-fp32"
    manifest = import_anchor(bf16_source, out=bf16, data=[public_spec], device=CPU)
    widened = import_anchor(
        bf16_source, out=fp32, data=[public_spec], device=CPU, dtype=torch.float32
    )
    assert (manifest.dtype, widened.dtype) == ("bfloat16", "float32")
    assert _dtypes(bf16) == {torch.bfloat16} and _dtypes(fp32) == {torch.float32}
    source = load_file(bf16_source / "model.safetensors")
    stored = load_file(bf16 / "model.safetensors")
    assert all(torch.equal(stored[k], v) for k, v in source.items())  # kept exactly as given
    assert _weight_bytes(bf16) * 2 == _weight_bytes(fp32)
    anchor = load_anchor(bf16)  # the fingerprint is recomputed while loading: exact
    assert next(anchor.model.parameters()).dtype == torch.float32  # CPU computes in float32
    assert open_anchor(bf16).dtype == torch.bfloat16

    packages = train_packages(tmp_path / "pkgs", bf16, corpus_dir)
    wide_packages = train_packages(tmp_path / "pkgs32", fp32, corpus_dir)
    for pkg, wide in zip(packages, wide_packages, strict=True):
        package = load_package(pkg, open_anchor(bf16))
        assert package.manifest.shapes.dtype == "bfloat16"
        assert {t.dtype for t in package.tensors.values()} == {torch.bfloat16}
        assert _package_bytes(pkg) * 2 == _package_bytes(wide)
    with pytest.raises(FlexMoEError, match="trained on another anchor"):
        load_package(packages[0], open_anchor(fp32))  # widening makes another anchor

    merged = tmp_path / "merged"
    build_merged(plan_merge(bf16, packages, top_k=2), merged, progress=False)
    assert _dtypes(merged) == {torch.bfloat16}
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    ids = torch.randint(3, 300, (2, 20))
    hf = AutoModelForCausalLM.from_pretrained(merged)  # no remote code; the stored dtype
    assert next(hf.parameters()).dtype == torch.bfloat16
    ours = load_merged(merged, dtype=torch.bfloat16)
    with torch.no_grad():
        theirs_logits, our_logits = hf(ids).logits.float(), ours(input_ids=ids).logits.float()
    assert (theirs_logits - our_logits).abs().max() < 0.05 * our_logits.abs().max()
    hf32 = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    with torch.no_grad():  # widened on both sides, the two agree to float32 precision
        torch.testing.assert_close(
            hf32(ids).logits, load_merged(merged)(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )
    smaller = remove_expert(merged, "again", out=tmp_path / "smaller", progress=False)
    assert _dtypes(smaller) == {torch.bfloat16}


def test_import_streams_into_shards(
    bf16_source: Path, tmp_path: Path, public_spec: DataSpec
) -> None:
    """A checkpoint larger than one shard is written as shards with an index, loads back with
    the same fingerprint, and transformers reads it."""
    whole = import_anchor(bf16_source, out=tmp_path / "whole", data=[public_spec], device=CPU)
    sharded = import_anchor(
        bf16_source, out=tmp_path / "sharded", data=[public_spec], device=CPU,
        max_shard_bytes=20_000,
    )  # fmt: skip
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert sharded.fingerprint == whole.fingerprint
    assert load_anchor(tmp_path / "sharded").manifest.fingerprint == whole.fingerprint
    Olmo2ForCausalLM.from_pretrained(tmp_path / "sharded")


def test_streamed_writes_and_hashes_match_safetensors(tmp_path: Path) -> None:
    tensors = {
        "b.weight": torch.randn(5, 3).to(torch.bfloat16),
        "a.weight": torch.randn(4),
        "c.empty": torch.zeros(0, 2),
        "d.half": torch.randn(2, 2).half(),
    }
    sources = [TensorSource(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in tensors.items()]
    write_safetensors(tmp_path / "ours.safetensors", sources, on_tensor=None)
    back = load_file(tmp_path / "ours.safetensors")
    assert set(back) == set(tensors)
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in tensors.items())
    with safe_open(str(tmp_path / "ours.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert sha256_sources(sources) == tensors_sha256(tensors)
    save_file(tensors, str(tmp_path / "theirs.safetensors"))
    assert tensors_sha256(load_file(tmp_path / "theirs.safetensors")) == tensors_sha256(back)
    wrong = [TensorSource("x", (3,), torch.float32, lambda: torch.zeros(4))]
    with pytest.raises(FlexMoEError, match="has shape"):
        write_safetensors(tmp_path / "bad.safetensors", wrong, on_tensor=None)
