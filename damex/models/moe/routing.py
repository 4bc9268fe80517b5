"""The routing contract shared by all routers and the MoE layer.

Axis letters: B batch (images), N tokens per image, T = B*N tokens, D embed dims,
E experts, K top-k, C capacity (tokens an expert may take), A assignments, S slots.

Each router family returns its routing type: a :class:`TokenChoiceRouting` (up to K
assignments per token) or an :class:`ExpertChoiceRouting` (C per expert), both a
:class:`SparseRouting`, a list of A (token, expert, weight) assignments that the layer
runs through the experts in one sorted pass (one dispatch / combine path for all sparse
routers), or a :class:`SoftRouting`. After each forward the layer keeps a detached
:class:`RoutingSummary` of it.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

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

    family = 'sparse'


@dataclass
class TokenChoiceRouting(SparseRouting):
    """Token choice: ``info`` holds ``expert_index`` and ``gates`` (T, K), -1 and 0 where
    a choice was dropped (and, per router, ``plan`` (T, E), ``expert_bias`` (E,))."""
    family = 'token_choice'


@dataclass
class ExpertChoiceRouting(SparseRouting):
    """Expert choice: ``info`` holds ``expert_tokens`` and ``expert_gates`` (E, C)."""
    family = 'expert_choice'


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

    family = 'soft'


@dataclass
class RoutingSummary:
    """What an MoE layer's last forward routed, detached, for analysis and telemetry.

    Always: ``family`` ('token_choice', 'expert_choice' or 'soft'), ``logits`` (B, N, E)
    before noise, ``targets`` (B,) or None. Sparse families: ``dispatch_mask`` (B, N, E),
    whether a token reached an expert. Token choice: ``expert_index`` and ``gates``
    (B, N, K), -1 and 0 where a choice was dropped; ``plan`` (B, N, E) for Sinkhorn token
    choice; ``expert_bias`` (E,) with aux-free balancing. Expert choice: ``expert_tokens``
    and ``expert_gates`` (E, C), the flat token index (into B*N) each expert slot took and
    its weight. Soft MoE: ``dispatch_weights`` (G, M, S), ``combine_weights`` (B, N, S),
    ``group_index`` (G, M).
    """
    family: str
    logits: Tensor
    targets: Optional[Tensor] = None
    dispatch_mask: Optional[Tensor] = None
    expert_index: Optional[Tensor] = None
    gates: Optional[Tensor] = None
    plan: Optional[Tensor] = None
    expert_bias: Optional[Tensor] = None
    expert_tokens: Optional[Tensor] = None
    expert_gates: Optional[Tensor] = None
    dispatch_weights: Optional[Tensor] = None
    combine_weights: Optional[Tensor] = None
    group_index: Optional[Tensor] = None

    def reached(self) -> Tensor:
        """(B, N, E) bool: the experts each token reached; Soft MoE: the expert with the
        largest combine mass (argmax of the per-expert logits)."""
        if self.dispatch_mask is not None:
            return self.dispatch_mask
        return F.one_hot(self.logits.argmax(-1), self.logits.shape[-1]).bool()

    def tokens_per_expert(self) -> Tensor:
        """(B, E) tokens of each image that reached each expert (a token dispatched to
        several experts counts for each, a dropped one for none)."""
        return self.reached().sum(dim=1).long()


def compute_capacity(num_tokens: int, num_experts: int, capacity_factor: float,
                     top_k: int = 1, multiple_of: int = 1) -> int:
    """Slots per expert for one routing group, as the reference (google-research/vmoe).

    Token choice: C = ceil(T * K * capacity_factor / E) (K choices per token need K times
    the slots); expert choice passes ``top_k=1``: C = ceil(T * capacity_factor / E).
    C is rounded up to a multiple of ``multiple_of`` (the reference uses 4, for
    hardware-friendly shapes) and is at least 1.
    """
    if capacity_factor <= 0:
        raise ValueError(f'capacity_factor must be positive, got {capacity_factor}')
    if multiple_of < 1:
        raise ValueError(f'capacity_multiple_of must be >= 1, got {multiple_of}')
    capacity = max(1, math.ceil(num_tokens * top_k * capacity_factor / num_experts))
    return math.ceil(capacity / multiple_of) * multiple_of


def stable_topk(scores: Tensor, k: int) -> Tensor:
    """Indices of the k largest entries of each row (last dim), ties to the lower index.

    ``torch.topk`` gives no order among equal scores; the reference (``jax.lax.top_k``)
    takes the lower index first. A stable descending sort does exactly that.
    """
    if k == 1:
        return scores.argmax(dim=-1, keepdim=True)  # documented: the first maximal index
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]


def top_k_assignment(scores: Tensor, top_k: int, capacity: Optional[int],
                     priority: Optional[Tensor] = None):
    """Token choice: every token picks its top-k experts by ``scores``; buffers fill in order.

    Slots are filled first choices first (all tokens' first choice, then all second
    choices, ...), tokens in their own order or by descending ``priority`` (batch
    prioritized routing, Riquelme et al. 2021). A choice that finds its expert full is
    dropped. scores: (T, E) for one routing group or (G, T, E) for G groups of equal size
    routed at once (capacity per group), priority (T,) / (G, T). Returns expert_index and
    kept, (T, K) / (G, T, K); kept is None when there is no capacity (nothing dropped).
    """
    expert_index = stable_topk(scores, top_k)
    if capacity is None:
        return expert_index, None
    if scores.dim() == 2:
        index, kept = top_k_assignment(scores[None], top_k, capacity,
                                       None if priority is None else priority[None])
        return index[0], kept[0]
    num_groups, num_tokens, num_experts = scores.shape
    if priority is not None:
        order = torch.argsort(priority, dim=-1, descending=True, stable=True)
    else:
        order = torch.arange(num_tokens, device=scores.device).expand(num_groups, num_tokens)
    order = order[..., None].expand(-1, -1, top_k)
    # (G, K*T) choice-major, tokens in priority order
    choices = expert_index.gather(1, order).transpose(1, 2).reshape(num_groups, -1)
    one_hot = F.one_hot(choices, num_experts)
    position = (one_hot.cumsum(dim=1) * one_hot).sum(dim=-1) - 1
    kept_ordered = (position < capacity).reshape(num_groups, top_k, num_tokens).transpose(1, 2)
    kept = torch.empty_like(kept_ordered).scatter_(1, order, kept_ordered)
    return expert_index, kept


def sparse_from_token_choice(logits: Tensor, expert_index: Tensor, kept: Optional[Tensor],
                             gates: Tensor) -> TokenChoiceRouting:
    """Build the assignments of a token-choice routing; combine weight = gates[t, e].

    ``kept`` None: every choice is kept (no capacity), which needs no data-dependent
    selection (no host sync).
    """
    num_tokens, top_k = expert_index.shape
    token_index = torch.arange(num_tokens, device=logits.device).repeat_interleave(top_k)
    flat_expert = expert_index.reshape(-1)
    weight = gates.gather(1, expert_index)
    if kept is None:
        return TokenChoiceRouting(logits=logits, token_index=token_index,
                                  expert_index=flat_expert, combine_weight=weight.reshape(-1),
                                  info=dict(expert_index=expert_index, gates=weight.detach()))
    flat_kept = kept.reshape(-1)
    dropped = torch.where(kept, expert_index, torch.full_like(expert_index, -1))
    chosen_gates = torch.where(kept, weight, torch.zeros_like(weight))
    return TokenChoiceRouting(
        logits=logits,
        token_index=token_index[flat_kept],
        expert_index=flat_expert[flat_kept],
        combine_weight=weight.reshape(-1)[flat_kept],
        info=dict(expert_index=dropped, gates=chosen_gates))


def sparse_from_expert_choice(logits: Tensor, selection_scores: Tensor, capacity: int,
                              combine: Tensor, group_starts: Optional[Tensor] = None
                              ) -> ExpertChoiceRouting:
    """Expert choice: in each routing group every expert takes its top-C tokens.

    selection_scores: (T, E) for one group, or (G, M, E) for G groups of M tokens solved
    together, group g's tokens being ``group_starts[g]`` ... + M - 1 of the T tokens that
    ``logits`` (T, E) and ``combine`` (T, E, the weights of the chosen pairs) cover.
    ``info`` gets ``expert_tokens`` (E, G*C), the token each expert slot took (groups
    concatenated along C), and ``expert_gates`` (E, G*C).
    """
    scores = selection_scores if selection_scores.dim() == 3 else selection_scores[None]
    num_groups, group_tokens, num_experts = scores.shape
    if group_starts is None:
        group_starts = torch.arange(num_groups, device=scores.device) * group_tokens
    capacity = min(capacity, group_tokens)
    local = stable_topk(scores.transpose(-1, -2), capacity)  # (G, E, C)
    token_index = (local + group_starts.to(local)[:, None, None]).transpose(0, 1)
    token_index = token_index.reshape(num_experts, num_groups * capacity)
    expert_index = torch.arange(num_experts, device=logits.device)[:, None].expand_as(token_index)
    weight = combine.t().gather(1, token_index)  # (E, G*C)
    return ExpertChoiceRouting(
        logits=logits,
        token_index=token_index.reshape(-1),
        expert_index=expert_index.reshape(-1),
        combine_weight=weight.reshape(-1),
        info=dict(expert_tokens=token_index, expert_gates=weight.detach()))


def mean_over_groups(runs: Sequence[Tuple[int, int, int]], values: Sequence[Tensor]) -> Tensor:
    """The mean over all groups from each run's mean over its groups."""
    if len(runs) == 1:
        return values[0]
    total = sum(count for _, _, count in runs)
    return torch.stack([v * count for v, (_, _, count) in zip(values, runs)]).sum() / total


