"""COCO box AP of every dataset of a mixture in its own label space, plus routing analysis."""
import contextlib
import io
import os.path as osp
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.logging import MMLogger
from mmengine.visualization import Visualizer
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from terminaltables import AsciiTable

from mmdet.registry import METRICS
from ..datasets.label_space import DatasetEntry, LabelSpace
from ..visualization import heatmap_file, plot_routing_heatmap
from .routing_stats import routing_accuracy

COCO_KEYS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75', 'bbox_mAP_s', 'bbox_mAP_m', 'bbox_mAP_l')


def coco_ground_truth(entry: DatasetEntry, images: List[dict]) -> COCO:
    """A COCO object built from the loaded instances of the evaluated images.

    ``iscrowd`` = the instance's ignore flag (as mmdet's CocoMetric), so COCOeval ignores
    detections matched to it; category ids are the dataset's own class indices.
    """
    annotations = []
    for image in images:
        for inst in image['instances']:
            x1, y1, x2, y2 = inst['bbox']
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image['img_id'], category_id=inst['bbox_label'],
                bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1),
                iscrowd=int(inst.get('ignore_flag', 0))))
    coco = COCO()
    coco.dataset = dict(
        images=[dict(id=i['img_id'], width=i['width'], height=i['height']) for i in images],
        annotations=annotations,
        categories=[dict(id=c, name=name) for c, name in enumerate(entry.classes)])
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_box_ap(coco_gt: COCO, detections: List[dict], img_ids: Sequence[int],
                iou_thrs: Optional[Sequence[float]] = None) -> Dict[str, float]:
    """COCOeval box AP (AP, AP50, AP75, APs, APm, APl) restricted to ``img_ids``.

    No detection at all gives 0.0 for every key (a model that predicts nothing has AP 0).
    """
    if not detections:
        return {key: 0.0 for key in COCO_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, 'bbox')
        evaluator.params.imgIds = list(img_ids)
        if iou_thrs is not None:
            evaluator.params.iouThrs = np.asarray(iou_thrs)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {key: float(value) for key, value in zip(COCO_KEYS, evaluator.stats[:6])}


