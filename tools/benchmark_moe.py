"""Benchmark the MoE FFN layer against a dense FFN and a GShard-style one-hot einsum MoE.

    python tools/benchmark_moe.py [--tokens 8192 22000] [--experts 4 8] [--top-k 1 2]
                                  [--routers ...] [--repeats 5] [--warmup 1] [--device cpu|cuda]
                                  [--dtype fp32|bf16|fp16] [--shared-expert H_S]
                                  [--json results.json]

Forward + backward, side by side and interleaved in one run; every ratio is the median of
per-repeat ratios (paired runs cancel machine drift). Columns:
- ``moe/dense``: MoEFFN (no capacity limit, nothing dropped) over mmcv's dense ``FFN`` of
  the same hidden size. Top-1 has the dense FFN's FLOPs: 1.0x is the floor.
- ``einsum/moe``: how many times slower a GShard-style dispatch (one-hot (T, E, C)
  dispatch and combine tensors and einsums) is than MoEFFN, both at capacity factor 1.25
  with the same routing (softmax token choice only: the dispatch does not depend on the
  router).
- ``mem``: MoEFFN's activation memory over the dense FFN's: on CPU the bytes autograd saves
  for backward (what dominates the peak of a forward+backward); on CUDA the peak allocated.
- ``ops``: top-level aten ops of one MoE / dense forward+backward (each a kernel launch on
  a GPU; with per-image routing groups they depend neither on the batch nor on E).
``--warmup N`` runs every layer N untimed steps first: with router noise the tokens per
expert change every step, and oneDNN builds a GEMM primitive per new shape, so bf16 on a
CPU needs ~20 steps to reach its steady state.
``--dtype bf16`` / ``fp16`` run both layers (float32 parameters) under ``torch.autocast``,
as mmengine's ``AmpOptimWrapper`` does. Gradients are set to None before every step, as
``OptimWrapper.zero_grad`` does in training (so no step adds into the last one's).
On a CPU, glibc is first told to keep the memory a step frees
(:func:`damex.cpu_allocator.keep_freed_memory`), as a caching allocator does, so that
steps are not timed with thousands of page faults; ``--system-allocator`` keeps glibc's
defaults. ``faults``: minor page faults per timed MoE step.
Needs only torch, mmengine and mmcv's FFN (mmcv-lite is enough).
"""
import argparse
import json
import statistics
import time

import torch
from mmcv.cnn.bricks.transformer import FFN

from damex.compat import silence_known_warnings
from damex.cpu_allocator import benchmark_allocator, minor_page_faults
from damex.models.moe import MoEFFN, upcycle_from_ffn
from damex.models.moe.op_count import count_top_level_ops

ROUTERS = ['SoftmaxTokenChoiceRouter', 'DatasetAwareRouter', 'SinkhornTokenChoiceRouter',
           'SoftmaxExpertChoiceRouter', 'SinkhornExpertChoiceRouter',
           'SparsityConstrainedExpertChoiceRouter', 'SoftMoERouter']
TOKEN_CHOICE = ROUTERS[:3]


def einsum_moe(layer: MoEFFN, x: torch.Tensor, targets) -> torch.Tensor:
    """GShard-style MoE: the same routing, dispatched with one-hot (T, E, C) tensors."""
    tokens = x.reshape(-1, x.shape[-1])
    routing = layer.route(x, targets)  # the layer's own groups and per-group capacities
    num_tokens, num_experts = routing.logits.shape
    order = torch.argsort(routing.expert_index, stable=True)
    counts = torch.bincount(routing.expert_index, minlength=num_experts)
    capacity = int(counts.max())  # buffer slots per expert: the groups' capacities added up
    starts = torch.cumsum(counts, 0) - counts
    position = torch.empty_like(order)
    position[order] = torch.arange(len(order)) - starts[routing.expert_index[order]]
    dispatch = tokens.new_zeros(num_tokens, num_experts, capacity)
    dispatch[routing.token_index, routing.expert_index, position] = 1.0
    combine = torch.zeros_like(dispatch)
    combine = combine.index_put((routing.token_index, routing.expert_index, position),
                                routing.combine_weight.to(tokens.dtype))
    expert_in = torch.einsum('tec,td->ecd', dispatch, tokens)
    expert_out = layer.experts.forward_batched(expert_in)
    return tokens + torch.einsum('tec,ecd->td', combine, expert_out).view_as(tokens)


