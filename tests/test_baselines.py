"""Baselines from the same anchor and packages: registry, soup, BTM posterior, sequence routing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flexmoe.anchor import load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.baselines import (
    PosteriorEnsemble,
    baseline_names,
    build_baseline,
    merged_variant,
    seq_route,
)
from flexmoe.evaluate.mixed import alternating
from flexmoe.evaluate.perplexity import DocumentRouted, eval_documents, evaluate_loaded
from flexmoe.evaluate.registry import Variant
from flexmoe.expert.manifest import PKG_PROJ
from flexmoe.expert.package import load_package
from flexmoe.expert.spec import ExpertIdentity, ExpertSpec
from flexmoe.expert.train import EXPERT_DEFAULTS, train_expert
from flexmoe.merge.build import build_merged
from flexmoe.merge.plan import plan_merge

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def package_dirs(
    tmp_path_factory: pytest.TempPathFactory, anchor_dir: Path, corpus_dir: Path
) -> list[Path]:
    root = tmp_path_factory.mktemp("baseline-packages")
    cfg = replace(EXPERT_DEFAULTS, steps=4, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1,
                  eval_every=0, checkpoint_every=0)  # fmt: skip
    for name, files in (("upper", "other.jsonl"), ("again", "public.jsonl")):
        train_expert(
            ExpertSpec(
                anchor=anchor_dir,
                data=[DataSpec(name, (str(corpus_dir / files),))],
                identity=ExpertIdentity(name=name, owner=f"{name} org", license="MIT"),
                schedule=cfg,
            ),
            out=root / name,
            device=CPU,
            cache_dir=None,
            progress=False,
        )
    return [root / "upper", root / "again"]


def test_registry_and_soup(anchor_dir: Path, package_dirs: list[Path], tmp_path: Path) -> None:
    anchor = load_anchor(anchor_dir)
    packages = [load_package(p, anchor) for p in package_dirs]
    assert baseline_names(packages) == [
        "anchor", "specialist:upper", "specialist:again", "soup", "btm", "seq-route", "flexmoe"
    ]  # fmt: skip
    soup = build_baseline("soup", anchor=anchor, packages=packages, device=CPU)
    key = "model.layers.1.mlp.up_proj.weight"
    want = torch.stack([
        anchor.model.state_dict()[key],
        packages[0].tensors[PKG_PROJ.format(layer=1, proj="up_proj")],
        packages[1].tensors[PKG_PROJ.format(layer=1, proj="up_proj")],
    ]).mean(0)  # fmt: skip
    assert torch.allclose(soup.state_dict()[key], want)
    same = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(soup.state_dict()[same], anchor.model.state_dict()[same])
    ids = torch.randint(2, 300, (1, 8))
    upper = build_baseline("specialist:upper", anchor=anchor, packages=packages, device=CPU)
    with torch.no_grad():
        assert upper(ids).logits.shape == (1, 8, anchor.model.config.vocab_size)
    build_merged(plan_merge(anchor_dir, package_dirs, top_k=2), tmp_path / "m", progress=False)
    merged = build_baseline(
        "flexmoe", anchor=anchor, packages=packages, device=CPU, merged_dir=tmp_path / "m"
    )
    assert merged.config.num_experts == 3
    for bad, match in (
        ("btm-ish", "unknown baseline"),
        ("specialist:nobody", "no such expert"),
        ("flexmoe", "needs the merged model"),
        ("unrestricted", "unknown baseline"),
    ):
        with pytest.raises(FlexMoEError, match=match):
            build_baseline(bad, anchor=anchor, packages=packages, device=CPU)


def test_merged_variants(anchor_dir: Path, package_dirs: list[Path], tmp_path: Path) -> None:
    build_merged(plan_merge(anchor_dir, package_dirs, top_k=2), tmp_path / "m", progress=False)
    model = merged_variant(tmp_path / "m", Variant.parse("flexmoe:top-3:bias:without-again"))
    layer = model.model.layers[0].mlp
    assert layer.top_k == 3 and layer.use_bias
    assert layer.expert_mask is not None and layer.expert_mask.tolist() == [True, True, False]
    for bad in ("top-9", "sideways", "without-nobody"):
        with pytest.raises(FlexMoEError):
            merged_variant(tmp_path / "m", Variant.parse(f"flexmoe:{bad}"))


def _reference_btm(members: list[torch.nn.Module], ids: torch.Tensor, top_k: int) -> torch.Tensor:
    """Position by position: the posterior from explicit sums, the top-k members mixed."""
    with torch.no_grad():
        logps = [torch.log_softmax(m(input_ids=ids).logits.float(), -1)[0] for m in members]
    out = []
    for t in range(ids.shape[1]):
        context = torch.tensor(
            [sum(float(lp[j, ids[0, j + 1]]) for j in range(t)) for lp in logps],
            dtype=torch.float64,
        )
        top = context.topk(top_k).indices
        weights = torch.softmax(context[top], 0)
        mix = sum(float(w) * logps[int(i)][t].exp() for w, i in zip(weights, top, strict=True))
        out.append(torch.as_tensor(mix).log())
    return torch.stack(out)


def test_btm_posterior_matches_a_reference(anchor_dir: Path, package_dirs: list[Path]) -> None:
    anchor = load_anchor(anchor_dir)
    packages = [load_package(p, anchor) for p in package_dirs]
    members = [anchor.model, *(build_baseline(f"specialist:{p.manifest.name}", anchor=anchor,
               packages=packages, device=CPU) for p in packages)]  # fmt: skip
    ids = anchor.tokenizer("THE CAT SAT on the mat, THE END", return_tensors="pt")["input_ids"]
    ensemble = PosteriorEnsemble(members, top_k=2)
    with torch.no_grad():
        got = ensemble(input_ids=ids).logits[0]
    assert torch.allclose(got, _reference_btm(members, ids, 2), atol=1e-5)
    assert torch.allclose(got.exp().sum(-1), torch.ones(ids.shape[1]), atol=1e-5)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % anchor.model.config.vocab_size
    with torch.no_grad():  # causal: a later token changes nothing before it
        assert torch.equal(ensemble(input_ids=changed).logits[0, :-1], got[:-1])
    single = PosteriorEnsemble(members[:1])
    with torch.no_grad():
        want = torch.log_softmax(members[0](input_ids=ids).logits.float(), -1)
        assert torch.allclose(single(input_ids=ids).logits, want, atol=1e-6)


def test_seq_route_sends_documents_and_sums_groups(
    anchor_dir: Path, package_dirs: list[Path], corpus_dir: Path
) -> None:
    anchor = load_anchor(anchor_dir)
    packages = [load_package(p, anchor) for p in package_dirs]
    routed = seq_route(anchor, packages, CPU)
    upper_texts = [line.upper() for line in ("the cat sat on the mat", "a dog ran far away")]
    assert routed.route(upper_texts) == [1, 1]  # the upper-case owner's row is nearest
    spec = DataSpec("other", (str(corpus_dir / "other.jsonl"),))
    score = evaluate_loaded(routed, anchor.tokenizer, [spec], device=CPU, cache_dir=None)[0]
    # all documents to one member: exactly that member's score
    only = DocumentRouted(members=routed.members, route=lambda texts: [2] * len(texts))
    alone = evaluate_loaded(routed.members[2], anchor.tokenizer, [spec], device=CPU,
                            cache_dir=None)[0]  # fmt: skip
    assert evaluate_loaded(only, anchor.tokenizer, [spec], device=CPU, cache_dir=None)[0] == alone
    assert score.documents == alone.documents and score.bytes == alone.bytes


def test_unrestricted_trains_the_merged_shape_on_all_data(
    anchor_dir: Path, package_dirs: list[Path], corpus_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from flexmoe.expert.unrestricted import RECORD_FILE, train_unrestricted
    from flexmoe.training.config import TrainConfig

    owners = [DataSpec("upper", (str(corpus_dir / "other.jsonl"),))]
    public = [DataSpec("public", (str(corpus_dir / "public.jsonl"),))]
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=1, eval_every=3,
                      checkpoint_every=0, eval_batches=1, z_loss=1e-3)  # fmt: skip
    out = tmp_path / "unrestricted"
    result = train_unrestricted(
        anchor_dir=anchor_dir, data=owners, public_data=public, out=out, cfg=cfg, top_k=2,
        device=CPU, cache_dir=None, progress=False,
    )  # fmt: skip
    assert result.steps == 6 and result.tokens == 6 * 4 * 32
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["domains"] == ["upper"] and record["steps"] == 6
    anchor = load_anchor(anchor_dir)
    packages = [load_package(p, anchor) for p in package_dirs]
    model = build_baseline(
        "unrestricted", anchor=anchor, packages=packages, device=CPU, unrestricted_dir=out
    )
    assert model.config.num_experts == 2 and model.config.num_experts_per_tok == 2
    # every part trained: attention as well as the copied experts
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[key], anchor.model.state_dict()[key])
    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(2, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(FlexMoEError, match="top-k"):
        train_unrestricted(
            anchor_dir=anchor_dir, data=owners, public_data=public, out=tmp_path / "x", cfg=cfg,
            top_k=3, device=CPU, cache_dir=None, progress=False,
        )  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_suite_scores_every_model_on_the_same_text(
    anchor_dir: Path, package_dirs: list[Path], corpus_dir: Path, tmp_path: Path
) -> None:
    from flexmoe.evaluate.suite import run_suite
    from flexmoe_lab.report import write_report

    build_merged(plan_merge(anchor_dir, package_dirs, top_k=2), tmp_path / "m", progress=False)
    data = [
        DataSpec("public", (str(corpus_dir / "public.jsonl"),)),
        DataSpec("other", (str(corpus_dir / "other.jsonl"),)),
    ]
    held = {spec.domain: eval_documents(spec) for spec in data}
    mixed = alternating(
        "other", held["other"], "public", held["public"], passage_bytes=100, per_document=2
    )
    results = run_suite(
        anchor_dir=anchor_dir, package_dirs=package_dirs, merged_dir=tmp_path / "m", data=data,
        device=CPU, cache_dir=None, max_bytes=1500, seq_len=32, log=lambda _: None,
        mixtures=[mixed],
    )  # fmt: skip
    assert list(results.models) == [
        "anchor", "specialist:upper", "specialist:again", "soup", "btm", "seq-route", "flexmoe",
        "flexmoe:top-1", "flexmoe:top-3", "flexmoe:bias", "flexmoe:prefix-50",
        "flexmoe:without-upper", "flexmoe:without-again",
    ]  # fmt: skip
    assert results.mixtures == ["other+public"] and results.domains == ["public", "other"]
    cost = results.cost
    assert cost["anchor"] == cost["soup"] == 1.0
    assert 1.0 < cost["flexmoe:top-1"] < cost["flexmoe"] < cost["flexmoe:top-3"]
    assert cost["flexmoe"] == cost["flexmoe:prefix-50"] == cost["flexmoe:without-upper"]
    assert cost["btm"] > 2 * cost["specialist:upper"] > cost["seq-route"] > cost["anchor"]
    for domain in ("public", "other", "other+public"):
        sizes = {row[domain].bytes for row in results.models.values()}
        assert len(sizes) == 1 and sizes.pop() <= 1500  # the same text for every model
    for domain in ("public", "other"):
        shares = results.routing_of()[domain]
        assert set(shares) == {"public", "upper", "again"}
        assert abs(sum(shares.values()) - 1) < 1e-6
    report = write_report(results, tmp_path / "report").read_text()
    assert "merged better on average than btm" in report
    assert "## Text that needs two experts" in report and "| btm | " in report
    assert (tmp_path / "report" / "cost_vs_quality.png").is_file()


def test_sparse_deltas_keep_the_largest_differences_from_the_public_expert(
    anchor_dir: Path, package_dirs: list[Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from flexmoe_lab.levers import sparse_delta, write_sparse_deltas

    public, own = torch.zeros(4, 5), torch.arange(20.0).reshape(4, 5) - 10
    kept = sparse_delta(public, own, 0.25)
    assert int((kept != 0).sum()) == 5 and set(kept[kept != 0].tolist()) == {-10, -9, 9, -8, 8}
    assert torch.equal(sparse_delta(public, own, 1.0), own)
    build_merged(plan_merge(anchor_dir, package_dirs, top_k=2), tmp_path / "m", progress=False)
    write_sparse_deltas(tmp_path / "m", tmp_path / "s", 0.1)

    def tensors(path: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}

    before, after = tensors(tmp_path / "m"), tensors(tmp_path / "s")
    key = "model.layers.1.mlp.experts.{}.up_proj.weight"
    assert torch.equal(after[key.format(0)], before[key.format(0)])  # the public expert as is
    moved = after[key.format(2)] != before[key.format(0)]
    assert abs(moved.float().mean().item() - 0.1) < 0.01
    assert torch.equal(after[key.format(2)][moved], before[key.format(2)][moved])
    same = [k for k in before if ".experts." not in k]
    assert all(torch.equal(after[k], before[k]) for k in same)


def test_distilled_rows_bring_the_merge_closer_to_btm_on_public_text(
    anchor_dir: Path, package_dirs: list[Path], corpus_dir: Path, tmp_path: Path
) -> None:
    from flexmoe.data.packing import pack_documents
    from flexmoe.data.split import load_splits
    from flexmoe.merge.layout import MergedModel
    from flexmoe_lab.levers import distilled_rows

    anchor = load_anchor(anchor_dir)
    packages = [load_package(p, anchor) for p in package_dirs]
    build_merged(plan_merge(anchor_dir, package_dirs, top_k=2), tmp_path / "m", progress=False)
    teacher = build_baseline("btm", anchor=anchor, packages=packages, device=CPU)
    public = load_splits([DataSpec("public", (str(corpus_dir / "public.jsonl"),))]).train
    stream = pack_documents(public, anchor.tokenizer)
    ids = stream.batch(list(range(6)), 32)[:, :-1]

    def kl(rows: torch.Tensor | None) -> float:
        model = MergedModel.open(tmp_path / "m").load()
        if rows is not None:
            for layer, moe in enumerate(model.model.layers):
                for k, row in enumerate(moe.mlp.router.rows):
                    row.data.copy_(rows[layer, k])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            target = teacher(input_ids=ids).logits.float()
        return float(torch.nn.functional.kl_div(logp, target, log_target=True, reduction="sum"))

    rows = distilled_rows(tmp_path / "m", teacher, stream, steps=15, batch_size=4, seq_len=32,
                          lr=0.05, device=CPU)  # fmt: skip
    assert rows.shape == (2, 3, anchor.model.config.hidden_size)
    assert torch.equal(rows[:, 0], anchor.public_router.to(rows.dtype))  # the public row stays
    assert kl(rows) < kl(None)
