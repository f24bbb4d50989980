"""A real-shaped model through the whole pipeline, each figure next to its comparator.

A random OLMo-2 of the given shape is written in bf16 (tensor by tensor), then each stage runs
in its own process, so that its peak host memory is its own (``wait4``'s max RSS):

- ``anchor import``: flexmoe's CLI, keeping the source's dtype.
- expert training: tokens/s, MFU and peak GPU memory of flexmoe's expert training, next to a
  full fine-tune of the same 2-expert model (every parameter trained) in the same run; two
  owners' packages for the merge, each trained by the CLI for 2 steps on its own text (a copy
  under another name would be refused).
- ``merge`` of the two packages: flexmoe's CLI, streaming.
- generation: the merged model loaded by transformers (no remote code) and by flexmoe, greedy
  tokens/s at batch 1, and whether their logits agree.

Prints one JSON object. Shapes: ``1b`` (OLMo-2 1B: 16 layers, 2048, 8192, vocab 100352; the
default), ``7b`` (OLMo-2 7B: 32 layers, 4096, 11008, vocab 100352) and ``tiny`` (a CPU check).
``--layers`` cuts the layer count to fit a machine's disk; the report says how many. Usage:

    python benchmarks/scale.py [--shape 1b] [--layers N] [--steps 20] [--batch 8 --seq 1024]
                               [--activation-checkpointing] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPES = {  # hidden, layers, heads, intermediate, vocab
    "tiny": (64, 2, 4, 128, 1024),
    "1b": (2048, 16, 16, 8192, 100352),
    "7b": (4096, 32, 32, 11008, 100352),
}
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, no sparsity


def _shape(args: argparse.Namespace) -> dict[str, int]:
    hidden, layers, heads, inter, vocab = SHAPES[args.shape]
    return {
        "hidden": hidden, "layers": args.layers or layers, "heads": heads,
        "intermediate": inter, "vocab": vocab,
    }  # fmt: skip


def _texts(n: int, seed: int = 0) -> list[str]:
    import random

    words = "the of and to in a is that for it as was with be by on not this are or from".split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(200)) for _ in range(n)]


def stage_make(work: Path, shape: dict[str, int]) -> dict[str, Any]:
    """A random bf16 OLMo-2 checkpoint with a small tokenizer, and public/owner text."""
    import torch
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from flexmoe.data.tokenizer import train_tokenizer
    from flexmoe.model.checkpoint import write_weights
    from flexmoe.model.config import ModelDims, olmo2_config
    from flexmoe.model.stream import TensorSource

    texts = _texts(16)
    for seed, name in enumerate(("public", "owner-a", "owner-b")):
        rows = (json.dumps({"text": t}) for t in _texts(16, seed))
        (work / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    src = work / "source"
    tokenizer = train_tokenizer(texts, src, vocab_size=1000, model_max_length=4096)
    dims = ModelDims(
        hidden_size=shape["hidden"], num_layers=shape["layers"], num_heads=shape["heads"],
        intermediate_size=shape["intermediate"], max_seq_len=4096,
    )  # fmt: skip
    config: Olmo2Config = olmo2_config(
        dims, vocab_size=shape["vocab"], bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.device("meta"):
        meta = Olmo2ForCausalLM(config)

    def random_tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)  # norms
        return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)

    sources = [
        TensorSource(
            name, tuple(t.shape), torch.bfloat16, lambda s=tuple(t.shape), i=i: random_tensor(s, i)
        )
        for i, (name, t) in enumerate(sorted(meta.state_dict().items()))
    ]
    write_weights(src, sources, max_shard_bytes=4 << 30)
    config.dtype = torch.bfloat16
    config.save_pretrained(src)
    return {"parameters": sum(math.prod(s.shape) for s in sources)}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flexmoe", *args]


def stage_train(work: Path, args: argparse.Namespace, *, full: bool) -> dict[str, Any]:
    """Expert training (flexmoe's frozen anchor) or a full fine-tune of the same 2-expert model,
    on the same tokens with the same loop; tokens/s over the steps after the first."""
    import torch

    from flexmoe.anchor import load_anchor
    from flexmoe.data.packing import TokenStream
    from flexmoe.device import pick_device
    from flexmoe.expert.train import build_trainable_moe
    from flexmoe.model.checkpoint import upcycle
    from flexmoe.training.config import TrainConfig
    from flexmoe.training.loop import train

    device = pick_device(args.device)
    anchor = load_anchor(work / "anchor", device=device, verify=False)
    rows = anchor.public_router.flip(0).to(device)
    if full:  # every parameter trained, float32 master weights for all of them
        model = upcycle(anchor.model, num_experts=2, top_k=2).float()
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = build_trainable_moe(anchor.model, anchor.public_router.to(device), rows)
    del anchor
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(
        3, 1000, ((args.steps + 1) * args.batch * (args.seq + 1),), generator=gen
    )
    stream = TokenStream(tokens=tokens.numpy(), num_bytes=len(tokens) * 4, num_docs=1)
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch, seq_len=args.seq, lr=1e-4, warmup_steps=0,
        eval_every=0, checkpoint_every=0, weight_decay=0.0,
        activation_checkpointing=args.activation_checkpointing,
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []

    def clock(_: torch.nn.Module) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())

    try:
        train(model, train_stream=stream, val_stream=None, cfg=cfg, device=device,
              after_step=clock, progress=False)  # fmt: skip
    except torch.OutOfMemoryError:
        return {"oom": True, "trained_parameters": trained}
    steady = (len(times) - 1) * args.batch * args.seq / (times[-1] - times[0])
    out: dict[str, Any] = {
        "tokens_per_s": round(steady), "trained_parameters": trained,
        "total_parameters": total,
    }  # fmt: skip
    if device.type == "cuda":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        config = model.config
        attention = 12 * config.num_hidden_layers * config.hidden_size * args.seq
        # forward + activation gradients through every weight, weight gradients for the trained
        flops_per_token = 4 * total + 2 * trained + attention
        out["gpu"] = name
        out["mfu"] = round(steady * flops_per_token / peak, 3) if peak else None
    return out


def stage_generate(work: Path, args: argparse.Namespace, *, library: str) -> dict[str, Any]:
    """Greedy tokens/s at batch 1 of the merged model, loaded by transformers or flexmoe."""
    import torch
    from transformers import AutoModelForCausalLM

    from flexmoe.device import pick_device
    from flexmoe.merge.layout import load_merged

    device = pick_device(args.device)
    merged = work / "merged"
    if library == "transformers":
        model = AutoModelForCausalLM.from_pretrained(merged).to(device)
    else:
        model = load_merged(merged, device=device)
    ids = torch.randint(3, 1000, (1, 32), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float().cpu()
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    dtype = str(next(model.parameters()).dtype)
    return {"tokens_per_s": round(new / seconds, 1), "dtype": dtype, "logits": logits.tolist()}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--layers", type=int, default=None, help="cut the layer count")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--skip-full", action="store_true", help="no full fine-tune comparator")
    parser.add_argument("--work", type=Path, default=None, help="where the models go")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = _shape(args)
    if args.stage is not None:
        work = args.work
        if args.stage == "make":
            result = stage_make(work, shape)
        elif args.stage in ("expert", "full"):
            result = stage_train(work, args, full=args.stage == "full")
        else:
            result = stage_generate(work, args, library=args.stage)
        print(json.dumps(result))
        return
    keep = args.work is not None
    work = args.work or Path(tempfile.mkdtemp(prefix="flexmoe-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    given = sys.argv[1:]  # passed on to each stage, less --work (each stage gets its own)
    argv = [
        a for i, a in enumerate(given)
        if not a.startswith("--work") and (i == 0 or given[i - 1] != "--work")
    ]  # fmt: skip
    report: dict[str, Any] = {"shape": {**shape, "name": args.shape}, "steps": args.steps,
                              "batch": args.batch, "seq": args.seq}  # fmt: skip
    try:
        report["make"] = _run_stage_rss(work, "make", argv)
        report["import"] = _rss(
            _cli(
                "anchor",
                "import",
                str(work / "source"),
                "--out",
                str(work / "anchor"),
                "--data",
                f"public={work / 'public.jsonl'}",
                "--device",
                args.device,
            )
        )
        report["expert_training"] = _run_stage_rss(work, "expert", argv)
        if not args.skip_full:
            report["full_finetune"] = _run_stage_rss(work, "full", argv)
            full = report["full_finetune"].get("tokens_per_s")
            if full:
                report["expert_vs_full_tokens_per_s"] = round(
                    report["expert_training"]["tokens_per_s"] / full, 2
                )
        _package(work, args)
        report["merge"] = _rss(
            _cli(
                "merge",
                "--anchor",
                str(work / "anchor"),
                "--expert",
                str(work / "pkg-a"),
                "--expert",
                str(work / "pkg-b"),
                "--out",
                str(work / "merged"),
            )
        )
        theirs = _run_stage_rss(work, "transformers", argv)
        ours = _run_stage_rss(work, "flexmoe", argv)
        import torch

        diff = (torch.tensor(theirs.pop("logits")) - torch.tensor(ours.pop("logits"))).abs()
        report["generate"] = {"transformers": theirs, "flexmoe": ours,
                              "max_logit_diff": round(float(diff.max()), 4)}  # fmt: skip
        report["disk_bytes"] = {
            name: _du(work / d)
            for name, d in (
                ("source", "source"),
                ("anchor", "anchor"),
                ("package", "pkg-a"),
                ("merged", "merged"),
            )
        }
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


def _child(cmd: list[str]) -> tuple[str, dict[str, Any]]:
    """Run a command to its end; its stdout, and its wall time and peak RSS (GiB)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd[1:6])} failed:\n{err.read()[-3000:]}")
        figures = {"seconds": round(wall, 1), "peak_host_gib": round(usage.ru_maxrss / 2**20, 2)}
        return out.read(), figures


def _rss(cmd: list[str]) -> dict[str, Any]:
    return _child(cmd)[1]


def _run_stage_rss(work: Path, stage: str, argv: list[str]) -> dict[str, Any]:
    """One stage of this script in its own process: its JSON, wall time and peak RSS."""
    stdout, figures = _child(
        [sys.executable, __file__, "--stage", stage, "--work", str(work), *argv]
    )
    return {**json.loads(stdout.strip().splitlines()[-1]), **figures}


def _package(work: Path, args: argparse.Namespace) -> None:
    """Two owners' packages, each trained by the CLI for a few steps on its own text."""
    for name in ("a", "b"):
        _rss(_cli("expert", "train", "--anchor", str(work / "anchor"), "--data",
                  str(work / f"owner-{name}.jsonl"), "--name", name, "--owner", f"org {name}",
                  "--license", "MIT", "--out", str(work / f"pkg-{name}"), "--steps", "2",
                  "--batch-size", "2", "--seq-len", "64", "--eval-every", "0",
                  "--checkpoint-every", "0", "--device", args.device,
                  "--cache-dir", str(work / "cache")))  # fmt: skip


if __name__ == "__main__":
    main()
