"""Routers against hand-computed values and their reference algorithms."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from damex.models.moe import MoEFFN
from damex.models.moe.losses import (damex_loss, importance_loss, load_loss, switch_loss,
                                     z_loss)
from damex.models.moe.optimal_transport import (project_k_sparse_simplex, sinkhorn_plan,
                                                sparsity_constrained_plan)
from damex.models.moe.routing import top_k_assignment

GATES = torch.tensor([[0.7, 0.2, 0.1],
                      [0.6, 0.3, 0.1],
                      [0.1, 0.1, 0.8],
                      [0.3, 0.4, 0.3]])


def test_importance_loss_by_hand():
    # sums per expert: [1.7, 1.0, 1.3]; mean 4/3; population var = ((0.3667)^2 +
    # (0.3333)^2 + (0.0333)^2) / 3 = 0.082222; CV^2 = 0.082222 / (16/9) = 0.04625
    assert importance_loss(GATES).item() == pytest.approx(0.04625, rel=1e-4)


def test_switch_loss_by_hand():
    # first choices: e0, e0, e2, e1 -> f = [0.5, 0.25, 0.25]; P = [0.425, 0.25, 0.325]
    # 3 * (0.2125 + 0.0625 + 0.08125) = 1.06875
    assert switch_loss(GATES).item() == pytest.approx(1.06875, rel=1e-5)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2, log 4 -> mean of squares = (log2^2 + log4^2) / 2 = 2.5 * log2^2
    assert z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-6)


def test_load_loss_by_hand():
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    noisy = torch.tensor([[1.2, 0.1], [0.3, -0.2]])
    # top-1 threshold per token: 1.2 and 0.3; P(win) = 1 - Phi((thr - logit) / 0.5)
    phi = torch.distributions.Normal(0.0, 1.0).cdf
    p = torch.tensor([[1 - phi(torch.tensor(0.2 / 0.5)), 1 - phi(torch.tensor(1.2 / 0.5))],
                      [1 - phi(torch.tensor(0.3 / 0.5)), 1 - phi(torch.tensor(0.3 / 0.5))]])
    mean = p.mean(0)
    expected = mean.var(unbiased=False) / mean.mean() ** 2
    assert load_loss(logits, noisy, 0.5, 1).item() == pytest.approx(expected.item(), rel=1e-5)


def test_damex_loss_is_cross_entropy_to_targets():
    logits = torch.randn(10, 4)
    targets = torch.randint(0, 4, (10,))
    expected = -(logits.log_softmax(-1)[torch.arange(10), targets]).mean()
    assert damex_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_layer_damex_loss_uses_pre_noise_logits_and_image_targets():
    layer = MoEFFN(embed_dims=8, feedforward_channels=16, num_experts=3,
                   router=dict(type='DatasetAwareRouter', noise_std=5.0)).train()
    x = torch.randn(2, 4, 8)
    layer(x, routing_targets=torch.tensor([2, 0]))
    logits = layer.last_routing.logits.reshape(-1, 3)
    expected = F.cross_entropy(logits, torch.tensor([2] * 4 + [0] * 4))
    assert layer.aux_losses['damex'].item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(layer.aux_losses) == {'damex'}


def test_top_k_assignment_fills_first_choices_first_and_respects_priority():
    scores = torch.tensor([[0.5, 0.4, 0.1],
                           [0.6, 0.3, 0.1],
                           [0.9, 0.05, 0.05]])
    index, kept = top_k_assignment(scores, top_k=2, capacity=2)
    # expert 0: first choices of tokens 0, 1 fit, token 2's is dropped; second choices
    # (expert 1 for all) fill expert 1 with tokens 0, 1, then token 2 finds it full.
    assert index[:, 0].tolist() == [0, 0, 0]
    assert kept.tolist() == [[True, True], [True, True], [False, False]]
    _, kept = top_k_assignment(scores, top_k=1, capacity=2, priority=scores.max(-1).values)
    assert kept[:, 0].tolist() == [False, True, True]  # token 0 has the lowest priority


def test_sinkhorn_plan_meets_marginals():
    torch.manual_seed(0)
    logits = torch.randn(64, 4) * 3
    plan = sinkhorn_plan(logits, num_iters=20)
    torch.testing.assert_close(plan.sum(1), torch.ones(64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 16.0), rtol=0, atol=0.2)
    assert torch.all(plan >= 0)


def test_sinkhorn_plan_matches_plain_sinkhorn():
    torch.manual_seed(1)
    logits = torch.randn(12, 3, dtype=torch.float64)
    # textbook (non-log) Sinkhorn-Knopp on K = exp(logits), columns first as OTT
    kernel = logits.exp()
    u = torch.ones(12, dtype=torch.float64)
    for _ in range(20):
        v = 4.0 / (kernel.t() @ u)
        u = 1.0 / (kernel @ v)
    expected = u[:, None] * kernel * v[None, :]
    torch.testing.assert_close(sinkhorn_plan(logits, 20).double(), expected, rtol=1e-4, atol=1e-5)


def brute_force_k_sparse_projection(v, k):
    best, best_dist = None, float('inf')
    for support in itertools.combinations(range(len(v)), k):
        sub = v[list(support)]
        # projection of sub onto the simplex by sorting
        srt = torch.sort(sub, descending=True).values
        css = srt.cumsum(0) - 1
        rho = max(i for i in range(k) if srt[i] - css[i] / (i + 1) > 0)
        proj = (sub - css[rho] / (rho + 1)).clamp(min=0)
        full = torch.zeros_like(v)
        full[list(support)] = proj
        dist = (full - v).pow(2).sum().item()
        if dist < best_dist:
            best, best_dist = full, dist
    return best


def test_k_sparse_simplex_projection_matches_brute_force():
    torch.manual_seed(2)
    values = torch.randn(20, 6, dtype=torch.float64)
    for k in (1, 2, 3, 6):
        projected = project_k_sparse_simplex(values, k)
        for row, got in zip(values, projected):
            torch.testing.assert_close(got, brute_force_k_sparse_projection(row, k))


def test_k_sparse_projection_ties_keep_the_lower_index_and_batch():
    # rows with values tied across the k-th place: the lower index is kept, as the
    # reference's stable sort; leading dims are independent rows. Expected by hand: keep
    # the k entries, tau = (sum of the support - 1) / |support|, entries minus tau.
    values = torch.tensor([[[0.5, 0.2, 0.5, 0.5, 0.1], [0.3, 0.3, 0.3, 0.3, 0.3]],
                           [[0.0, 0.0, 0.0, 0.9, 0.0], [0.4, 0.1, 0.4, 0.2, 0.4]]],
                          dtype=torch.float64)
    third, thirtieth = 1 / 3, 1 / 30
    expected = {
        1: [[[1, 0, 0, 0, 0], [1, 0, 0, 0, 0]], [[0, 0, 0, 1, 0], [1, 0, 0, 0, 0]]],
        2: [[[0.5, 0, 0.5, 0, 0], [0.5, 0.5, 0, 0, 0]],
            [[0.05, 0, 0, 0.95, 0], [0.5, 0, 0.5, 0, 0]]],
        3: [[[third, 0, third, third, 0], [third, third, third, 0, 0]],
            [[thirtieth, thirtieth, 0, 0.9 + thirtieth, 0], [third, 0, third, 0, third]]],
    }
    for k, rows in expected.items():
        torch.testing.assert_close(project_k_sparse_simplex(values, k),
                                   torch.tensor(rows, dtype=torch.float64))


def test_sparsity_constrained_plan_marginals_and_sparsity():
    torch.manual_seed(3)
    sim = torch.randn(40, 4).softmax(-1)
    # Without the sparsity constraint the problem is convex: the semi-dual solver meets
    # the row marginals too.
    dense = sparsity_constrained_plan(sim, k=40, num_iters=2000, lr=0.05)
    torch.testing.assert_close(dense.sum(1), torch.ones(40), rtol=0, atol=0.03)
    torch.testing.assert_close(dense.sum(0), torch.full((4,), 10.0), rtol=1e-5, atol=1e-5)
    # k-sparse: columns exact with at most k non-zeros each (rows only approximately,
    # the constrained problem is not convex).
    plan = sparsity_constrained_plan(sim, k=12)
    assert torch.all((plan > 0).sum(0) <= 12) and torch.all(plan >= 0)
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 10.0), rtol=1e-5, atol=1e-5)


def test_expert_choice_experts_take_their_top_tokens():
    layer = MoEFFN(embed_dims=8, feedforward_channels=16, num_experts=2,
                   router=dict(type='SoftmaxExpertChoiceRouter'), capacity_factor=1.0).eval()
    layer(torch.randn(1, 10, 8))
    gates = layer.last_routing.logits.reshape(-1, 2).softmax(-1)
    for e in range(2):
        expected = set(gates[:, e].topk(5).indices.tolist())
        assert set(layer.last_routing.expert_tokens[e].tolist()) == expected
        torch.testing.assert_close(layer.last_routing.expert_gates[e],
                                   gates[layer.last_routing.expert_tokens[e], e])


def test_damex_router_learns_dataset_to_expert_map():
    """Trained with only the DAMEX loss, the router sends >= 95% of each dataset's tokens
    to its expert at inference, without dataset ids."""
    torch.manual_seed(0)
    dims, num_experts = 16, 4
    layer = MoEFFN(embed_dims=dims, feedforward_channels=32, num_experts=num_experts,
                   router=dict(type='DatasetAwareRouter'))
    centers = torch.randn(2, dims) * 2  # dataset 0 and dataset 1 look different
    expert_of = torch.tensor([3, 1])  # h(d): many-to-one maps are allowed, here 0->3, 1->1

    def batch(n_images=8):
        datasets = torch.randint(0, 2, (n_images,))
        x = centers[datasets][:, None, :] + torch.randn(n_images, 20, dims)
        return x, datasets

    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer.train()
    for _ in range(150):
        x, datasets = batch()
        layer(x, routing_targets=expert_of[datasets])
        optimizer.zero_grad()
        layer.aux_losses['damex'].backward()
        optimizer.step()
    layer.eval()
    x, datasets = batch(64)
    layer(x)
    chosen = layer.last_routing.expert_index[..., 0]
    for d in range(2):
        accuracy = (chosen[datasets == d] == expert_of[d]).float().mean().item()
        assert accuracy >= 0.95, (d, accuracy)


def aux_free_router(**kwargs):
    from damex.models.moe.routers.token_choice import SoftmaxTokenChoiceRouter
    torch.manual_seed(0)
    return SoftmaxTokenChoiceRouter(8, 4, noise_std=0.0, balance='aux_free', **kwargs)


def test_aux_free_bias_moves_towards_balance_and_is_fixed_in_eval():
    router = aux_free_router(bias_update_rate=0.05).train()
    assert not router.use_importance_loss and not router.use_load_loss
    tokens = torch.randn(64, 8) + 3 * router.gate.weight[0].detach()  # skewed to expert 0
    loads = []
    for _ in range(12):
        routing = router(tokens)
        loads.append(torch.bincount(routing.expert_index, minlength=4))
        assert routing.aux_losses == {}
    assert loads[0][0] == loads[0].max() and loads[0].max() > 2 * loads[0].float().mean()
    assert router.expert_bias[0] < 0 and (router.expert_bias[1:] > 0).any()
    assert loads[-1].max() < loads[0].max()  # more balanced than at the start
    # the combine weights stay the unbiased gates
    gates = router.gate_logits(tokens)[1].float().softmax(-1)
    torch.testing.assert_close(routing.combine_weight,
                               gates[routing.token_index, routing.expert_index])
    router.eval()
    bias = router.expert_bias.clone()
    router(tokens)
    assert torch.equal(router.expert_bias, bias)
    # a buffer: in the state dict, restored bit-exactly
    fresh = aux_free_router(bias_update_rate=0.05)
    fresh.load_state_dict(router.state_dict())
    assert torch.equal(fresh.expert_bias, bias)
    fresh.train()
    router.train()
    fresh(tokens)
    router(tokens)
    assert torch.equal(fresh.expert_bias, router.expert_bias)


def test_aux_free_losses_on_request_and_telemetry():
    from damex.models.moe.telemetry import routing_telemetry
    router = aux_free_router(use_importance_loss=True)
    assert set(router.train()(torch.randn(16, 8)).aux_losses) == {'importance'}
    layer = MoEFFN(embed_dims=8, feedforward_channels=16, num_experts=4,
                   router=dict(type='SoftmaxTokenChoiceRouter', balance='aux_free',
                               bias_update_rate=0.1)).train()
    layer(torch.randn(2, 6, 8))
    stats = routing_telemetry(layer.last_routing)
    bias = layer.router.expert_bias
    torch.testing.assert_close(stats['bias_spread'], bias.max() - bias.min())
    with pytest.raises(ValueError, match="balance must be 'aux_loss' or 'aux_free'"):
        MoEFFN(embed_dims=8, feedforward_channels=16, num_experts=4,
               router=dict(type='SoftmaxTokenChoiceRouter', balance='none'))
