"""MoEFFN: a drop-in Mixture-of-Experts replacement for mmcv's transformer ``FFN``.

Axis letters: B batch, N tokens per image, T = B*N, D embed dims, E experts, K top-k.
"""
import contextlib
from typing import Dict, Iterator, Optional

import torch
from torch import Tensor, nn

from mmcv.cnn.bricks.drop import build_dropout
from mmcv.cnn.bricks.transformer import FFN
from mmengine.model import BaseModule
from mmdet.registry import MODELS
from .experts import StackedExperts
from .routers.build import build_router
from .routing import (PER_TOKEN_INFO, GroupSize, RoutingSummary, SoftRouting, SparseRouting,
                      TokenChoiceRouting, check_group_size, from_groups, group_slices, to_groups)


@MODELS.register_module()
class MoEFFN(BaseModule):
    """Mixture-of-Experts FFN with mmcv ``FFN``'s interface, residual included.

    Args:
        embed_dims: D.
        feedforward_channels: hidden width H of every expert.
        num_experts: E.
        router: router config, e.g. ``dict(type='DatasetAwareRouter')``; ``embed_dims``
            and ``num_experts`` are filled in.
        capacity_factor: None (default) drops no token; a number caps every expert at
            ceil(T * K * factor / E) assignments of a routing group of T tokens (expert
            choice: ceil(T * factor / E)), and tokens over capacity skip the experts
            (residual only).
        eval_capacity_factor: the factor in eval mode; defaults to ``capacity_factor``.
        capacity_multiple_of: round capacities up to a multiple of this (the reference
            uses 4 for hardware-friendly shapes; default 1).
        group_size: the routing groups: ``'image'`` (default: each image's N tokens, so
            an image's output never depends on its batch-mates, whatever the router or
            capacity), ``'batch'`` (all B*N tokens of the forward in one group), or an
            int (consecutive groups of that many tokens, as the reference). Routers and
            capacities work per group; auxiliary losses are averaged over groups.
        shared_expert: None (default: no shared path) or ``dict(feedforward_channels=H_s)``
            (other mmcv ``FFN`` arguments may be given; act_cfg and ffn_drop default to the
            experts'): a dense FFN every token passes through, its output added to the
            routed experts' combined output inside the same residual, so a token dropped by a
            capacity still gets identity + shared (DeepSeekMoE's shared experts; the base
            model of "Revisiting single-gated MoE").
        num_fcs, act_cfg, ffn_drop, dropout_layer, add_identity, init_cfg: as mmcv's FFN
            (only ``num_fcs=2``).

    After each forward:
        ``aux_losses``: the router's unweighted scalar losses ('damex', 'importance',
        'load', 'switch', 'z' where computed).
        ``last_routing``: a :class:`~.routing.RoutingSummary` (detached, for analysis):
        the router family, logits (B, N, E) before noise, targets, which experts each
        token reached, and the family's own tensors.

    Cost: one router call per forward (all routing groups batched) and, for sparse
    routers, one grouped GEMM pair for all experts, so the number of ops depends neither
    on the batch size nor on E. Host syncs per forward: the finiteness check of the
    router logits (one bool, so that a diverged router fails naming the layer), the range
    check of routing targets when given (min / max), and, only when a capacity drops
    assignments, the selection of the kept ones (a data-dependent size). Experts that
    ``grouped_mm`` refuses (see ``experts.grouped_gemm_ok``) read their split sizes back.
    """

    def __init__(self, embed_dims: int = 256, feedforward_channels: int = 1024,
                 num_experts: int = 8, router: dict = dict(type='SoftmaxTokenChoiceRouter'),
                 capacity_factor: Optional[float] = None,
                 eval_capacity_factor: Optional[float] = None,
                 capacity_multiple_of: int = 1, group_size: GroupSize = 'image',
                 shared_expert: Optional[dict] = None, num_fcs: int = 2,
                 act_cfg: dict = dict(type='ReLU', inplace=True), ffn_drop: float = 0.0,
                 dropout_layer: Optional[dict] = None, add_identity: bool = True,
                 init_cfg: Optional[dict] = None):
        super().__init__(init_cfg)
        if num_fcs != 2:
            raise ValueError(f'MoEFFN supports num_fcs=2 only, got {num_fcs}')
        if num_experts < 1:
            raise ValueError(f'num_experts must be >= 1, got {num_experts}')
        for name, factor in (('capacity_factor', capacity_factor),
                             ('eval_capacity_factor', eval_capacity_factor)):
            if factor is not None and factor <= 0:
                raise ValueError(f'{name} must be None or > 0, got {factor}')
        self.embed_dims = embed_dims
        self.feedforward_channels = feedforward_channels
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = (capacity_factor if eval_capacity_factor is None
                                     else eval_capacity_factor)
        self.capacity_multiple_of = capacity_multiple_of
        self.group_size = check_group_size(group_size)
        self.router = build_router(router, embed_dims, num_experts, capacity_multiple_of)
        self.experts = StackedExperts(num_experts, embed_dims, feedforward_channels,
                                      act_cfg, ffn_drop)
        self.shared_expert = None
        if shared_expert is not None:
            if 'feedforward_channels' not in shared_expert:
                raise ValueError('shared_expert needs its width: dict(feedforward_channels=H_s)')
            self.shared_expert = FFN(**{**dict(embed_dims=embed_dims, act_cfg=act_cfg,
                                               ffn_drop=ffn_drop), **shared_expert,
                                        'add_identity': False})
        self.dropout_layer = build_dropout(dropout_layer) if dropout_layer else nn.Identity()
        self.add_identity = add_identity
        self.aux_losses: Dict[str, Tensor] = {}
        self.last_routing: Optional[RoutingSummary] = None
        self.context_targets: Optional[Tensor] = None
        #: staged routing (``ForcedRoutingHook``): in training, with targets, every token
        #: goes to its target expert whatever the router says; the router's losses stay.
        self.force_targets = False
        #: how errors name the layer; the detector sets its module path.
        self.name = 'MoEFFN'

    def forward(self, x: Tensor, identity: Optional[Tensor] = None,
                routing_targets: Optional[Tensor] = None) -> Tensor:
        """x: (B, N, D); routing_targets: (B,) expert of each image's dataset, or None.

        Without ``routing_targets`` the layer uses the targets set by
        :func:`routing_targets` around the forward, if any.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dims:
            raise ValueError(f'MoEFFN expects (batch, tokens, {self.embed_dims}) input, '
                             f'got {tuple(x.shape)}')
        targets = routing_targets if routing_targets is not None else self.context_targets
        targets = self._check_targets(targets, x.shape[0])
        batch, num_tokens = x.shape[:2]
        tokens = x.reshape(-1, self.embed_dims)
        routing = self.route(x, targets)
        if not torch.isfinite(routing.logits).all():  # one sync per layer and forward
            if not torch.isfinite(x).all():
                raise FloatingPointError(
                    f'{self.name}: the input tokens of this layer are not finite (nan/inf): the '
                    'input (images or the layers before), not the router, is at fault')
            raise FloatingPointError(
                f'{self.name}: router logits are not finite (nan/inf) in this forward while its '
                'input tokens are finite: the router diverged. The z-loss (router '
                'use_z_loss=True) keeps logits small; lowering the learning rate or clipping '
                'gradients helps too')
        if isinstance(routing, SoftRouting):
            out = self._soft_forward(tokens, routing)
        else:
            out = self._sparse_forward(tokens, routing)
        out = out.view_as(x)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        self.aux_losses = routing.aux_losses
        self.last_routing = self._routing_summary(routing, batch, num_tokens, targets)
        if not self.add_identity:
            return self.dropout_layer(out)
        if identity is None:
            identity = x
        return identity + self.dropout_layer(out)

    def route(self, x: Tensor, targets: Optional[Tensor]):
        """Route x (B, N, D) in its routing groups (see ``group_size``) with one router call;
        targets: (B,) or None. Returns the router family's routing over the B*N tokens."""
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        batch, num_tokens = x.shape[:2]
        tokens = x.reshape(-1, self.embed_dims)
        slices = group_slices(batch, num_tokens, self.group_size)
        token_targets = None if targets is None else targets.repeat_interleave(num_tokens)
        routing = self.router(tokens, token_targets, factor, groups=slices)
        if self.force_targets and self.training and token_targets is not None:
            if isinstance(routing, SoftRouting):
                raise ValueError(
                    f'{self.name}: forced routing (ForcedRoutingHook) sends every token to one '
                    'expert; Soft MoE has no per-token expert to force: remove the hook or '
                    'use a sparse router')
            routing = forced_routing(routing, token_targets)
        return routing

    def _check_targets(self, targets: Optional[Tensor], batch: int) -> Optional[Tensor]:
        if targets is None:
            if self.training and self.router.requires_targets:
                raise ValueError(
                    f'{type(self.router).__name__} needs routing targets in training: pass '
                    '`routing_targets` (one expert index per image) or run the forward inside '
                    '`damex.models.moe.routing_targets(model, targets)`')
            return None
        targets = torch.as_tensor(targets)
        if targets.dtype not in (torch.int32, torch.int64) or targets.shape != (batch,):
            raise ValueError(f'routing targets must be an integer tensor of shape ({batch},), '
                             f'got {targets.dtype} {tuple(targets.shape)}')
        if targets.numel() and (targets.min() < 0 or targets.max() >= self.num_experts):
            raise ValueError(f'routing targets must lie in [0, {self.num_experts}), '
                             f'got {targets.tolist()}')
        return targets.long()

    def _sparse_forward(self, tokens: Tensor, routing: SparseRouting) -> Tensor:
        """Sort the assignments by expert, run the experts, add each token's outputs up."""
        order = torch.argsort(routing.expert_index, stable=True)
        token_index = routing.token_index[order]
        # (bincount would read its input's maximum back to the host on CUDA)
        counts = routing.expert_index.new_zeros(self.num_experts).index_add_(
            0, routing.expert_index, torch.ones_like(routing.expert_index))
        # (T, D); under autocast in autocast's dtype, as a dense FFN's output
        return self.experts.forward_sorted(tokens, token_index, routing.expert_index[order],
                                           counts, routing.combine_weight[order])

    def _soft_forward(self, tokens: Tensor, routing: SoftRouting) -> Tensor:
        """Slots = dispatch-weighted token sums per group; experts run on (E, G*P, D) slots."""
        groups = to_groups(tokens, routing.group_index)
        num_groups, _, num_slots = routing.dispatch_weights.shape
        per_expert = num_slots // self.num_experts
        dispatch = routing.dispatch_weights.to(tokens.dtype)
        slots = torch.einsum('gms,gmd->gsd', dispatch, groups)
        slots = slots.view(num_groups, self.num_experts, per_expert, -1).transpose(0, 1)
        slot_out = self.experts.forward_batched(slots.reshape(self.num_experts, -1, slots.shape[-1]))
        slot_out = slot_out.view(self.num_experts, num_groups, per_expert, -1).transpose(0, 1)
        combine = routing.combine_weights.to(tokens.dtype)
        out = torch.einsum('gms,gsd->gmd', combine, slot_out.reshape(num_groups, num_slots, -1))
        return from_groups(out, routing.group_index, tokens.shape[0])

    def _routing_summary(self, routing, batch: int, num_tokens: int,
                         targets: Optional[Tensor]) -> RoutingSummary:
        def per_token(t: Tensor) -> Tensor:
            return t.detach().reshape(batch, num_tokens, *t.shape[1:])

        summary = RoutingSummary(family=routing.family, logits=per_token(routing.logits),
                                 targets=targets)
        if isinstance(routing, SoftRouting):
            combine = from_groups(routing.combine_weights, routing.group_index,
                                  batch * num_tokens)
            summary.dispatch_weights = routing.dispatch_weights.detach()
            summary.combine_weights = per_token(combine)
            summary.group_index = routing.group_index
        else:
            mask = torch.zeros(batch * num_tokens, self.num_experts, dtype=torch.bool,
                               device=routing.logits.device)
            mask[routing.token_index, routing.expert_index] = True
            summary.dispatch_mask = per_token(mask)
        for key, value in routing.info.items():
            if not hasattr(summary, key):
                raise KeyError(f'{type(self.router).__name__} reports {key!r}, which '
                               'RoutingSummary has no field for')
            setattr(summary, key, per_token(value) if key in PER_TOKEN_INFO else value.detach())
        return summary

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept a dense mmcv FFN's keys (``layers.0.0.*``, ``layers.1.*``): upcycle them.

        So a dense checkpoint (e.g. mmdet's DINO) loads into a model whose FFN became an
        MoE layer, as :func:`upcycled_tensors` says; the router keeps its init.
        A checkpoint whose layer has another number of experts is an error naming the layer
        and both counts (not a size-mismatch warning among hundreds of log lines).
        """
        saved = state_dict.get(prefix + 'experts.fc1_weight')
        if saved is not None and saved.shape[0] != self.num_experts:
            layer = prefix.rstrip('.') or self.name
            raise ValueError(
                f'{layer}: the checkpoint has {saved.shape[0]} experts, the model '
                f'{self.num_experts} (model.moe.num_experts); resume or load with the same '
                'number of experts')
        if (prefix + 'experts.fc1_weight' not in state_dict
                and prefix + 'layers.0.0.weight' in state_dict):
            for dense_key in DENSE_TO_EXPERT:
                state_dict.update({prefix + key: value for key, value in upcycled_tensors(
                    dense_key, state_dict.pop(prefix + dense_key), self.num_experts,
                    self.shared_expert is not None).items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f'embed_dims={self.embed_dims}, num_experts={self.num_experts}, '
                f'capacity_factor={self.capacity_factor}, group_size={self.group_size!r}')


def forced_routing(routing: SparseRouting, token_targets: Tensor) -> SparseRouting:
    """Every token to its target expert, combine weight = the router's softmax probability of
    that expert (so the router keeps a gradient); logits and auxiliary losses unchanged."""
    gates = routing.logits.float().softmax(-1)
    weight = gates.gather(1, token_targets[:, None])
    return TokenChoiceRouting(
        logits=routing.logits, token_index=torch.arange(len(token_targets),
                                                        device=token_targets.device),
        expert_index=token_targets, combine_weight=weight[:, 0], aux_losses=routing.aux_losses,
        info=dict(expert_index=token_targets[:, None], gates=weight.detach()))


@contextlib.contextmanager
def routing_targets(model: nn.Module, targets: Optional[Tensor]) -> Iterator[None]:
    """Hand every MoEFFN inside ``model`` the per-image routing targets for one forward.

    The targets are cleared when the block exits, even on error, so they never leak
    into a later forward.
    """
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    for layer in layers:
        layer.context_targets = targets
    try:
        yield
    finally:
        for layer in layers:
            layer.context_targets = None


DENSE_TO_EXPERT = {'layers.0.0.weight': 'fc1_weight', 'layers.0.0.bias': 'fc1_bias',
                   'layers.1.weight': 'fc2_weight', 'layers.1.bias': 'fc2_bias'}


def upcycled_tensors(dense_key: str, value: Tensor, num_experts: int,
                     shared: bool) -> Dict[str, Tensor]:
    """What one tensor of a dense mmcv FFN (its key, e.g. ``layers.0.0.weight``) becomes in
    an MoE layer (keys relative to the layer).

    Without a shared expert every expert starts as the dense FFN (sparse upcycling: the
    layer computes gate * dense). With one, the shared expert is the dense FFN and the
    experts start with its fc1 but their output layer (fc2 weight and bias) at zero, so the
    layer computes exactly what the dense FFN computes, whatever the router does.
    """
    stacked = value.unsqueeze(0).expand(num_experts, *value.shape).clone()
    if not shared:
        return {'experts.' + DENSE_TO_EXPERT[dense_key]: stacked}
    if dense_key.startswith('layers.1.'):
        stacked.zero_()
    return {'experts.' + DENSE_TO_EXPERT[dense_key]: stacked,
            'shared_expert.' + dense_key: value.clone()}


@torch.no_grad()
def upcycle_from_ffn(moe_layer: MoEFFN, ffn: nn.Module) -> None:
    """Start ``moe_layer`` from a dense mmcv ``FFN`` as :func:`upcycled_tensors` says."""
    dense = ffn.state_dict()
    own = moe_layer.state_dict()
    for dense_key in DENSE_TO_EXPERT:
        for key, value in upcycled_tensors(dense_key, dense[dense_key], moe_layer.num_experts,
                                           moe_layer.shared_expert is not None).items():
            if own[key].shape != value.shape:
                raise ValueError(f'cannot upcycle an FFN whose {dense_key} is '
                                 f'{tuple(dense[dense_key].shape)} into {key} of '
                                 f'{tuple(own[key].shape)}')
            own[key].copy_(value)
