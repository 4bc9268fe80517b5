"""The unified label space of a dataset mixture.

Built once by :class:`~damex.datasets.DatasetMixture`, stored as plain data in the
mixture's metainfo (``metainfo['label_space']``, so it survives checkpoints and configs)
and in every sample it yields, and read back with :meth:`LabelSpace.from_metainfo` by the
detector's dataset-aware prediction, the per-dataset metric and the routing analysis.
Nobody re-derives offsets.

A trained model carries the label space of its training mixture (in its checkpoint). A
test mixture may hold a subset of those datasets, in any order: datasets are matched by
name and classes by name within a dataset (:meth:`LabelSpace.id_map`).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


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

    def __repr__(self) -> str:
        rows = ', '.join(f'{d.name}: {len(d.classes)} classes @ {d.offset} -> expert {d.expert}'
                         for d in self.datasets)
        return f'LabelSpace({self.num_classes} classes; {rows})'
