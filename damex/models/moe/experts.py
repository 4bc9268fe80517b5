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

    def forward_sorted(self, tokens: Tensor, token_index: Tensor, counts: List[int],
                       weight: Tensor) -> Tensor:
        """``weight * expert(tokens[token_index])``, assignments sorted by expert.

        ``counts[e]`` assignments go to expert e; one GEMM pair per expert. Without dropout
        in training this runs as one autograd function (:class:`_WeightedExperts`) that
        stores about what a dense FFN stores and makes no extra passes over the hidden
        activations.
        """
        if self.training and self.drop.p > 0:
            x = tokens.index_select(0, token_index)
            out = torch.cat([self.expert(e, chunk) for e, chunk in enumerate(x.split(counts))])
            return out * weight.to(out.dtype)[:, None]
        return _WeightedExperts.apply(tokens, token_index, weight.to(tokens.dtype),
                                      self.fc1_weight, self.fc1_bias, self.fc2_weight,
                                      self.fc2_bias, counts, self.activate)

    def forward_batched(self, x: Tensor) -> Tensor:
        """x: (E, C, D), one row of slots per expert -> (E, C, D) with batched GEMMs."""
        hidden = torch.baddbmm(self.fc1_bias[:, None], x, self.fc1_weight.transpose(1, 2))
        hidden = self.drop(self.activate(hidden))
        return self.drop(torch.baddbmm(self.fc2_bias[:, None], hidden,
                                       self.fc2_weight.transpose(1, 2)))

    def extra_repr(self) -> str:
        e, h, d = self.fc1_weight.shape
        return f'num_experts={e}, embed_dims={d}, feedforward_channels={h}'


def compute_dtype(tokens: Tensor) -> torch.dtype:
    """The dtype ``nn.Linear`` would compute in here: autocast's when it is on."""
    device_type = tokens.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return tokens.dtype


class _WeightedExperts(torch.autograd.Function):
    """y = w * fc2(act(fc1(x))), x = tokens[token_index], per expert slice; hand backward.

    Mixed precision: under autocast the GEMMs run in autocast's dtype, exactly as
    ``nn.Linear`` would (inputs and weights cast per call, parameters stay float32 and
    get float32 gradients); the output has that dtype. Out-variant GEMMs are not
    autocast-eligible, so the casts are explicit.

    Time and memory as a dense FFN's. Kept for backward: the token index (the tokens
    themselves are kept by the router's gate anyway), one (A, H) activation (ReLU's output,
    from which its derivative follows; for other activations the pre-activation,
    re-activated in backward) and the unweighted expert output (A, D), from which the
    combine weight's gradient <g_y, fc2(h)> is a cheap (A, D) dot. The weight multiplies
    (A, D)-sized tensors only and GEMMs write into preallocated outputs, so no pass over
    (A, H) data is added to the dense FFN's.
    """

    @staticmethod
    def forward(ctx, tokens, token_index, weight, w1, b1, w2, b2, counts, activate):
        relu = isinstance(activate, nn.ReLU)
        dtype = compute_dtype(tokens)
        ctx.tokens_dtype = tokens.dtype
        if dtype != tokens.dtype or dtype != w1.dtype:  # autocast: cast per call, as nn.Linear
            tokens, weight = tokens.to(dtype), weight.to(dtype)
            w1, b1, w2, b2 = w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype)
        x = tokens.index_select(0, token_index)
        hidden = x.new_empty(x.shape[0], w1.shape[1])
        expert_out = x.new_empty(x.shape[0], w2.shape[1])
        for e, (x_e, z_e) in enumerate(zip(x.split(counts), hidden.split(counts))):
            if len(x_e):
                torch.addmm(b1[e], x_e, w1[e].t(), out=z_e)
        if relu:
            activated = hidden.relu_()
        else:
            activated = activate(hidden.clone() if getattr(activate, 'inplace', False) else hidden)
        for e, (h_e, y_e) in enumerate(zip(activated.split(counts), expert_out.split(counts))):
            if len(h_e):
                torch.addmm(b2[e], h_e, w2[e].t(), out=y_e)
        ctx.save_for_backward(tokens, token_index, weight, w1, w2, hidden, expert_out)
        ctx.counts, ctx.activate = counts, activate
        return expert_out * weight[:, None]

    @staticmethod
    def backward(ctx, grad_out):
        tokens, token_index, weight, w1, w2, saved, expert_out = ctx.saved_tensors
        counts, activate = ctx.counts, ctx.activate
        grad_out = grad_out.to(expert_out.dtype).contiguous()
        x = tokens.index_select(0, token_index)
        grad_weight = (grad_out * expert_out).sum(-1)
        scaled = grad_out * weight[:, None]  # gradient at fc2's output
        grad_w1, grad_w2 = torch.zeros_like(w1), torch.zeros_like(w2)
        grad_b1 = w1.new_zeros(w1.shape[:2])
        grad_b2 = w2.new_zeros(w2.shape[:2])
        grad_x = torch.empty_like(x)
        grad_hidden = x.new_empty(saved.shape)
        slices = zip(x.split(counts), saved.split(counts), scaled.split(counts),
                     grad_x.split(counts), grad_hidden.split(counts))
        for e, (x_e, s_e, g_e, gx_e, gh_e) in enumerate(slices):
            if not len(x_e):
                continue
            torch.mm(g_e, w2[e], out=gh_e)
            if isinstance(activate, nn.ReLU):
                h_e = s_e
                g_z = torch.ops.aten.threshold_backward(gh_e, h_e, 0)
            else:
                with torch.enable_grad():
                    z = s_e.detach().requires_grad_(True)
                    h = activate(z.clone())
                g_z, = torch.autograd.grad(h, z, gh_e)
                h_e = h.detach()
            torch.mm(g_e.t(), h_e, out=grad_w2[e])
            torch.sum(g_e, 0, out=grad_b2[e])
            torch.mm(g_z.t(), x_e, out=grad_w1[e])
            torch.sum(g_z, 0, out=grad_b1[e])
            torch.mm(g_z, w1[e], out=gx_e)
        grad_tokens = torch.zeros_like(tokens).index_add_(0, token_index, grad_x)
        # under autocast these are in the compute dtype; autograd casts them to the inputs'
        return (grad_tokens.to(ctx.tokens_dtype), None, grad_weight, grad_w1, grad_b1, grad_w2,
                grad_b2, None, None)
