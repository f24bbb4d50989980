"""flexmoe's MoE feed-forward: per-expert linears, router rows, negative bias, masks, capture.

For N experts with router rows r_0 .. r_{N-1} (row 0 = the public expert):

    logits_i = r_i . h  (+ min(b_i, 0) for i >= 1 when the bias is on)
    p = softmax(logits over the active experts);  (w, idx) = top_k(p)   -- no renormalisation
    MoE(h) = sum over idx of w_j * down_j(silu(gate_j h) * up_j h)

Every row and every expert is its own parameter, so freezing the public parts is a matter of
``requires_grad`` on whole tensors, never of masking gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: the OLMo-2 SwiGLU feed-forward."""

    def __init__(self, *, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Router rows (one parameter each) and the negative-only biases of experts 1..N-1."""

    def __init__(self, *, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.rows = nn.ParameterList(
            [nn.Parameter(torch.zeros(hidden_size)) for _ in range(num_experts)]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(())) for _ in range(num_experts - 1)]
        )

    @property
    def num_experts(self) -> int:
        return len(self.rows)

    @property
    def weight(self) -> torch.Tensor:
        return torch.stack(list(self.rows))  # (N, H)

    def bias_vector(self) -> torch.Tensor:
        """``[0, min(b_1, 0), ..., min(b_{N-1}, 0)]``."""
        zero = torch.zeros(1, device=self.rows[0].device, dtype=self.rows[0].dtype)
        if not len(self.biases):
            return zero
        return torch.cat([zero, torch.stack(list(self.biases)).clamp(max=0)])  # (N,)

    def forward(self, x: torch.Tensor, *, use_bias: bool) -> torch.Tensor:
        logits = F.linear(x, self.weight)  # (..., N)
        if use_bias:
            logits = logits + self.bias_vector().to(logits.dtype)
        return logits


class MoEFeedForward(nn.Module):
    """The MoE feed-forward that replaces transformers' FlexOlmo sparse block."""

    def __init__(
        self, *, experts: list[ExpertMLP], router: Router, top_k: int, use_bias: bool = False
    ) -> None:
        super().__init__()
        if len(experts) != router.num_experts:
            raise ValueError(f"{len(experts)} experts but {router.num_experts} router rows")
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.top_k = top_k
        self.use_bias = use_bias
        self.expert_mask: torch.Tensor | None = None  # (N,) or (B, N) bool; True = active
        self.capture = False
        self.last_routing: torch.Tensor | None = None  # (B, T, N) routing weights after top-k
        self.last_logits: torch.Tensor | None = None  # (B*T, N) router logits, for the z-loss
        # Document-level routing (an evaluation mode, for whole sequences; not in the checkpoint,
        # so transformers runs this model with per-token routing): this share of each token's
        # router logits is replaced by their mean over the sequence so far.
        self.prefix_mix = 0.0

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        x = hidden_states.reshape(-1, hidden)  # (B*T, H)
        # The router and dense experts see (B, T, H): the batch first, as per-sample gradients
        # (DP-SGD) need it.
        logits = self.router(hidden_states, use_bias=self.use_bias)  # (B, T, N)
        if self.prefix_mix:
            seen = torch.arange(1, seq + 1, device=logits.device, dtype=logits.dtype)[:, None]
            pooled = logits.cumsum(dim=1) / seen  # (B, T, N): mean over positions <= t
            logits = torch.lerp(logits, pooled, self.prefix_mix)
        logits = logits.reshape(-1, self.num_experts)  # (B*T, N)
        if self.expert_mask is not None:
            mask = self.expert_mask.to(logits.device)
            if mask.dim() == 2:  # one row of the batch per mask row
                mask = mask.repeat_interleave(seq, dim=0)  # (B*T, N)
            logits = logits.masked_fill(~mask, float("-inf"))
        self.last_logits = logits if self.training else None
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)  # (B*T, N)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)  # (B*T, K)
        weights = torch.zeros_like(probs).scatter(1, top_i, top_w).to(x.dtype)  # (B*T, N)
        if self.capture:
            self.last_routing = weights.detach().reshape(batch, seq, -1)  # (B, T, N)

        out = torch.zeros_like(x)
        dense = self.top_k >= self.num_experts  # every token visits every expert (training)
        for e, expert in enumerate(self.experts):
            w = weights[:, e]  # (B*T,)
            if dense:  # no gather; a zero weight (an excluded expert) adds exactly zero
                out = out + expert(hidden_states).reshape(-1, hidden) * w[:, None]
                continue
            rows = w.nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            if rows.numel() == w.numel():  # every token routed here: skip the gather
                out = out + expert(x) * w[:, None]
            else:
                out.index_add_(0, rows, (expert(x[rows]) * w[rows, None]).to(out.dtype))
        return out.reshape(batch, seq, hidden)  # (B, T, H)
