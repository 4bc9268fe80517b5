"""Soft MoE router (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Every slot is a convex combination of tokens and every token a convex combination of
slot outputs, so nothing is dropped and everything is differentiable.

Grouping, to keep the cost bounded: each routing group of the MoE layer
(``MoEFFN(group_size=...)``, by default one image) is cut, in order, into groups of at most
``group_size`` tokens (the last one padded and masked), so with the default groups never
mix images. Each group has its own S = E * P slots (P = ``slots_per_expert``, default
``ceil(group_size / E)`` so that the experts see about as many slots as there are
tokens, the compute of top-1 routing). The cost is then O(T * S * D): linear in the
number of tokens instead of quadratic.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdet.registry import MODELS
from ..losses import z_loss
from ..routing import SoftRouting, from_groups, padded_group_index, to_groups


@MODELS.register_module()
class SoftMoERouter(nn.Module):
    """Soft MoE routing with l2-normalised tokens and slot embeddings and a learned scale.

    Args:
        group_size: tokens per Soft MoE group (M); groups stay within one of the layer's
            routing groups.
        slots_per_expert: P; default ceil(group_size / E).
    """

    requires_targets = False
    default_capacity_factor = None
    #: the layer hands its routing groups to ``forward`` (Soft MoE batches them itself).
    takes_groups = True

    def __init__(self, embed_dims: int, num_experts: int, group_size: int = 256,
                 slots_per_expert: Optional[int] = None, use_z_loss: bool = False):
        super().__init__()
        if num_experts < 1 or group_size < 1:
            raise ValueError(f'num_experts and group_size must be >= 1, got {num_experts} '
                             f'and {group_size}')
        self.embed_dims = embed_dims
        self.num_experts = num_experts
        self.use_z_loss = use_z_loss
        self.group_size = group_size
        self.slots_per_expert = slots_per_expert or math.ceil(group_size / num_experts)
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
        """tokens: (T, D); groups: the layer's routing groups as (start, stop) ranges
        (default: all T tokens in one)."""
        slices = groups if groups is not None else [(0, tokens.shape[0])]
        group_index = padded_group_index(slices, self.group_size, tokens.device)
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
        return (f'num_experts={self.num_experts}, group_size={self.group_size}, '
                f'slots_per_expert={self.slots_per_expert}')
