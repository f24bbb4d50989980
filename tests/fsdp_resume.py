"""Run by ``test_fsdp_interrupt_and_resume_is_exact`` under torchrun (two gloo processes):
an FSDP2 run stopped by SIGTERM after its first step and resumed from its gathered checkpoint,
and an uninterrupted one; process 0 writes both loss curves and final weights to OUT."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Olmo2ForCausalLM

from flexmoe.data.packing import TokenStream
from flexmoe.errors import TrainingInterrupted
from flexmoe.model.config import ModelDims, olmo2_config
from flexmoe.training.config import TrainConfig
from flexmoe.training.loop import full_state, train

CPU = torch.device("cpu")
DIMS = ModelDims(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_seq_len=64)
CFG = TrainConfig(steps=4, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=1, eval_every=0,
                  checkpoint_every=0, fsdp=True)  # fmt: skip


def model() -> Olmo2ForCausalLM:
    torch.manual_seed(0)
    config = olmo2_config(DIMS, vocab_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return Olmo2ForCausalLM(config)


def main() -> None:
    out = Path(sys.argv[1])
    tokens = np.random.default_rng(0).integers(2, 64, size=4000).astype(np.int64)
    stream = TokenStream(tokens=tokens, num_bytes=4000, num_docs=1)
    rank = int(os.environ["RANK"])

    def stop_once(_: torch.nn.Module) -> None:
        if rank == 0 and not (out / "signalled").exists():
            (out / "signalled").touch()
            os.kill(os.getpid(), signal.SIGTERM)

    common = {"train_stream": stream, "val_stream": None, "cfg": CFG, "device": CPU,
              "progress": False}  # fmt: skip
    first = model()
    try:
        train(first, checkpoint_dir=out / "ckpt", after_step=stop_once, **common)  # type: ignore[arg-type]
        raise SystemExit("the run was not interrupted")
    except TrainingInterrupted:
        pass
    resumed_model = model()
    resumed = train(resumed_model, checkpoint_dir=out / "ckpt", resume=True, **common)  # type: ignore[arg-type]
    straight_model = model()
    straight = train(straight_model, **common)  # type: ignore[arg-type]
    weights = {"resumed": full_state(resumed_model), "straight": full_state(straight_model)}
    if rank == 0:
        curves = {"resumed": resumed.history, "straight": straight.history}
        (out / "curves.json").write_text(json.dumps(curves))
        for name, state in weights.items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{name}.st"))


if __name__ == "__main__":
    main()
