"""Text that needs two experts, inference cost per model, and document-level routing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flexmoe.anchor import load_anchor
from flexmoe.data.documents import Document
from flexmoe.data.packing import pack_documents
from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.cost import Shape, relative_cost
from flexmoe.evaluate.mixed import HeldOutText, alternating, passages
from flexmoe.evaluate.perplexity import evaluate_loaded, stream_nll
from flexmoe.evaluate.registry import Variant
from flexmoe.model.moe import ExpertMLP, MoEFeedForward, Router

CPU = torch.device("cpu")


def _docs(domain: str, lines: int, docs: int = 2) -> list[Document]:
    return [
        Document(domain, f"{domain}{d}", "".join(f"{domain} {d}.{i} " * 8 + "\n" for i in range(lines)))
        for d in range(docs)
    ]  # fmt: skip


def test_passages_are_whole_lines_of_one_document() -> None:
    docs = _docs("code", 5)  # 5 lines of 73 bytes each
    found = list(passages(docs, 200))
    assert len(found) == 4  # per document: lines 0-2, lines 3-4
    assert found[0] == docs[0].text.split("\n", 3)[0] + "\n" + "".join(
        docs[0].text.splitlines(keepends=True)[1:3]
    )
    assert all(p.endswith("\n") and "code 1" not in p for p in found[:2])


def test_alternating_takes_passages_in_turn_until_one_domain_runs_out() -> None:
    mixed = alternating("code", _docs("code", 9), "legal", _docs("legal", 3), passage_bytes=50)
    assert mixed.domain == "code+legal"
    # a line a passage: legal has 6, code 18; 6 a document, 3 of each -> 2 documents
    assert [d.doc_id for d in mixed.documents] == ["code+legal:0", "code+legal:1"]
    lines = mixed.documents[0].text.splitlines()
    assert [line.split()[0] for line in lines] == ["code", "legal"] * 3
    assert mixed.documents[1].text.splitlines()[1].startswith("legal 1.0 ")


def test_held_out_text_is_scored_on_its_own_documents(anchor_dir: Path) -> None:
    anchor = load_anchor(anchor_dir)
    mixed = alternating("a", _docs("alpha", 4), "b", _docs("beta", 4), per_document=2)
    [score] = evaluate_loaded(
        anchor.model, anchor.tokenizer, [mixed], device=CPU, cache_dir=None, seq_len=32
    )
    stream = pack_documents(list(mixed.documents), anchor.tokenizer)
    nll, count = stream_nll(anchor.model, stream, seq_len=32, device=CPU)
    assert score.domain == "a+b" and score.documents == len(mixed.documents)
    assert math.isclose(score.bits_per_byte, nll / (math.log(2) * stream.num_bytes))
    assert score.tokens == count
    with pytest.raises(FlexMoEError, match="empty: no held-out documents"):
        evaluate_loaded(
            anchor.model, anchor.tokenizer, [HeldOutText("empty", ())], device=CPU, cache_dir=None
        )


def test_costs_counted_by_hand() -> None:
    shape = Shape(hidden=4, intermediate=8, layers=1, heads=1, kv_heads=1, head_dim=4, vocab=10,
                  context=2.0)  # fmt: skip
    # anchor: projections 2*4*16=128, attention 2*2*4*2=32, FFN 2*3*4*8=192, output 2*4*10=80
    assert shape.forward() == 432
    cost = {
        name: relative_cost(name, shape, owners=2, top_k=2)
        for name in ("anchor", "soup", "fedavg", "specialist:a", "flexmoe", "flexmoe:top-3",
                     "flexmoe:tuned", "unrestricted", "btm", "seq-route")
    }  # fmt: skip
    assert cost["anchor"] == cost["soup"] == cost["fedavg"] == 1.0
    assert cost["specialist:a"] == 640 / 432  # two FFNs and two router rows
    assert cost["flexmoe"] == cost["flexmoe:tuned"] == cost["unrestricted"] == 648 / 432
    assert cost["flexmoe:top-3"] == (648 + 192) / 432
    assert cost["btm"] == (2 * 640 + 2 * 20 + 2 * 20) / 432  # both members, then the mixing
    assert cost["seq-route"] == (432 + 640) / 432  # the anchor's pass over the document first
    # two public rivals in the merge and in every owner's model, top-3: three FFNs of 4 or 5
    with_rivals = {
        name: relative_cost(name, shape, owners=2, top_k=3, rivals=2)
        for name in ("anchor", "specialist:a", "flexmoe", "btm", "unrestricted")
    }
    assert with_rivals["anchor"] == 1.0
    assert with_rivals["specialist:a"] == 848 / 432  # 128 + 32 + 3 * 192 + 2*4*4 + 80
    assert with_rivals["flexmoe"] == 856 / 432  # five router rows
    assert with_rivals["unrestricted"] == 840 / 432  # its own three, no rivals
    assert with_rivals["btm"] == (2 * 848 + 2 * 20 + 2 * 20) / 432


def _moe(prefix: float, mask: list[bool] | None = None) -> MoEFeedForward:
    torch.manual_seed(0)
    experts = [ExpertMLP(hidden_size=8, intermediate_size=16) for _ in range(3)]
    router = Router(hidden_size=8, num_experts=3)
    with torch.no_grad():
        for row in router.rows:
            row.normal_()
    layer = MoEFeedForward(experts=experts, router=router, top_k=2)
    layer.prefix_mix, layer.capture = prefix, True
    layer.expert_mask = None if mask is None else torch.tensor(mask)
    return layer


def test_document_level_routing_pools_the_logits_over_the_prefix() -> None:
    x = torch.randn(2, 5, 8)
    plain, pooled, half = _moe(0.0), _moe(1.0), _moe(0.5)
    with torch.no_grad():
        plain(x), pooled(x), half(x)
        logits = x @ plain.router.weight.T  # (B, T, N)
    assert plain.last_routing is not None and pooled.last_routing is not None
    # the first token has no prefix but itself
    assert torch.allclose(pooled.last_routing[:, 0], plain.last_routing[:, 0])
    mean = logits.cumsum(1) / torch.arange(1, 6)[:, None]
    want = torch.softmax(mean, -1)
    top = want.topk(2, -1)
    expected = torch.zeros_like(want).scatter(-1, top.indices, top.values)
    assert torch.allclose(pooled.last_routing, expected, atol=1e-6)
    assert half.last_routing is not None
    mixed = torch.softmax((logits + mean) / 2, -1)
    assert torch.allclose(half.last_routing.sum(-1), mixed.topk(2, -1).values.sum(-1), atol=1e-6)
    # an opted-out expert gets nothing, pooled or not
    masked = _moe(1.0, mask=[True, False, True])
    with torch.no_grad():
        masked(x)
    assert masked.last_routing is not None and not masked.last_routing[..., 1].any()


def test_prefix_is_a_merged_model_option() -> None:
    variant = Variant.parse("flexmoe:top-2:prefix-50")
    assert variant.prefix == 50 and variant.name() == "flexmoe:top-2:prefix-50"
    for bad, match in (
        ("flexmoe:prefix-0", "share in 1..100"),
        ("btm:prefix-50", "only the merged"),
    ):
        with pytest.raises(FlexMoEError, match=match):
            Variant.parse(bad)
