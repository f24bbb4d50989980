"""Router levers measured as ablation rows: a coordinator-side calibration of the owners' rows,
and the ceiling of every router-only lever.

- **calibrated** (private by construction: public text and the packages only). Per layer, expert
  k's margin over the public expert, ``m_k = (r_k - r_0) . h``, is measured on public training
  text in the anchor; its row becomes ``r_0 + (r_k - r_0) s / sigma_k`` with ``sigma_k`` the
  margin's spread and ``s`` the median spread, so that one unit of margin means as much for every
  expert although the rows were trained apart. Each row still depends on its own package only,
  so opt-out stays exact. Writes a plain FlexOlmo checkpoint (no bias needed).
- **router ceiling** (a measurement, never a recipe): the router rows fitted on the language
  modelling loss of the very held-out text that is scored, every expert frozen. No lever that
  changes only the router, private or not, should beat it with these experts.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from flexmoe.data.packing import TokenStream
from flexmoe.evaluate.registry import ANCHOR, BTM, FLEXMOE, Evaluation
from flexmoe.expert.train import ROUTER_OBJECTIVE
from flexmoe.merge.edit import with_router_rows
from flexmoe.merge.layout import MergedModel
from flexmoe.merge.slots import RouterCalibration
from flexmoe.model import names
from flexmoe.model.checkpoint import moe_layers
from flexmoe.model.stream import TensorSource


@torch.no_grad()
def ffn_inputs(
    model: PreTrainedModel,
    stream: TokenStream,
    *,
    seq_len: int = 128,
    max_tokens: int = 20_000,
    seed: int = 0,
) -> torch.Tensor:
    """``(tokens, layers, hidden)``: the feed-forward inputs of ``max_tokens`` tokens in blocks
    drawn at random from a packed stream (not document starts: a Gutenberg text starts with its
    licence)."""
    layers = list(model.model.layers)  # type: ignore[union-attr]
    captured: list[torch.Tensor] = [torch.empty(0)] * len(layers)

    def hook_for(i: int) -> Callable[..., None]:
        return lambda module, args: captured.__setitem__(i, args[0])

    handles = [layer.mlp.register_forward_pre_hook(hook_for(i)) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    blocks = stream.num_blocks(seq_len)
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = order[: max(1, max_tokens // seq_len)]
    found = []
    model.eval()
    try:
        for start in range(0, len(chosen), 8):
            batch = stream.batch(chosen[start : start + 8], seq_len)[:, :-1]  # (B, T)
            model(input_ids=batch.to(device))
            found.append(torch.stack([h.flatten(0, 1) for h in captured], 1).float().cpu())
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(found)  # (tokens, L, H)


def calibrated_rows(rows: torch.Tensor, public: torch.Tensor) -> torch.Tensor:
    """Router rows ``(L, N, H)`` with every owner's margin over the public row (row 0) rescaled
    to the same spread on the public tokens' feed-forward inputs ``public (tokens, L, H)``."""
    diff = rows[:, 1:] - rows[:, :1]  # (L, N-1, H)
    margins = torch.einsum("tlh,lnh->tln", public.to(rows.dtype), diff)  # (T, L, N-1)
    spread = margins.std(0).clamp(min=1e-6)  # (L, N-1)
    scale = spread.median(-1, keepdim=True).values / spread  # (L, N-1)
    return torch.cat([rows[:, :1], rows[:, :1] + diff * scale[..., None]], 1)


def write_rows(
    merged_dir: Path,
    out: Path,
    rows: torch.Tensor,
    *,
    method: str,
    public_tokens: int,
    progress: bool = False,
) -> Path:
    """A copy of the merged model at ``merged_dir`` with router rows ``rows (L, N, H)``, its slot
    table noting the calibration under ``router_calibration``; written atomically to ``out``."""
    merged = MergedModel.open(merged_dir)
    table = merged.table()
    record = RouterCalibration(
        time=datetime.now(UTC).isoformat(timespec="seconds"),
        method=method,
        public_tokens=public_tokens,
    )
    merged.write(
        out,
        sources=with_router_rows(merged.sources(), list(rows)),
        config=merged.config(table),
        table=table.model_copy(update={"router_calibration": record}),
        progress=progress,
    )
    return Path(out)


