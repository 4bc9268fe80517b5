"""Never lose a run: atomic checkpoints, resume from the newest complete one, kills (#19)."""
import os
import os.path as osp
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from mmengine.runner import Runner

from damex.testing import REPO, tiny_demo_config

from damex.engine.checkpoint import numbered_checkpoints, why_unloadable

TRAIN = [sys.executable, 'tools/train.py', 'configs/demo/damex_demo.py', '--cfg-options',
         'train_cfg.max_iters=200', 'default_hooks.checkpoint.interval=1',
         'default_hooks.logger.interval=1', 'model.encoder.num_layers=1', 'model.num_queries=20',
         'model.dn_cfg.group_cfg.num_dn_queries=10']
# 6 kills 0-300 ms after checkpoint K's temporary or final file appears (inside its write
# or just after), 4 at other instants of training (well after a checkpoint)
KILL_DELAYS = [0.0, 0.01, 0.02, 0.05, 0.1, 0.3]
LATE_DELAYS = [0.5, 0.8, 1.1, 1.5]


def checkpoint_files(work_dir, step):
    return [osp.join(work_dir, f'iter_{step}.pth.partial'), osp.join(work_dir, f'iter_{step}.pth')]


def newest_step_seen(work_dir) -> int:
    """The highest K whose checkpoint file (temporary or final) exists."""
    steps = [int(m.group(1)) for m in (re.match(r'iter_(\d+)\.pth', n) for n in os.listdir(work_dir))
             if m]
    return max(steps, default=0)


def start(work_dir, log, resume):
    return subprocess.Popen(TRAIN[:3] + ['--work-dir', str(work_dir)] + TRAIN[3:]
                            + (['--resume'] if resume else []),
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, 'PYTHONWARNINGS': 'ignore',
                                 'PYTHONUNBUFFERED': '1'})


def wait(condition, process, log_path, what, timeout=600):
    deadline = time.time() + timeout
    while True:
        found = condition()
        if found:
            return found
        if process.poll() is not None:
            raise AssertionError(f'training exited with {process.returncode} while waiting for '
                                 f'{what}:\n' + open(log_path).read()[-3000:])
        assert time.time() < deadline, f'no {what} after {timeout} s'
        time.sleep(0.01)


def fresh(paths, since):
    """One of ``paths`` written after ``since`` (a killed run's leftovers do not count)."""
    def written():
        for path in paths:
            try:
                if os.stat(path).st_mtime >= since:
                    return path
            except FileNotFoundError:
                pass
        return None
    return written


def resumed_iter(log_path):
    def found():
        match = re.search(r'resumed epoch: \d+, iter: (\d+)', open(log_path).read())
        return match and int(match.group(1)) + 1  # + 1: iteration 0 is a valid resume point
    return found


@pytest.mark.slow
def test_sigkill_at_any_instant_loses_at_most_the_checkpoint_being_written(demo_data, tmp_path):
    work_dir = tmp_path / 'run'
    kills = [('write', d) for d in KILL_DELAYS] + [('late', d) for d in LATE_DELAYS]
    kills = [kills[i] for i in (0, 6, 1, 2, 7, 3, 4, 8, 5, 9)]  # interleave the two kinds
    resumed_from, seen_at_kill, inside_write = [], 0, 0
    for run, (kind, delay) in enumerate(kills + [('final', None)]):
        log_path = str(tmp_path / f'run{run}.log')
        with open(log_path, 'w') as log:
            started = time.time()
            process = start(work_dir, log, resume=run > 0)
            try:
                resumed = 0
                if run > 0:
                    resumed = wait(resumed_iter(log_path), process, log_path, 'resume') - 1
                    # at most the checkpoint being written at the kill is lost
                    assert resumed >= seen_at_kill - 1, (run, resumed, seen_at_kill)
                    resumed_from.append(resumed)
                # it trains on: it completes the next checkpoint
                wait(fresh(checkpoint_files(work_dir, resumed + 1)[1:], started), process,
                     log_path, f'checkpoint {resumed + 1}')
                if kind == 'write':  # kill inside (or right after) the write of the one after
                    wait(fresh(checkpoint_files(work_dir, resumed + 2), started), process,
                         log_path, f'checkpoint {resumed + 2}')
                if kind != 'final':
                    time.sleep(delay)
                seen_at_kill = newest_step_seen(work_dir)
                inside_write += any(n.endswith('.partial') for n in os.listdir(work_dir))
            finally:
                process.send_signal(signal.SIGKILL)
                process.wait()
    newest = numbered_checkpoints(str(work_dir), 'iter_{}.pth')[0][1]
    assert why_unloadable(newest) is None
    assert len(resumed_from) == len(kills) >= 10
    print(f'{len(kills)} kills, {inside_write} with a write in progress; resumed from '
          f'{resumed_from}')


