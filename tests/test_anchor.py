"""The anchor: its directory, transformers compatibility, fingerprints, import, evaluation."""

from __future__ import annotations

import inspect
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FlexOlmoForCausalLM, Olmo2ForCausalLM

from flexmoe.anchor import ANCHOR_MANIFEST, ROUTER_FILE, import_anchor, load_anchor
from flexmoe.data.documents import DataSpec
from flexmoe.data.split import Split
from flexmoe.errors import FlexMoEError
from flexmoe.evaluate.perplexity import evaluate_model
from flexmoe.model.checkpoint import load_model
from flexmoe.model.config import flex_config
from flexmoe.model.probe import mean_ffn_inputs, unit_rows

CPU = torch.device("cpu")


def test_anchor_directory_layout(anchor_dir: Path) -> None:
    files = {p.name for p in anchor_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        ANCHOR_MANIFEST,
        ROUTER_FILE,
    } <= files
    manifest = json.loads((anchor_dir / ANCHOR_MANIFEST).read_text())
    assert manifest["schema_version"] == 1 and manifest["origin"] == "trained"
    assert (
        manifest["training"]["steps"] == 40 and manifest["router_init"]["method"] == "anchor-hidden"
    )
    config = json.loads((anchor_dir / "config.json").read_text())
    assert config["model_type"] == "olmo2" and config["architectures"] == ["Olmo2ForCausalLM"]
    assert config["rope_parameters"]["rope_theta"] == 500000.0 and config["rms_norm_eps"] == 1e-6


def test_transformers_loads_the_anchor_with_the_same_logits(anchor_dir: Path) -> None:
    theirs = AutoModelForCausalLM.from_pretrained(anchor_dir).eval()
    assert isinstance(theirs, Olmo2ForCausalLM)
    ours = load_anchor(anchor_dir).model
    ids = torch.randint(2, theirs.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() <= 1e-5


def test_public_router_is_the_mean_ffn_input(anchor_dir: Path, public_spec: DataSpec) -> None:
    from flexmoe.data.split import load_splits

    anchor = load_anchor(anchor_dir)
    assert anchor.public_router.shape == (2, 32)
    texts = [d.text for d in load_splits([public_spec]).train]
    again = mean_ffn_inputs(anchor.model, anchor.tokenizer, texts, max_tokens=256)
    assert torch.allclose(unit_rows(again), anchor.public_router, atol=1e-5)
    assert torch.allclose(anchor.public_router.norm(dim=-1), torch.ones(2), atol=1e-6)
    # By hand for one document and layer 0: the residual stream after attention.
    one = mean_ffn_inputs(anchor.model, anchor.tokenizer, texts[:1], max_tokens=256)
    ids = anchor.tokenizer(texts[0], add_special_tokens=False, return_tensors="pt")["input_ids"][
        :, :256
    ]
    with torch.no_grad():
        h = anchor.model(ids, output_hidden_states=True).hidden_states[0]  # embeddings
        layer = anchor.model.model.layers[0]
        pos = anchor.model.model.rotary_emb(h, torch.arange(ids.shape[1])[None])
        from transformers.masking_utils import create_causal_mask

        cache = (
            "cache"
            if "cache" in inspect.signature(create_causal_mask).parameters
            else "past_key_values"
        )
        mask = create_causal_mask(
            config=anchor.model.config,
            inputs_embeds=h,
            attention_mask=None,
            **{cache: None},
            position_ids=torch.arange(ids.shape[1])[None],
        )
        attn, _ = layer.self_attn(h, position_embeddings=pos, attention_mask=mask)
        ffn_in = h + layer.post_attention_layernorm(attn)
    assert torch.allclose(one[0], ffn_in[0].mean(0), atol=1e-5)


def _copy(anchor_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(anchor_dir, out)
    return out


def test_tampered_tensor_fails_the_fingerprint(anchor_dir: Path, tmp_path: Path) -> None:
    bad = _copy(anchor_dir, tmp_path)
    state = load_file(bad / "model.safetensors")
    state["model.norm.weight"][0] += 1e-3
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(FlexMoEError, match="do not match the manifest's fingerprint"):
        load_anchor(bad)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("drop", "missing tensors: model.norm.weight"),
        ("extra", "unexpected tensors: model.extra.weight"),
        ("truncate", "not a readable safetensors file"),
        ("manifest", "not a flexmoe anchor"),
        ("router", "missing or unreadable public router"),
        ("schema", "field 'schema_version'"),
    ],
)
def test_broken_anchor_is_one_line(
    anchor_dir: Path, tmp_path: Path, damage: str, message: str
) -> None:
    bad = _copy(anchor_dir, tmp_path)
    weights = bad / "model.safetensors"
    if damage in {"drop", "extra"}:
        state = load_file(weights)
        if damage == "drop":
            del state["model.norm.weight"]
        else:
            state["model.extra.weight"] = torch.zeros(2)
        save_file(state, str(weights), metadata={"format": "pt"})
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "manifest":
        (bad / ANCHOR_MANIFEST).unlink()
    elif damage == "router":
        (bad / ROUTER_FILE).unlink()
    else:
        manifest = json.loads((bad / ANCHOR_MANIFEST).read_text())
        manifest["schema_version"] = 99
        (bad / ANCHOR_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FlexMoEError) as exc:
        load_anchor(bad)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_not_an_anchor_via_cli(tmp_path: Path, corpus_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "flexmoe", "eval", "ppl", str(tmp_path / "empty"),
         "--data", f"public={corpus_dir / 'public.jsonl'}", "--cache-dir", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"flexmoe: error: {tmp_path / 'empty'}: no config.json: not a transformers checkpoint directory"
    )


