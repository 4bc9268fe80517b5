"""MoE layer under autocast (issue #14.1): experts in autocast's dtype as nn.Linear would be,
routing and losses in float32. CPU bf16 GEMMs are slow on this machine: small sizes."""
import pytest
import torch
import torch.nn.functional as F
from mmcv.cnn.bricks.transformer import FFN

from damex.models.moe import MoEFFN, upcycle_from_ffn

D, H, E = 16, 32, 4
BF16 = dict(device_type='cpu', dtype=torch.bfloat16)
ROUTERS = ['SoftmaxTokenChoiceRouter', 'DatasetAwareRouter', 'SoftmaxExpertChoiceRouter',
           'SinkhornTokenChoiceRouter', 'SparsityConstrainedExpertChoiceRouter', 'SoftMoERouter']
#: tolerance of bf16 results against the bf16 reference: a few bf16 ulps of the values
TOL = dict(rtol=2e-2, atol=2e-2)


def make_layer(router, num_experts=E, **kwargs):
    torch.manual_seed(0)
    cfg = dict(type=router)
    if router == 'SoftMoERouter':
        cfg.update(tokens_per_group=8)
    return MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=num_experts, router=cfg,
                  **kwargs)


@pytest.mark.parametrize('router', ROUTERS)
@pytest.mark.parametrize('drop', [0.0, 0.1])
def test_expert_output_has_the_dense_ffn_dtype(router, drop):
    layer = make_layer(router, add_identity=False, ffn_drop=drop).train()
    dense = FFN(embed_dims=D, feedforward_channels=H, add_identity=False)
    x = torch.randn(2, 8, D)
    with torch.autocast(**BF16):
        out = layer(x, routing_targets=torch.tensor([0, 1]))
        ref = dense(x)
    assert ref.dtype == torch.bfloat16 and out.dtype == ref.dtype
    with torch.autocast(**BF16):  # the residual path: float32 + bf16, as the dense FFN
        assert make_layer(router)(x, routing_targets=torch.tensor([0, 1])).dtype == \
            FFN(embed_dims=D, feedforward_channels=H)(x).dtype
    assert make_layer(router, add_identity=False)(x, routing_targets=torch.tensor([0, 1])).dtype \
        == torch.float32  # outside autocast nothing changes


def reference_experts(layer, tokens, routing):
    """Per expert, F.linear under autocast on the tokens the routing sends there."""
    ex = layer.experts
    out = torch.zeros(tokens.shape, dtype=torch.bfloat16)
    for e in range(E):
        pick = routing.expert_index == e
        if not pick.any():
            continue
        index = routing.token_index[pick]
        with torch.autocast(**BF16):
            hidden = F.relu(F.linear(tokens[index], ex.fc1_weight[e], ex.fc1_bias[e]))
            y = F.linear(hidden, ex.fc2_weight[e], ex.fc2_bias[e])
            y = y * routing.combine_weight[pick].to(y.dtype)[:, None]
        out = out.index_put((index, ), y, accumulate=True)
    return out


@pytest.mark.parametrize('router', ['SoftmaxTokenChoiceRouter', 'SoftmaxExpertChoiceRouter'])
def test_forward_and_gradients_match_per_expert_linear_under_autocast(router):
    layer = make_layer(router, add_identity=False).train()
    captured = {}
    route = layer.route

    def recording(*args):
        captured['routing'] = route(*args)
        return captured['routing']

    layer.route = recording
    x1 = torch.randn(2, 12, D, requires_grad=True)
    torch.manual_seed(3)
    with torch.autocast(**BF16):
        out = layer(x1)
    routing = captured['routing']  # its combine weights carry the router's gradient path
    expected = reference_experts(layer, x1.reshape(-1, D), routing).view_as(out)
    torch.testing.assert_close(out, expected, **TOL)
    grad = torch.randn_like(out)
    params = [layer.experts.fc1_weight, layer.experts.fc2_weight, layer.experts.fc1_bias]
    got = torch.autograd.grad(out, [x1, *params], grad, retain_graph=True)
    want = torch.autograd.grad(expected, [x1, *params], grad)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype  # float32 for parameters and the float32 input
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * scale)
    assert layer.experts.fc1_weight.dtype == torch.float32


@pytest.mark.parametrize('router', ROUTERS)
def test_router_logits_and_losses_stay_float32(router):
    layer = make_layer(router).train()
    with torch.autocast(**BF16):
        layer(torch.randn(2, 8, D), routing_targets=torch.tensor([0, 1]))
    assert layer.last_routing.logits.dtype == torch.float32
    for name, value in layer.aux_losses.items():
        assert value.dtype == torch.float32, name


def test_upcycled_one_expert_under_autocast_equals_the_dense_ffn():
    layer = make_layer('SoftmaxTokenChoiceRouter', num_experts=1).eval()
    dense = FFN(embed_dims=D, feedforward_channels=H)
    upcycle_from_ffn(layer, dense)
    x = torch.randn(2, 8, D)
    with torch.autocast(**BF16):
        torch.testing.assert_close(layer(x), dense(x), **TOL)
