"""Dataset x expert routing heatmaps (one per MoE layer), drawn with matplotlib."""
import os
import os.path as osp
from typing import Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle


def plot_routing_heatmap(counts: np.ndarray, dataset_names: Sequence[str],
                         experts: Sequence[int], title: str, path: str,
                         dpi: int = 100, figsize=(6.4, 4.8)) -> str:
    """Save a heatmap of the share of each dataset's tokens per expert; returns the path.

    Rows are datasets (normalised to 1), columns experts; the mapped expert of each dataset
    is outlined, and each cell shows its percentage.
    """
    counts = np.asarray(counts, dtype=np.float64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig = Figure(figsize=figsize, dpi=dpi)  # no pyplot: no backend, no global state
    ax = fig.subplots()
    image = ax.imshow(share, vmin=0, vmax=1, cmap='viridis', aspect='auto')
    ax.set_xticks(range(share.shape[1]))
    ax.set_xticklabels([f'E{e}' for e in range(share.shape[1])])
    ax.set_yticks(range(share.shape[0]))
    ax.set_yticklabels(dataset_names)
    ax.set_xlabel('expert')
    ax.set_ylabel('dataset')
    ax.set_title(title, fontsize=9)
    for row, expert in enumerate(experts):
        ax.add_patch(Rectangle((expert - 0.5, row - 0.5), 1, 1, fill=False,
                                   edgecolor='red', linewidth=2))
        for col in range(share.shape[1]):
            ax.text(col, row, f'{100 * share[row, col]:.0f}', ha='center', va='center',
                    color='white' if share[row, col] < 0.5 else 'black', fontsize=7)
    fig.colorbar(image, ax=ax, label='share of the dataset\'s tokens')
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def plot_loss_curve(iterations: Sequence[int], losses: Sequence[float], path: str,
                    title: str = 'training loss') -> str:
    """Save a line plot of the total loss over iterations; returns the path."""
    fig = Figure(figsize=(6.4, 4.0), dpi=100)  # no pyplot: no backend, no global state
    ax = fig.subplots()
    ax.plot(iterations, losses)
    ax.set_xlabel('iteration')
    ax.set_ylabel('loss')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def heatmap_file(out_dir: str, layer: str, step: Optional[int] = None) -> str:
    suffix = '' if step is None else f'_{step}'
    return osp.join(out_dir, f'routing_{layer.replace(".", "_")}{suffix}.png')
