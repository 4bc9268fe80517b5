"""Shared parts of every router: the gate (a linear map without bias) and gate noise."""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn


class BaseRouter(nn.Module):
    """A router maps tokens (B, N, D) to a routing over ``num_experts`` experts.

    Subclasses implement ``forward(x, targets, capacity_factor)`` returning a
    :class:`~damex.models.moe.routing.SparseRouting` or ``SoftRouting``.

    Args:
        embed_dims: D, token width (filled in by the MoE layer).
        num_experts: E (filled in by the MoE layer).
        noise_std: std of the Gaussian gate noise in training, divided by E as in V-MoE.
        use_z_loss: also report the router z-loss (ST-MoE) under 'z'.
    """

    #: whether the router needs per-image routing targets in training.
    requires_targets = False
    #: default capacity factor when the layer sets none (expert choice needs one).
    default_capacity_factor: Optional[float] = None

    def __init__(self, embed_dims: int, num_experts: int, noise_std: float = 0.0,
                 use_z_loss: bool = False):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f'num_experts must be >= 1, got {num_experts}')
        if noise_std < 0:
            raise ValueError(f'noise_std must be >= 0, got {noise_std}')
        self.embed_dims = embed_dims
        self.num_experts = num_experts
        self.noise_std = noise_std
        self.use_z_loss = use_z_loss
        self.gate = nn.Linear(embed_dims, num_experts, bias=False)

    def gate_logits(self, tokens: Tensor) -> Tuple[Tensor, Tensor, float]:
        """Return (clean logits, logits used for routing, noise std used) for tokens (T, D)."""
        logits = self.gate(tokens)
        if self.training and self.noise_std > 0:
            std = self.noise_std / self.num_experts
            return logits, logits + torch.randn_like(logits) * std, std
        return logits, logits, 0.0

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, noise_std={self.noise_std}'
