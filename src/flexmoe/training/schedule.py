"""Learning-rate schedule and the deterministic order of training blocks."""

from __future__ import annotations

import math

import numpy as np

from flexmoe.training.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``cfg.steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, cfg: TrainConfig, num_blocks: int) -> list[int]:
    """Block indices of the global batch at ``step``.

    Sample ``g = step * batch_size + i`` is block ``perm_e[g % num_blocks]`` of epoch
    ``e = g // num_blocks``, where ``perm_e`` is a permutation seeded by (seed, e). The order
    depends only on the step, so a resumed run sees exactly the batches it would have seen.
    """
    out = []
    perms: dict[int, np.ndarray] = {}
    for i in range(cfg.batch_size):
        g = step * cfg.batch_size + i
        epoch, pos = divmod(g, num_blocks)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([cfg.seed, epoch]).permutation(num_blocks)
        out.append(int(perms[epoch][pos]))
    return out
