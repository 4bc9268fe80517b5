"""Runner hooks: exact resume of random streams, and an expert-map check before training."""
import random
from typing import Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper

from mmdet.registry import HOOKS
from ..datasets.label_space import LabelSpace


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


def check_mixture(space: Optional[LabelSpace], num_classes: Optional[int],
                  num_experts: Optional[int], trained: Optional[LabelSpace] = None,
                  training: bool = True) -> None:
    """The checks ExpertMapCheckHook and ``tools/misc/print_mixture.py`` share.

    Training: ``num_classes`` (the head's) must equal the mixture's unified label space and
    every dataset's expert must exist among ``num_experts``. Testing: the mixture's
    datasets and classes must be known to the ``trained`` label space, if the model has
    one (else num_classes is checked as in training).
    """
    if space is None:
        return
    if trained is not None and not training:
        space.check_subset_of(trained)
    elif num_classes is not None:
        space.check_num_classes(num_classes, 'the mixture')
    if training:
        space.check_experts(num_experts)


def _mixture_label_space(dataloader) -> Optional[LabelSpace]:
    dataset = getattr(dataloader, 'dataset', None)
    metainfo = getattr(dataset, 'metainfo', None) or {}
    return LabelSpace.from_dict(metainfo['label_space']) if 'label_space' in metainfo else None


@HOOKS.register_module()
class ExpertMapCheckHook(Hook):
    """Fail before the first iteration when the mixture does not fit the model.

    Before training: every dataset's expert must exist in the model's MoE layers, and
    ``model.bbox_head.num_classes`` must equal the unified label space's size. Before
    validation and testing: the mixture's datasets and classes must be known to the
    model's trained label space (or, for a model without one, num_classes must match).
    Errors name the dataset, expert or the two numbers. Before training it also logs the
    training mixture's table (:meth:`DatasetMixture.summary`).
    """

    priority = 'VERY_HIGH'

    @staticmethod
    def _check(runner, dataloader, training: bool) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        head = getattr(model, 'bbox_head', None)
        check_mixture(_mixture_label_space(dataloader), getattr(head, 'num_classes', None),
                      getattr(model, 'num_experts', None), getattr(model, 'label_space', None),
                      training)

    def before_train(self, runner) -> None:
        self._check(runner, runner.train_dataloader, True)
        summary = getattr(runner.train_dataloader.dataset, 'summary', None)
        if summary is not None:
            runner.logger.info(f'Training mixture:\n{summary()}')

    def before_val(self, runner) -> None:
        self._check(runner, runner.val_dataloader, False)

    def before_test(self, runner) -> None:
        self._check(runner, runner.test_dataloader, False)


@HOOKS.register_module()
class ForcedRoutingHook(Hook):
    """Staged routing: for the first ``iters`` training iterations (0-based index < iters)
    every token goes to its dataset's expert whatever the router says, while the router
    keeps learning from its DAMEX loss; from iteration ``iters`` on the router decides.

    It reads the runner's iteration before every step, so a resumed run continues in the
    right stage. Needs a router trained with targets (``DatasetAwareRouter``) or any
    router when the mixture tags samples with ``expert_id``.
    """

    priority = 'NORMAL'

    def __init__(self, iters: int):
        if iters < 0:
            raise ValueError(f'ForcedRoutingHook: iters must be >= 0, got {iters}')
        self.iters = iters

    @staticmethod
    def _layers(runner):
        from ..models.moe import MoEFFN
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        return [m for m in model.modules() if isinstance(m, MoEFFN)]

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        forced = runner.iter < self.iters
        for layer in self._layers(runner):
            layer.force_targets = forced

    def after_train(self, runner) -> None:
        for layer in self._layers(runner):
            layer.force_targets = False
