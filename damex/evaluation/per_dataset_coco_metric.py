"""COCO box AP of every dataset of a mixture in its own label space, plus routing analysis."""
import contextlib
import io
import os.path as osp
import warnings
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
    detections matched to it; category ids are the dataset's own class indices. Boxes are
    clipped to the image, as predictions are (DOTA polygons and VOC boxes may extend past
    it); a box wholly outside the image is dropped, with one counted warning per dataset.
    """
    annotations = []
    outside = 0
    for image in images:
        width, height = image['width'], image['height']
        for inst in image['instances']:
            x1, y1, x2, y2 = inst['bbox']
            x1, x2 = min(max(x1, 0), width), min(max(x2, 0), width)
            y1, y2 = min(max(y1, 0), height), min(max(y2, 0), height)
            if x2 <= x1 or y2 <= y1:
                outside += 1
                continue
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image['img_id'], category_id=inst['bbox_label'],
                bbox=[x1, y1, x2 - x1, y2 - y1], area=(x2 - x1) * (y2 - y1),
                iscrowd=int(inst.get('ignore_flag', 0))))
    if outside:
        warnings.warn(f'PerDatasetCocoMetric: dataset {entry.name!r}: dropped {outside} ground-'
                      'truth boxes that lie wholly outside their image')
    coco = COCO()
    coco.dataset = dict(
        images=[dict(id=i['img_id'], width=i['width'], height=i['height']) for i in images],
        annotations=annotations,
        categories=[dict(id=c, name=name) for c, name in enumerate(entry.classes)])
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


#: the value of every key for a dataset without ground truth: COCO's "undefined"
UNDEFINED = -1.0


def has_ground_truth(coco_gt: COCO, img_ids: Sequence[int], cat_ids: Sequence[int]) -> bool:
    """Whether any (non-crowd) box of the classes lies in the evaluated images."""
    cats = set(cat_ids)
    return any(ann['category_id'] in cats and not ann.get('iscrowd', 0)
               for img_id in img_ids for ann in coco_gt.imgToAnns.get(img_id, ()))


def coco_box_ap(coco_gt: COCO, detections: List[dict], img_ids: Sequence[int],
                iou_thrs: Optional[Sequence[float]] = None,
                cat_ids: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """COCOeval box AP (AP, AP50, AP75, APs, APm, APl) restricted to ``img_ids`` and to the
    categories ``cat_ids`` (default all of the ground truth's).

    No ground truth in the images: -1.0 for every key (undefined, as COCOeval). No
    detection at all gives 0.0 (a model that predicts nothing has AP 0).
    """
    cat_ids = list(coco_gt.getCatIds()) if cat_ids is None else list(cat_ids)
    if not has_ground_truth(coco_gt, img_ids, cat_ids):
        return {key: UNDEFINED for key in COCO_KEYS}
    if not detections:
        return {key: 0.0 for key in COCO_KEYS}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, 'bbox')
        evaluator.params.imgIds = list(img_ids)
        evaluator.params.catIds = cat_ids
        if iou_thrs is not None:
            evaluator.params.iouThrs = np.asarray(iou_thrs)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {key: float(value) for key, value in zip(COCO_KEYS, evaluator.stats[:6])}


def format_ap(value: float) -> str:
    return 'n/a' if value == UNDEFINED else f'{value:.3f}'


@METRICS.register_module()
class PerDatasetCocoMetric(BaseMetric):
    """Per-dataset COCO box AP for a :class:`~damex.datasets.DatasetMixture` test set.

    Reports ``<dataset>/bbox_mAP`` (and ``_50``, ``_75``, ``_s``, ``_m``, ``_l``) for each
    dataset in its own label space (-1.0, shown as n/a, for a dataset without any ground
    truth in its evaluated images), ``mean/bbox_mAP`` and ``mean/bbox_mAP_50`` over the
    datasets with ground truth, and, for models with MoE layers, ``routing/accuracy`` (share of each
    dataset's tokens that reach its mapped expert, mean over datasets and layers),
    ``routing/<layer>/accuracy`` and ``routing/<dataset>/accuracy``. Prints one table.

    Ground truth: the dataset's COCO JSON when it has one (``ann_file`` in the label
    space), otherwise the loaded instances (DOTA, VOC...), which the mixture adds to
    every test-mode sample; only the dataset's own classes are scored. Predictions arrive
    in the unified label space of the mixture in ``dataset_meta`` (the detector maps its
    trained ids to it) and are mapped to each dataset's own ids; predictions of other
    datasets' classes are dropped. Routing accuracy compares with each sample's
    ``expert_id`` (the detector sets the trained expert map's).

    Args:
        heatmap_dir: where to save one dataset x expert heatmap per MoE layer; default the
            run's visualizer dir (``<work_dir>/<timestamp>/vis_data/routing``).
        save_heatmaps: set False to skip the PNGs.
        iou_thrs: COCOeval IoU thresholds (default COCO's).
    """

    #: keys are already namespaced ('<dataset>/bbox_mAP', 'routing/...'): no prefix (and
    #: no "prefix is not set" warning); ``prefix=`` still adds one
    default_prefix: Optional[str] = ''

    def __init__(self, heatmap_dir: Optional[str] = None, save_heatmaps: bool = True,
                 iou_thrs: Optional[Sequence[float]] = None, collect_device: str = 'cpu',
                 prefix: Optional[str] = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.heatmap_dir = heatmap_dir
        self.save_heatmaps = save_heatmaps
        self.iou_thrs = iou_thrs
        self.heatmap_files: List[str] = []
        #: per dataset of the last evaluation, what COCOeval got (coco_gt, detections,
        #: img_ids, cat_ids): for bootstrap intervals (:mod:`damex.evaluation.bootstrap`)
        self.evaluation_inputs: Dict[str, dict] = {}

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
                          instances=sample.get('instances'), expert_id=sample.get('expert_id'),
                          label_space=sample.get('label_space'))
            if 'routing_counts' in sample:
                result['routing_counts'] = sample['routing_counts'].cpu().numpy()
                result['routing_layers'] = sample['routing_layers']
            self.results.append(result)

    def compute_metrics(self, results: list) -> Dict[str, float]:
        logger = MMLogger.get_current_instance()
        label_space = LabelSpace.from_metainfo(self.dataset_meta)
        self.check_label_space(results)
        metrics: Dict[str, float] = {}
        table = [['dataset', 'images', *COCO_KEYS]]
        defined = []
        self.evaluation_inputs = {}
        for dataset_id, entry in enumerate(label_space.datasets):
            images = [r for r in results if r['dataset_id'] == dataset_id]
            stats = self.evaluate_dataset(label_space, dataset_id, entry, images)
            metrics.update({f'{entry.name}/{k}': v for k, v in stats.items()})
            if stats['bbox_mAP'] != UNDEFINED:
                defined.append(entry.name)
            table.append([entry.name, len(images), *(format_ap(stats[k]) for k in COCO_KEYS)])
        # the mean is over the datasets with ground truth; none: undefined
        for key in ('bbox_mAP', 'bbox_mAP_50'):
            values = [metrics[f'{name}/{key}'] for name in defined]
            metrics[f'mean/{key}'] = float(np.mean(values)) if values else UNDEFINED
        table.append([f'mean ({len(defined)} datasets)', len(results),
                      format_ap(metrics['mean/bbox_mAP']),
                      format_ap(metrics['mean/bbox_mAP_50']), '', '', '', ''])
        logger.info('Per-dataset box AP (each dataset in its own label space):\n'
                    + AsciiTable(table).table)
        metrics.update(self.routing_metrics(label_space, results, logger))
        return metrics

    def check_label_space(self, results: list) -> None:
        """Predictions must be in the label space of ``dataset_meta``'s mixture."""
        expected = self.dataset_meta.get('label_space')
        for r in results:
            if r.get('label_space') is not None and r['label_space'] != expected:
                raise ValueError(
                    'PerDatasetCocoMetric: a sample was tagged by another mixture (datasets '
                    f'{[d["name"] for d in r["label_space"]["datasets"]]}) than the one in the '
                    f'metric\'s dataset_meta ({[d["name"] for d in expected["datasets"]]}); set '
                    'metric.dataset_meta to the evaluated mixture\'s metainfo')

    def evaluate_dataset(self, label_space: LabelSpace, dataset_id: int, entry: DatasetEntry,
                         images: List[dict]) -> Dict[str, float]:
        if not images:
            return {key: UNDEFINED for key in COCO_KEYS}
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
        img_ids = [i['img_id'] for i in images]
        self.evaluation_inputs[entry.name] = dict(coco_gt=coco_gt, detections=detections,
                                                  img_ids=img_ids, cat_ids=list(cat_ids))
        return coco_box_ap(coco_gt, detections, img_ids, self.iou_thrs, cat_ids)

    def routing_metrics(self, label_space: LabelSpace, results: list, logger) -> Dict[str, float]:
        routed = [r for r in results if 'routing_counts' in r]
        if not routed:
            return {}
        layers = routed[0]['routing_layers']
        num_experts = routed[0]['routing_counts'].shape[-1]
        counts = np.zeros((len(layers), len(label_space.datasets), num_experts), dtype=np.int64)
        expert_of = {d: entry.expert for d, entry in enumerate(label_space.datasets)}
        for r in routed:
            counts[:, r['dataset_id']] += r['routing_counts']
            if r.get('expert_id') is not None:  # the trained map, set by the detector
                expert_of[r['dataset_id']] = r['expert_id']
        present = [d for d in range(len(label_space.datasets)) if counts[:, d].sum() > 0]
        experts = [expert_of[d] for d in present]
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
            self.heatmap_files = self.save_routing_heatmaps(label_space, layers, counts, present,
                                                            experts)
            if self.heatmap_files:
                logger.info(f'Routing heatmaps saved to {osp.dirname(self.heatmap_files[0])}')
        return metrics

    def save_routing_heatmaps(self, label_space, layers, counts, present,
                              experts) -> List[str]:
        out_dir = self.heatmap_dir or self._run_heatmap_dir()
        if out_dir is None:
            MMLogger.get_current_instance().warning(
                'PerDatasetCocoMetric: no heatmap_dir and no visualizer save dir; heatmaps '
                'not saved')
            return []
        names = [label_space.datasets[d].name for d in present]
        return [plot_routing_heatmap(counts[i][present], names, experts,
                                     f'routing, {layer}', heatmap_file(out_dir, layer))
                for i, layer in enumerate(layers)]

    @staticmethod
    def _run_heatmap_dir() -> Optional[str]:
        """``<log_dir>/vis_data/routing`` of the run this metric evaluates in.

        The run's log dir comes from its logger (mmengine names each Runner's logger after
        the experiment), not from the visualizer: mmdet's configs name the visualizer
        ``'visualizer'``, so a second Runner in the same process gets the first one's
        instance, whose save dir is the first run's.
        """
        log_file = getattr(MMLogger.get_current_instance(), 'log_file', None)
        if log_file:
            return osp.join(osp.dirname(log_file), 'vis_data', 'routing')
        try:
            visualizer = Visualizer.get_current_instance()
        except RuntimeError:  # no visualizer: not run by a Runner
            return None
        for backend in getattr(visualizer, '_vis_backends', {}).values():
            save_dir = getattr(backend, '_save_dir', None)
            if save_dir:
                return osp.join(save_dir, 'routing')
        return None
