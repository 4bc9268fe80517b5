"""Routers against the reference implementation's conventions (google-research/vmoe, OTT).

One test group per point of the router-fidelity issue: Sinkhorn update order, importance
loss on the clean softmax, top-k capacity, reference defaults, ties, batch independence.
"""
import math

import pytest
import torch

from damex.models.moe import MoEFFN, compute_capacity
from damex.models.moe.losses import importance_loss
from damex.models.moe.op_count import count_top_level_ops
from damex.models.moe.optimal_transport import sinkhorn_plan, sparsity_constrained_plan
from damex.models.moe.routing import (group_slices, sparse_from_expert_choice, stable_topk,
                                      top_k_assignment)

D, H = 16, 32
SPARSE_ROUTERS = ['SoftmaxTokenChoiceRouter', 'DatasetAwareRouter', 'SinkhornTokenChoiceRouter',
                  'SoftmaxExpertChoiceRouter', 'SinkhornExpertChoiceRouter',
                  'SparsityConstrainedExpertChoiceRouter']
#: routers whose choice for a token depends on the other tokens of its group
CROSS_TOKEN_ROUTERS = ['SinkhornTokenChoiceRouter', 'SoftmaxExpertChoiceRouter',
                       'SinkhornExpertChoiceRouter', 'SparsityConstrainedExpertChoiceRouter']


# 1. Sinkhorn: columns first, rows last (OTT's order) --------------------------------------

def test_sinkhorn_3x2_plan_after_one_and_two_iterations():
    # K = exp(scores) = [[1, 2], [3, 1], [1, 1]]; rows sum to 1, columns to T/E = 1.5.
    # Iteration 1: u = 1. v = 1.5 / (K^T u) = 1.5 / [5, 4] = [3/10, 3/8];
    #   K v = [3/10 + 3/4, 9/10 + 3/8, 3/10 + 3/8] = [21/20, 51/40, 27/40], u = 1 / K v.
    #   plan = u K v: row 0 = [3/10, 3/4] / (21/20) = [2/7, 5/7]; row 1 = [9/10, 3/8] /
    #   (51/40) = [12/17, 5/17]; row 2 = [3/10, 3/8] / (27/40) = [4/9, 5/9].
    #   Rows sum to 1 exactly; columns 1.436 / 1.564.
    # Iteration 2: K^T u = [20/21 + 3*40/51 + 40/27, 2*20/21 + 40/51 + 40/27], so
    #   v = [9639/30760, 9639/26800] and v0 : v1 = 670 : 769. Rows normalise K_i * v:
    #   row 0 = [670, 2*769] / 2208 = [335/1104, 769/1104]; row 1 = [3*670, 769] / 2779 =
    #   [2010/2779, 769/2779]; row 2 = [670, 769] / 1439. Columns 1.4923 / 1.5077.
    scores = torch.tensor([[1.0, 2.0], [3.0, 1.0], [1.0, 1.0]], dtype=torch.float64).log()
    one = torch.tensor([[2 / 7, 5 / 7], [12 / 17, 5 / 17], [4 / 9, 5 / 9]], dtype=torch.float64)
    two = torch.tensor([[335 / 1104, 769 / 1104], [2010 / 2779, 769 / 2779],
                        [670 / 1439, 769 / 1439]], dtype=torch.float64)
    for iters, expected in ((1, one), (2, two)):
        plan = sinkhorn_plan(scores, num_iters=iters)
        torch.testing.assert_close(plan, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(plan.sum(1), torch.ones(3, dtype=torch.float64),
                                   rtol=0, atol=1e-12)


def test_sinkhorn_rows_exact_columns_converge():
    torch.manual_seed(0)
    logits = torch.randn(64, 4) * 4  # sharp logits, where the update order matters most
    plan = sinkhorn_plan(logits, num_iters=20)
    torch.testing.assert_close(plan.sum(1), torch.ones(64), rtol=0, atol=1e-5)
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 16.0), rtol=0, atol=0.5)
    converged = sinkhorn_plan(logits.double(), num_iters=2000)
    torch.testing.assert_close(converged.sum(0), torch.full((4,), 16.0, dtype=torch.float64))


# 2. Importance loss on the clean softmax, in training too ---------------------------------

def test_importance_loss_in_eval_uses_the_clean_softmax():
    torch.manual_seed(0)
    layer = MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=4,
                   router=dict(type='SoftmaxTokenChoiceRouter', noise_std=8.0)).eval()
    layer(torch.randn(1, 30, D))
    clean = layer.last_routing.logits.reshape(-1, 4).softmax(-1)
    torch.testing.assert_close(layer.aux_losses['importance'], importance_loss(clean))


