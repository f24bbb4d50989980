"""The training loop (single process and torchrun), its schedule and its checkpoints."""