@METRICS.register_module()
class PerDatasetCocoMetric(BaseMetric):
    """Per-dataset COCO box AP for a :class:`~damex.datasets.DatasetMixture` test set.

    Reports ``<dataset>/bbox_mAP`` (and ``_50``, ``_75``, ``_s``, ``_m``, ``_l``) for each
    dataset in its own label space, ``mean/bbox_mAP`` and ``mean/bbox_mAP_50`` over
    datasets, and, for models with MoE layers, ``routing/accuracy`` (share of each
    dataset's tokens that reach its mapped expert, mean over datasets and layers),
    ``routing/<layer>/accuracy`` and ``routing/<dataset>/accuracy``. Prints one table.

    Ground truth: the dataset's COCO JSON when it has one (``ann_file`` in the label
    space), otherwise the loaded instances (DOTA, VOC...), which the mixture adds to
    every test-mode sample. Predictions arrive in the unified label space and are mapped
    to each dataset's own ids; predictions of other datasets' classes are dropped.

    Args:
        heatmap_dir: where to save one dataset x expert heatmap per MoE layer; default the
            visualizer's save dir (``<work_dir>/<timestamp>/vis_data/routing``).
        save_heatmaps: set False to skip the PNGs.
        iou_thrs: COCOeval IoU thresholds (default COCO's).
    """

    default_prefix: Optional[str] = None

    def __init__(self, heatmap_dir: Optional[str] = None, save_heatmaps: bool = True,
                 iou_thrs: Optional[Sequence[float]] = None, collect_device: str = 'cpu',
                 prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.heatmap_dir = heatmap_dir
        self.save_heatmaps = save_heatmaps
        self.iou_thrs = iou_thrs
        self.heatmap_files: List[str] = []

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for sample in data_samples:
            if 'dataset_id' not in sample:
                raise KeyError('PerDatasetCocoMetric: a sample has no "dataset_id"; evaluate a '
                               'DatasetMixture (it tags every sample with its dataset)')
            pred = sample['pred_instances']
            height, width = sample['ori_shape']
            result = dict(dataset_id=sample['dataset_id'], img_id=sample['img_id'],
                          width=width, height=height,
                          bboxes=pred['bboxes'].cpu().numpy(), scores=pred['scores'].cpu().numpy(),
                          labels=pred['labels'].cpu().numpy(),
                          instances=sample.get('instances'))
            if 'routing_counts' in sample:
                result['routing_counts'] = sample['routing_counts'].cpu().numpy()
                result['routing_layers'] = sample['routing_layers']
            self.results.append(result)

    def compute_metrics(self, results: list) -> Dict[str, float]:
        logger = MMLogger.get_current_instance()
        label_space = LabelSpace.from_metainfo(self.dataset_meta)
        metrics: Dict[str, float] = {}
        table = [['dataset', 'images', *COCO_KEYS]]
        for dataset_id, entry in enumerate(label_space.datasets):
            images = [r for r in results if r['dataset_id'] == dataset_id]
            stats = self.evaluate_dataset(label_space, dataset_id, entry, images)
            metrics.update({f'{entry.name}/{k}': v for k, v in stats.items()})
            table.append([entry.name, len(images), *(f'{stats[k]:.3f}' for k in COCO_KEYS)])
        for key in ('bbox_mAP', 'bbox_mAP_50'):
            metrics[f'mean/{key}'] = float(np.mean(
                [metrics[f'{d.name}/{key}'] for d in label_space.datasets]))
        table.append(['mean', len(results), f'{metrics["mean/bbox_mAP"]:.3f}',
                      f'{metrics["mean/bbox_mAP_50"]:.3f}', '', '', '', ''])
        logger.info('Per-dataset box AP (each dataset in its own label space):\n'
                    + AsciiTable(table).table)
        metrics.update(self.routing_metrics(label_space, results, logger))
        return metrics

    def evaluate_dataset(self, label_space: LabelSpace, dataset_id: int, entry: DatasetEntry,
                         images: List[dict]) -> Dict[str, float]:
        if not images:
            return {key: 0.0 for key in COCO_KEYS}
        ann_file = label_space.ann_files[dataset_id]
        if ann_file:
            with contextlib.redirect_stdout(io.StringIO()):
                coco_gt = COCO(ann_file)
            cat_ids = [c['id'] for name in entry.classes
                       for c in coco_gt.dataset['categories'] if c['name'] == name]
        else:
            if any(image['instances'] is None for image in images):
                raise KeyError(f'PerDatasetCocoMetric: no ground truth for dataset {entry.name!r}: '
                               'its samples carry no "instances" (is the dataset in test_mode?)')
            coco_gt = coco_ground_truth(entry, images)
            cat_ids = list(range(len(entry.classes)))
        detections = []
        for image in images:
            own = label_space.to_dataset(dataset_id, torch.as_tensor(image['labels'])).numpy()
            for box, score, label in zip(image['bboxes'], image['scores'], own):
                if label < 0:
                    continue
                x1, y1, x2, y2 = (float(v) for v in box)
                detections.append(dict(image_id=image['img_id'], category_id=cat_ids[label],
                                       bbox=[x1, y1, x2 - x1, y2 - y1], score=float(score)))
        return coco_box_ap(coco_gt, detections, [i['img_id'] for i in images], self.iou_thrs)

    def routing_metrics(self, label_space: LabelSpace, results: list, logger) -> Dict[str, float]:
        routed = [r for r in results if 'routing_counts' in r]
        if not routed:
            return {}
        layers = routed[0]['routing_layers']
        num_experts = routed[0]['routing_counts'].shape[-1]
        counts = np.zeros((len(layers), len(label_space.datasets), num_experts), dtype=np.int64)
        for r in routed:
            counts[:, r['dataset_id']] += r['routing_counts']
        present = [d for d in range(len(label_space.datasets)) if counts[:, d].sum() > 0]
        experts = [label_space.datasets[d].expert for d in present]
        metrics = {}
        per_layer = []
        for index, layer in enumerate(layers):
            accuracy = routing_accuracy(torch.from_numpy(counts[index][present]), experts)
            per_layer.append(accuracy)
            metrics[f'routing/{layer}/accuracy'] = float(accuracy.mean())
        stacked = torch.stack(per_layer)  # (layers, datasets)
        for column, d in enumerate(present):
            metrics[f'routing/{label_space.datasets[d].name}/accuracy'] = float(
                stacked[:, column].mean())
        metrics['routing/accuracy'] = float(stacked.mean())
        logger.info(f'Routing accuracy (share of a dataset\'s tokens reaching its expert): '
                    f'{metrics["routing/accuracy"]:.3f}')
        if self.save_heatmaps:
            self.heatmap_files = self.save_routing_heatmaps(label_space, layers, counts, present)
            if self.heatmap_files:
                logger.info(f'Routing heatmaps saved to {osp.dirname(self.heatmap_files[0])}')
        return metrics

    def save_routing_heatmaps(self, label_space, layers, counts, present) -> List[str]:
        out_dir = self.heatmap_dir or self._visualizer_dir()
        if out_dir is None:
            MMLogger.get_current_instance().warning(
                'PerDatasetCocoMetric: no heatmap_dir and no visualizer save dir; heatmaps '
                'not saved')
            return []
        names = [label_space.datasets[d].name for d in present]
        experts = [label_space.datasets[d].expert for d in present]
        return [plot_routing_heatmap(counts[i][present], names, experts,
                                     f'routing, {layer}', heatmap_file(out_dir, layer))
                for i, layer in enumerate(layers)]

    @staticmethod
    def _visualizer_dir() -> Optional[str]:
        try:
            visualizer = Visualizer.get_current_instance()
        except RuntimeError:  # no visualizer: not run by a Runner
            return None
        for backend in getattr(visualizer, '_vis_backends', {}).values():
            save_dir = getattr(backend, '_save_dir', None)
            if save_dir:
                return osp.join(save_dir, 'routing')
        return None
