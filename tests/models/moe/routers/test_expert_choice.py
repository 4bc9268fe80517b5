"""Expert-choice routers: top tokens per expert, reference noise defaults, ties, groups."""
import pytest
import torch

from damex.models.moe import MoEFFN
from damex.models.moe.routing import group_slices, sparse_from_expert_choice
from damex.testing import MOE_D as D, MOE_H as H, make_eval_layer


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



def test_expert_choice_tie_resolved_to_lower_token_index():
    # a plan column with fewer non-zeros than C = 3: expert 0 takes token 2, then the zero
    # scores of tokens 0 and 1 (lower index first), never token 3 or 4
    plan = torch.tensor([[0.0, 0.2], [0.0, 0.2], [1.0, 0.2], [0.0, 0.2], [0.0, 0.2]])
    routing = sparse_from_expert_choice(plan, plan, 3, plan)
    assert routing.info['expert_tokens'].tolist() == [[2, 0, 1], [0, 1, 2]]



@pytest.mark.parametrize('router', ['SoftmaxExpertChoiceRouter', 'SinkhornExpertChoiceRouter',
                                    'SparsityConstrainedExpertChoiceRouter'])
def test_expert_choice_ragged_groups_equal_routing_each_group_alone(router):
    # group_size=10 over 2 x 12 tokens: groups of 10, 10 and a shorter last group of 4,
    # ranked in two batched passes; each must equal the router run on its group alone
    layer = make_eval_layer(router, group_size=10, capacity_factor=1.0)
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
