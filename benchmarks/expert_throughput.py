"""Expert training tokens/s vs full fine-tuning of the same 2-expert model, side by side.

Both train the 2-expert MoE upcycled from one random anchor on the same random tokens with the
same optimizer; "expert" freezes everything but expert 1, r_1 and b_1 (flexmoe's expert
training), "full" trains every parameter. Steps alternate between the two so that machine noise
hits both alike; prints medians and the ratio as JSON. Target: ratio >= 1.4. Usage:

    python benchmarks/expert_throughput.py [--preset tiny --batch 16 --seq 128 --steps 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import Olmo2ForCausalLM

from flexmoe.device import autocast, pick_device
from flexmoe.expert.train import build_trainable_moe
from flexmoe.model.checkpoint import upcycle
from flexmoe.model.config import PRESETS, Preset, olmo2_config
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import build_optimizer, next_token_loss


def _setup(preset: Preset, vocab: int, seq: int, device: torch.device, *, frozen: bool):  # type: ignore[no-untyped-def]
    dims = PRESETS[preset].with_overrides(max_seq_len=seq)
    config = olmo2_config(dims, vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    dense = Olmo2ForCausalLM(config)
    rows = torch.randn(config.num_hidden_layers, config.hidden_size)
    if frozen:  # flexmoe's expert training: only expert 1, r_1 and b_1 are trainable
        model = build_trainable_moe(dense, rows, rows.flip(0))
    else:  # the same 2-expert model with every parameter trainable
        model = upcycle(dense, num_experts=2, top_k=2)
    model = model.to(device).train()
    optimizer = build_optimizer(model, TrainConfig(seq_len=seq, weight_decay=0.0))
    return model, optimizer


def _step(model, optimizer, data: torch.Tensor, device: torch.device) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    with autocast(device):
        loss = next_token_loss(model, data)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=[p.value for p in Preset])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    runs = {
        "expert": _setup(Preset(args.preset), args.vocab, args.seq, device, frozen=True),
        "full": _setup(Preset(args.preset), args.vocab, args.seq, device, frozen=False),
    }
    data = torch.randint(2, args.vocab, (args.batch, args.seq + 1), device=device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(args.steps + 2):
        for name, (model, optimizer) in runs.items():
            elapsed = _step(model, optimizer, data, device)
            if step >= 2:  # two warm-up steps
                times[name].append(elapsed)
    rates = {name: [args.batch * args.seq / t for t in ts] for name, ts in times.items()}
    medians = {name: statistics.median(r) for name, r in rates.items()}
    trainable = {
        name: sum(p.numel() for p in model.parameters() if p.requires_grad)
        for name, (model, _) in runs.items()
    }
    print(json.dumps({
        "benchmark": "expert_throughput",
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "shape": vars(args),
        "trainable_parameters": trainable,
        "tokens_per_s_median": {k: round(v) for k, v in medians.items()},
        "tokens_per_s_runs": {k: [round(x) for x in v] for k, v in rates.items()},
        "ratio_expert_vs_full": round(medians["expert"] / medians["full"], 3),
        "target_ratio": 1.4,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