def test_importance_loss_in_training_uses_the_clean_softmax():
    torch.manual_seed(1)
    layer = MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=4,
                   router=dict(type='SoftmaxTokenChoiceRouter', noise_std=8.0)).train()
    captured = {}
    router_forward = layer.router.gate_logits

    def recording(tokens):
        captured['out'] = router_forward(tokens)
        return captured['out']

    layer.router.gate_logits = recording
    layer(torch.randn(1, 30, D))
    logits, noisy, _ = captured['out']
    assert not torch.allclose(noisy, logits)
    torch.testing.assert_close(layer.aux_losses['importance'], importance_loss(logits.softmax(-1)))
    assert abs(importance_loss(noisy.softmax(-1)) - layer.aux_losses['importance']) > 1e-4


# 3. Capacity: ceil(T * K * cf / E), rounded up to capacity_multiple_of -------------------

def test_top_k_capacity():
    assert compute_capacity(16, 4, 1.0, top_k=2) == 8
    assert compute_capacity(16, 4, 1.0, top_k=2, multiple_of=4) == 8
    assert compute_capacity(16, 4, 1.25, top_k=2) == 10
    assert compute_capacity(16, 4, 1.25, top_k=2, multiple_of=4) == 12
    assert compute_capacity(10, 4, 1.0) == 3  # expert choice: ceil(T * cf / E)
    assert compute_capacity(10, 4, 1.0, multiple_of=4) == 4
    with pytest.raises(ValueError, match='capacity_multiple_of'):
        compute_capacity(10, 4, 1.0, multiple_of=0)


def test_top2_balanced_tokens_keep_their_second_choices():
    """With T*K*cf/E slots, perfectly balanced top-2 choices are all kept at cf 1.0."""
    scores = torch.tensor([[0.5, 0.4, 0.1, 0.0], [0.1, 0.5, 0.4, 0.0],
                           [0.0, 0.1, 0.5, 0.4], [0.4, 0.0, 0.1, 0.5]] * 4)
    capacity = compute_capacity(16, 4, 1.0, top_k=2)
    _, kept = top_k_assignment(scores, 2, capacity)
    assert kept.all()
    _, kept_old = top_k_assignment(scores, 2, math.ceil(16 * 1.0 / 4))  # the old capacity
    assert kept_old[:, 1].sum() == 0  # every second choice used to be dropped


@pytest.mark.parametrize('router', SPARSE_ROUTERS)
def test_layer_passes_capacity_multiple_of_to_router(router):
    layer = MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=4,
                   router=dict(type=router), capacity_factor=0.5, capacity_multiple_of=4).eval()
    assert layer.router.capacity_multiple_of == 4
    layer(torch.randn(1, 10, D), routing_targets=torch.tensor([0]))
    per_expert = layer.last_routing.dispatch_mask.reshape(-1, 4).sum(0)
    assert per_expert.max() <= 4  # ceil(10 * 0.5 / 4) = 2 -> 4
    if router in CROSS_TOKEN_ROUTERS[1:]:  # expert choice fills every slot
        assert per_expert.tolist() == [4, 4, 4, 4]


# 4. Defaults as the reference --------------------------------------------------------------

def test_softmax_expert_choice_adds_gate_noise_in_training_by_default():
    torch.manual_seed(0)
    layer = MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=4,
                   router=dict(type='SoftmaxExpertChoiceRouter'))
    assert layer.router.noise_std == 1.0  # std 1/E, as vmoe
    x = torch.randn(1, 64, D) * 0.01  # nearly equal gates: noise decides
    layer.train()
    picks = [layer(x) is not None and layer.last_routing.expert_tokens.clone()
             for _ in range(2)]
    assert not torch.equal(picks[0], picks[1])
    layer.eval()
    picks = [layer(x) is not None and layer.last_routing.expert_tokens.clone()
             for _ in range(2)]
    assert torch.equal(picks[0], picks[1])


def test_sparsity_constrained_router_never_adds_noise():
    with pytest.raises(ValueError, match='adds no gate noise'):
        MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=4,
               router=dict(type='SparsityConstrainedExpertChoiceRouter', noise_std=1.0))
    layer = MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=4,
                   router=dict(type='SparsityConstrainedExpertChoiceRouter')).train()
    x = torch.randn(1, 32, D) * 0.01
    layer(x)
    first = layer.last_routing.expert_tokens.clone()
    layer(x)
    assert torch.equal(first, layer.last_routing.expert_tokens)


# 5. Ties go to the lower index -------------------------------------------------------------

def test_stable_topk_breaks_ties_by_lower_index():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.5, 0.2], [0.3, 0.3, 0.3, 0.3, 0.3]])
    assert stable_topk(scores, 2).tolist() == [[1, 2], [0, 1]]
    assert stable_topk(scores, 1).tolist() == [[1], [0]]
    # the same on a long row, where torch.topk's order is not specified
    long_row = torch.zeros(1, 5000)
    assert stable_topk(long_row, 7).tolist() == [list(range(7))]


