"""Anchor training tokens/s per size preset (forward + backward + AdamW step).

Trains each preset for a few steps on random tokens (the data does not change the arithmetic)
and prints the median tokens/s of the timed steps as JSON. Usage:

    python benchmarks/anchor_throughput.py [--presets tiny small --steps 8 --batch 16 --seq 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import Olmo2ForCausalLM

from flexmoe.device import autocast, pick_device
from flexmoe.model.config import PRESETS, Preset, count_parameters, olmo2_config
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import build_optimizer, next_token_loss


def measure(
    preset: Preset, *, vocab: int, batch: int, seq: int, steps: int, device: torch.device
) -> dict:
    dims = PRESETS[preset].with_overrides(max_seq_len=seq)
    config = olmo2_config(dims, vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    model = Olmo2ForCausalLM(config).to(device).train()
    optimizer = build_optimizer(model, TrainConfig(seq_len=seq, batch_size=batch))
    data = torch.randint(2, vocab, (batch, seq + 1), device=device)
    times = []
    for step in range(steps + 2):  # two warm-up steps
        start = time.perf_counter()
        with autocast(device):
            loss = next_token_loss(model, data)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    rates = [batch * seq / t for t in times]
    return {
        "preset": preset.value,
        "parameters": count_parameters(dims, vocab),
        "parameters_counted": sum(p.numel() for p in model.parameters()),
        "tokens_per_s_median": round(statistics.median(rates)),
        "tokens_per_s_runs": [round(r) for r in rates],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=[p.value for p in Preset])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    results = [
        measure(
            Preset(p),
            vocab=args.vocab,
            batch=args.batch,
            seq=args.seq,
            steps=args.steps,
            device=device,
        )
        for p in args.presets
    ]
    print(
        json.dumps(
            {
                "benchmark": "anchor_throughput",
                "device": str(device),
                "torch_threads": torch.get_num_threads(),
                "batch": args.batch,
                "seq": args.seq,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
