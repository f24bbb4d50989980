"""flexmoe's runtime against transformers' own classes on the same tiny random weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FlexOlmoConfig,
    FlexOlmoForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
)

from flexmoe.model import names
from flexmoe.model.checkpoint import build_moe, load_model, moe_layers, save_model, upcycle
from flexmoe.model.config import flex_config
from flexmoe.model.moe import MoEFeedForward

TOL = 1e-5


def _random_flex(cfg: FlexOlmoConfig, tmp_path: Path) -> FlexOlmoForCausalLM:
    torch.manual_seed(0)
    model = FlexOlmoForCausalLM(cfg).eval()
    with torch.no_grad():  # transformers initialises the router near zero; make routing matter
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)
    model.save_pretrained(tmp_path / "hf")
    return model


def _generate(
    model: torch.nn.Module, prompt: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model.generate(
        prompt, max_new_tokens=8, do_sample=False, output_scores=True,
        return_dict_in_generate=True, pad_token_id=1,
    )  # fmt: skip
    return out.sequences, list(out.scores)


def test_flexolmo_forward_and_cached_generation_match(
    flex_cfg: FlexOlmoConfig, tmp_path: Path
) -> None:
    reference = _random_flex(flex_cfg, tmp_path)
    ours = load_model(tmp_path / "hf")
    assert len(moe_layers(ours)) == flex_cfg.num_hidden_layers
    ids = torch.randint(2, flex_cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (reference(ids).logits - ours(ids).logits).abs().max().item()
    assert diff <= TOL
    seq_ref, scores_ref = _generate(reference, ids[:, :6])
    seq_ours, scores_ours = _generate(ours, ids[:, :6])
    assert torch.equal(seq_ref, seq_ours)
    assert (
        max((a - b).abs().max().item() for a, b in zip(scores_ref, scores_ours, strict=True)) <= TOL
    )


def test_cached_generation_equals_full_forward(flex_cfg: FlexOlmoConfig, tmp_path: Path) -> None:
    _random_flex(flex_cfg, tmp_path)
    ours = load_model(tmp_path / "hf")
    prompt = torch.randint(
        2, flex_cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(2)
    )
    sequences, scores = _generate(ours, prompt)
    with torch.no_grad():
        full = ours(sequences).logits  # (B, T, V)
    for step, score in enumerate(scores):
        assert (full[:, prompt.shape[1] - 1 + step] - score).abs().max().item() <= TOL


def test_olmo2_matches_transformers(olmo2_cfg: Olmo2Config, tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = Olmo2ForCausalLM(olmo2_cfg).eval()
    reference.save_pretrained(tmp_path / "dense")
    ours = load_model(tmp_path / "dense")
    ids = torch.randint(2, olmo2_cfg.vocab_size, (2, 24))
    with torch.no_grad():
        assert (reference(ids).logits - ours(ids).logits).abs().max().item() <= TOL
    seq_ref, scores_ref = _generate(reference, ids[:, :4])
    seq_ours, scores_ours = _generate(ours, ids[:, :4])
    assert torch.equal(seq_ref, seq_ours)
    assert (
        max((a - b).abs().max().item() for a, b in zip(scores_ref, scores_ours, strict=True)) <= TOL
    )


def test_our_moe_checkpoint_loads_in_transformers(flex_cfg: FlexOlmoConfig, tmp_path: Path) -> None:
    _random_flex(flex_cfg, tmp_path)
    ours = load_model(tmp_path / "hf")
    save_model(ours, tmp_path / "ours")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(again).__name__ == "FlexOlmoForCausalLM"
    ids = torch.randint(2, flex_cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert (again(ids).logits - ours(ids).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("num_experts", [2, 4])
def test_upcycled_model_reproduces_the_anchor(olmo2_cfg: Olmo2Config, num_experts: int) -> None:
    torch.manual_seed(0)
    dense = Olmo2ForCausalLM(olmo2_cfg).eval()
    moe = upcycle(dense, num_experts=num_experts, top_k=num_experts).eval()
    with torch.no_grad():  # arbitrary router rows: all experts active, weights sum to one
        for layer in moe_layers(moe):
            for row in layer.router.rows:
                row.normal_(0, 1.0)
    ids = torch.randint(2, olmo2_cfg.vocab_size, (2, 16))
    with torch.no_grad():
        assert (dense(ids).logits - moe(ids).logits).abs().max().item() <= TOL
    # expert 0 shares the anchor's tensors; the others are copies
    layer0 = moe_layers(moe)[0]
    assert (
        layer0.experts[0].up_proj.weight.data_ptr()
        == dense.model.layers[0].mlp.up_proj.weight.data_ptr()
    )
    assert (
        layer0.experts[1].up_proj.weight.data_ptr() != layer0.experts[0].up_proj.weight.data_ptr()
    )


def test_parameter_counts(flex_cfg: FlexOlmoConfig, tmp_path: Path) -> None:
    reference = _random_flex(flex_cfg, tmp_path)
    ours = load_model(tmp_path / "hf")
    biases = flex_cfg.num_hidden_layers * (flex_cfg.num_experts - 1)
    assert (
        sum(p.numel() for p in ours.parameters())
        == sum(p.numel() for p in reference.parameters()) + biases
    )


def _masked(model: torch.nn.Module, mask: torch.Tensor | None) -> None:
    for layer in moe_layers(model):
        layer.expert_mask = mask


def test_row_masks_equal_a_model_merged_without_the_expert(
    flex_cfg: FlexOlmoConfig, tmp_path: Path
) -> None:
    """Excluding expert 2 in one row of a batch equals a model whose slot 2 was never there."""
    _random_flex(flex_cfg, tmp_path)
    full = load_model(tmp_path / "hf")
    state = {k: v for k, v in full.state_dict().items()}
    n, drop = flex_cfg.num_experts, 2
    keep = [e for e in range(n) if e != drop]
    smaller: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".mlp.experts." in key or ".mlp.router." in key:
            continue
        smaller[key] = value
    for layer in range(flex_cfg.num_hidden_layers):
        for new, old in enumerate(keep):
            for proj in names.PROJECTIONS:
                smaller[names.EXPERT.format(layer=layer, expert=new, proj=proj)] = state[
                    names.EXPERT.format(layer=layer, expert=old, proj=proj)
                ]
            smaller[names.ROUTER_ROW.format(layer=layer, expert=new)] = state[
                names.ROUTER_ROW.format(layer=layer, expert=old)
            ]
    cfg_small = flex_config(flex_cfg, num_experts=n - 1, top_k=flex_cfg.num_experts_per_tok)
    without = build_moe(cfg_small, smaller, where=tmp_path)
    ids = torch.randint(2, flex_cfg.vocab_size, (2, 14))
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, drop] = False  # row 1 excludes the expert; row 0 keeps everything
    _masked(full, mask)
    with torch.no_grad():
        mixed = full(ids).logits
        alone = without(ids).logits
    _masked(full, None)
    with torch.no_grad():
        unmasked = full(ids).logits
    assert (mixed[1] - alone[1]).abs().max().item() <= TOL
    assert (mixed[0] - unmasked[0]).abs().max().item() <= TOL
    assert (mixed[1] - unmasked[1]).abs().max().item() > 1e-4  # the expert mattered


def test_negative_bias_only_lowers_logits() -> None:
    from flexmoe.model.moe import ExpertMLP, Router

    router = Router(hidden_size=4, num_experts=3)
    with torch.no_grad():
        router.biases[0].fill_(0.5)
        router.biases[1].fill_(-2.0)
    assert router.bias_vector().tolist() == [0.0, 0.0, -2.0]
    moe = MoEFeedForward(
        experts=[ExpertMLP(hidden_size=4, intermediate_size=8) for _ in range(3)],
        router=router,
        top_k=2,
        use_bias=True,
    )
    moe.capture = True
    moe(torch.randn(1, 3, 4))
    assert moe.last_routing is not None and moe.last_routing.shape == (1, 3, 3)
    assert ((moe.last_routing > 0).sum(-1) == 2).all()