def test_existing_output_is_refused_and_untouched(anchor_dir: Path, public_spec: DataSpec) -> None:
    before = (anchor_dir / ANCHOR_MANIFEST).read_bytes()
    with pytest.raises(FlexMoEError, match="already exists"):
        import_anchor(anchor_dir, out=anchor_dir, data=[public_spec], device=CPU)
    assert (anchor_dir / ANCHOR_MANIFEST).read_bytes() == before


def test_import_olmo2_and_single_expert_flexolmo(
    anchor_dir: Path, tmp_path: Path, public_spec: DataSpec
) -> None:
    dense = AutoModelForCausalLM.from_pretrained(anchor_dir)
    hf = tmp_path / "hf"
    dense.save_pretrained(hf)
    shutil.copy(anchor_dir / "tokenizer.json", hf)
    shutil.copy(anchor_dir / "tokenizer_config.json", hf)
    manifest = import_anchor(hf, out=tmp_path / "imported", data=[public_spec], device=CPU)
    original = load_anchor(anchor_dir)
    assert manifest.origin == "imported"
    assert manifest.fingerprint == original.manifest.fingerprint  # same tensors, same r_0
    # The same weights as a one-expert FlexOlmo checkpoint.
    flex = FlexOlmoForCausalLM(flex_config(dense.config, num_experts=1, top_k=1)).eval()
    state = dense.state_dict()
    for i, layer in enumerate(flex.model.layers):
        mlp = dense.model.layers[i].mlp
        with torch.no_grad():
            gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])[None]
            layer.mlp.experts.gate_up_proj.copy_(gate_up)
            layer.mlp.experts.down_proj.copy_(mlp.down_proj.weight[None])
    flex.load_state_dict({k: v for k, v in state.items() if ".mlp." not in k}, strict=False)
    flex_dir = tmp_path / "flex"
    flex.save_pretrained(flex_dir)
    shutil.copy(anchor_dir / "tokenizer.json", flex_dir)
    shutil.copy(anchor_dir / "tokenizer_config.json", flex_dir)
    manifest2 = import_anchor(flex_dir, out=tmp_path / "imported2", data=[public_spec], device=CPU)
    assert manifest2.fingerprint == original.manifest.fingerprint


def test_bits_per_byte_by_hand(anchor_dir: Path, tmp_path: Path, public_spec: DataSpec) -> None:
    from flexmoe.data.split import load_splits

    (score,) = evaluate_model(
        anchor_dir, [public_spec], split=Split.TEST, device=CPU, cache_dir=None, seq_len=16
    )
    docs = load_splits([public_spec]).test
    model = load_model(anchor_dir)
    tok = load_anchor(anchor_dir).tokenizer
    nll, count = 0.0, 0
    with torch.no_grad():
        for doc in docs:  # one document at a time, its own context only
            ids = [
                tok.eos_token_id,
                *tok(doc.text, add_special_tokens=False)["input_ids"],
                tok.eos_token_id,
            ]
            t = torch.tensor([ids])
            logp = torch.log_softmax(model(t[:, :-1]).logits.float(), -1)
            nll -= logp[0, torch.arange(len(ids) - 1), t[0, 1:]].sum().item()
            count += len(ids) - 1
    n_bytes = sum(len(d.text.encode()) for d in docs)
    assert score.bytes == n_bytes and score.tokens == count and score.documents == len(docs)
    # Context differs (blocks of 16 across documents vs one document each): close, not equal.
    assert score.bits_per_byte == pytest.approx(nll / (math.log(2) * n_bytes), rel=0.05)
    assert score.perplexity == pytest.approx(math.exp(score.loss))


def test_eval_ppl_cli_json(anchor_dir: Path, tmp_path: Path, corpus_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "flexmoe", "eval", "ppl", str(anchor_dir), "--json",
         "--data", f"public={corpus_dir / 'public.jsonl'}", "--data", f"other={corpus_dir / 'other.jsonl'}",
         "--cache-dir", str(tmp_path / "c"), "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = {r["domain"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"public", "other"}
    # The anchor was trained on public text only: unseen upper-case text costs more bits.
    assert rows["public"]["bits_per_byte"] < rows["other"]["bits_per_byte"]
