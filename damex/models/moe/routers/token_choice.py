"""Token-choice routers: every token picks its experts (V-MoE, DAMEX, Sinkhorn token choice)."""
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from mmdet.registry import MODELS
from ..losses import damex_loss, importance_loss, load_loss, switch_loss, z_loss
from ..optimal_transport import sinkhorn_plan
from ..planning import gate_from_plan
from ..routing import (TokenChoiceRouting, mean_over_groups, sparse_from_token_choice,
                       top_k_assignment)
from .base import GatedRouter


@MODELS.register_module()
class SoftmaxTokenChoiceRouter(GatedRouter):
    """Noisy top-k softmax router (V-MoE, Riquelme et al. 2021).

    Gates are softmax(logits + noise) in training; each token keeps its top-k experts
    with combine weight = its gate (not renormalised over the k, as V-MoE).

    Args:
        top_k: experts per token (K).
        noise_std: gate noise; V-MoE uses 1.0 (std 1/E).
        batch_prioritized: under a capacity, fill buffers by descending max gate instead
            of token order (BPR, V-MoE).
        use_importance_loss / use_load_loss: V-MoE balance losses ('importance' on the
            clean softmax, before noise, as V-MoE; 'load', which needs noise).
        use_switch_loss: Switch Transformer balance loss ('switch', on the gates used
            for routing).
        use_z_loss: ST-MoE router z-loss ('z').
        use_damex_loss: cross-entropy of the pre-noise logits to each token's routing
            target ('damex'); with it the router needs targets in training.
        balance: ``'aux_loss'`` (default: the importance / load losses above) or
            ``'aux_free'`` (DeepSeek-V3's auxiliary-loss-free balancing): a per-expert bias
            (buffer ``expert_bias``, saved in checkpoints) is added to the gates for the
            top-k *choice* only (combine weights stay the unbiased gates), and after every
            training forward it moves by ``bias_update_rate`` towards balance,
            ``b_e += u * sign(mean load - load_e)``, the loads all-reduced over ranks so that
            every rank keeps the same bias; in eval the bias is fixed. In that mode the
            importance / load losses are off unless asked for.
    """

    def __init__(self, embed_dims: int, num_experts: int, top_k: int = 1,
                 noise_std: float = 1.0, batch_prioritized: bool = False,
                 use_importance_loss: Optional[bool] = None,
                 use_load_loss: Optional[bool] = None,
                 use_switch_loss: bool = False, use_z_loss: bool = False,
                 use_damex_loss: bool = False, capacity_multiple_of: int = 1,
                 balance: str = 'aux_loss', bias_update_rate: float = 1e-3):
        super().__init__(embed_dims, num_experts, noise_std=noise_std, use_z_loss=use_z_loss,
                         capacity_multiple_of=capacity_multiple_of)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f'top_k must be in [1, num_experts={num_experts}], got {top_k}')
        if balance not in ('aux_loss', 'aux_free'):
            raise ValueError(f"balance must be 'aux_loss' or 'aux_free', got {balance!r}")
        self.top_k = top_k
        self.batch_prioritized = batch_prioritized
        self.balance = balance
        self.bias_update_rate = bias_update_rate
        with_losses = balance == 'aux_loss'
        self.use_importance_loss = with_losses if use_importance_loss is None else use_importance_loss
        self.use_load_loss = with_losses if use_load_loss is None else use_load_loss
        if balance == 'aux_free':
            self.register_buffer('expert_bias', torch.zeros(num_experts))
        self.use_switch_loss = use_switch_loss
        self.use_damex_loss = use_damex_loss

    @property
    def requires_targets(self) -> bool:  # type: ignore[override]
        return self.use_damex_loss

    def forward(self, tokens: Tensor, targets: Optional[Tensor] = None,
                capacity_factor: Optional[float] = None,
                groups: Optional[Sequence[Tuple[int, int]]] = None) -> TokenChoiceRouting:
        """The router contract (:class:`~.base.BaseRouter`). Groups of equal size are routed
        in one batched pass; capacities, batch priority and losses are per group, the
        losses averaged over groups.
        """
        runs = self.group_runs(tokens.shape[0], groups)
        logits, noisy_logits, std = self.gate_logits(tokens)
        gates = noisy_logits.float().softmax(dim=-1)

        choice = gates + self.expert_bias if self.balance == 'aux_free' else gates

        def route(start, size, count):
            run = choice[start:start + size * count].view(count, size, -1)
            capacity = self.capacity(size, capacity_factor, self.top_k)
            priority = run.max(dim=-1).values if self.batch_prioritized else None
            expert_index, kept = top_k_assignment(run, self.top_k, capacity, priority)
            return expert_index.flatten(0, 1), None if kept is None else kept.flatten(0, 1)

        assigned = [route(*run) for run in runs]
        routing = sparse_from_token_choice(
            logits, torch.cat([index for index, _ in assigned]),
            None if assigned[0][1] is None else torch.cat([kept for _, kept in assigned]), gates)
        routing.aux_losses = self.losses(runs, logits, noisy_logits, gates, std, targets)
        if self.balance == 'aux_free':
            if self.training:
                self.update_bias(routing.expert_index)
            routing.info['expert_bias'] = self.expert_bias.clone()
        return routing

    @torch.no_grad()
    def update_bias(self, expert_index: Tensor) -> None:
        """One aux-free step from this forward's loads (all ranks' loads, when distributed)."""
        load = torch.zeros_like(self.expert_bias).index_add_(
            0, expert_index, torch.ones_like(expert_index, dtype=self.expert_bias.dtype))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def losses(self, runs, logits: Tensor, noisy_logits: Tensor, gates: Tensor, std: float,
               targets: Optional[Tensor]) -> dict:
        """Each loss per routing group, averaged over groups."""
        def per_group(fn, *tensors):
            return mean_over_groups(runs, [
                fn(*(t[start:start + size * count].view(count, size, *t.shape[1:])
                     for t in tensors)) for start, size, count in runs])

        losses = {}
        if self.use_importance_loss:
            clean_gates = gates if noisy_logits is logits else logits.float().softmax(dim=-1)
            losses['importance'] = per_group(importance_loss, clean_gates)
        if self.use_load_loss and std > 0:
            losses['load'] = per_group(lambda a, b: load_loss(a, b, std, self.top_k),
                                       logits.float(), noisy_logits.float())
        if self.use_switch_loss:
            losses['switch'] = per_group(switch_loss, gates)
        if self.use_z_loss:
            losses['z'] = per_group(z_loss, logits)
        if self.use_damex_loss and targets is not None:
            losses['damex'] = per_group(damex_loss, logits, targets)
        return losses


