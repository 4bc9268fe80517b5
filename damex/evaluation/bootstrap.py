"""Bootstrap intervals of box AP over validation images (seeds pooled).

A replicate resamples each dataset's images with replacement (the same draw for every
seed, so seeds are pooled over the same resampled sets), recomputes every seed's COCO AP
on it with pycocotools (a duplicated image enters as a new image of its own), and averages
over seeds; the interval is the central ``level`` share of the replicates. The mean AP's
replicate is the mean over datasets of the datasets' replicates, with the same draws.
"""
import contextlib
import copy
import io
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from pycocotools.coco import COCO

from .per_dataset_coco_metric import UNDEFINED, coco_box_ap


@dataclass
class DatasetEvaluation:
    """What COCOeval needs for one dataset of one run: its ground truth, the detections
    (COCO result dicts), the evaluated image ids and categories."""
    coco_gt: COCO
    detections: List[dict]
    img_ids: List[int]
    cat_ids: List[int]

    def resampled(self, picks: Sequence[int]) -> 'DatasetEvaluation':
        """The evaluation on images ``img_ids[p] for p in picks`` (repeats allowed): the
        k-th pick becomes image k, with its ground truth and detections."""
        gt = self.coco_gt
        images, annotations, detections = [], [], []
        by_image: Dict[int, List[dict]] = {}
        for det in self.detections:
            by_image.setdefault(det['image_id'], []).append(det)
        for new_id, pick in enumerate(picks, start=1):
            old_id = self.img_ids[pick]
            images.append(dict(gt.imgs[old_id], id=new_id))
            for ann in gt.imgToAnns.get(old_id, ()):
                annotations.append(dict(ann, id=len(annotations) + 1, image_id=new_id))
            for det in by_image.get(old_id, ()):
                detections.append(dict(det, image_id=new_id))
        coco = COCO()
        coco.dataset = dict(images=images, annotations=annotations,
                            categories=copy.deepcopy(gt.dataset['categories']))
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
        return DatasetEvaluation(coco, detections, list(range(1, len(picks) + 1)),
                                 list(self.cat_ids))

    def box_ap(self, iou_thrs: Optional[Sequence[float]] = None) -> float:
        return coco_box_ap(self.coco_gt, self.detections, self.img_ids, iou_thrs,
                           self.cat_ids)['bbox_mAP']


def bootstrap_ap(runs: Sequence[Dict[str, DatasetEvaluation]], num_samples: int = 200,
                 level: float = 0.9, seed: int = 0
                 ) -> Dict[str, Tuple[float, float, float]]:
    """``{dataset or 'mean': (AP, low, high)}`` over runs (seeds) of one variant.

    runs: per seed, ``{dataset name: DatasetEvaluation}`` on the same validation images.
    AP is the mean over seeds on all images; (low, high) the central ``level`` interval of
    the bootstrap replicates. A dataset whose AP is undefined (no ground truth) is left out,
    of the mean too; a replicate that draws no ground truth for a dataset is not counted for
    it (and the mean takes the datasets defined in that replicate).
    """
    full = {name: [r[name].box_ap() for r in runs] for name in runs[0]}
    names = [name for name, aps in full.items() if UNDEFINED not in aps]
    point = {name: float(np.mean(full[name])) for name in names}
    rng = np.random.default_rng(seed)
    replicates: Dict[str, List[float]] = {name: [] for name in names + ['mean']}
    for _ in range(num_samples):
        values = []
        for name in names:
            picks = rng.integers(0, len(runs[0][name].img_ids), len(runs[0][name].img_ids))
            aps = [r[name].resampled(picks).box_ap() for r in runs]
            if any(ap == UNDEFINED for ap in aps):
                continue
            replicates[name].append(float(np.mean(aps)))
            values.append(replicates[name][-1])
        if values:
            replicates['mean'].append(float(np.mean(values)))
    point['mean'] = float(np.mean(list(point.values()))) if names else UNDEFINED
    tail = (1 - level) / 2
    out = {}
    for name, value in point.items():
        samples = replicates[name]
        low, high = (np.quantile(samples, [tail, 1 - tail]) if samples else (np.nan, np.nan))
        out[name] = (value, float(low), float(high))
    return out
