"""Warm-start a DAMEX-DINO config from a pretrained dense DINO checkpoint (e.g. mmdet's COCO one).

    python tools/model_converters/upcycle_dino.py SRC_CKPT CONFIG OUT_CKPT
        [--src-classes coco|FILE] [--class-map FILE]

Writes a checkpoint that ``load_from`` takes without a size warning:
- every weight of the source whose name and shape the config's model shares is copied;
- every MoE layer's experts are copied from the source FFN of the same layer (sparse
  upcycling); with a shared expert (``moe.shared_expert``) the source FFN becomes the
  shared expert and the routed experts get its fc1 and a zero output layer, so the
  converted model computes exactly what the dense one does; routers keep their init;
- the class-dependent tensors (the 7 classification branches ``bbox_head.cls_branches.*``,
  weight rows and bias, and the denoising label embedding
  ``dn_query_generator.label_embedding.weight``): for every unified class of the config's
  training mixture whose name matches a source class (case-insensitive, after the optional
  ``--class-map``), the source's row; other classes keep the config's init (bias at the
  focal-loss prior);
- the head carries the config's label space (as after training on that mixture).
A source key the converter does not know how to carry over is an error naming it: nothing
is dropped silently.

Source classes: the checkpoint's ``meta.dataset_meta.classes`` when present, else
``--src-classes`` (``coco`` for mmdet's COCO names, or a file: a JSON list or one name a
line). ``--class-map``: a flat JSON object ``{"source-side name": "name in the checkpoint"}``
naming the mixture's class as it appears on the left, e.g. ``{"aeroplane": "airplane"}``
(``configs/_base_/class_maps/voc_to_coco.json``). Prints, per dataset, classes matched /
total. No dataset file is read: the label space comes from the config's class names.
"""
import argparse
import copy
import json
import os.path as osp
import re
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.config import Config
from mmengine.registry import init_default_scope
from mmengine.runner.checkpoint import _load_checkpoint

from mmdet.registry import DATASETS, MODELS

import damex  # noqa: F401
from damex.datasets import LabelSpace
from damex.models.moe.layer import DENSE_TO_EXPERT, upcycled_tensors

#: class-dependent tensors: one row per class
CLASS_KEYS = re.compile(r'^(bbox_head\.cls_branches\.\d+\.(weight|bias)|'
                        r'dn_query_generator\.label_embedding\.weight)$')
#: a dense FFN's keys and the stacked-expert tensor each goes to
DENSE_FFN = re.compile(r'^(?P<layer>.+\.ffn)\.(?P<key>layers\.0\.0\.weight|layers\.0\.0\.bias|'
                       r'layers\.1\.weight|layers\.1\.bias)$')


def source_classes(checkpoint: dict, option: Optional[str]) -> List[str]:
    meta_classes = (checkpoint.get('meta') or {}).get('dataset_meta', {}).get('classes')
    if meta_classes:
        return list(meta_classes)
    if option is None:
        raise SystemExit('error: the checkpoint names no classes (meta.dataset_meta.classes); '
                         'give --src-classes coco or a file')
    if option == 'coco':
        from mmdet.datasets import CocoDataset
        return list(CocoDataset.METAINFO['classes'])
    with open(option) as f:
        text = f.read()
    return list(json.loads(text)) if text.lstrip().startswith('[') else \
        [line.strip() for line in text.splitlines() if line.strip()]


def class_rows(space: LabelSpace, src_classes: Sequence[str],
               class_map: Dict[str, str]) -> List[Optional[int]]:
    """For each unified class, the source row it takes, or None."""
    index = {name.lower(): i for i, name in enumerate(src_classes)}
    rows = []
    for name in space.classes:
        mapped = class_map.get(name, name)
        rows.append(index.get(mapped.lower()))
    return rows