def test_expert_choice_tie_resolved_to_lower_token_index():
    # a plan column with fewer non-zeros than C = 3: expert 0 takes token 2, then the zero
    # scores of tokens 0 and 1 (lower index first), never token 3 or 4
    plan = torch.tensor([[0.0, 0.2], [0.0, 0.2], [1.0, 0.2], [0.0, 0.2], [0.0, 0.2]])
    routing = sparse_from_expert_choice(plan, plan, 3, plan)
    assert routing.info['expert_tokens'].tolist() == [[2, 0, 1], [0, 1, 2]]


def test_token_choice_tie_resolved_to_lower_expert_index():
    layer = MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=4,
                   router=dict(type='SoftmaxTokenChoiceRouter', top_k=2)).eval()
    torch.nn.init.zeros_(layer.router.gate.weight)  # all gates equal
    layer(torch.randn(1, 5, D))
    assert layer.last_routing.expert_index.reshape(-1, 2).tolist() == [[0, 1]] * 5


# 6. Batch independence ---------------------------------------------------------------------

def make_layer(router, **kwargs):
    torch.manual_seed(0)
    cfg = dict(type=router)
    if router == 'SoftMoERouter':
        cfg.update(tokens_per_group=8)
    return MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=4, router=cfg,
                  **kwargs).eval()


@pytest.mark.parametrize('capacity_factor', [None, 0.75])
@pytest.mark.parametrize('router', SPARSE_ROUTERS + ['SoftMoERouter'])
def test_image_result_does_not_depend_on_batch_mates(router, capacity_factor):
    layer = make_layer(router, capacity_factor=capacity_factor)
    assert layer.group_size == 'image'
    torch.manual_seed(1)
    x = torch.randn(3, 24, D) + torch.randn(3, 1, D)  # images that look different
    batched = layer(x)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('router', CROSS_TOKEN_ROUTERS)
def test_batch_grouping_mixes_images_for_cross_token_routers(router):
    layer = make_layer(router, group_size='batch')
    torch.manual_seed(1)
    x = torch.randn(3, 24, D) + 2 * torch.randn(3, 1, D)
    batched = layer(x)
    alone = torch.cat([layer(x[i:i + 1]) for i in range(3)])
    assert (batched - alone).abs().max() > 1e-3


def test_capacity_is_per_group():
    layer = make_layer('DatasetAwareRouter', capacity_factor=0.5)
    x = torch.randn(2, 16, D) + 3 * torch.randn(D)  # every token wants the same expert
    layer(x)
    mask = layer.last_routing.dispatch_mask  # (B, N, E)
    assert mask.sum(1).max() <= compute_capacity(16, 4, 0.5)  # per image
    layer.group_size = 'batch'
    layer(x)
    assert layer.last_routing.dispatch_mask.sum((0, 1)).max() <= compute_capacity(32, 4, 0.5)


def test_group_slices():
    assert group_slices(2, 3, 'image') == [(0, 3), (3, 6)]
    assert group_slices(2, 3, 'batch') == [(0, 6)]
    assert group_slices(2, 3, 4) == [(0, 4), (4, 6)]
    for bad in ('images', 0, -2, 1.5, True):
        with pytest.raises(ValueError, match='group_size'):
            group_slices(2, 3, bad)
    with pytest.raises(ValueError, match='group_size'):
        MoEFFN(embed_dims=D, feedforward_channels=H, group_size='tokens')


def test_losses_average_over_groups():
    layer = make_layer('SoftmaxTokenChoiceRouter').train()
    layer.router.noise_std = 0.0
    x = torch.randn(2, 10, D)
    layer(x)
    logits = layer.last_routing.logits
    expected = torch.stack([importance_loss(logits[b].softmax(-1)) for b in range(2)]).mean()
    torch.testing.assert_close(layer.aux_losses['importance'], expected)


def test_ot_solvers_batched_over_groups_equal_one_solve_per_group():
    torch.manual_seed(2)
    scores = 3 * torch.randn(3, 20, 4)
    batched = sinkhorn_plan(scores, num_iters=7)
    for g in range(3):
        torch.testing.assert_close(batched[g], sinkhorn_plan(scores[g], num_iters=7))
    similarity = scores.softmax(-1)
    batched = sparsity_constrained_plan(similarity, k=5)
    for g in range(3):
        torch.testing.assert_close(batched[g], sparsity_constrained_plan(similarity[g], k=5))


@pytest.mark.parametrize('router', ['SoftmaxExpertChoiceRouter', 'SinkhornExpertChoiceRouter',
                                    'SparsityConstrainedExpertChoiceRouter'])