class ActivationMemory:
    """Bytes autograd saves for backward (unique storages, parameters excluded)."""

    def __init__(self, module):
        self.seen = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self.bytes = 0

    def pack(self, tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key[0] not in self.seen:
            self.seen.add(key[0])
            self.bytes += key[1]
        return tensor

    def measure(self, fn):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            out = fn()
        out.float().sum().backward()
        return self.bytes


def run_step(fn, device, leaves=()) -> float:
    for leaf in leaves:  # as OptimWrapper.zero_grad: the step's gradients start as None
        leaf.grad = None
    if device == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    out.float().sum().backward()
    if device == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter() - start


def memory(fn, module, device) -> float:
    if device == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # parameters (and inputs) already allocated
        out = fn()
        out.float().sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return ActivationMemory(module).measure(fn)


def under_autocast(fn, device, dtype):
    if dtype == torch.float32:
        return fn

    def run():
        with torch.autocast(device_type=device, dtype=dtype):
            return fn()
    return run


def bench(router, tokens, experts, top_k, args, dtype, shared=None):
    device = args.device
    torch.manual_seed(0)
    dense = FFN(embed_dims=args.dims, feedforward_channels=args.hidden).to(device)
    router_cfg = dict(type=router)
    if router in TOKEN_CHOICE and router != 'DatasetAwareRouter':
        router_cfg['top_k'] = top_k
    moe = MoEFFN(embed_dims=args.dims, feedforward_channels=args.hidden, num_experts=experts,
                 router=router_cfg,
                 shared_expert=shared and dict(feedforward_channels=shared)).to(device)
    if not shared:  # a narrower shared expert cannot start from the dense FFN
        upcycle_from_ffn(moe, dense)
    batch = args.batch
    x = torch.randn(batch, tokens // batch, args.dims, device=device)
    x.requires_grad_(True)
    targets = torch.arange(batch, device=device) % experts
    runs = dict(dense=lambda: dense(x), moe=lambda: moe(x, routing_targets=targets))
    if args.einsum and router == 'SoftmaxTokenChoiceRouter':
        capped = MoEFFN(embed_dims=args.dims, feedforward_channels=args.hidden,
                        num_experts=experts, router=router_cfg,
                        capacity_factor=1.25).to(device)
        capped.load_state_dict(moe.state_dict())
        runs['moe_cf'] = lambda: capped(x, routing_targets=targets)
        runs['einsum'] = lambda: einsum_moe(capped, x, targets)
    runs = {name: under_autocast(fn, device, dtype) for name, fn in runs.items()}
    leaves = [x, *dense.parameters(), *moe.parameters()]
    if 'moe_cf' in runs:
        leaves += list(capped.parameters())
    for _ in range(args.warmup):  # steady state: router noise changes the shapes every step
        for fn in runs.values():
            run_step(fn, device, leaves)
    times = {name: [] for name in runs}
    faults = 0
    for _ in range(args.repeats):
        for name, fn in runs.items():  # interleaved
            before = minor_page_faults()
            times[name].append(run_step(fn, device, leaves))
            if name == 'moe':
                faults += minor_page_faults() - before
    ratio = statistics.median(m / d for m, d in zip(times['moe'], times['dense']))
    row = dict(router=router + (f'+shared{shared}' if shared else ''), tokens=tokens,
               experts=experts, top_k=top_k,
               dense_ms=1e3 * statistics.median(times['dense']),
               moe_ms=1e3 * statistics.median(times['moe']), moe_over_dense=ratio,
               moe_faults_per_step=faults / args.repeats,
               memory_ratio=memory(runs['moe'], moe, device) / memory(runs['dense'], dense, device),
               moe_ops=count_top_level_ops(lambda: runs['moe']().float().sum().backward()),
               dense_ops=count_top_level_ops(lambda: runs['dense']().float().sum().backward()))
    if 'einsum' in runs:
        row['einsum_over_moe'] = statistics.median(
            e / m for e, m in zip(times['einsum'], times['moe_cf']))
        row['einsum_ms'] = 1e3 * statistics.median(times['einsum'])
    return row


def main():
    silence_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--tokens', type=int, nargs='+', default=[8192, 22000])
    parser.add_argument('--experts', type=int, nargs='+', default=[4, 8])
    parser.add_argument('--top-k', type=int, nargs='+', default=[1, 2])
    parser.add_argument('--routers', nargs='+', default=ROUTERS)
    parser.add_argument('--dims', type=int, default=256)
    parser.add_argument('--hidden', type=int, default=2048)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed steps of every layer first (20 for a bf16 steady state)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                        help='bf16 / fp16: both layers under torch.autocast')
    parser.add_argument('--no-einsum', dest='einsum', action='store_false')
    parser.add_argument('--shared-expert', type=int, default=0, metavar='H_S',
                        help='also a row per router with a shared expert of this width')
    parser.add_argument('--system-allocator', action='store_true',
                        help="CPU: keep glibc's defaults (freed memory goes back to the OS, "
                             'so steps page-fault)')
    parser.add_argument('--json', help='also write the rows (ratios included) to this file')
    args = parser.parse_args()
    allocator = benchmark_allocator(args.device, args.system_allocator)
    dtype = dict(fp32=torch.float32, bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]
    rows = []
    print(f'device {args.device}, {args.dtype}, D={args.dims}, H={args.hidden}, '
          f'median of {args.repeats} interleaved fwd+bwd after {args.warmup} warm-up steps, '
          f'allocator: {allocator}')
    header = (f'{"router":<38}{"tokens":>7}{"E":>3}{"k":>3}{"dense ms":>10}{"moe ms":>9}'
              f'{"moe/dense":>10}{"mem":>6}{"ops":>11}{"faults":>8}{"einsum/moe":>11}')
    print(header)
    for router in args.routers:
        ks = args.top_k if router in TOKEN_CHOICE and router != 'DatasetAwareRouter' else [1]
        for tokens in args.tokens:
            for experts in args.experts:
                for top_k, shared in [(k, None) for k in ks] + (
                        [(1, args.shared_expert)] if args.shared_expert else []):
                    row = bench(router, tokens, experts, top_k, args, dtype, shared)
                    rows.append(row)
                    einsum = (f'{row["einsum_over_moe"]:>10.1f}x' if 'einsum_over_moe' in row
                              else f'{"":>11}')
                    print(f'{row["router"]:<38}{tokens:>7}{experts:>3}{top_k:>3}{row["dense_ms"]:>10.1f}'
                          f'{row["moe_ms"]:>9.1f}{row["moe_over_dense"]:>9.2f}x'
                          f'{row["memory_ratio"]:>5.2f}x'
                          f'{row["moe_ops"]:>6}/{row["dense_ops"]:<4}'
                          f'{row["moe_faults_per_step"]:>8.0f}{einsum}', flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(device=args.device, dtype=args.dtype, allocator=allocator,
                           rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
