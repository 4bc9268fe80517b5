"""Stock mmdet DINO vs DAMEX-DINO, same config otherwise: step time, inference, memory.

    python tools/benchmark_detector.py [--config configs/damex/damex-dino-e8_r50_4scale_8xb2-12e_uodb.py]
                                       [--size 512] [--batch 2] [--repeats 3] [--warmup 1]
                                       [--json out.json]
                                       [--device cpu|cuda] [--dtype fp32|bf16|fp16]

Also times the routing telemetry the detector logs every training step (its share of the
DAMEX train step, which includes it). Both models are built from the same config (the stock one with ``type='DINO'``, its plain
``DINOHead`` and no ``moe``), fed the same synthetic batch, and timed interleaved; each
ratio is the median of per-repeat ratios. Memory: parameters + gradients + the activation
bytes autograd saves for backward (CPU; CUDA: peak allocated) of one training step.
``--dtype bf16`` / ``fp16``: both models under ``torch.autocast`` (as AmpOptimWrapper).
The ratio's spread over repeats is printed beside it (interquartile range and min - max;
the models run in ABBA order, so linear drift cancels in pairs): with bf16 on a CPU,
oneDNN builds GEMM primitives for new shapes in the first steps, so take ``--warmup 3``
or more and quote a ratio only when its spread is small. On a CPU, glibc keeps the memory
a step frees (:func:`damex.cpu_allocator.keep_freed_memory`, as a caching allocator), so
steps are not timed with page faults; ``--system-allocator`` keeps glibc's defaults.
"""
import contextlib
import argparse
import copy
import json
import logging
import statistics
import time

import torch
from mmengine.config import Config
from mmengine.logging import MMLogger
from mmengine.registry import init_default_scope

from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmengine.structures import InstanceData

import damex  # noqa: F401
from damex.compat import silence_known_warnings
from damex.cpu_allocator import benchmark_allocator


def synthetic_batch(size, batch, num_classes, num_experts, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, size, size, generator=generator)
    samples = []
    for i in range(batch):
        sample = DetDataSample(metainfo=dict(
            img_shape=(size, size), batch_input_shape=(size, size), ori_shape=(size, size),
            pad_shape=(size, size), scale_factor=(1.0, 1.0), expert_id=i % num_experts))
        xy = torch.rand(6, 2, generator=generator) * size * 0.6
        wh = torch.rand(6, 2, generator=generator) * size * 0.3 + 16
        sample.gt_instances = InstanceData(
            bboxes=torch.cat([xy, xy + wh], dim=1),
            labels=torch.randint(0, num_classes, (6, ), generator=generator))
        samples.append(sample)
    return inputs, samples


def saved_bytes(model, fn):
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return total[0]


def training_memory(model, step, device):
    model.zero_grad(set_to_none=True)
    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        step().backward()
        return torch.cuda.max_memory_allocated()
    activations = saved_bytes(model, step)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return activations + params + grads


def stock_dino_config(damex_cfg):
    """mmdet's DINO from a DAMEX-DINO model config: no MoE, the plain DINOHead (without the
    dataset-aware head's own arguments; the UODB configs' loss_scope='all' is DINOHead's
    loss)."""
    stock_cfg = copy.deepcopy(damex_cfg)
    stock_cfg.type = 'DINO'
    stock_cfg.pop('moe', None)
    stock_cfg.bbox_head.type = 'DINOHead'
    for key in ('dataset_aware', 'loss_scope'):
        stock_cfg.bbox_head.pop(key, None)
    return stock_cfg


