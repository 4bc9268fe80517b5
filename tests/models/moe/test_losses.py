"""The auxiliary losses by hand, and which logits and groups they see (as vmoe)."""
import math

import pytest
import torch

from damex.models.moe import MoEFFN
from damex.models.moe.losses import damex_loss, importance_loss, load_loss, switch_loss, z_loss
from damex.testing import MOE_D as D, MOE_H as H, make_eval_layer


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



def test_losses_average_over_groups():
    layer = make_eval_layer('SoftmaxTokenChoiceRouter').train()
    layer.router.noise_std = 0.0
    x = torch.randn(2, 10, D)
    layer(x)
    logits = layer.last_routing.logits
    expected = torch.stack([importance_loss(logits[b].softmax(-1)) for b in range(2)]).mean()
    torch.testing.assert_close(layer.aux_losses['importance'], expected)