def training_label_space(cfg: Config) -> LabelSpace:
    dataset_cfg = copy.deepcopy(cfg.train_dataloader.dataset)
    if dataset_cfg.get('type') != 'DatasetMixture':
        raise SystemExit(f'error: {cfg.filename}: train_dataloader.dataset is not a DatasetMixture')
    dataset_cfg['lazy_init'] = True  # class names only, no data files
    return DATASETS.build(dataset_cfg).label_space


def upcycle(source: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor],
            rows: List[Optional[int]]) -> Dict[str, torch.Tensor]:
    """The target state dict with everything the source can give copied in."""
    out = {k: v.clone() if torch.is_tensor(v) else v for k, v in target.items()}
    for key, value in source.items():
        if key.endswith('label_space_bytes'):  # a damex source's label space: the config's wins
            continue
        dense = DENSE_FFN.match(key)
        if CLASS_KEYS.match(key):
            if key not in out:
                raise ValueError(f'source key {key}: the config\'s model has no such tensor')
            for unified, row in enumerate(rows):
                if row is not None:
                    if row >= value.shape[0]:
                        raise ValueError(f'source key {key} has {value.shape[0]} rows, but its '
                                         f'class list names class {row}')
                    out[key][unified] = value[row]
        elif key in out:
            if out[key].shape != value.shape:
                raise ValueError(f'source key {key}: shape {tuple(value.shape)}, the config\'s '
                                 f'model has {tuple(out[key].shape)}')
            out[key] = value.clone()
        elif dense and f'{dense["layer"]}.experts.{DENSE_TO_EXPERT[dense["key"]]}' in out:
            layer = dense['layer']
            experts = out[f'{layer}.experts.{DENSE_TO_EXPERT[dense["key"]]}']
            if experts.shape[1:] != value.shape:
                raise ValueError(f'source key {key}: shape {tuple(value.shape)}, the experts of '
                                 f'{layer} have {tuple(experts.shape[1:])}')
            shared = f'{layer}.shared_expert.{dense["key"]}' in out
            for name, tensor in upcycled_tensors(dense['key'], value, experts.shape[0],
                                                 shared).items():
                out[f'{layer}.{name}'] = tensor
        else:
            raise ValueError(f'source key {key}: the config\'s model has no such tensor and it is '
                             'no dense FFN weight of an MoE layer; nothing would carry it over')
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('src_ckpt')
    parser.add_argument('config')
    parser.add_argument('out_ckpt')
    parser.add_argument('--src-classes', help="'coco' or a file of class names")
    parser.add_argument('--class-map', help='JSON {"source-side name": "name in the checkpoint"}')
    args = parser.parse_args()

    cfg = Config.fromfile(args.config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    checkpoint = _load_checkpoint(args.src_ckpt, map_location='cpu')
    source = checkpoint.get('state_dict', checkpoint)
    src_classes = source_classes(checkpoint, args.src_classes)
    class_map = {}
    if args.class_map:
        with open(args.class_map) as f:
            class_map = json.load(f)
        if not isinstance(class_map, dict):
            raise SystemExit(f'error: {args.class_map}: a class map is a JSON object')
    space = training_label_space(cfg)

    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.get('backbone', {}).pop('init_cfg', None)  # nothing to download: weights follow
    model = MODELS.build(model_cfg)
    model.init_weights()
    if hasattr(model, 'set_label_space'):
        model.set_label_space(space.to_dict())
    rows = class_rows(space, src_classes, class_map)
    state = upcycle(source, model.state_dict(), rows)

    print(f'{"dataset":<16}{"matched":>8}{"classes":>9}')
    for entry in space.datasets:
        matched = sum(rows[u] is not None for u in entry.label_map)
        print(f'{entry.name:<16}{matched:>8}{len(entry.classes):>9}')
    meta = dict(dataset_meta=dict(classes=space.classes, label_space=space.to_dict()),
                upcycled_from=osp.abspath(args.src_ckpt))
    torch.save(dict(state_dict=state, meta=meta), args.out_ckpt)
    print(f'wrote {args.out_ckpt}')


if __name__ == '__main__':
    main()
