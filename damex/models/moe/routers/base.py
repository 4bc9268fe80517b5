"""The router contract, and the gate shared by every sparse router.

Every router is a :class:`BaseRouter` with one call::

    routing = router(tokens, targets, capacity_factor, groups=None)

tokens (T, D); targets (T,) the routing target (expert) of every token, or None;
capacity_factor None (no limit, or the router's default) or a number; groups the MoE
layer's routing groups, (start, stop) ranges that cover the T tokens in order (None: all
T tokens are one group). Nothing a router computes crosses a group: capacities, balance,
optimal-transport plans and auxiliary losses are per group (losses averaged over groups).
It returns one routing type per family (see :mod:`..routing`):
:class:`~..routing.TokenChoiceRouting`, :class:`~..routing.ExpertChoiceRouting` or
:class:`~..routing.SoftRouting`.
"""
from abc import ABCMeta, abstractmethod
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing import compute_capacity, equal_size_runs


def full_precision_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x, weight)`` in float32 or float64, with autocast off."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), weight.to(dtype))


class BaseRouter(nn.Module, metaclass=ABCMeta):
    """A router maps tokens (T, D), cut into routing groups, to a routing over E experts.

    Args:
        embed_dims: D, token width (filled in by the MoE layer).
        num_experts: E (filled in by the MoE layer).
        use_z_loss: also report the router z-loss (ST-MoE) under 'z'.
        capacity_multiple_of: round every capacity up to a multiple of this (filled in by
            the MoE layer; the reference's default is 4, ours 1).
    """

    #: whether the router needs per-token routing targets in training.
    requires_targets = False
    #: the capacity factor when the layer sets none (expert choice needs one; None: no limit).
    default_capacity_factor: Optional[float] = None

    def __init__(self, embed_dims: int, num_experts: int, use_z_loss: bool = False,
                 capacity_multiple_of: int = 1):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f'num_experts must be >= 1, got {num_experts}')
        if capacity_multiple_of < 1:
            raise ValueError(f'capacity_multiple_of must be >= 1, got {capacity_multiple_of}')
        self.embed_dims = embed_dims
        self.num_experts = num_experts
        self.use_z_loss = use_z_loss
        self.capacity_multiple_of = capacity_multiple_of

    @abstractmethod
    def forward(self, tokens: Tensor, targets: Optional[Tensor] = None,
                capacity_factor: Optional[float] = None,
                groups: Optional[Sequence[Tuple[int, int]]] = None):
        """The router contract (module docstring): each family returns its routing."""

    def capacity(self, num_tokens: int, capacity_factor: Optional[float],
                 top_k: int = 1) -> Optional[int]:
        """Slots per expert in a group of ``num_tokens`` (None: no limit); the one place a
        capacity is computed (a layer's factor, else the router's default)."""
        if capacity_factor is None:
            capacity_factor = self.default_capacity_factor
        if capacity_factor is None:
            return None
        return compute_capacity(num_tokens, self.num_experts, capacity_factor, top_k,
                                self.capacity_multiple_of)

    @staticmethod
    def group_runs(num_tokens: int, groups: Optional[Sequence[Tuple[int, int]]]
                   ) -> List[Tuple[int, int, int]]:
        """The groups as runs of equal size, (start, group size, number of groups), checked
        to cover the ``num_tokens`` tokens in order; a router solves each run batched."""
        slices = groups if groups is not None else [(0, num_tokens)]
        runs = equal_size_runs(slices)
        position = 0
        for start, size, count in runs:
            if start != position or size < 1:
                break
            position = start + size * count
        if position != num_tokens:
            raise ValueError(f'routing groups must cover the {num_tokens} tokens in order, got '
                             f'{list(slices)[:4]}...')
        return runs


class GatedRouter(BaseRouter):
    """A sparse router's gate (a linear map without bias) and its training noise.

    Args:
        noise_std: std of the Gaussian gate noise in training, divided by E as in V-MoE.
        (others as :class:`BaseRouter`)
    """

    def __init__(self, embed_dims: int, num_experts: int, noise_std: float = 0.0,
                 use_z_loss: bool = False, capacity_multiple_of: int = 1):
        super().__init__(embed_dims, num_experts, use_z_loss=use_z_loss,
                         capacity_multiple_of=capacity_multiple_of)
        if noise_std < 0:
            raise ValueError(f'noise_std must be >= 0, got {noise_std}')
        self.noise_std = noise_std
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

    def extra_repr(self) -> str:
        return f'num_experts={self.num_experts}, noise_std={self.noise_std}'
