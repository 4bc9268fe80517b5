"""Data-parallel training with MoE layers on CPU (gloo)."""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from damex.testing import REPO

pytestmark = pytest.mark.slow
D, H, E = 16, 32, 4


def make_inputs():
    """Two images; every token of image 1 prefers expert 0 (the others get none there)."""
    torch.manual_seed(0)
    from damex.models.moe import MoEFFN
    layer = MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=E,
                   router=dict(type='DatasetAwareRouter', noise_std=0.0))
    x = torch.randn(2, 10, D)
    x[1] = 0.05 * torch.randn(10, D) + 20 * layer.router.gate.weight[0].detach()
    targets = torch.tensor([2, 0])
    return layer, x, targets


def loss_of(model, x, targets):
    out = model(x, routing_targets=targets)
    layer = getattr(model, 'module', model)
    return out.pow(2).mean() + 0.1 * layer.aux_losses['damex']


def ddp_worker(rank, world_size, port, out_file):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    layer, x, targets = make_inputs()
    model = DistributedDataParallel(layer, find_unused_parameters=False)
    loss = loss_of(model, x[rank:rank + 1], targets[rank:rank + 1])
    loss.backward()
    used = layer.last_routing.dispatch_mask.reshape(-1, E).sum(0)
    if rank == 0:
        torch.save({n: p.grad for n, p in layer.named_parameters()}, out_file)
    else:
        torch.save(used, out_file + '.used')
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_batch_one_equal_one_process_batch_two(tmp_path):
    out_file = str(tmp_path / 'grads.pt')
    mp.spawn(ddp_worker, args=(2, 29613, out_file), nprocs=2, join=True)
    ddp_grads = torch.load(out_file)
    used_on_rank1 = torch.load(out_file + '.used')
    assert (used_on_rank1 == 0).sum() == E - 1  # experts that got no token on rank 1

    layer, x, targets = make_inputs()
    # the DDP average of per-image means equals the batch mean (same tokens per image)
    loss_of(layer, x, targets).backward()
    for name, param in layer.named_parameters():
        torch.testing.assert_close(ddp_grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def aux_free_worker(rank, world_size, port, out_file):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=world_size)
    from damex.models.moe import MoEFFN
    torch.manual_seed(0)  # the same initial model on both ranks
    layer = MoEFFN(embed_dims=D, feedforward_channels=H, num_experts=E,
                   router=dict(type='SoftmaxTokenChoiceRouter', balance='aux_free',
                               bias_update_rate=0.01)).train()
    torch.manual_seed(100 + rank)  # each rank its own tokens: different local loads
    local = []
    for _ in range(3):
        x = torch.randn(1, 12, D) + (3.0 if rank else -3.0) * layer.router.gate.weight[rank]
        layer(x.detach())
        local.append(torch.bincount(layer.last_routing.expert_index.reshape(-1),
                                    minlength=E))
    torch.save(dict(bias=layer.router.expert_bias.clone(), loads=torch.stack(local)),
               f'{out_file}.{rank}')
    dist.barrier()
    dist.destroy_process_group()


def test_aux_free_bias_is_the_same_on_every_rank(tmp_path):
    out_file = str(tmp_path / 'bias')
    mp.spawn(aux_free_worker, args=(2, 29619, out_file), nprocs=2, join=True)
    ranks = [torch.load(f'{out_file}.{rank}') for rank in range(2)]
    assert not torch.equal(ranks[0]['loads'], ranks[1]['loads'])  # the local loads differ
    assert torch.equal(ranks[0]['bias'], ranks[1]['bias'])  # the bias does not
    assert ranks[0]['bias'].abs().sum() > 0


def dist_train(work_dir, port, max_iters, *args):
    """tools/dist_train.sh on the tiny demo with 2 CPU processes; returns (exit code, output)."""
    result = subprocess.run(
        ['bash', 'tools/dist_train.sh', 'configs/demo/damex_demo.py', '2', '--work-dir',
         str(work_dir), *args, '--cfg-options', f'train_cfg.max_iters={max_iters}',
         'train_cfg.val_interval=100', 'default_hooks.logger.interval=1',
         'model.encoder.num_layers=1', 'val_dataloader.dataset.datasets.0.dataset.indices=1'],
        cwd=REPO, capture_output=True, text=True, timeout=900,
        env={**os.environ, 'PYTHON': sys.executable, 'PORT': str(port),
             'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'})
    return result.returncode, result.stdout + result.stderr


def test_dist_train_sh_runs_the_demo_on_two_cpu_processes(demo_data, tmp_path):
    code, output = dist_train(tmp_path, 29617, 2)
    assert code == 0, output[-4000:]
    assert osp.exists(osp.join(str(tmp_path), 'iter_2.pth'))
    assert 'Distributed training is not used' not in output
    assert 'Distributed training: True' in output

    # resume on two processes when last_checkpoint names a file that is gone: both ranks
    # take the newest complete checkpoint, only rank 0 writes, no temporary file is left
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_9.pth'))
    code, output = dist_train(tmp_path, 29618, 3, '--resume')
    assert code == 0, output[-4000:]
    assert (f'resume: resuming from {tmp_path / "iter_2.pth"} (skipped iter_9.pth (the file '
            'does not exist))') in output
    assert 'resumed epoch: 0, iter: 2' in output
    assert sorted(n for n in os.listdir(tmp_path) if 'iter_' in n) == ['iter_3.pth']
    assert (tmp_path / 'last_checkpoint').read_text() == str(tmp_path / 'iter_3.pth')
