"""MixtureSampler: dataset policies, determinism, ranks, and the endless stream of
iteration-based loops."""
import collections
import itertools

import pytest
import torch
from mmengine.runner.loops import _InfiniteDataloaderIterator
from torch.utils.data import DataLoader

from damex.datasets import MixtureSampler, dataset_probabilities


class FakeMixture:
    def __init__(self, sizes):
        self.sizes = sizes

    def dataset_sizes(self):
        return self.sizes

    def __len__(self):
        return sum(self.sizes)


@pytest.mark.parametrize('policy, temperature, expected', [
    ('proportional', 1.0, [0.8, 0.15, 0.05]),
    ('uniform', 1.0, [1 / 3, 1 / 3, 1 / 3]),
    # n^(1/2) = [20, 8.66, 5] / 33.66
    ('temperature', 2.0, [20 / 33.66, 8.66 / 33.66, 5 / 33.66]),
])
def test_sampler_frequencies_follow_the_policy(policy, temperature, expected):
    sizes = [400, 75, 25]
    sampler = MixtureSampler(FakeMixture(sizes), policy=policy, temperature=temperature, seed=0)
    starts = [0, 400, 475]
    counts = collections.Counter()
    for epoch in range(20):
        sampler.set_epoch(epoch)
        for index in sampler:
            counts[sum(index >= s for s in starts) - 1] += 1
    total = sum(counts.values())
    assert total == 20 * 500
    for d, p in enumerate(expected):
        assert counts[d] / total == pytest.approx(p, abs=0.015)
    torch.testing.assert_close(dataset_probabilities(sizes, policy, temperature),
                               torch.tensor(expected, dtype=torch.float64), atol=1e-3, rtol=0)


def test_sampler_is_deterministic_and_splits_across_ranks(monkeypatch):
    sampler = MixtureSampler(FakeMixture([10, 5]), policy='uniform', seed=3)
    assert list(sampler) == list(sampler)
    import damex.datasets.samplers as samplers
    monkeypatch.setattr(samplers, 'get_dist_info', lambda: (0, 2))
    rank0 = list(MixtureSampler(FakeMixture([10, 5]), policy='uniform', seed=3))
    monkeypatch.setattr(samplers, 'get_dist_info', lambda: (1, 2))
    rank1 = list(MixtureSampler(FakeMixture([10, 5]), policy='uniform', seed=3))
    full = list(sampler) + list(sampler)[:1]  # padded to a multiple of 2 ranks
    assert rank0 == full[0::2] and rank1 == full[1::2]


def test_infinite_stream_is_the_finite_epochs_one_after_the_other():
    finite = MixtureSampler(FakeMixture([10, 5]), policy='uniform', seed=3)
    epochs = []
    for epoch in range(3):
        finite.set_epoch(epoch)
        epochs += list(finite)
    endless = MixtureSampler(FakeMixture([10, 5]), policy='uniform', seed=3, infinite=True)
    assert list(itertools.islice(iter(endless), 3 * 15)) == epochs


def test_an_iteration_loop_never_restarts_an_infinite_sampler():
    # mmengine's iterator restarts a finite dataloader at its end, with a warning and a 2 s
    # pause; with the infinite sampler it never reaches an end (and batches are the same)
    sampler = MixtureSampler(FakeMixture([4, 2]), policy='proportional', seed=0, infinite=True)
    loader = DataLoader(list(range(6)), batch_size=2, sampler=sampler)
    iterator = _InfiniteDataloaderIterator(loader)
    batches = [next(iterator).tolist() for _ in range(9)]  # 3 epochs of 3 batches
    assert iterator._epoch == 0
    finite = MixtureSampler(FakeMixture([4, 2]), policy='proportional', seed=0)
    expected = []
    for epoch in range(3):
        finite.set_epoch(epoch)
        order = list(finite)
        expected += [order[i:i + 2] for i in range(0, 6, 2)]
    assert batches == expected
