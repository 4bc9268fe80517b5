"""Soft MoE router (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Every slot is a convex combination of tokens and every token a convex combination of
slot outputs, so nothing is dropped and everything is differentiable.

Grouping, to keep the cost bounded: the tokens of each image are cut, in order, into
groups of at most ``group_size`` tokens (the last one padded and masked); groups never
mix images. Each group has its own S = E * P slots (P = ``slots_per_expert``, default
``ceil(group_size / E)`` so that the experts see about as many slots as there are
tokens, the compute of top-1 routing). The cost is then O(T * S * D): linear in the
number of tokens instead of quadratic.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmdet.registry import MODELS
from ..losses import z_loss
from ..routing import SoftRouting


@MODELS.register_module()
class SoftMoERouter(nn.Module):
    """Soft MoE routing with l2-normalised tokens and slot embeddings and a learned scale.

    Args:
        group_size: tokens per routing group (M); groups stay within one image.
        slots_per_expert: P; default ceil(group_size / E).
    """

    requires_targets = False
    default_capacity_factor = None

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

    def group(self, x: Tensor):
        """Cut (B, N, D) into (G, M, D) groups within images; return groups and (G, M) token ids."""
        batch, num_tokens, dims = x.shape
        size = min(self.group_size, num_tokens)
        per_image = math.ceil(num_tokens / size)
        pad = per_image * size - num_tokens
        token_id = torch.arange(batch * num_tokens, device=x.device).view(batch, num_tokens)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            token_id = F.pad(token_id, (0, pad), value=-1)
        return x.reshape(batch * per_image, size, dims), token_id.reshape(batch * per_image, size)

    def forward(self, x: Tensor, targets: Optional[Tensor] = None,
                capacity_factor: Optional[float] = None) -> SoftRouting:
        groups, group_index = self.group(x)
        tokens = F.normalize(groups, dim=-1)
        slots = F.normalize(self.slot_embeds, dim=-1) * self.scale
        slot_logits = tokens @ slots.t()  # (G, M, S)
        padding = (group_index < 0)[..., None]
        dispatch = slot_logits.float().masked_fill(padding, float('-inf')).softmax(dim=1)
        combine = slot_logits.float().softmax(dim=-1)
        valid = group_index >= 0
        per_slot = slot_logits[valid]  # (T, S): groups are in token order, padding last
        logits = per_slot.view(-1, self.num_experts, self.slots_per_expert).logsumexp(dim=-1)
        routing = SoftRouting(logits=logits, dispatch_weights=dispatch,
                              combine_weights=combine, group_index=group_index)
        if self.use_z_loss:
            routing.aux_losses['z'] = z_loss(logits)
        return routing

    def extra_repr(self) -> str:
        return (f'num_experts={self.num_experts}, group_size={self.group_size}, '
                f'slots_per_expert={self.slots_per_expert}')