@MODELS.register_module()
class DatasetAwareRouter(SoftmaxTokenChoiceRouter):
    """DAMEX router (Jain et al. 2023): top-1 routing trained to send dataset d to expert h(d).

    In training every token's pre-noise logits get a cross-entropy to its image's routing
    target (reported as 'damex'); at inference the router picks the expert from the token
    alone, no dataset id needed. As the official code: top-1, gate noise 1.0, and the
    DAMEX loss replaces the balance losses (``use_balance_loss=True`` adds them back).

    ``init_from_plan='PLAN.json'`` (written by tools/analysis_tools/plan_experts.py): the
    detector's ``init_weights`` sets the gate from the plan's entry for this router's layer
    (:func:`~damex.models.moe.planning.gate_from_plan`), so each dataset's mean token routes
    to its planned expert from the first step.
    """

    def __init__(self, embed_dims: int, num_experts: int, noise_std: float = 1.0,
                 batch_prioritized: bool = True, use_balance_loss: bool = False,
                 use_z_loss: bool = False, top_k: int = 1, capacity_multiple_of: int = 1,
                 init_from_plan: Optional[str] = None):
        super().__init__(embed_dims, num_experts, top_k=top_k, noise_std=noise_std,
                         batch_prioritized=batch_prioritized,
                         use_importance_loss=use_balance_loss, use_load_loss=use_balance_loss,
                         use_z_loss=use_z_loss, use_damex_loss=True,
                         capacity_multiple_of=capacity_multiple_of)
        self.init_from_plan = init_from_plan

    @torch.no_grad()
    def init_gate_from_plan(self, entry: dict, experts: dict, source: str = 'the plan') -> None:
        """Set the gate from a plan's entry for this router's layer (its dataset means and
        within-dataset covariance) and the plan's expert map; the detector reads the plan
        (:class:`~damex.datasets.label_space.ExpertPlan`) and hands both over."""
        weight = gate_from_plan(entry['dataset_means'], experts, self.num_experts,
                                covariance=entry.get('within_covariance'))
        if weight.shape != self.gate.weight.shape:
            raise ValueError(f'expert plan {source}: a layer gives a gate of '
                             f'{tuple(weight.shape)}, the router has '
                             f'{tuple(self.gate.weight.shape)}')
        self.gate.weight.copy_(weight)


@MODELS.register_module()
class SinkhornTokenChoiceRouter(GatedRouter):
    """Sinkhorn token choice (Liu et al. 2024, "Routers in Vision MoE"; vmoe KL projection).

    The top-k of each token are taken from the entropic transport plan of cost -logits
    (eps 1, ``num_iters`` Sinkhorn iterations, rows 1, columns T/E), which balances experts
    without a loss; combine weights are softmax(logits) at the chosen experts, as the
    reference (the plan itself gets no gradient).
    """

    def __init__(self, embed_dims: int, num_experts: int, top_k: int = 1,
                 noise_std: float = 0.0, num_iters: int = 20, use_z_loss: bool = False,
                 capacity_multiple_of: int = 1):
        super().__init__(embed_dims, num_experts, noise_std=noise_std, use_z_loss=use_z_loss,
                         capacity_multiple_of=capacity_multiple_of)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f'top_k must be in [1, num_experts={num_experts}], got {top_k}')
        self.top_k = top_k
        self.num_iters = num_iters

    def forward(self, tokens: Tensor, targets: Optional[Tensor] = None,
                capacity_factor: Optional[float] = None,
                groups: Optional[Sequence[Tuple[int, int]]] = None) -> TokenChoiceRouting:
        """As :meth:`SoftmaxTokenChoiceRouter.forward`: groups of equal size share one
        batched Sinkhorn solve; each group's plan balances its own tokens."""
        runs = self.group_runs(tokens.shape[0], groups)
        logits, noisy_logits, _ = self.gate_logits(tokens)

        def route(start, size, count):
            plan = sinkhorn_plan(noisy_logits[start:start + size * count].detach()
                                 .view(count, size, -1), self.num_iters)
            capacity = self.capacity(size, capacity_factor, self.top_k)
            expert_index, kept = top_k_assignment(plan, self.top_k, capacity)
            return (plan.flatten(0, 1), expert_index.flatten(0, 1),
                    None if kept is None else kept.flatten(0, 1))

        solved = [route(*run) for run in runs]
        kept = None if solved[0][2] is None else torch.cat([k for _, _, k in solved])
        routing = sparse_from_token_choice(logits, torch.cat([i for _, i, _ in solved]), kept,
                                           logits.float().softmax(-1))
        routing.info['plan'] = torch.cat([p for p, _, _ in solved])
        if self.use_z_loss:
            routing.aux_losses['z'] = mean_over_groups(runs, [
                z_loss(logits[start:start + size * count]) for start, size, count in runs])
        return routing
