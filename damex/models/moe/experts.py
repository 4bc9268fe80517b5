"""The experts of an MoE layer: E two-layer FFNs stored as stacked tensors.

Weights keep ``nn.Linear``'s (out, in) layout per expert, so that expert e computes
exactly what an mmcv ``FFN`` with the same weights computes, and a dense FFN can be
copied into every expert (upcycling) without transposes.
"""
import math
from dataclasses import dataclass

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
        #: grouped GEMMs get every expert's rows padded to a multiple of this (padding rows
        #: are computed and discarded): oneDNN runs aligned row counts ~20% faster in bf16
        self.row_bucket = 16
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

    def forward_sorted(self, tokens: Tensor, token_index: Tensor, expert_index: Tensor,
                       counts: Tensor, weight: Tensor) -> Tensor:
        """Per token, the sum of ``weight * expert(token)`` over its assignments: (T, D).

        Assignments are sorted by expert: ``token_index`` (A,) is each assignment's token,
        ``expert_index`` (A,) its expert (sorted), ``counts`` (E,) the
        assignments per expert, on the tokens' device. All experts run as one grouped GEMM
        pair (``torch.nn.functional.grouped_mm`` with device-side offsets: no host sync, and
        as many ops for 16 experts as for 4) where it accepts the shapes, else one GEMM pair
        per expert (:func:`grouped_gemm_ok` says which). The grouped GEMMs get each expert's
        rows padded to a multiple of ``row_bucket`` (aligned row counts, and fewer distinct
        GEMM shapes for oneDNN to build primitives for). Without dropout in training this
        runs as one autograd function (:class:`_WeightedExperts`) that stores about what a
        dense FFN stores and makes no extra passes over the hidden activations; it also
        adds the assignments into their tokens' rows (``index_add_``: 12x faster on a CPU
        than ``index_put_(accumulate=True)``, and autograd keeps nothing for it).
        """
        grouped = grouped_gemm_ok(tokens, self.fc1_weight) and token_index.numel() > 0
        if self.training and self.drop.p > 0:
            x = tokens.index_select(0, token_index)
            if grouped:
                out = self._grouped_autograd(x, expert_index, counts)
            else:
                out = torch.cat([self.expert(e, chunk)
                                 for e, chunk in enumerate(x.split(counts.tolist()))])
            out = out * weight.to(out.dtype)[:, None]
            # index_put(accumulate) keeps only the index for backward (index_add the source)
            return out.new_zeros(tokens.shape[0], out.shape[1]).index_put_(
                (token_index, ), out, accumulate=True)
        if grouped:
            layout = padded_layout(expert_index, counts, self.row_bucket)
            return _WeightedExperts.apply(tokens, token_index, layout, weight.to(tokens.dtype),
                                          self.fc1_weight, self.fc1_bias, self.fc2_weight,
                                          self.fc2_bias, self.activate)
        return _LoopedExperts.apply(tokens, token_index, weight.to(tokens.dtype),
                                    self.fc1_weight, self.fc1_bias, self.fc2_weight,
                                    self.fc2_bias, counts.tolist(), self.activate)

    def _grouped_autograd(self, x: Tensor, expert_index: Tensor, counts: Tensor) -> Tensor:
        """The experts with dropout, by autograd through grouped GEMMs."""
        dtype = compute_dtype(x)
        offs = counts.cumsum(0).to(torch.int32)
        w1, b1, w2, b2 = (p.to(dtype) for p in (self.fc1_weight, self.fc1_bias,
                                                 self.fc2_weight, self.fc2_bias))
        hidden = F.grouped_mm(x.to(dtype), w1.transpose(1, 2), offs=offs) + b1[expert_index]
        hidden = self.drop(self.activate(hidden))
        return self.drop(F.grouped_mm(hidden, w2.transpose(1, 2), offs=offs) + b2[expert_index])

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


def grouped_gemm_ok(tokens: Tensor, fc1_weight: Tensor) -> bool:
    """Whether ``grouped_mm`` takes these experts: it exists, the compute dtype is one it
    has kernels for (CPU: float32, bfloat16, float16; CUDA: bfloat16), and every row of
    the (A, D) and (A, H) operands is a multiple of 16 bytes (its stride rule). Otherwise
    (float64, float32 on CUDA, D or H not a multiple of 4) the experts run one GEMM pair
    each."""
    if not hasattr(F, 'grouped_mm'):
        return False
    dtype = compute_dtype(tokens)
    accepted = (torch.bfloat16, ) if tokens.device.type == 'cuda' else (
        torch.float32, torch.bfloat16, torch.float16)
    if dtype not in accepted:
        return False
    size = torch.empty((), dtype=dtype).element_size()
    hidden, embed = fc1_weight.shape[1:]
    return (hidden * size) % 16 == 0 and (embed * size) % 16 == 0


def _bias_pad(dtype: torch.dtype) -> int:
    """Columns appended to rows of this dtype: a ones column, padded to keep 16-byte rows."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def with_ones(x: Tensor) -> Tensor:
    """x (A, D) with a ones column (and zero padding): fc1's bias rides in its GEMM."""
    pad = x.new_zeros(x.shape[0], _bias_pad(x.dtype))
    pad[:, 0] = 1
    return torch.cat([x, pad], 1)