def sparse_delta(public: torch.Tensor, own: torch.Tensor, keep: float) -> torch.Tensor:
    """``own`` with only the largest ``keep`` fraction (by magnitude) of its difference from
    ``public`` left; the rest of it is ``public``'s values."""
    delta = own.float() - public.float()
    count = max(1, round(keep * delta.numel()))
    threshold = delta.abs().flatten().kthvalue(delta.numel() - count + 1).values
    return torch.where(delta.abs() >= threshold, own, public.to(own.dtype))


def write_sparse_deltas(merged_dir: Path, out: Path, keep: float) -> Path:
    """A copy of the merged model whose owners' experts keep only the largest ``keep`` fraction
    of their difference from the public expert (slot 0), per tensor. Each expert still depends
    on its own package and the public expert only, so opt-out stays exact."""
    merged = MergedModel.open(merged_dir)
    table = merged.table()
    sources = merged.sources()
    by_name = {s.name: s for s in sources}
    layers, experts = merged.config(table).num_hidden_layers, len(table.infos())
    publics: dict[str, str] = {}
    for layer in range(layers):
        for proj in names.PROJECTIONS:
            public = names.EXPERT.format(layer=layer, expert=0, proj=proj)
            for k in range(1, experts):
                publics[names.EXPERT.format(layer=layer, expert=k, proj=proj)] = public

    def thinned(own: TensorSource) -> TensorSource:
        public = by_name[publics[own.name]]
        return TensorSource(
            own.name,
            own.shape,
            own.dtype,
            lambda: sparse_delta(public.load(), own.load(), keep),
        )

    merged.write(
        out,
        sources=[thinned(s) if s.name in publics else s for s in sources],
        config=merged.config(table),
        table=table,
        progress=False,
    )
    return Path(out)


