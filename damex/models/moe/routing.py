"""The routing contract shared by all routers and the MoE layer.

Axis letters: B batch (images), N tokens per image, T = B*N tokens, D embed dims,
E experts, K top-k, C capacity (tokens an expert may take), A assignments, S slots.

A sparse router returns a :class:`SparseRouting`: a list of A (token, expert, weight)
assignments. Token-choice routers make up to K per token, expert-choice routers C per
expert; the layer runs every assignment through its expert in one sorted pass, so all
sparse routers share one dispatch/combine path. Soft MoE returns a :class:`SoftRouting`.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SparseRouting:
    """Sparse assignments of tokens to experts.

    Attributes:
        logits: (T, E) router logits before noise.
        token_index: (A,) token each assignment reads (index into the T flattened tokens).
        expert_index: (A,) expert of each assignment.
        combine_weight: (A,) weight of the expert's output in the token's output
            (differentiable: the router learns through it).
        aux_losses: unweighted scalar losses under 'damex', 'importance', 'load', 'switch', 'z'.
        info: extra (T, ...) or (E, ...) tensors for ``MoEFFN.last_routing``.
    """
    logits: Tensor
    token_index: Tensor
    expert_index: Tensor
    combine_weight: Tensor
    aux_losses: Dict[str, Tensor] = field(default_factory=dict)
    info: Dict[str, Tensor] = field(default_factory=dict)


@dataclass
class SoftRouting:
    """Soft MoE dispatch and combine weights over groups of tokens (Puigcerver et al. 2023).

    Attributes:
        logits: (T, E) per-expert logits, logsumexp of the token's slot logits of each
            expert, so that softmax(logits) is the combine mass each expert gets.
        dispatch_weights: (G, M, S) per group of M tokens, softmax over the tokens.
        combine_weights: (G, M, S) softmax over all S = E * P slots.
        group_index: (G, M) token of each group position (index into T), -1 for padding.
        aux_losses, info: as in :class:`SparseRouting`.
    """
    logits: Tensor
    dispatch_weights: Tensor
    combine_weights: Tensor
    group_index: Tensor
    aux_losses: Dict[str, Tensor] = field(default_factory=dict)
    info: Dict[str, Tensor] = field(default_factory=dict)


def compute_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(T * capacity_factor / E), at least 1 (as in GShard / V-MoE)."""
    if capacity_factor <= 0:
        raise ValueError(f'capacity_factor must be positive, got {capacity_factor}')
    return max(1, math.ceil(num_tokens * capacity_factor / num_experts))


def top_k_assignment(scores: Tensor, top_k: int, capacity: Optional[int],
                     priority: Optional[Tensor] = None):
    """Token choice: every token picks its top-k experts by ``scores``; buffers fill in order.

    Slots are filled first choices first (all tokens' first choice, then all second
    choices, ...), tokens in their own order or by descending ``priority`` (batch
    prioritized routing, Riquelme et al. 2021). A choice that finds its expert full is
    dropped. scores: (T, E). Returns expert_index (T, K) and kept (T, K) bool.
    """
    expert_index = scores.topk(top_k, dim=-1).indices
    kept = torch.ones_like(expert_index, dtype=torch.bool)
    if capacity is None:
        return expert_index, kept
    num_tokens, num_experts = scores.shape
    order = (torch.argsort(priority, descending=True, stable=True) if priority is not None
             else torch.arange(num_tokens, device=scores.device))
    choices = expert_index[order].t().reshape(-1)  # (K*T,) choice-major, in priority order
    one_hot = F.one_hot(choices, num_experts)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
    kept_ordered = (position < capacity).reshape(top_k, num_tokens).t()
    kept[order] = kept_ordered
    return expert_index, kept


def sparse_from_token_choice(logits: Tensor, expert_index: Tensor, kept: Tensor,
                             gates: Tensor) -> SparseRouting:
    """Build the assignments of a token-choice routing; combine weight = gates[t, e]."""
    num_tokens, top_k = expert_index.shape
    token_index = torch.arange(num_tokens, device=logits.device).repeat_interleave(top_k)
    flat_expert = expert_index.reshape(-1)
    flat_kept = kept.reshape(-1)
    weight = gates.gather(1, expert_index).reshape(-1)
    dropped = torch.where(kept, expert_index, torch.full_like(expert_index, -1))
    chosen_gates = torch.where(kept, gates.gather(1, expert_index), torch.zeros_like(gates[:, :top_k]))
    return SparseRouting(
        logits=logits,
        token_index=token_index[flat_kept],
        expert_index=flat_expert[flat_kept],
        combine_weight=weight[flat_kept],
        info=dict(expert_index=dropped, gates=chosen_gates))


def sparse_from_expert_choice(logits: Tensor, selection_scores: Tensor, capacity: int,
                              combine: Tensor) -> SparseRouting:
    """Expert choice: every expert takes its top-C tokens by ``selection_scores`` (T, E).

    combine: (T, E) weights the chosen (token, expert) pairs use. ``info`` gets
    ``expert_tokens`` (E, C), the token each expert slot took, and ``expert_gates`` (E, C).
    """
    num_tokens, num_experts = selection_scores.shape
    capacity = min(capacity, num_tokens)
    token_index = selection_scores.t().topk(capacity, dim=-1).indices  # (E, C)
    expert_index = torch.arange(num_experts, device=logits.device)[:, None].expand_as(token_index)
    weight = combine.t().gather(1, token_index)  # (E, C)
    return SparseRouting(
        logits=logits,
        token_index=token_index.reshape(-1),
        expert_index=expert_index.reshape(-1),
        combine_weight=weight.reshape(-1),
        info=dict(expert_tokens=token_index, expert_gates=weight.detach()))
