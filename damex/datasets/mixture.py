"""DatasetMixture: datasets with different label spaces as one training set.

Every sample is tagged with its dataset (``dataset_id``, ``dataset_name``), its routing
target (``expert_id``) and the mixture's label space (``label_space``, plain data: the
space its labels are in) in ``data_sample.metainfo``, and its labels are moved into the
unified label space, for any pipeline that ends in mmdet's plain ``PackDetInputs()``.
"""
import copy
from typing import List, Optional, Sequence, Union

from mmengine.dataset import BaseDataset
from mmengine.dataset import ConcatDataset as MMEngineConcatDataset

from mmdet.datasets import CocoDataset
from mmdet.registry import DATASETS
from .coco import NamedCocoDataset
from .label_space import ExpertPlan, LabelSpace, check_expert


LOAD_IMAGE_TYPES = ('LoadImageFromFile', 'mmdet.LoadImageFromFile')


def stored_pixels(pipeline: Sequence) -> list:
    """The pipeline with every image loader reading pixels as stored, EXIF orientation
    ignored (unless a ``color_type`` is set): annotations (box coordinates, image width and
    height) of every format refer to the stored pixels, and cv2 would rotate them."""
    steps = []
    for step in pipeline:
        if isinstance(step, dict) and step.get('type') in LOAD_IMAGE_TYPES:
            step = dict(step)
            step.setdefault('color_type', 'color_ignore_orientation')
        steps.append(step)
    return steps


def build_dataset(cfg, pipeline: Optional[list] = None, lazy_init: bool = False):
    """Build one dataset of the mixture; ``type='CocoDataset'`` becomes NamedCocoDataset,
    so that its categories are mapped by name, identically in loading and evaluation.

    ``pipeline`` is the dataset's pipeline when its config sets none; image loaders read
    pixels as stored (:func:`stored_pixels`); ``lazy_init`` defers reading its annotation
    files."""
    if isinstance(cfg, BaseDataset):
        if type(cfg) is CocoDataset:
            raise TypeError(f'DatasetMixture: pass the COCO dataset {cfg.ann_file!r} as a config '
                            'dict (or as a NamedCocoDataset), so that its categories are '
                            'mapped by name')
        return cfg
    cfg = copy.deepcopy(cfg)
    if pipeline is not None:
        cfg.setdefault('pipeline', copy.deepcopy(pipeline))
    cfg['pipeline'] = stored_pixels(cfg.get('pipeline') or [])
    if lazy_init:
        cfg['lazy_init'] = True
    if cfg.get('type') in ('CocoDataset', CocoDataset):
        cfg['type'] = NamedCocoDataset
    return DATASETS.build(cfg)


def assign_experts(entries: Sequence[dict], num_experts: Optional[int],
                   plan: Optional[ExpertPlan] = None) -> List[int]:
    """Expert of every dataset: as given, else from the plan, else one per dataset in order.

    Several datasets may share an expert; a dataset left without one because the
    experts ran out, or missing from the plan, or an expert out of range, is an error
    naming the dataset.
    """
    experts = []
    for i, entry in enumerate(entries):
        name = entry['name']
        given = entry.get('expert') is not None  # expert=None (--cfg-options) unsets it
        if not given and plan is not None and name not in plan.experts:
            raise ValueError(f'dataset {name!r} is not in the expert plan {plan.path} (it plans '
                             f'{sorted(plan.experts)}); add it there or give it expert=<index>')
        if given:
            expert = entry['expert']
        else:
            expert = plan.experts[name] if plan is not None else i
        if not given and plan is None and num_experts is not None and i >= num_experts:
            raise ValueError(f'dataset {name!r} (#{i}) has no expert: the {num_experts} experts '
                             'ran out; give it one with expert=<index> (experts may be shared)')
        check_expert(expert, num_experts, name)
        experts.append(expert)
    return experts


