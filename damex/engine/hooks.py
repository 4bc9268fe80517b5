"""Runner hooks: exact resume of random streams, and an expert-map check before training."""
import random
from typing import Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from mmdet.registry import HOOKS


def get_random_state() -> dict:
    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(),
                python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_random_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class _RestoreAfterSkip:
    """Wraps the loop's batch iterator: puts the saved random state back right before the
    first batch after those that mmengine skips on resume (their augmentations draw too)."""

    def __init__(self, iterator, skip: int, state: dict):
        self._iterator, self._skip, self._state = iterator, skip, state

    def __next__(self):
        if self._state is not None and self._skip == 0:
            set_random_state(self._state)
            self._state = None
        self._skip -= 1
        return next(self._iterator)

    def __iter__(self):
        return self

    def __getattr__(self, name):
        return getattr(self._iterator, name)


@HOOKS.register_module()
class RandomStateHook(Hook):
    """Save the torch / numpy / python random states in checkpoints; restore them on resume.

    mmengine reseeds on resume, so gate noise, DINO's denoising noise and random
    augmentations would draw other numbers than an uninterrupted run. With this hook a
    resumed run continues with the same losses as an uninterrupted one (with
    ``randomness=dict(seed=..., deterministic=True)`` and ``num_workers=0``; worker
    processes reseed themselves). Iteration-based loops: the state is put back right
    before the first new batch is loaded, after mmengine has skipped the trained ones.
    """

    priority = 'VERY_LOW'

    def __init__(self):
        self._pending: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint['random_state'] = get_random_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._pending = checkpoint.get('random_state')

    def before_train(self, runner) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        loop = runner.train_loop
        if hasattr(loop, 'dataloader_iterator'):  # iteration-based: skips trained batches
            loop.dataloader_iterator = _RestoreAfterSkip(loop.dataloader_iterator, loop.iter,
                                                         state)
        else:  # epoch-based loops resume at an epoch boundary
            set_random_state(state)


@HOOKS.register_module()
class ExpertMapCheckHook(Hook):
    """Fail before training when the mixture's expert map does not fit the model.

    Every dataset's expert must exist in the model's MoE layers; the error names the
    dataset and the expert.
    """

    priority = 'VERY_HIGH'

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        num_experts = getattr(model, 'num_experts', None)
        space = getattr(runner.train_dataloader.dataset, 'label_space', None)
        if num_experts is None or space is None:
            return
        for entry in space.datasets:
            if not 0 <= entry.expert < num_experts:
                raise ValueError(
                    f'dataset {entry.name!r} is mapped to expert {entry.expert}, but the model '
                    f'has {num_experts} experts (model.moe.num_experts); fix the mixture\'s '
                    f'`expert` entries or the number of experts')
