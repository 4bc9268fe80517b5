"""Per-dataset evaluation and routing analysis."""
from .per_dataset_coco_metric import PerDatasetCocoMetric, coco_box_ap, coco_ground_truth
from .routing_stats import routing_accuracy, tokens_per_expert

__all__ = ['PerDatasetCocoMetric', 'coco_box_ap', 'coco_ground_truth', 'routing_accuracy',
           'tokens_per_expert']
