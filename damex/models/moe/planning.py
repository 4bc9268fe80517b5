"""Planning the dataset-to-expert map from features, and a gate that follows the plan.

Two pieces, both plain numpy / torch and independent of the detector:
- :func:`plan_assignment` clusters datasets into experts from the mean token of each
  dataset at an MoE layer (HydraNets-style: average a group's features, cluster the
  averages), under a per-expert load cap;
- :func:`gate_from_plan` builds router gate weights that send each dataset's mean token to
  its planned expert with a confident softmax (Revisiting single-gated MoE: start the gate
  from a clustering of a base model's embeddings, so routing is right from the first step).
"""
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def plan_assignment(means: np.ndarray, shares: Sequence[float], num_experts: int,
                    seed: int = 0, restarts: int = 10,
                    max_load: float = None) -> Tuple[List[int], float]:
    """Assign K datasets to E experts: size-aware spherical k-means with a load cap.

    Why this method: the datasets are few (tens at most) and each is summarised by one mean
    token, so a clustering of the means is the natural plan (similar datasets share an
    expert and its parameters), but plain k-means may pile most of the training tokens onto
    one expert or leave an expert empty. So each assignment step (1) first gives every
    expert one dataset (a minimum-cost matching, so no expert is empty when K >= E), then
    (2) places the other datasets, most decided first, at the nearest centroid whose load
    (sum of the datasets' shares of training tokens) stays within ``max_load`` (default
    max(1.5 / E, the largest share)); the centroid update weighs datasets by share. The
    best of ``restarts`` k-means++ starts (lowest share-weighted cosine distance) wins;
    the result is deterministic for a seed.

    means: (K, D); shares: (K,) summing to 1. Returns (expert per dataset, cost).
    """
    means = _normalize(np.asarray(means, dtype=np.float64))
    shares = np.asarray(shares, dtype=np.float64)
    num_datasets = len(means)
    if num_datasets <= num_experts:
        return list(range(num_datasets)), 0.0
    cap = max(1.5 / num_experts, shares.max()) if max_load is None else max_load
    rng = np.random.default_rng(seed)
    best, best_cost = None, np.inf
    for _ in range(restarts):
        centroids = _kmeans_pp(means, num_experts, rng)
        assignment = None
        for _ in range(100):
            new = _capped_assignment(1.0 - means @ centroids.T, shares, cap)
            if assignment is not None and new == assignment:
                break
            assignment = new
            centroids = np.stack([
                _normalize((shares[np.array(assignment) == e, None]
                            * means[np.array(assignment) == e]).sum(0))
                for e in range(num_experts)])
        cost = float(sum(shares[d] * (1.0 - means[d] @ centroids[e])
                         for d, e in enumerate(assignment)))
        if cost < best_cost - 1e-12:
            best, best_cost = assignment, cost
    return best, best_cost


def _kmeans_pp(points: np.ndarray, k: int, rng) -> np.ndarray:
    centroids = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        distance = np.min(1.0 - points @ np.stack(centroids).T, axis=1).clip(min=0)
        total = distance.sum()
        index = rng.choice(len(points), p=distance / total) if total > 0 else rng.integers(
            len(points))
        centroids.append(points[index])
    return np.stack(centroids)


def _capped_assignment(cost: np.ndarray, shares: np.ndarray, cap: float) -> List[int]:
    num_datasets, num_experts = cost.shape
    assignment = [-1] * num_datasets
    load = np.zeros(num_experts)
    rows, cols = linear_sum_assignment(cost)  # one dataset per expert: none stays empty
    for d, e in zip(rows, cols):
        assignment[d], load[e] = int(e), load[e] + shares[d]
    rest = [d for d in range(num_datasets) if assignment[d] < 0]
    sorted_cost = np.sort(cost, axis=1)
    regret = sorted_cost[:, 1] - sorted_cost[:, 0]
    for d in sorted(rest, key=lambda d: (-regret[d], d)):
        for e in np.argsort(cost[d], kind='stable'):
            if load[e] + shares[d] <= cap + 1e-12:
                break
        else:
            e = int(np.argmin(load))
        assignment[d], load[e] = int(e), load[e] + shares[d]
    return assignment


def gate_from_plan(dataset_means: Dict[str, Sequence[float]], experts: Dict[str, int],
                   num_experts: int, covariance: Optional[Sequence[Sequence[float]]] = None,
                   confidence: float = 5.0, shrinkage: float = 0.01,
                   ridge: float = 1e-6) -> torch.Tensor:
    """(E, D) gate weights W under which tokens route to their dataset's planned expert.

    W gives every dataset's mean token exactly the logits ``confidence * (onehot(expert) -
    1/E)`` (softmax ~0.98 for E = 3 at 5) and, among all such W, disturbs the logits of a
    token the least for the token's variation around its dataset's mean: it minimises
    trace(W S W^T) with S the pooled within-dataset token ``covariance`` (shrunk by
    ``shrinkage`` towards its mean variance): W = T^T (M S^-1 M^T)^-1 M S^-1, M the means,
    T the target logits. Tokens vary far more within a dataset than the dataset means
    differ (measured on the demo: ~5x), so discounting the directions they vary in is what
    makes the routing right per token, not only per mean. Without a covariance S = I (the
    minimum-norm gate). Several datasets may share an expert.
    """
    names = list(dataset_means)
    missing = sorted(n for n in names if n not in experts)
    if missing:
        raise KeyError(f'the plan has means but no expert for {missing}')
    for name in names:
        if not 0 <= experts[name] < num_experts:
            raise ValueError(f'the plan maps {name!r} to expert {experts[name]}, but the layer '
                             f'has {num_experts} experts')
    means = torch.tensor([dataset_means[n] for n in names], dtype=torch.float64)  # (K, D)
    targets = torch.full((len(names), num_experts), -confidence / num_experts,
                         dtype=torch.float64)
    targets[torch.arange(len(names)), torch.tensor([experts[n] for n in names])] += confidence
    dims = means.shape[1]
    if covariance is None:
        whitened = means  # M S^-1 with S = I
    else:
        cov = torch.tensor(covariance, dtype=torch.float64)
        cov = (1 - shrinkage) * cov + shrinkage * cov.diagonal().mean() * torch.eye(
            dims, dtype=torch.float64)
        whitened = torch.linalg.solve(cov, means.T).T  # M S^-1 (S symmetric)
    gram = whitened @ means.T  # M S^-1 M^T
    gram += ridge * gram.diagonal().mean() * torch.eye(len(names), dtype=torch.float64)
    return (torch.linalg.solve(gram, targets).T @ whitened).float()
