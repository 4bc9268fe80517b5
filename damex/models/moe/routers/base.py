"""Shared parts of every sparse router: the gate (a linear map without bias), gate noise
and the capacity of a routing group."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing import compute_capacity


def full_precision_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` in float32 or float64, with autocast off."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), weight.to(dtype))


class BaseRouter(nn.Module):
    """A router maps the tokens of one routing group (T, D) to a routing over E experts.

    The MoE layer cuts the batch into groups (``MoEFFN(group_size=...)``) and calls the
    router once per group, so nothing a router computes crosses a group. Subclasses
    implement ``forward(tokens, targets, capacity_factor)``: tokens (T, D), targets (T,)
    the routing target (expert) of every token or None; they return a
    :class:`~damex.models.moe.routing.SparseRouting` over the group's T tokens.

    Args:
        embed_dims: D, token width (filled in by the MoE layer).
        num_experts: E (filled in by the MoE layer).
        noise_std: std of the Gaussian gate noise in training, divided by E as in V-MoE.
        use_z_loss: also report the router z-loss (ST-MoE) under 'z'.
        capacity_multiple_of: round every capacity up to a multiple of this (filled in by
            the MoE layer; the reference's default is 4, ours 1).
    """

    #: whether the router needs per-image routing targets in training.
    requires_targets = False
    #: default capacity factor when the layer sets none (expert choice needs one).
    default_capacity_factor: Optional[float] = None

    def __init__(self, embed_dims: int, num_experts: int, noise_std: float = 0.0,
                 use_z_loss: bool = False, capacity_multiple_of: int = 1):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f'num_experts must be >= 1, got {num_experts}')
        if noise_std < 0:
            raise ValueError(f'noise_std must be >= 0, got {noise_std}')
        if capacity_multiple_of < 1:
            raise ValueError(f'capacity_multiple_of must be >= 1, got {capacity_multiple_of}')
        self.embed_dims = embed_dims
        self.num_experts = num_experts
        self.noise_std = noise_std
        self.use_z_loss = use_z_loss
        self.capacity_multiple_of = capacity_multiple_of
        self.gate = nn.Linear(embed_dims, num_experts, bias=False)

    def gate_logits(self, tokens: Tensor) -> Tuple[Tensor, Tensor, float]:
        """Return (clean logits, logits used for routing, noise std used) for tokens (T, D).

        The logits are float32 (float64 for float64 tokens) even under autocast: routing
        decisions, softmax, Sinkhorn / OT and the auxiliary losses stay in full precision
        (selective precision, as Switch Transformer and ST-MoE recommend).
        """
        logits = full_precision_linear(tokens, self.gate.weight)
        if self.training and self.noise_std > 0:
            std = self.noise_std / self.num_experts
            return logits, logits + torch.randn_like(logits) * std, std
        return logits, logits, 0.0

    def capacity(self, num_tokens: int, capacity_factor: Optional[float],
                 top_k: int = 1) -> Optional[int]:
        """Slots per expert in a group of ``num_tokens`` (None: no limit)."""
        if capacity_factor is None:
            return None
        return compute_capacity(num_tokens, self.num_experts, capacity_factor, top_k,
                                self.capacity_multiple_of)

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, noise_std={self.noise_std}'