def main():
    silence_known_warnings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default='configs/damex/damex-dino-e8_r50_4scale_8xb2-12e_uodb.py')
    parser.add_argument('--size', type=int, default=512)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--dtype', choices=('fp32', 'bf16', 'fp16'), default='fp32',
                        help='bf16 / fp16: both models under torch.autocast')
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed train + inference steps of each model first')
    parser.add_argument('--system-allocator', action='store_true',
                        help="CPU: keep glibc's defaults (freed memory goes back to the OS, "
                             'so steps page-fault)')
    parser.add_argument('--json')
    args = parser.parse_args()
    allocator = benchmark_allocator(args.device, args.system_allocator)
    dtype = dict(fp32=None, bf16=torch.bfloat16, fp16=torch.float16)[args.dtype]

    def precision():
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=args.device, dtype=dtype)
    init_default_scope('mmdet')
    cfg = Config.fromfile(args.config)
    damex_cfg = copy.deepcopy(cfg.model)
    damex_cfg.backbone.init_cfg = None
    stock_cfg = stock_dino_config(damex_cfg)
    num_experts = damex_cfg.moe.num_experts
    models = {}
    MMLogger.get_current_instance().setLevel(logging.WARNING)  # no per-parameter init log
    for name, model_cfg in (('stock', stock_cfg), ('damex', damex_cfg)):
        torch.manual_seed(0)
        models[name] = MODELS.build(model_cfg).to(args.device)
        models[name].init_weights()
    inputs, samples = synthetic_batch(args.size, args.batch, damex_cfg.bbox_head.num_classes,
                                      num_experts)
    inputs = inputs.to(args.device)
    samples = [s.to(args.device) for s in samples]

    def train_step(model):
        with precision():
            losses = model.loss(inputs, copy.deepcopy(samples))
        return sum(v for k, v in losses.items() if 'loss' in k)

    def timed(fn):
        if args.device == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if args.device == 'cuda':
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def train(model):
        model.train()
        model.zero_grad(set_to_none=True)
        train_step(model).backward()

    def infer(model):
        model.eval()
        with torch.no_grad(), precision():
            model.predict(inputs, copy.deepcopy(samples))

    for _ in range(args.warmup):
        for model in models.values():
            train(model)
            infer(model)
    times = {(n, kind): [] for n in models for kind in ('train', 'infer')}
    for repeat in range(args.repeats):
        for kind, fn in (('train', train), ('infer', infer)):
            # ABBA order: the two models swap places every repeat, so a drift of the
            # machine's speed within a repeat favours neither
            for name in (('stock', 'damex') if repeat % 2 == 0 else ('damex', 'stock')):
                times[(name, kind)].append(timed(lambda: fn(models[name])))
    # routing telemetry (logged every step from the forward's routing): its share of a step
    damex_model = models['damex']
    telemetry_s = statistics.median(timed(lambda: damex_model.routing_telemetry(samples))
                                    for _ in range(max(args.repeats, 5)))
    memory = {}
    for name, model in models.items():
        model.train()
        memory[name] = training_memory(model, lambda: train_step(model), args.device)
    rows = {}
    print(f'{args.config}: {args.size}x{args.size}, batch {args.batch}, {args.device}, {args.dtype}, '
          f'median of {args.repeats} interleaved repeats after {args.warmup} warm-up steps, '
          f'allocator: {allocator}')
    print(f'{"":<14}{"stock DINO":>12}{"DAMEX-DINO":>12}{"ratio":>8}  IQR          min-max')
    for kind in ('train', 'infer'):
        ratios = [d / s for d, s in zip(times[('damex', kind)], times[('stock', kind)])]
        ratio = statistics.median(ratios)
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratio] * 3
        stock, ours = (statistics.median(times[(n, kind)]) for n in ('stock', 'damex'))
        rows[kind] = dict(stock_s=stock, damex_s=ours, ratio=ratio,
                          ratio_min=min(ratios), ratio_max=max(ratios),
                          ratio_q1=quartiles[0], ratio_q3=quartiles[2])
        label = 'train step s' if kind == 'train' else 'inference s'
        print(f'{label:<14}{stock:>12.2f}{ours:>12.2f}{ratio:>7.3f}x  '
              f'{quartiles[0]:.3f}-{quartiles[2]:.3f}  {min(ratios):.3f}-{max(ratios):.3f}')
    telemetry_share = telemetry_s / rows['train']['damex_s']
    rows['telemetry'] = dict(seconds=telemetry_s, share_of_train_step=telemetry_share)
    rows['allocator'] = allocator
    print(f'{"telemetry ms":<14}{"":>12}{1e3 * telemetry_s:>12.2f}{100 * telemetry_share:>7.2f}% '
          'of the DAMEX train step')
    mem_ratio = memory['damex'] / memory['stock']
    rows['memory'] = dict(stock_mb=memory['stock'] / 2**20, damex_mb=memory['damex'] / 2**20,
                          ratio=mem_ratio)
    print(f'{"memory MB":<14}{memory["stock"] / 2**20:>12.0f}{memory["damex"] / 2**20:>12.0f}'
          f'{mem_ratio:>7.3f}x')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
