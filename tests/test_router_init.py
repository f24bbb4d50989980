"""Router initialisation methods: anchor-hidden, embedder (a local model), random."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from flexmoe.anchor import import_anchor, load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.data.split import load_splits
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexMoEError
from flexmoe.expert.train import owner_router_rows
from flexmoe.model.embedder import Embedder, projection
from flexmoe.router_init import RouterInitMethod

CPU = torch.device("cpu")


def _embedder(root: Path, tokenizer_dir: Path, seed: int, *, safe: bool = True) -> Path:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=400,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=300,
    )
    out = root / f"embedder-{seed}-{safe}"
    model = BertModel(config)
    model.save_pretrained(out)
    if not safe:  # the same weights as a pickle, the format flexmoe must never load
        (out / "model.safetensors").unlink()
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    load_tokenizer(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return _embedder(tmp_path_factory.mktemp("emb"), tokenizer_dir, seed=0)


@pytest.fixture(scope="module")
def embedder_anchor(
    tmp_path_factory: pytest.TempPathFactory,
    anchor_dir: Path,
    embedder_dir: Path,
    public_spec: DataSpec,
) -> Path:
    out = tmp_path_factory.mktemp("emb-anchor") / "anchor"
    import_anchor(
        anchor_dir,
        out=out,
        data=[public_spec],
        device=CPU,
        router_init=RouterInitMethod.EMBEDDER,
        embedder=embedder_dir,
    )
    return out


def test_public_row_is_the_projected_mean_embedding(
    embedder_anchor: Path, embedder_dir: Path, public_spec: DataSpec
) -> None:
    anchor = load_anchor(embedder_anchor)
    record = anchor.manifest.router_init
    assert record.method == "embedder" and record.params["embedding_dim"] == 16
    emb = Embedder(embedder_dir, device=CPU)
    assert record.params["embedder_fingerprint"] == emb.fingerprint()
    texts = [d.text for d in load_splits([public_spec]).train]
    mean = emb.mean_embedding(texts)
    row = projection(int(record.params["projection_seed"]), hidden_size=32, embedding_dim=16) @ mean
    expected = row / row.norm()
    for layer in range(2):  # the same unit row in every layer
        assert torch.allclose(anchor.public_router[layer], expected, atol=1e-5)


def test_owner_rows_with_the_same_embedder(embedder_anchor: Path, embedder_dir: Path) -> None:
    anchor = load_anchor(embedder_anchor)
    rows, params = owner_router_rows(
        anchor,
        RouterInitMethod.EMBEDDER,
        ["THE UNION OF STATE"] * 3,
        device=CPU,
        embedder=embedder_dir,
    )
    assert rows.shape == (2, 32) and torch.allclose(rows.norm(dim=-1), torch.ones(2))
    assert (
        params["embedder_fingerprint"] == anchor.manifest.router_init.params["embedder_fingerprint"]
    )
    assert not torch.allclose(rows[0], anchor.public_router[0])


def test_another_embedder_is_refused(
    embedder_anchor: Path, tmp_path: Path, tokenizer_dir: Path
) -> None:
    other = _embedder(tmp_path, tokenizer_dir, seed=1)
    with pytest.raises(FlexMoEError, match="not the embedding model"):
        owner_router_rows(
            load_anchor(embedder_anchor),
            RouterInitMethod.EMBEDDER,
            ["x y"],
            device=CPU,
            embedder=other,
        )


def test_methods_must_match_the_anchor(
    embedder_anchor: Path, anchor_dir: Path, embedder_dir: Path
) -> None:
    with pytest.raises(FlexMoEError, match="use --router-init embedder"):
        owner_router_rows(
            load_anchor(embedder_anchor), RouterInitMethod.ANCHOR_HIDDEN, ["x y"], device=CPU
        )
    with pytest.raises(FlexMoEError, match="use --router-init anchor-hidden"):
        owner_router_rows(
            load_anchor(anchor_dir),
            RouterInitMethod.EMBEDDER,
            ["x y"],
            device=CPU,
            embedder=embedder_dir,
        )
    for path in (anchor_dir, embedder_anchor):  # random (an ablation) goes with any anchor
        rows, params = owner_router_rows(
            load_anchor(path), RouterInitMethod.RANDOM, ["x"], device=CPU, seed=3
        )
        assert params == {"seed": 3} and torch.allclose(rows.norm(dim=-1), torch.ones(2))


def test_embedder_never_unpickles(tmp_path: Path, tokenizer_dir: Path) -> None:
    pickled = _embedder(tmp_path, tokenizer_dir, seed=0, safe=False)
    assert not list(pickled.glob("*.safetensors"))
    with pytest.raises(FlexMoEError, match="cannot load the embedding model"):
        Embedder(pickled, device=CPU)
    (tmp_path / "none").mkdir()
    with pytest.raises(FlexMoEError, match=r"no config\.json"):
        Embedder(tmp_path / "none", device=CPU)
    shutil.rmtree(pickled)
