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

    def forward_sorted(self, x: Tensor, counts: List[int]) -> Tensor:
        """Tokens sorted by expert, ``counts[e]`` of them for expert e: one GEMM pair per expert."""
        return torch.cat([self.expert(e, chunk) for e, chunk in enumerate(x.split(counts))])

    def forward_batched(self, x: Tensor) -> Tensor:
        """x: (E, C, D), one row of slots per expert -> (E, C, D) with batched GEMMs."""
        hidden = torch.baddbmm(self.fc1_bias[:, None], x, self.fc1_weight.transpose(1, 2))
        hidden = self.drop(self.activate(hidden))
        return self.drop(torch.baddbmm(self.fc2_bias[:, None], hidden,
                                       self.fc2_weight.transpose(1, 2)))

    def extra_repr(self) -> str:
        e, h, d = self.fc1_weight.shape
        return f'num_experts={e}, embed_dims={d}, feedforward_channels={h}'