@DATASETS.register_module()
class DatasetMixture(MMEngineConcatDataset):
    """Concatenate datasets, each with its own pipeline, under one unified label space.

    Args:
        datasets: ``[dict(name='dota', dataset=dict(type='DOTADataset', ...), expert=0), ...]``;
            ``expert`` defaults to the dataset's position.
        num_experts: if given, every expert must lie in [0, num_experts) and a dataset
            without an explicit expert past the last expert is an error.
        expert_plan: a PLAN.json of ``tools/analysis_tools/plan_experts.py``: datasets
            without an explicit ``expert`` take the plan's (one absent from the plan is an
            error naming it).
        merge_classes: None (default) for the disjoint union of all classes, True to
            merge classes that share a name, or ``{'dataset.class': 'unified name'}``.
        pipeline: the pipeline of every dataset whose config sets none. mmdet's
            ``DetInferencer`` and ``init_detector`` take the test pipeline from
            ``test_dataloader.dataset.pipeline``, so the shipped configs set it here.
        lazy_init: read no annotation file until the data is needed (the datasets are
            built lazily too): the label space comes from the configs' class names alone,
            so a config can be inspected, or a model run, without the data on disk.

    ``metainfo`` holds ``classes`` (unified), ``dataset_names`` and ``label_space``
    (each dataset's name, classes, offset, label_map and expert; read it with
    :meth:`LabelSpace.from_metainfo`).
    """

    def __init__(self, datasets: Sequence[dict], num_experts: Optional[int] = None,
                 merge_classes: Union[None, bool, dict] = None, pipeline: Optional[list] = None,
                 expert_plan: Optional[str] = None, lazy_init: bool = False):
        if not datasets:
            raise ValueError('DatasetMixture needs at least one dataset')
        names = []
        for i, entry in enumerate(datasets):
            if not isinstance(entry, dict) or 'name' not in entry or 'dataset' not in entry:
                raise ValueError(f'DatasetMixture: datasets[{i}] must be dict(name=..., '
                                 f'dataset=dict(type=...), expert=...), got {entry!r}')
            if entry['name'] in names:
                raise ValueError(f'DatasetMixture: duplicate dataset name {entry["name"]!r}')
            names.append(entry['name'])
        plan = ExpertPlan.read(expert_plan) if expert_plan else None
        experts = assign_experts(datasets, num_experts, plan)
        self.pipeline_cfg = pipeline
        built = []
        for name, entry in zip(names, datasets):
            try:
                built.append(build_dataset(entry['dataset'], pipeline, lazy_init))
            except ValueError as error:  # name the dataset too (the file is in the message)
                raise type(error)(f'DatasetMixture: dataset {name!r}: {error}') from error
        for name, dataset in zip(names, built):
            if getattr(dataset, '_fully_initialized', True) and len(dataset) == 0:
                raise ValueError(
                    f'DatasetMixture: dataset {name!r} has no image left (e.g. '
                    'filter_cfg=dict(filter_empty_gt=True) drops every image without boxes); '
                    'check its annotation file, or set filter_empty_gt=False')
        self.label_space = LabelSpace.build(
            [(name, ds.metainfo['classes'], expert)
             for name, ds, expert in zip(names, built, experts)], merge_classes,
            ann_files=[ds.ann_file if isinstance(ds, CocoDataset) else None for ds in built])
        all_keys = sorted(set().union(*(ds.metainfo.keys() for ds in built)))
        super().__init__(built, lazy_init=lazy_init, ignore_keys=all_keys)
        self._label_space_dict = self.label_space.to_dict()
        self._metainfo = dict(classes=self.label_space.classes, dataset_names=tuple(names),
                              label_space=self._label_space_dict)

    def __getitem__(self, idx: int) -> dict:
        self.full_init()
        dataset_id, sample_idx = self._get_ori_dataset_idx(idx)
        dataset = self.datasets[dataset_id]
        try:
            data = dataset[sample_idx]
        except Exception as error:
            name = self.label_space.datasets[dataset_id].name
            path = dataset.get_data_info(sample_idx).get('img_path')
            raise RuntimeError(f'DatasetMixture: dataset {name!r}, image {path}: loading failed '
                               f'({type(error).__name__}: {error}); '
                               'tools/misc/print_mixture.py --check-images lists unreadable '
                               'images') from error
        # In test mode the raw annotations (original coordinates, own labels) travel with
        # the sample, so the per-dataset metric can build ground truth for any format.
        instances = dataset.get_data_info(sample_idx)['instances'] if dataset.test_mode else None
        return self.tag(data, dataset_id, instances)

    def tag(self, data: dict, dataset_id: int, instances: Optional[list] = None) -> dict:
        """Add the dataset, its expert and label map to the packed sample; unify its labels."""
        sample = data.get('data_samples') if isinstance(data, dict) else None
        if sample is None or not hasattr(sample, 'set_metainfo'):
            name = self.label_space.datasets[dataset_id].name
            raise TypeError(f'DatasetMixture: the pipeline of dataset {name!r} must end in '
                            'PackDetInputs (its output has no "data_samples")')
        entry = self.label_space.datasets[dataset_id]
        sample.set_metainfo(dict(dataset_id=dataset_id, dataset_name=entry.name,
                                 expert_id=entry.expert, label_map=list(entry.label_map),
                                 label_space=self._label_space_dict))
        if instances is not None:
            sample.set_metainfo(dict(instances=instances))
        for field in ('gt_instances', 'ignored_instances'):
            instances = sample.get(field)
            if instances is not None and 'labels' in instances:
                instances.labels = self.label_space.to_unified(dataset_id, instances.labels)
        return data

    def summary(self) -> str:
        """The mixture as a table: every dataset's type, images, classes, first unified id
        and expert (training logs and tools/misc/print_mixture.py show it)."""
        self.full_init()
        space = self.label_space
        rows = [f'DatasetMixture: {len(self.datasets)} datasets, {len(self)} samples, '
                f'{space.num_classes} unified classes',
                f'  {"name":<14}{"type":<20}{"size":>7}{"classes":>9}{"offset":>8}{"expert":>8}']
        for entry, dataset in zip(space.datasets, self.datasets):
            rows.append(f'  {entry.name:<14}{type(dataset).__name__:<20}{len(dataset):>7}'
                        f'{len(entry.classes):>9}{entry.offset:>8}{entry.expert:>8}')
        return '\n'.join(rows)

    def dataset_sizes(self) -> List[int]:
        self.full_init()
        return [len(ds) for ds in self.datasets]