def distilled_rows(
    merged_dir: Path,
    teacher: torch.nn.Module,
    stream: TokenStream,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    lr: float,
    device: torch.device,
    seed: int = 0,
) -> torch.Tensor:
    """Router rows ``(L, N, H)`` of the merged model fitted so that its next-token distribution
    on ``stream`` (public text) matches ``teacher``'s (log-probabilities, e.g. btm's): the KL
    divergence per token, Adam on the owners' rows only (the public row stays the anchor's)."""
    model: torch.nn.Module = MergedModel.open(merged_dir).load()
    model.to(device).train()
    for param in model.parameters():
        param.requires_grad_(False)
    rows = [moe.router.rows for moe in moe_layers(model)]
    trained = [row[k] for row in rows for k in range(1, len(row))]
    for param in trained:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=lr)
    teacher.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    blocks = stream.num_blocks(seq_len)
    for _ in range(steps):
        picks = torch.randint(blocks, (batch_size,), generator=generator).tolist()
        ids = stream.batch(picks, seq_len)[:, :-1].to(device)  # (B, T)
        with torch.no_grad():
            target = teacher(input_ids=ids).logits.float()  # (B, T, V) log-probabilities
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        loss = torch.nn.functional.kl_div(
            logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean"
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return torch.stack([torch.stack([p.detach().cpu() for p in row]) for row in rows])


# Public "rival" experts: the coordinator trains this many experts on clusters of the public
# text; owners train against them at the merge's top-k (``expert train --rival``), and the
# merge leaves them out or keeps them as slots (two rows).
RIVALS = 2

# Coordinator-side levers on the experts or the router, measured beside the owner-side ones:
# only the run's packages and merge (and public text): ``delta_keep`` thins each expert's
# difference from the public one (every row still depends on one package and the public
# expert); ``distill_steps`` fits the router rows to btm on public text (rows fitted jointly,
# as router tuning does: it weakens strict opt-out).
MERGE_LEVERS: dict[str, dict[str, Any]] = {
    "merge-delta-keep-30": {"delta_keep": 0.3},
    "merge-delta-keep-10": {"delta_keep": 0.1},
    "distill-btm": {"distill_steps": 60},
}

# Levers on the owner's side: each a recipe of ``flexmoe expert train`` options, measured by
# training every owner's expert again with it against the run's anchor (lab/experiments/
# owner_levers.py) and scoring the merge on the run's held-out text. Each names its router
# objective weight, so that a row means the same on a run made before or after the objective
# became the default (``ROUTER_OBJECTIVE``).
OWNER_LEVERS: dict[str, dict[str, Any]] = {
    "public-spread": {"public_sample": "spread", "router_objective": 0.0},
    "public-50-spread": {
        "public_fraction": 0.5,
        "public_sample": "spread",
        "router_objective": 0.0,
    },
    "stay-close-0.1": {"stay_close": 0.1, "router_objective": 0.0},
    "stay-close-1": {"stay_close": 1.0, "router_objective": 0.0},
    "spread-stay-close-0.1": {
        "public_sample": "spread",
        "stay_close": 0.1,
        "router_objective": 0.0,
    },
    "no-router-objective": {"router_objective": 0.0},
    "router-objective-0.1": {"router_objective": 0.1},
    "router-objective-0.3": {"router_objective": 0.3},
    "router-objective-1": {"router_objective": 1.0},
    "spread-router-objective-0.1": {"public_sample": "spread", "router_objective": 0.1},
    "rivals-out": {"rivals": RIVALS, "rivals_in_merge": False, "router_objective": 0.0},
    "rivals-in": {"rivals": RIVALS, "rivals_in_merge": True, "router_objective": 0.0},
    "rivals-objective-0.1-out": {
        "rivals": RIVALS,
        "rivals_in_merge": False,
        "router_objective": 0.1,
    },
    "rivals-objective-0.1-in": {"rivals": RIVALS, "rivals_in_merge": True, "router_objective": 0.1},
}
LEVER_RESULTS = "owner_levers.json"  # written into a run by lab/experiments/owner_levers.py


def levers_section(found: dict[str, Any], evaluation: Evaluation) -> str:
    """The owner-side levers as rows beside the run's own merge (the default recipe), btm and
    the anchor: bits per byte per domain, on average, on the text that needs two experts."""
    domains, mixes = evaluation.domains, evaluation.mixtures

    def cells(bpb: dict[str, float]) -> str:
        average = sum(bpb[d] for d in domains) / len(domains)
        two = [f"{bpb[m]:.4f}" for m in mixes if m in bpb]
        gap = average / evaluation.average(BTM) - 1 if BTM in evaluation.models else None
        return " | ".join(
            [*(f"{bpb[d]:.4f}" for d in domains), f"{average:.4f}", *two]
            + ([f"{gap:+.1%}"] if gap is not None else [])
        )

    def scored(model: str) -> dict[str, float]:
        return {k: v.bits_per_byte for k, v in evaluation.models[model].items()}

    head = "| recipe | options | " + " | ".join([*domains, "average", *mixes, "vs btm"]) + " |"
    rule = "| --- | --- |" + " ---: |" * (len(domains) + len(mixes) + 2)
    lines = [head, rule]
    for model, what in (
        (FLEXMOE, "the run's merge (its recipe at the top)"),
        (BTM, "btm"),
        (ANCHOR, "the anchor"),
    ):
        if model in evaluation.models:
            lines.append(f"| `{model}` | {what} | {cells(scored(model))} |")
    for row in found["rows"]:
        options = ", ".join(f"{k}={v}" for k, v in row["options"].items())
        lines.append(f"| {row['lever']} | {options} | {cells(row['bpb'])} |")
    return f"""## Levers on the owner's side, measured

Every owner's expert trained again with each recipe (the run's expert settings otherwise, its
anchor), merged as the run merges, scored on the same held-out text. `public_sample=spread`
mixes in public tokens spread over the whole public corpus instead of its first ones (the
documents are in id order, so a prefix holds the first sources only); `public_fraction` is
the public share; `stay_close` weighs a penalty on the expert's squared distance from the public
expert, relative to it; `router_objective` weighs a loss teaching each layer's router the
owner's tokens from the public ones (labels the owner has; the z-loss stays; `expert train`
uses {ROUTER_OBJECTIVE:g} by default, and the run's own weight is stated at the top of this
report); `delta_keep` (at the coordinator, no training) keeps only that fraction of each owner
expert's difference from the public expert, the largest values. Made by
`python lab/experiments/owner_levers.py RUN --corpora {found["corpora"]}`; "vs btm" compares the
average.

{chr(10).join(lines)}
"""
