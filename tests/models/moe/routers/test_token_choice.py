"""Token-choice routers: the DAMEX loss and router, aux-free balancing, ties, groups."""
import pytest
import torch
import torch.nn.functional as F

from damex.models.moe import MoEFFN
from damex.models.moe.routing import group_slices
from damex.testing import MOE_D as D, MOE_H as H


def test_layer_damex_loss_uses_pre_noise_logits_and_image_targets():
    layer = MoEFFN(embed_dims=8, feedforward_channels=16, num_experts=3,
                   router=dict(type='DatasetAwareRouter', noise_std=5.0)).train()
    x = torch.randn(2, 4, 8)
    layer(x, routing_targets=torch.tensor([2, 0]))
    logits = layer.last_routing.logits.reshape(-1, 3)
    expected = F.cross_entropy(logits, torch.tensor([2] * 4 + [0] * 4))
    assert layer.aux_losses['damex'].item() == pytest.approx(expected.item(), rel=1e-6)
    assert set(layer.aux_losses) == {'damex'}



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



def test_token_choice_tie_resolved_to_lower_expert_index():
    layer = MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=4,
                   router=dict(type='SoftmaxTokenChoiceRouter', top_k=2)).eval()
    torch.nn.init.zeros_(layer.router.gate.weight)  # all gates equal
    layer(torch.randn(1, 5, D))
    assert layer.last_routing.expert_index.reshape(-1, 2).tolist() == [[0, 1]] * 5



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
