"""The unified label space of a dataset mixture, and its expert map: the one owner.

Everything about which classes a dataset has, where they sit in the unified space and
which expert a dataset routes to lives here: building it (:meth:`LabelSpace.build`, from
the mixture's datasets and, optionally, an :class:`ExpertPlan`), checking it against a
model (:meth:`LabelSpace.check_num_classes`, :func:`check_expert`), serialising it into
a checkpoint (:func:`label_space_to_buffer` / :func:`label_space_from_buffer`) and
looking things up (:meth:`LabelSpace.expert_of`, :meth:`LabelSpace.prediction_tables`).

The path: the mixture builds it and stamps each sample (``dataset_id``, ``dataset_name``,
``expert_id``, ``label_map``, ``label_space``); the detector adopts the training batch's
space, keeps it in its checkpoint, derives every image's routing target and class tables
from it, and hands the tables to the head; the per-dataset metric and the routing
analysis read it back with :meth:`LabelSpace.from_metainfo`. Nobody re-derives offsets.

A test mixture may hold a subset of the trained datasets, in any order: datasets are
matched by name and classes by name within a dataset (:meth:`LabelSpace.id_map`).
"""
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

#: bytes reserved in a checkpoint for the label space's JSON (thousands of classes fit)
LABEL_SPACE_CAPACITY = 1 << 18


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of the mixture: its name, own classes, expert and unified label ids."""
    name: str
    classes: Tuple[str, ...]
    expert: int
    label_map: Tuple[int, ...]  # own class i -> unified class label_map[i]
    ann_file: Optional[str] = None  # COCO JSON ground truth, when the dataset has one

    @property
    def offset(self) -> int:
        """First unified id of the dataset (its offset in a disjoint union)."""
        return self.label_map[0] if self.label_map else 0


class LabelSpace:
    """Unified classes and, per dataset, how its own classes map into them."""

    def __init__(self, classes: Sequence[str], datasets: Sequence[DatasetEntry]):
        self.classes = tuple(classes)
        self.datasets = tuple(datasets)
        self._by_name = {d.name: i for i, d in enumerate(self.datasets)}

    @classmethod
    def build(cls, datasets: Sequence[Tuple[str, Sequence[str], int]],
              merge: Optional[object] = None,
              ann_files: Optional[Sequence[Optional[str]]] = None) -> 'LabelSpace':
        """Build from (name, classes, expert) triples (and each one's COCO JSON, if any).

        merge: None for the disjoint union of all classes (offsets in order); True to
        merge classes that share a name; or a dict ``{'dataset.class': 'unified name'}``
        that maps chosen classes onto a shared unified class (the rest stay disjoint).
        """
        unified: List[str] = []
        index: Dict[str, int] = {}
        entries = []
        explicit = merge if isinstance(merge, dict) else {}
        for name, classes, expert in datasets:
            label_map = []
            for cls_name in classes:
                key = explicit.get(f'{name}.{cls_name}')
                if key is None and merge is True:
                    key = cls_name
                if key is None or key not in index:
                    index_key = key if key is not None else f'{name}.{cls_name}'
                    index[index_key] = len(unified)
                    unified.append(key if key is not None else cls_name)
                    label_map.append(index[index_key])
                else:
                    label_map.append(index[key])
            ann_file = ann_files[len(entries)] if ann_files else None
            entries.append(DatasetEntry(name, tuple(classes), int(expert), tuple(label_map),
                                        ann_file))
        return cls(unified, entries)

    # --- plain-data round trip (metainfo must stay picklable with weights_only) ---
    def to_dict(self) -> dict:
        return dict(classes=list(self.classes),
                    datasets=[dict(name=d.name, classes=list(d.classes), expert=d.expert,
                                   offset=d.offset, label_map=list(d.label_map),
                                   ann_file=d.ann_file)
                              for d in self.datasets])

    @classmethod
    def from_dict(cls, data: dict) -> 'LabelSpace':
        return cls(data['classes'], [
            DatasetEntry(d['name'], tuple(d['classes']), d['expert'], tuple(d['label_map']),
                         d.get('ann_file')) for d in data['datasets']])

    @classmethod
    def from_metainfo(cls, metainfo: dict) -> 'LabelSpace':
        if not metainfo or 'label_space' not in metainfo:
            raise KeyError('metainfo has no "label_space": is the dataset a DatasetMixture?')
        return cls.from_dict(metainfo['label_space'])

    # --- queries ---
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(d.name for d in self.datasets)

    @property
    def ann_files(self) -> Tuple[Optional[str], ...]:
        return tuple(d.ann_file for d in self.datasets)

    @property
    def experts(self) -> Tuple[int, ...]:
        return tuple(d.expert for d in self.datasets)

    def index(self, name: str) -> int:
        if name not in self._by_name:
            raise KeyError(f'unknown dataset {name!r}; the mixture has {list(self._by_name)}')
        return self._by_name[name]

    def __eq__(self, other) -> bool:
        return isinstance(other, LabelSpace) and self.to_dict() == other.to_dict()

    def check_subset_of(self, trained: 'LabelSpace') -> None:
        """Every dataset of this (test) space, and every class of it, must exist in
        ``trained`` (matched by name); else an error naming it and listing the known ones."""
        for entry in self.datasets:
            if entry.name not in trained._by_name:
                raise KeyError(
                    f'dataset {entry.name!r} of the test mixture was not in the model\'s '
                    f'training mixture; the model knows {list(trained.names)}')
            known = trained.datasets[trained.index(entry.name)].classes
            for cls_name in entry.classes:
                if cls_name not in known:
                    raise KeyError(
                        f'class {cls_name!r} of dataset {entry.name!r} was not among that '
                        f'dataset\'s classes in the model\'s training mixture; it knows '
                        f'{list(known)}')

    def id_map(self, target: 'LabelSpace', prefer: Optional[str] = None) -> List[int]:
        """For every unified id of this space, the unified id of the same (dataset, class)
        in ``target``, or -1 where ``target`` has no such class.

        Datasets are matched by name, classes by name within a dataset. A class merged
        across datasets may map to several target ids: dataset ``prefer``'s wins, then the
        first dataset in this space's order.
        """
        table = [-1] * self.num_classes
        order = sorted(self.datasets, key=lambda d: d.name != prefer)
        for entry in order:
            if entry.name not in target._by_name:
                continue
            other = target.datasets[target.index(entry.name)]
            own_index = {name: i for i, name in enumerate(other.classes)}
            for cls_name, unified in zip(entry.classes, entry.label_map):
                if table[unified] == -1 and cls_name in own_index:
                    table[unified] = other.label_map[own_index[cls_name]]
        return table

    def to_unified(self, dataset_id: int, labels: Tensor) -> Tensor:
        """Own class ids of dataset ``dataset_id`` -> unified ids."""
        table = torch.as_tensor(self.datasets[dataset_id].label_map, device=labels.device)
        return table[labels.long()] if labels.numel() else labels.long()

    def class_mask(self, dataset_id: int, device=None) -> Tensor:
        """(num_classes,) bool: which unified classes belong to the dataset."""
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=device)
        mask[list(self.datasets[dataset_id].label_map)] = True
        return mask

    def to_dataset(self, dataset_id: int, unified: Tensor) -> Tensor:
        """Unified ids -> own ids of the dataset, -1 for classes it does not have."""
        table = torch.full((self.num_classes,), -1, dtype=torch.long, device=unified.device)
        label_map = torch.as_tensor(self.datasets[dataset_id].label_map, device=unified.device)
        table[label_map] = torch.arange(len(label_map), device=unified.device)
        return table[unified.long()]

    # --- the expert map ---
    def expert_of(self, name: str) -> int:
        """The expert that dataset ``name`` routes to."""
        return self.datasets[self.index(name)].expert

    def check_experts(self, num_experts: Optional[int]) -> None:
        """Every dataset's expert must exist among ``num_experts`` (None: no limit)."""
        for entry in self.datasets:
            check_expert(entry.expert, num_experts, entry.name)

    def check_num_classes(self, num_classes: int, what: str) -> None:
        """The head's ``num_classes`` must equal this space's size."""
        if num_classes != self.num_classes:
            raise ValueError(
                f'model.bbox_head.num_classes is {num_classes}, but {what} has '
                f'{self.num_classes} unified classes ({", ".join(self.names)}); set '
                f'model.bbox_head.num_classes={self.num_classes}')

    def prediction_tables(self, name: str, test: Optional['LabelSpace']
                          ) -> Tuple[Tuple[int, ...], Optional[Tuple[int, ...]]]:
        """For an image of dataset ``name`` scored by a model trained on this space:
        (the trained ids of its dataset's classes, trained id -> ``test`` id or -1).

        Without a test space the ids stay the trained ones (table None). A dataset or
        class the model was not trained on is an error naming it.
        """
        if test is not None:
            test.check_subset_of(self)
        if name not in self._by_name:
            raise KeyError(f'dataset {name!r} was not in the model\'s training mixture; '
                           f'the model knows {list(self.names)}')
        entry = self.datasets[self.index(name)]
        if test is None:
            return tuple(entry.label_map), None
        own = test.datasets[test.index(name)].classes
        keep = tuple(entry.label_map[entry.classes.index(c)] for c in own)
        return keep, tuple(self.id_map(test, prefer=name))

    def __repr__(self) -> str:
        rows = ', '.join(f'{d.name}: {len(d.classes)} classes @ {d.offset} -> expert {d.expert}'
                         for d in self.datasets)
        return f'LabelSpace({self.num_classes} classes; {rows})'


def check_expert(expert, num_experts: Optional[int], dataset: str, where: str = '') -> None:
    """A dataset's expert must be an int in [0, num_experts): the one expert-range check."""
    if not isinstance(expert, int) or isinstance(expert, bool) or expert < 0:
        raise ValueError(f'dataset {dataset!r}{where}: expert {expert!r} must be a '
                         'non-negative int')
    if num_experts is not None and expert >= num_experts:
        raise ValueError(
            f'dataset {dataset!r}{where} is mapped to expert {expert}, but the model has '
            f'{num_experts} experts (model.moe.num_experts), so it must be [0, {num_experts}); '
            'fix the mixture\'s `expert` entries (experts may be shared) or the number of '
            'experts')


# --- the label space in a checkpoint ---
def label_space_to_buffer(space: Optional[LabelSpace], like: Tensor) -> Tensor:
    """The label space as zero-padded UTF-8 JSON bytes, shaped and placed like ``like``.

    A fixed-size uint8 buffer travels in every state dict and checkpoint, and mmengine's
    weight broadcast and EMA, which expect tensors of fixed shapes, handle it as any buffer.
    """
    out = torch.zeros_like(like)
    if space is None:
        return out
    data = json.dumps(space.to_dict(), separators=(',', ':')).encode('utf-8')
    if len(data) > out.numel():
        raise ValueError(f'the label space needs {len(data)} bytes, more than the '
                         f'{out.numel()} a checkpoint reserves (LABEL_SPACE_CAPACITY)')
    out[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(out.device)
    return out


def label_space_from_buffer(data: Tensor) -> Optional[LabelSpace]:
    raw = bytes(data.cpu().numpy().tobytes()).rstrip(b'\x00')
    return LabelSpace.from_dict(json.loads(raw.decode('utf-8'))) if raw else None


# --- expert plans (tools/analysis_tools/plan_experts.py) ---
@dataclass(frozen=True)
class ExpertPlan:
    """A PLAN.json: ``experts`` {dataset name: expert} and, per MoE layer, what a router's
    gate is initialised from (``layers[name]``: ``dataset_means``, ``within_covariance``).

    Read and validated once per file (:meth:`read` caches by path and modification time);
    the mixture takes its expert map, the detector its routers' gate initialisation.
    """
    path: str
    experts: Dict[str, int]
    layers: Dict[str, dict]

    @classmethod
    def read(cls, path: str) -> 'ExpertPlan':
        try:
            key = (os.path.abspath(path), os.stat(path).st_mtime_ns)
        except OSError as error:
            raise ValueError(f'expert plan {path}: cannot read it ({error})') from None
        if key not in _PLANS:
            _PLANS[key] = cls._parse(path)
        return _PLANS[key]

    @classmethod
    def _parse(cls, path: str) -> 'ExpertPlan':
        try:
            with open(path) as f:
                plan = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f'expert plan {path}: cannot read it ({error})') from None
        if not isinstance(plan, dict) or not isinstance(plan.get('experts'), dict):
            raise ValueError(f'expert plan {path}: no "experts" object (dataset name -> expert)')
        for name, expert in plan['experts'].items():
            check_expert(expert, None, name, f' in the expert plan {path}')
        layers = plan.get('layers', {})
        if not isinstance(layers, dict) or any(
                not isinstance(v, dict) or 'dataset_means' not in v for v in layers.values()):
            raise ValueError(f'expert plan {path}: "layers" must map each MoE layer to an object '
                             'with "dataset_means"')
        return cls(path, dict(plan['experts']), layers)

    def layer(self, name: str) -> dict:
        """The plan's entry for the MoE layer ``name`` (e.g. 'decoder.layers.0.ffn')."""
        if name not in self.layers:
            raise KeyError(f'expert plan {self.path}: no entry for layer {name!r}; it has '
                           f'{sorted(self.layers)}')
        return self.layers[name]


_PLANS: Dict[tuple, ExpertPlan] = {}
