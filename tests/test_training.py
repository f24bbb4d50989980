"""The training loop: learning, exact resume, interruption, accumulation, schedule, torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_DIMS
from safetensors.torch import load_file
from transformers import Olmo2Config, Olmo2ForCausalLM

from flexmoe.data.documents import read_documents
from flexmoe.data.packing import TokenStream, pack_documents
from flexmoe.data.tokenizer import load_tokenizer
from flexmoe.errors import FlexMoEError, TrainingInterrupted
from flexmoe.model.config import olmo2_config
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import train
from flexmoe.training.schedule import batch_indices, lr_at

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def streams(tokenizer_dir: Path, public_spec) -> tuple[TokenStream, TokenStream, Olmo2Config]:  # type: ignore[no-untyped-def]
    tok = load_tokenizer(tokenizer_dir)
    docs = read_documents(public_spec)
    cfg = olmo2_config(
        TINY_DIMS, vocab_size=len(tok), bos_token_id=0, eos_token_id=0, pad_token_id=1
    )
    return pack_documents(docs[:100], tok), pack_documents(docs[100:], tok), cfg


def _model(cfg: Olmo2Config) -> Olmo2ForCausalLM:
    torch.manual_seed(0)
    return Olmo2ForCausalLM(cfg)


def _cfg(**kw: object) -> TrainConfig:
    base = dict(
        steps=8,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        eval_every=4,
        checkpoint_every=0,
        eval_batches=2,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def _train(model: torch.nn.Module, stream: TokenStream, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("cfg", _cfg())
    return train(
        model,
        train_stream=stream,
        val_stream=kw.pop("val_stream", None),
        device=CPU,
        progress=False,
        **kw,
    )


def test_loss_goes_down(streams) -> None:  # type: ignore[no-untyped-def]
    train_s, val_s, cfg = streams
    result = _train(_model(cfg), train_s, val_stream=val_s, cfg=_cfg(steps=30, eval_every=10))
    losses = [h["loss"] for h in result.history]
    assert result.steps == 30 and result.tokens == 30 * 4 * 32
    assert losses[-1] < losses[0] - 1.0
    assert result.final_val_loss is not None and result.final_val_loss < losses[0]


def _interrupt_at(call: int):  # type: ignore[no-untyped-def]
    """An auxiliary loss of zero that sends this process SIGINT on its ``call``-th use."""
    calls = [0]

    def aux(model: torch.nn.Module) -> torch.Tensor:
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signal.SIGINT)
        return torch.zeros(())

    return aux


def test_interrupt_checkpoints_and_resume_continues_exactly(streams, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train_s, _, cfg = streams
    straight = _model(cfg)
    full = _train(straight, train_s)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(TrainingInterrupted, match="interrupted at step 4"):
        _train(_model(cfg), train_s, cfg=_cfg(), checkpoint_dir=ckpt, aux_loss=_interrupt_at(4))
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 4
    assert not list(tmp_path.glob(".ckpt.tmp-*"))  # nothing half-written beside it
    resumed = _model(cfg)  # fresh weights: everything trained comes from the checkpoint
    result = _train(resumed, train_s, cfg=_cfg(), checkpoint_dir=ckpt, resume=True)
    assert [h["loss"] for h in result.history] == pytest.approx(
        [h["loss"] for h in full.history], abs=1e-6
    )
    for (name, a), b in zip(
        straight.state_dict().items(), resumed.state_dict().values(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_with_other_settings_is_refused(streams, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train_s, _, cfg = streams
    ckpt = tmp_path / "ckpt"
    _train(_model(cfg), train_s, cfg=_cfg(steps=4, checkpoint_every=2), checkpoint_dir=ckpt)
    with pytest.raises(FlexMoEError, match="batch_size=4, now 8"):
        _train(
            _model(cfg), train_s, cfg=_cfg(steps=4, batch_size=8), checkpoint_dir=ckpt, resume=True
        )


def test_grad_accumulation_matches_one_big_batch(streams) -> None:  # type: ignore[no-untyped-def]
    train_s, _, cfg = streams
    a = _train(_model(cfg), train_s, cfg=_cfg(steps=4))
    b = _train(_model(cfg), train_s, cfg=_cfg(steps=4, grad_accum=2))
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], abs=1e-4)


def test_schedule_and_batch_order() -> None:
    cfg = _cfg(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(100, cfg) == pytest.approx(0.1)
    assert lr_at(55, cfg) == pytest.approx(0.55)
    order = [i for s in range(5) for i in batch_indices(s, cfg, num_blocks=10)]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert order != sorted(order)


def test_too_little_data(streams) -> None:  # type: ignore[no-untyped-def]
    _, _, cfg = streams
    tiny = TokenStream(tokens=torch.arange(10).numpy(), num_bytes=10, num_docs=1)
    with pytest.raises(FlexMoEError, match="shorter than one block"):
        _train(_model(cfg), tiny)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["--fsdp", "--activation-checkpointing"]])
def test_torchrun_two_processes_match_one(
    tmp_path: Path, corpus_dir: Path, tokenizer_dir: Path, sharding: list[str]
) -> None:
    """DDP, or FSDP2 with activation checkpointing, over two gloo processes gives the loss curve
    of one process at the same global batch."""
    args = [
        "anchor", "train", "--data", f"public={corpus_dir / 'public.jsonl'}", "--tokenizer", str(tokenizer_dir),
        "--hidden-size", "32", "--num-layers", "2", "--num-heads", "4", "--intermediate-size", "64",
        "--steps", "5", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--checkpoint-every", "0",
        "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "flexmoe", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    multi = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node=2", "-m", "flexmoe", *args, *sharding, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "flexmoe_anchor.json").read_text())["training"]
    two = json.loads((tmp_path / "two" / "flexmoe_anchor.json").read_text())["training"]
    assert one["steps"] == two["steps"] == 5
    assert two["final_train_loss"] == pytest.approx(one["final_train_loss"], abs=1e-4)
    curve_one = json.loads((tmp_path / "one" / "training_history.json").read_text())
    curve_two = json.loads((tmp_path / "two" / "training_history.json").read_text())
    assert [h["loss"] for h in curve_two] == pytest.approx([h["loss"] for h in curve_one], abs=1e-4)
    if sharding:  # the anchor written from the gathered shards is the one-process anchor
        a = load_file(tmp_path / "one" / "model.safetensors")
        b = load_file(tmp_path / "two" / "model.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


@pytest.mark.slow
def test_fsdp_interrupt_and_resume_is_exact(tmp_path: Path) -> None:
    """Under FSDP2 (two gloo processes) a run stopped by SIGTERM checkpoints its gathered shards
    and resumes to the same losses and weights as a run never stopped."""
    torchrun = Path(sys.executable).with_name("torchrun")
    script = Path(__file__).with_name("fsdp_resume.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node=2", str(script), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    curves = json.loads((tmp_path / "curves.json").read_text())
    resumed, straight = curves["resumed"], curves["straight"]
    assert [h["step"] for h in resumed] == [1, 2, 3, 4]  # the first from the checkpoint
    assert [h["loss"] for h in resumed] == pytest.approx([h["loss"] for h in straight], abs=1e-5)
    a, b = load_file(tmp_path / "resumed.st"), load_file(tmp_path / "straight.st")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
