"""Plots: routing heatmaps and loss curves."""
from .routing_heatmap import heatmap_file, plot_loss_curve, plot_routing_heatmap

__all__ = ['plot_routing_heatmap', 'plot_loss_curve', 'heatmap_file']
