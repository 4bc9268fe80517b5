"""The experts of an MoE layer: E two-layer FFNs stored as stacked tensors.

Weights keep ``nn.Linear``'s (out, in) layout per expert, so that expert e computes
exactly what an mmcv ``FFN`` with the same weights computes, and a dense FFN can be
copied into every expert (upcycling) without transposes.
"""
import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmcv.cnn import build_activation_layer


class StackedExperts(nn.Module):
    """E experts ``fc2(drop(act(fc1(x))))`` with weights (E, H, D), (E, D, H).

    Args:
        num_experts: E.
        embed_dims: D.
        feedforward_channels: H.
        act_cfg: activation, as mmcv's FFN.
        ffn_drop: dropout after the activation and after fc2, as mmcv's FFN.
    """

    def __init__(self, num_experts: int, embed_dims: int, feedforward_channels: int,
                 act_cfg: dict = dict(type='ReLU', inplace=True), ffn_drop: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, feedforward_channels, embed_dims))
        self.fc1_bias = nn.Parameter(torch.empty(num_experts, feedforward_channels))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, embed_dims, feedforward_channels))
        self.fc2_bias = nn.Parameter(torch.empty(num_experts, embed_dims))
        self.activate = build_activation_layer(act_cfg)
        self.drop = nn.Dropout(ffn_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per expert, the default init of ``nn.Linear`` (what mmcv's FFN gets)."""
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(weight[e], a=math.sqrt(5))
            nn.init.uniform_(bias, -bound, bound)

    def xavier_init_(self) -> None:
        """Per expert, the xavier-uniform init DINO gives its dense FFN weights.

        DINO.init_weights applies xavier to every parameter with dim > 1, which on a
        stacked (E, out, in) tensor uses the wrong fans; the detector calls this after it.
        """
        for weight in (self.fc1_weight, self.fc2_weight):
            for e in range(self.num_experts):
                nn.init.xavier_uniform_(weight[e])

    def expert(self, index: int, x: Tensor) -> Tensor:
        """Expert ``index`` on tokens x (..., D)."""
        hidden = self.drop(self.activate(F.linear(x, self.fc1_weight[index], self.fc1_bias[index])))
        return self.drop(F.linear(hidden, self.fc2_weight[index], self.fc2_bias[index]))

    def forward_sorted(self, x: Tensor, counts: List[int], weight: Tensor) -> Tensor:
        """``weight * expert(x)`` for tokens sorted by expert, ``counts[e]`` for expert e.

        One GEMM pair per expert. Without dropout in training this runs as one autograd
        function that keeps only the inputs and the pre-activations for backward (not the
        expert outputs), so an MoE layer stores about what a dense FFN stores.
        """
        if self.training and self.drop.p > 0:
            out = torch.cat([self.expert(e, chunk) for e, chunk in enumerate(x.split(counts))])
            return out * weight.to(out.dtype)[:, None]
        return _WeightedExperts.apply(x, weight.to(x.dtype), self.fc1_weight, self.fc1_bias,
                                      self.fc2_weight, self.fc2_bias, counts, self.activate)

    def forward_batched(self, x: Tensor) -> Tensor:
        """x: (E, C, D), one row of slots per expert -> (E, C, D) with batched GEMMs."""
        hidden = torch.baddbmm(self.fc1_bias[:, None], x, self.fc1_weight.transpose(1, 2))
        hidden = self.drop(self.activate(hidden))
        return self.drop(torch.baddbmm(self.fc2_bias[:, None], hidden,
                                       self.fc2_weight.transpose(1, 2)))

    def extra_repr(self) -> str:
        e, h, d = self.fc1_weight.shape
        return f'num_experts={e}, embed_dims={d}, feedforward_channels={h}'


class _WeightedExperts(torch.autograd.Function):
    """y = w * fc2(act(fc1(x))) per expert slice, with a hand-written backward.

    Saves x and the pre-activation z1 only. The gradient of the combine weight,
    <g_y, fc2(h)> = <g_y W2, h> + <g_y, b2>, reuses g_y W2, which the gradient of h needs
    anyway, so the expert output need not be kept.
    """

    @staticmethod
    def forward(ctx, x, weight, w1, b1, w2, b2, counts, activate):
        outputs, pre_activations = [], []
        for e, chunk in enumerate(x.split(counts)):
            z1 = F.linear(chunk, w1[e], b1[e])
            pre_activations.append(z1)
            outputs.append(F.linear(activate(z1.clone()), w2[e], b2[e]))
        out = torch.cat(outputs) * weight[:, None]
        ctx.save_for_backward(x, weight, w1, b2, w2, torch.cat(pre_activations))
        ctx.counts, ctx.activate = counts, activate
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, w1, b2, w2, z1 = ctx.saved_tensors
        counts = ctx.counts
        grads = dict(x=[], weight=[], w1=[], b1=[], w2=[], b2=[])
        slices = zip(x.split(counts), weight.split(counts), z1.split(counts),
                     grad_out.split(counts))
        for e, (x_e, w_e, z_e, g_e) in enumerate(slices):
            with torch.enable_grad():
                z = z_e.detach().requires_grad_(True)
                h = ctx.activate(z * 1.0)
            g_w2h = g_e @ w2[e]  # (A_e, H): g_y W2
            grads['weight'].append((g_w2h * h.detach()).sum(-1) + g_e @ b2[e])
            g_pre2 = g_e * w_e[:, None]
            grads['w2'].append(g_pre2.t() @ h.detach())
            grads['b2'].append(g_pre2.sum(0))
            g_z1, = torch.autograd.grad(h, z, g_w2h * w_e[:, None])
            grads['w1'].append(g_z1.t() @ x_e)
            grads['b1'].append(g_z1.sum(0))
            grads['x'].append(g_z1 @ w1[e])
        return (torch.cat(grads['x']), torch.cat(grads['weight']), torch.stack(grads['w1']),
                torch.stack(grads['b1']), torch.stack(grads['w2']), torch.stack(grads['b2']),
                None, None)
