"""Sampling across the datasets of a mixture: proportional, uniform or temperature."""
import itertools
import math
from typing import Iterator, Optional, Sized

import torch
from mmengine.dist import get_dist_info, sync_random_seed
from torch.utils.data import Sampler

from mmdet.registry import DATA_SAMPLERS


def dataset_probabilities(sizes, policy: str, temperature: float = 1.0) -> torch.Tensor:
    """Probability of drawing from each dataset: p_d ~ n_d (proportional), 1 (uniform),
    or n_d^(1/T) (temperature; T=1 is proportional, T->inf uniform)."""
    sizes = torch.tensor(sizes, dtype=torch.float64)
    if policy == 'proportional':
        weights = sizes
    elif policy == 'uniform':
        weights = (sizes > 0).double()
    elif policy == 'temperature':
        if temperature <= 0:
            raise ValueError(f'temperature must be > 0, got {temperature}')
        weights = sizes.pow(1.0 / temperature)
    else:
        raise ValueError(f"policy must be 'proportional', 'uniform' or 'temperature', got {policy!r}")
    return weights / weights.sum()


@DATA_SAMPLERS.register_module()
class MixtureSampler(Sampler):
    """Epoch sampler over a :class:`DatasetMixture` that draws datasets by a policy.

    Each epoch has ``len(dataset)`` draws. 'proportional' (default) is a plain shuffle
    (every sample once); 'uniform' and 'temperature' draw a dataset by its probability,
    then a sample of it uniformly (with replacement). Deterministic for a seed and epoch;
    in distributed training every rank takes its own slice of the same draw.

    Args:
        infinite: False (default) for epoch-based loops (which call ``set_epoch``); True
            for iteration-based loops: one endless stream of the same epochs, one after
            the other (epoch e drawn as ``set_epoch(e)`` would), as mmengine's
            ``InfiniteSampler``, so the loop never restarts the dataloader (no "Reach the
            end of the dataloader" warning and 2 s pause per epoch). A resumed run skips
            the trained batches of the same stream, so it continues where it stopped.
    """

    def __init__(self, dataset: Sized, policy: str = 'proportional', temperature: float = 1.0,
                 seed: Optional[int] = None, round_up: bool = True, infinite: bool = False):
        self.dataset = dataset
        self.policy = policy
        self.sizes = dataset.dataset_sizes()
        self.probabilities = dataset_probabilities(self.sizes, policy, temperature)
        self.rank, self.world_size = get_dist_info()
        self.seed = sync_random_seed() if seed is None else seed
        self.epoch = 0
        total = sum(self.sizes)
        self.num_samples = (math.ceil(total / self.world_size) if round_up
                            else math.ceil((total - self.rank) / self.world_size))
        self.total_size = self.num_samples * self.world_size if round_up else total
        self.round_up = round_up
        self.infinite = infinite

    def _draw(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        total = sum(self.sizes)
        if self.policy == 'proportional':
            return torch.randperm(total, generator=generator)
        starts = torch.tensor([0] + self.sizes[:-1]).cumsum(0)
        datasets = torch.multinomial(self.probabilities, total, replacement=True,
                                     generator=generator)
        sizes = torch.tensor(self.sizes)[datasets]
        within = (torch.rand(total, generator=generator, dtype=torch.float64) * sizes).long()
        return starts[datasets] + within

    def _epoch_indices(self) -> list:
        indices = self._draw().tolist()
        if self.round_up and len(indices) < self.total_size:
            repeats = math.ceil(self.total_size / len(indices))
            indices = (indices * repeats)[:self.total_size]
        return indices[self.rank:self.total_size:self.world_size]

    def __iter__(self) -> Iterator[int]:
        if not self.infinite:
            return iter(self._epoch_indices())
        return self._endless()

    def _endless(self) -> Iterator[int]:
        start = self.epoch
        for epoch in itertools.count(start):
            self.epoch = epoch
            yield from self._epoch_indices()

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
