"""Auxiliary routing losses, each a small function that cites where it comes from.

Axis letters: T tokens of a routing group, E experts, K top-k. Every function takes
(T, E) for one group or (G, T, E) for G groups of equal size, computes the loss of each
group and returns the mean over groups: an unweighted scalar; the detector applies the
weights.
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation over the last dim, Var/Mean^2 with the population
    variance (as V-MoE)."""
    mean = values.mean(dim=-1)
    return values.var(dim=-1, unbiased=False) / (mean * mean + 1e-10)


def importance_loss(gates: Tensor) -> Tensor:
    """V-MoE importance loss (Riquelme et al. 2021, A.2): CV^2 of sum_t gates[t, e].

    gates: (T, E) softmax of the clean router logits (before noise), in training and in
    eval, as V-MoE ("importance loss is applied before adding noise").
    """
    return cv_squared(gates.sum(dim=-2)).mean()


def load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float, top_k: int) -> Tensor:
    """V-MoE load loss (Riquelme et al. 2021, A.2): CV^2 of the expected expert load.

    The load of expert e for token t is the probability that e is still among the top-k
    experts when fresh noise N(0, noise_std^2) is drawn for e alone, the other experts'
    noisy logits fixed: P(logits[t, e] + eps >= threshold_t), threshold_t being the k-th
    largest noisy logit of token t.

    logits, noisy_logits: (T, E); noise_std: the std actually used (already divided by E).
    """
    threshold = noisy_logits.topk(top_k, dim=-1).values[..., -1:]
    noise_required_to_win = threshold - logits
    # no argument validation: non-finite logits reach the layer's check, which names the layer
    normal = torch.distributions.Normal(logits.new_zeros(()), logits.new_tensor(noise_std),
                                        validate_args=False)
    prob = 1.0 - normal.cdf(noise_required_to_win)
    return cv_squared(prob.mean(dim=-2)).mean()


def switch_loss(gates: Tensor) -> Tensor:
    """Switch Transformer balance loss (Fedus et al. 2021, eq. 4): E * sum_e f_e * P_e.

    f_e is the fraction of tokens whose first choice is e, P_e the mean probability of e.
    gates: (T, E) router probabilities.
    """
    num_experts = gates.shape[-1]
    fraction = F.one_hot(gates.argmax(dim=-1), num_experts).to(gates.dtype).mean(dim=-2)
    return (num_experts * (fraction * gates.mean(dim=-2)).sum(dim=-1)).mean()


def z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean_t logsumexp(logits[t])^2."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def damex_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """DAMEX loss (Jain et al. 2023): cross-entropy of every token's logits to its dataset's expert.

    logits: (..., T, E) router logits before noise; targets: (..., T) expert index h(d) of
    each token (groups of equal size: the mean over tokens is the mean over groups).
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