def _two_checkpoints(tmp_path):
    """A 2-iteration run keeping iter_1.pth and iter_2.pth."""
    cfg = tiny_demo_config(tmp_path, max_iters=2)
    cfg.default_hooks.checkpoint.interval = 1
    cfg.default_hooks.checkpoint.max_keep_ckpts = 2
    Runner.from_cfg(cfg).train()
    assert {'iter_1.pth', 'iter_2.pth'} <= set(os.listdir(tmp_path))
    return tmp_path


@pytest.fixture(scope='module')
def two_checkpoints(demo_data, tmp_path_factory):
    return _two_checkpoints(tmp_path_factory.mktemp('two'))


def resume_in(work_dir, source, max_iters=3):
    """Copy ``source``'s checkpoints to ``work_dir`` and resume there for one more iteration."""
    import shutil
    shutil.copytree(source, work_dir)
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_2.pth'))  # the moved run's
    cfg = tiny_demo_config(work_dir, max_iters=max_iters)
    cfg.resume = True
    return Runner.from_cfg(cfg)


def last_checkpoint(work_dir):
    return open(osp.join(work_dir, 'last_checkpoint')).read().strip()


@pytest.mark.slow  # trains or spawns a process
def test_checkpoints_are_committed_in_order(two_checkpoints):
    names = os.listdir(two_checkpoints)
    assert not [n for n in names if n.endswith('.partial')]
    assert last_checkpoint(two_checkpoints) == osp.join(str(two_checkpoints), 'iter_2.pth')
    state = torch.load(osp.join(two_checkpoints, 'iter_2.pth'), weights_only=True)
    assert state['message_hub']['runtime_info']['keep_ckpt_ids'] == [1, 2]


@pytest.mark.slow  # trains or spawns a process
@pytest.mark.parametrize('damage', ['missing', 'truncated', 'no_pointer'])
def test_resume_falls_back_to_the_newest_complete_checkpoint(two_checkpoints, tmp_path, damage):
    work_dir = tmp_path / 'w'
    runner = resume_in(work_dir, two_checkpoints)
    newest = work_dir / 'iter_2.pth'
    if damage == 'missing':
        newest.unlink()
    elif damage == 'truncated':
        newest.write_bytes(newest.read_bytes()[:1_000_000])
    else:
        (work_dir / 'last_checkpoint').unlink()
    (work_dir / 'iter_3.pth.partial').write_bytes(b'a killed write')
    runner.train()
    expected = 2 if damage == 'no_pointer' else 1  # iter_2 is complete without a pointer
    assert runner.message_hub.get_info('last_ckpt').endswith('iter_3.pth')
    log = open(runner.log_dir + f'/{runner.timestamp}.log').read()
    assert f'resume: resuming from {work_dir / f"iter_{expected}.pth"}' in log
    reason = {'missing': 'iter_2.pth (the file does not exist)',
              'truncated': 'iter_2.pth (it does not load', 'no_pointer': 'last_checkpoint (missing)'}
    assert reason[damage] in log
    assert re.search(rf'resumed epoch: \d+, iter: {expected}', log)
    assert not (work_dir / 'iter_3.pth.partial').exists()
    assert runner.iter == 3 and why_unloadable(str(work_dir / 'iter_3.pth')) is None