def test_expert_choice_ragged_groups_equal_routing_each_group_alone(router):
    # group_size=10 over 2 x 12 tokens: groups of 10, 10 and a shorter last group of 4,
    # ranked in two batched passes; each must equal the router run on its group alone
    layer = make_layer(router, group_size=10, capacity_factor=1.0)
    layer.router.use_z_loss = True
    torch.manual_seed(3)
    x = torch.randn(2, 12, D)
    out = layer(x)
    tokens = x.reshape(-1, D)
    expected_out, z_losses, slots = [], [], []
    for start, stop in group_slices(2, 12, 10):
        alone = layer(tokens[start:stop][None])
        expected_out.append(alone[0])
        z_losses.append(layer.aux_losses['z'])
        slots.append(layer.last_routing.expert_tokens + start)
    torch.testing.assert_close(out.reshape(-1, D), torch.cat(expected_out))
    layer(x)
    assert layer.last_routing.expert_tokens.tolist() == torch.cat(slots, dim=1).tolist()
    torch.testing.assert_close(layer.aux_losses['z'], torch.stack(z_losses).mean())


def test_forced_routing_with_soft_moe_is_an_error():
    layer = make_layer('SoftMoERouter').train()
    layer.force_targets = True
    with pytest.raises(ValueError, match='Soft MoE'):
        layer(torch.randn(2, 8, D), routing_targets=torch.tensor([0, 1]))


@pytest.mark.parametrize('router, extra', [
    ('SoftmaxTokenChoiceRouter', dict(top_k=2, use_switch_loss=True, use_z_loss=True,
                                      batch_prioritized=True)),
    ('DatasetAwareRouter', dict(use_balance_loss=True, use_z_loss=True)),
    ('SinkhornTokenChoiceRouter', dict(top_k=2, use_z_loss=True))])
def test_token_choice_ragged_groups_equal_routing_each_group_alone(router, extra):
    """One batched call over groups of 10, 10 and 4 tokens equals one call per group:
    expert index, gates, kept mask (capacity per group) and every aux loss (averaged)."""
    from damex.models.moe.routers.token_choice import (DatasetAwareRouter,
                                                       SinkhornTokenChoiceRouter,
                                                       SoftmaxTokenChoiceRouter)
    cls = dict(SoftmaxTokenChoiceRouter=SoftmaxTokenChoiceRouter,
               DatasetAwareRouter=DatasetAwareRouter,
               SinkhornTokenChoiceRouter=SinkhornTokenChoiceRouter)[router]
    torch.manual_seed(4)
    module = cls(D, 4, noise_std=0.0, **extra).train()  # noise off: both calls see the same gates
    tokens = torch.randn(24, D)
    targets = torch.randint(0, 4, (24, ))
    slices = group_slices(2, 12, 10)
    assert [stop - start for start, stop in slices] == [10, 10, 4]
    batched = module(tokens, targets, 1.0, groups=slices)
    alone = [module(tokens[start:stop], targets[start:stop], 1.0) for start, stop in slices]
    for key in ('expert_index', 'gates'):
        torch.testing.assert_close(batched.info[key], torch.cat([a.info[key] for a in alone]))
    assert (batched.info['expert_index'] == -1).any()  # the capacity dropped some choices
    assert batched.token_index.tolist() == torch.cat(
        [a.token_index + start for a, (start, _) in zip(alone, slices)]).tolist()
    assert set(batched.aux_losses) == set(alone[0].aux_losses) and batched.aux_losses
    for key, value in batched.aux_losses.items():
        torch.testing.assert_close(value, torch.stack([a.aux_losses[key] for a in alone]).mean(),
                                   msg=key)


@pytest.mark.parametrize('router', ['SoftmaxTokenChoiceRouter', 'DatasetAwareRouter',
                                    'SinkhornTokenChoiceRouter', 'SoftmaxExpertChoiceRouter',
                                    'SinkhornExpertChoiceRouter',
                                    'SparsityConstrainedExpertChoiceRouter'])
def test_op_count_does_not_grow_with_images_or_experts(router):
    """One router call per layer and grouped-GEMM experts: as many ops for 8 images as for
    2, and for 16 experts as for 4 (per-image routing groups, training mode)."""
    def ops(images, experts):
        torch.manual_seed(0)
        torch.manual_seed(0)
        cfg = dict(type=router)
        layer = MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=experts,
                       router=cfg).train()
        x = torch.randn(images, 32, D, requires_grad=True)
        targets = torch.arange(images) % experts
        return count_top_level_ops(lambda: layer(x, routing_targets=targets).sum().backward())

    assert abs(ops(8, 4) - ops(2, 4)) <= 2
    assert abs(ops(2, 16) - ops(2, 4)) <= 2