def equal_size_runs(slices: Sequence[Tuple[int, int]]) -> List[Tuple[int, int, int]]:
    """Consecutive routing groups of one size, as (start, group size, number of groups).

    Routers that look across tokens solve each run in one batched pass: ``'image'`` and
    ``'batch'`` groups form one run, an int ``group_size`` at most two (a shorter last group).
    """
    runs: List[Tuple[int, int, int]] = []
    for start, stop in slices:
        if runs and stop - start == runs[-1][1] and start == runs[-1][0] + runs[-1][1] * runs[-1][2]:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((start, stop - start, 1))
    return runs


GroupSize = Union[str, int]


def group_slices(batch: int, tokens_per_image: int,
                 group_size: GroupSize) -> List[Tuple[int, int]]:
    """Routing groups as (start, stop) ranges of the B*N flattened tokens.

    ``'image'``: each image's N tokens (an image's routing never depends on its
    batch-mates); ``'batch'``: all tokens in one group; an int M: consecutive groups of M
    tokens of the flattened batch, the last one shorter (reference-style; M = N is
    ``'image'``). Capacity is computed per group and routers never look across groups.
    """
    total = batch * tokens_per_image
    if group_size == 'image':
        return [(b * tokens_per_image, (b + 1) * tokens_per_image) for b in range(batch)]
    if group_size == 'batch':
        return [(0, total)]
    if isinstance(group_size, int) and not isinstance(group_size, bool) and group_size > 0:
        return [(start, min(start + group_size, total)) for start in range(0, total, group_size)]
    raise ValueError(f"group_size must be 'image', 'batch' or a positive int, got {group_size!r}")