@pytest.mark.slow  # trains or spawns a process
def test_resume_removes_what_a_kill_before_the_removal_left(demo_data, tmp_path):
    import shutil
    cfg = tiny_demo_config(tmp_path, max_iters=2)  # max_keep_ckpts=1: only iter_2.pth
    Runner.from_cfg(cfg).train()
    shutil.copy(tmp_path / 'iter_2.pth', tmp_path / 'iter_1.pth')  # its removal was killed
    cfg = tiny_demo_config(tmp_path, max_iters=3)
    cfg.resume = True
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith('.pth')) == ['iter_3.pth']
    log = open(runner.log_dir + f'/{runner.timestamp}.log').read()
    assert f'removed {tmp_path / "iter_1.pth"}, outdated (max_keep_ckpts=1)' in log


@pytest.mark.slow  # trains or spawns a process
def test_resume_without_any_complete_checkpoint_is_an_error(demo_data, tmp_path):
    (tmp_path / 'iter_1.pth').write_bytes(b'truncated')
    (tmp_path / 'last_checkpoint').write_text(str(tmp_path / 'iter_1.pth'))
    cfg = tiny_demo_config(tmp_path, max_iters=2)
    cfg.resume = True
    runner = Runner.from_cfg(cfg)
    with pytest.raises(FileNotFoundError, match=r'no complete checkpoint to resume from in .*'
                                                r'iter_1.pth \(it does not load.*Without --resume '
                                                r'training would start from scratch'):
        runner.train()
    assert runner.iter == 0


@pytest.mark.slow  # trains or spawns a process
def test_test_with_another_moe_placement_is_an_error(two_checkpoints, tmp_path):
    result = subprocess.run(
        [sys.executable, 'tools/test.py', 'configs/demo/damex_demo.py',
         str(two_checkpoints / 'iter_2.pth'), '--work-dir', str(tmp_path), '--cfg-options',
         'model.moe.decoder_layers=[1,3,5]', 'model.encoder.num_layers=1', 'model.num_queries=20',
         'model.dn_cfg.group_cfg.num_dn_queries=10'],
        cwd=REPO, capture_output=True, text=True, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    assert result.returncode != 0
    err = result.stderr
    assert 'CheckpointMismatchError' in err and 'iter_2.pth: the checkpoint does not match' in err
    assert 'missing from the checkpoint: decoder.layers.0.ffn.layers.0.0.weight' in err
    assert 'decoder.layers.1.ffn.router.gate.weight' in err
    assert 'unexpected in the checkpoint: decoder.layers.0.ffn.router.gate.weight' in err
    assert 'the MoE placement (model.moe.encoder_layers / model.moe.decoder_layers' in err


@pytest.mark.slow  # trains or spawns a process
def test_other_loaders_refuse_a_checkpoint_of_another_model(two_checkpoints, demo_data):
    from mmdet.apis import init_detector
    from damex.models.checkpoint_match import CheckpointMismatchError
    cfg = tiny_demo_config(two_checkpoints)
    cfg.model.moe.num_experts = 4
    with pytest.raises(CheckpointMismatchError, match=r'shape in the checkpoint vs the model: '
                                                      r'.*\(3, .*the number of experts'):
        init_detector(cfg, str(two_checkpoints / 'iter_2.pth'), device='cpu')
    cfg = tiny_demo_config(two_checkpoints)
    cfg.model.bbox_head.num_classes = 6
    with pytest.raises(CheckpointMismatchError, match=r'model.bbox_head.num_classes'):
        init_detector(cfg, str(two_checkpoints / 'iter_2.pth'), device='cpu')
    # the matching config loads, and torch's non-strict load is the caller's choice
    model = init_detector(tiny_demo_config(two_checkpoints), str(two_checkpoints / 'iter_2.pth'),
                          device='cpu')
    state = model.state_dict()
    del state['query_embedding.weight']
    model.load_state_dict(state, strict=False)
    with pytest.raises(CheckpointMismatchError, match=r'missing from the checkpoint: '
                                                      r'query_embedding.weight'):
        model.load_state_dict(state)


@pytest.mark.slow  # trains or spawns a process
def test_fine_tuning_with_load_from_stays_non_strict(two_checkpoints, tmp_path):
    cfg = tiny_demo_config(tmp_path, max_iters=1)
    cfg.load_from = str(two_checkpoints / 'iter_2.pth')
    cfg.model.moe.decoder_layers = [1, 3, 5]  # MoE elsewhere: those layers start fresh
    runner = Runner.from_cfg(cfg)
    runner.train()
    assert runner.iter == 1
