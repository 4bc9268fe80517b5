"""Soft MoE router (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Every slot is a convex combination of tokens and every token a convex combination of
slot outputs, so nothing is dropped and everything is differentiable.

Grouping, to keep the cost bounded: each routing group of the MoE layer
(``MoEFFN(group_size=...)``, by default one image) is cut, in order, into soft groups of
at most ``tokens_per_group`` tokens (the last one padded and masked), so with the default
soft groups never mix images. Each soft group has its own S = E * P slots
(P = ``slots_per_expert``, default ``ceil(tokens_per_group / E)`` so that the experts see
about as many slots as there are tokens, the compute of top-1 routing). The cost is then
O(T * S * D): linear in the number of tokens instead of quadratic.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdet.registry import MODELS
from ..losses import z_loss
from ..routing import SoftRouting, from_groups, padded_group_index, to_groups
from .base import BaseRouter


@MODELS.register_module()
class SoftMoERouter(BaseRouter):
    """Soft MoE routing with l2-normalised tokens and slot embeddings and a learned scale.

    Nothing is dropped, so there is no capacity (``capacity_factor`` is ignored).

    Args:
        tokens_per_group: tokens per soft group (M); soft groups stay within one of the
            layer's routing groups.
        slots_per_expert: P; default ceil(tokens_per_group / E).
    """

    def __init__(self, embed_dims: int, num_experts: int, tokens_per_group: int = 256,
                 slots_per_expert: Optional[int] = None, use_z_loss: bool = False,
                 capacity_multiple_of: int = 1):
        super().__init__(embed_dims, num_experts, use_z_loss=use_z_loss,
                         capacity_multiple_of=capacity_multiple_of)
        if tokens_per_group < 1:
            raise ValueError(f'tokens_per_group must be >= 1, got {tokens_per_group}')
        self.tokens_per_group = tokens_per_group
        self.slots_per_expert = slots_per_expert or math.ceil(tokens_per_group / num_experts)
        # The slot embeddings act as the gate: a linear map without bias, (S, D).
        self.slot_embeds = nn.Parameter(
            torch.randn(num_experts * self.slots_per_expert, embed_dims) / math.sqrt(embed_dims))
        self.scale = nn.Parameter(torch.ones(()))

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.slots_per_expert

    def forward(self, tokens: Tensor, targets: Optional[Tensor] = None,
                capacity_factor: Optional[float] = None,
                groups: Optional[Sequence[Tuple[int, int]]] = None) -> SoftRouting:
        """The router contract (:class:`~.base.BaseRouter`); targets are not used."""
        runs = self.group_runs(tokens.shape[0], groups)
        slices = [(start + i * size, start + (i + 1) * size)
                  for start, size, count in runs for i in range(count)]
        group_index = padded_group_index(slices, self.tokens_per_group, tokens.device)
        grouped = to_groups(tokens, group_index)  # the slices cover all tokens in order
        dtype = grouped.dtype if grouped.dtype in (torch.float32, torch.float64) else torch.float32
        with torch.autocast(tokens.device.type, enabled=False):  # routing in full precision
            slots = F.normalize(self.slot_embeds.to(dtype), dim=-1) * self.scale.to(dtype)
            slot_logits = F.normalize(grouped.to(dtype), dim=-1) @ slots.t()  # (G, M, S)
        dispatch_logits = slot_logits.float()
        if group_index.numel() != tokens.shape[0]:  # padded positions get no dispatch weight
            dispatch_logits = dispatch_logits.masked_fill((group_index < 0)[..., None],
                                                          float('-inf'))
        dispatch = dispatch_logits.softmax(dim=1)
        combine = slot_logits.float().softmax(dim=-1)
        per_slot = from_groups(slot_logits, group_index, tokens.shape[0])  # (T, S)
        logits = per_slot.view(-1, self.num_experts, self.slots_per_expert).logsumexp(dim=-1)
        routing = SoftRouting(logits=logits, dispatch_weights=dispatch,
                              combine_weights=combine, group_index=group_index)
        if self.use_z_loss:
            routing.aux_losses['z'] = z_loss(logits)
        return routing

    def extra_repr(self) -> str:
        return (f'num_experts={self.num_experts}, tokens_per_group={self.tokens_per_group}, '
                f'slots_per_expert={self.slots_per_expert}')