def check_group_size(group_size: GroupSize) -> GroupSize:
    group_slices(1, 1, group_size)  # raises on a bad value
    return group_size


def padded_group_index(slices: Sequence[Tuple[int, int]], max_size: int,
                       device=None) -> Tensor:
    """(G, M) token ids of the groups, each slice cut into chunks of at most ``max_size``.

    Chunks are padded with -1 at their end; reading the valid ids row by row gives the
    tokens in order. Soft MoE batches its groups this way.
    """
    size = min(max_size, max(stop - start for start, stop in slices))
    rows = []
    for start, stop in slices:
        for chunk_start in range(start, stop, size):
            ids = torch.arange(chunk_start, min(chunk_start + size, stop), device=device)
            rows.append(F.pad(ids, (0, size - len(ids)), value=-1))
    return torch.stack(rows)


def to_groups(tokens: Tensor, group_index: Tensor) -> Tensor:
    """(T, ...) tokens into (G, M, ...) groups laid out by :func:`padded_group_index`.

    Without padding (every routing group a multiple of M tokens, e.g. 4096-token images in
    groups of 256) this is a free view; otherwise a masked scatter, padding zero.
    """
    if group_index.numel() == tokens.shape[0]:
        return tokens.view(*group_index.shape, *tokens.shape[1:])
    grouped = tokens.new_zeros(*group_index.shape, *tokens.shape[1:])
    grouped[group_index >= 0] = tokens  # the groups hold the tokens in order, padding last
    return grouped


def from_groups(grouped: Tensor, group_index: Tensor, num_tokens: int) -> Tensor:
    """Inverse of :func:`to_groups`: (G, M, ...) back to the T tokens, padding dropped."""
    if group_index.numel() == num_tokens:
        return grouped.reshape(num_tokens, *grouped.shape[2:])
    return grouped[group_index >= 0]


#: ``SparseRouting.info`` keys holding one row per token (concatenated over groups).
PER_TOKEN_INFO = ('expert_index', 'gates', 'plan')
#: ``info`` keys of shape (E, C) per group, concatenated along C; token ids are offset.
PER_SLOT_INFO = ('expert_tokens', 'expert_gates')


def merge_group_routings(routings: Sequence[SparseRouting],
                         starts: Sequence[int]) -> SparseRouting:
    """One SparseRouting over all tokens from per-group routings (group g starts at starts[g]).

    Auxiliary losses are averaged over groups, as the reference does.
    """
    if len(routings) == 1 and starts[0] == 0:
        return routings[0]
    info = {}
    for key in routings[0].info:
        values = [r.info[key] for r in routings]
        if key == 'expert_tokens':
            values = [v + start for v, start in zip(values, starts)]
        info[key] = torch.cat(values, dim=1 if key in PER_SLOT_INFO else 0)
    return type(routings[0])(
        logits=torch.cat([r.logits for r in routings]),
        token_index=torch.cat([r.token_index + start for r, start in zip(routings, starts)]),
        expert_index=torch.cat([r.expert_index for r in routings]),
        combine_weight=torch.cat([r.combine_weight for r in routings]),
        aux_losses={key: torch.stack([r.aux_losses[key] for r in routings]).mean()
                    for key in routings[0].aux_losses},
        info=info)