def with_bias(weight: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
    """(E, H, D) weights with their (E, H) biases as column D (and zero padding), in
    ``dtype``: one pass over the weights (the cast is the copy)."""
    experts, hidden, embed = weight.shape
    out = weight.new_empty(experts, hidden, embed + _bias_pad(dtype), dtype=dtype)
    out[..., :embed].copy_(weight)
    out[..., embed:].zero_()
    out[..., embed].copy_(bias)
    return out


@dataclass
class PaddedLayout:
    """Assignments sorted by expert, each expert's rows padded to a multiple of a bucket.

    ``rows`` (host-known: A + E * (bucket - 1)) rows in all, the last expert taking the
    slack so that every row is computed from a real token (padding reads token 0 and is
    discarded); ``positions`` (A,) the row of each assignment; ``offsets`` (E,) int32 ends
    of the experts' rows for ``grouped_mm``; ``row_expert`` (rows,) the expert of each row.
    """
    rows: int
    positions: Tensor
    offsets: Tensor
    row_expert: Tensor


def padded_layout(expert_index: Tensor, counts: Tensor, bucket: int) -> PaddedLayout:
    """The layout of sorted assignments (``expert_index`` sorted, ``counts`` per expert)."""
    num_experts = counts.shape[0]
    rows = expert_index.shape[0] + num_experts * (bucket - 1)
    padded = (counts + bucket - 1) // bucket * bucket
    padded[-1] += rows - padded.sum()
    starts = padded.cumsum(0) - padded
    real_starts = counts.cumsum(0) - counts
    positions = (torch.arange(expert_index.shape[0], device=counts.device)
                 - real_starts[expert_index] + starts[expert_index])
    row_expert = torch.repeat_interleave(torch.arange(num_experts, device=counts.device),
                                         padded, output_size=rows)
    return PaddedLayout(rows, positions, padded.cumsum(0).to(torch.int32), row_expert)


def _activation_grad(activate, saved: Tensor, grad_hidden: Tensor):
    """(gradient at the pre-activation, activation output) from what forward kept."""
    if isinstance(activate, nn.ReLU):
        return torch.ops.aten.threshold_backward(grad_hidden, saved, 0), saved
    with torch.enable_grad():
        z = saved.detach().requires_grad_(True)
        h = activate(z.clone())
    g_z, = torch.autograd.grad(h, z, grad_hidden)
    return g_z, h.detach()


def _activate_forward(activate, hidden: Tensor) -> Tensor:
    if isinstance(activate, nn.ReLU):
        return hidden.relu_()
    return activate(hidden.clone() if getattr(activate, 'inplace', False) else hidden)


def _cast_for_compute(tokens, weight, w1, b1, w2, b2):
    """Under autocast: the tokens and the stacked weights cast once, as ``nn.Linear``."""
    dtype = compute_dtype(tokens)
    if dtype == tokens.dtype and dtype == w1.dtype:
        return tokens, weight, w1, b1, w2, b2
    return tuple(t.to(dtype) for t in (tokens, weight, w1, b1, w2, b2))


class _WeightedExperts(torch.autograd.Function):
    """out[t] = sum of w * fc2(act(fc1(tokens[t]))) over t's assignments, all experts as
    grouped GEMMs.

    One ``grouped_mm`` per GEMM over the padded layout (:func:`padded_layout`), the expert
    boundaries as device offsets: no host sync, and as many ops for 16 experts as for 4.

    Mixed precision: under autocast the GEMMs run in autocast's dtype, exactly as
    ``nn.Linear`` would (inputs and the stacked weights cast once per call, parameters
    stay float32 and get float32 gradients); the output has that dtype. Grouped GEMMs are
    not autocast-eligible, so the casts are explicit.

    Time and memory as a dense FFN's. Kept for backward: the token index (the tokens
    themselves are kept by the router's gate anyway), one (rows, H) activation (ReLU's
    output, from which its derivative follows; for other activations the pre-activation,
    re-activated in backward) and the unweighted expert output (rows, D), from which the
    combine weight's gradient <g_y, fc2(h)> is a cheap (A, D) dot. fc1's bias rides in
    its GEMM as the weight of a ones column appended to x (K grows by 4 or 8 columns),
    fc2's bias is one (rows, D) gather-add, and the combine weight multiplies (A, D)
    tensors only: no pass over (rows, H) data is added to the dense FFN's. Padding rows
    get a zero output gradient, so they add nothing to any gradient.
    """

    @staticmethod
    def forward(ctx, tokens, token_index, layout, weight, w1, b1, w2, b2, activate):
        ctx.tokens_dtype = tokens.dtype
        w1b1 = with_bias(w1, b1, compute_dtype(tokens))  # (E, H, D + pad), cast once
        tokens, weight, w2, b2 = (t.to(w1b1.dtype) for t in (tokens, weight, w2, b2))
        row_token = token_index.new_zeros(layout.rows).index_copy_(0, layout.positions,
                                                                   token_index)
        x = tokens.index_select(0, row_token)
        hidden = F.grouped_mm(with_ones(x), w1b1.transpose(1, 2), offs=layout.offsets)
        activated = _activate_forward(activate, hidden)
        expert_out = F.grouped_mm(activated, w2.transpose(1, 2), offs=layout.offsets)
        expert_out.add_(b2[layout.row_expert])
        # fc1's weight for backward: the parameter itself when nothing was cast (no copy kept)
        w1 = w1 if w1.dtype == w1b1.dtype else w1b1[..., :w1.shape[2]]
        ctx.save_for_backward(tokens, token_index, row_token, weight, w1, w2, hidden,
                              expert_out)
        ctx.layout, ctx.activate = layout, activate
        weighted = expert_out.index_select(0, layout.positions).mul_(weight[:, None])
        return expert_out.new_zeros(tokens.shape).index_add_(0, token_index, weighted)

    @staticmethod
    def backward(ctx, grad_tokens_out):
        tokens, token_index, row_token, weight, w1, w2, saved, expert_out = ctx.saved_tensors
        layout, offs = ctx.layout, ctx.layout.offsets
        embed = w1.shape[2]
        # each assignment's share of its token's output gradient
        grad_out = grad_tokens_out.to(expert_out.dtype).index_select(0, token_index)
        x = tokens.index_select(0, row_token)
        grad_weight = (grad_out * expert_out.index_select(0, layout.positions)).sum(-1)
        # gradient at fc2's output, zero on padding rows
        scaled = expert_out.new_zeros(expert_out.shape).index_copy_(
            0, layout.positions, grad_out * weight[:, None])
        grad_hidden = F.grouped_mm(scaled, w2, offs=offs)
        g_z, h = _activation_grad(ctx.activate, saved, grad_hidden)
        grad_w2 = F.grouped_mm(scaled.t(), h, offs=offs)
        # fc1's bias is the weight of x's ones column: its gradient comes with fc1's
        grad_w1b1 = F.grouped_mm(g_z.t(), with_ones(x), offs=offs)
        grad_w1, grad_b1 = grad_w1b1[..., :embed], grad_w1b1[..., embed]
        grad_x = F.grouped_mm(g_z, w1, offs=offs)
        grad_b2 = w2.new_zeros(w2.shape[:2]).index_add_(0, layout.row_expert, scaled)
        grad_tokens = torch.zeros_like(tokens).index_add_(0, row_token, grad_x)
        # under autocast these are in the compute dtype; autograd casts them to the inputs'
        return (grad_tokens.to(ctx.tokens_dtype), None, None, grad_weight, grad_w1, grad_b1,
                grad_w2, grad_b2, None)


class _LoopedExperts(torch.autograd.Function):
    """:class:`_WeightedExperts` with one GEMM pair per expert slice (what ``grouped_mm``
    refuses: float64, float32 on CUDA, rows not 16-byte multiples); ``counts`` is a list,
    so the split sizes were read back to the host. GEMMs write into preallocated outputs."""

    @staticmethod
    def forward(ctx, tokens, token_index, weight, w1, b1, w2, b2, counts, activate):
        ctx.tokens_dtype = tokens.dtype
        tokens, weight, w1, b1, w2, b2 = _cast_for_compute(tokens, weight, w1, b1, w2, b2)
        x = tokens.index_select(0, token_index)
        hidden = x.new_empty(x.shape[0], w1.shape[1])
        for e, (x_e, z_e) in enumerate(zip(x.split(counts), hidden.split(counts))):
            if len(x_e):
                torch.addmm(b1[e], x_e, w1[e].t(), out=z_e)
        activated = _activate_forward(activate, hidden)
        expert_out = x.new_empty(x.shape[0], w2.shape[1])
        for e, (h_e, y_e) in enumerate(zip(activated.split(counts), expert_out.split(counts))):
            if len(h_e):
                torch.addmm(b2[e], h_e, w2[e].t(), out=y_e)
        ctx.save_for_backward(tokens, token_index, weight, w1, w2, hidden, expert_out)
        ctx.counts, ctx.activate = counts, activate
        return expert_out.new_zeros(tokens.shape).index_add_(0, token_index,
                                                             expert_out * weight[:, None])

    @staticmethod
    def backward(ctx, grad_tokens_out):
        tokens, token_index, weight, w1, w2, saved, expert_out = ctx.saved_tensors
        counts = ctx.counts
        grad_out = grad_tokens_out.to(expert_out.dtype).index_select(0, token_index)
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
            g_z, h_e = _activation_grad(ctx.activate, s_e, gh_e)
            torch.mm(g_e.t(), h_e, out=grad_w2[e])
            torch.sum(g_e, 0, out=grad_b2[e])
            torch.mm(g_z.t(), x_e, out=grad_w1[e])
            torch.sum(g_z, 0, out=grad_b1[e])
            torch.mm(g_z, w1[e], out=gx_e)
        grad_tokens = torch.zeros_like(tokens).index_add_(0, token_index, grad_x)
        return (grad_tokens.to(ctx.tokens_dtype), None, grad_weight, grad_w1, grad_b1, grad_w2,
                grad_b2, None, None)
