"""Writing a converted dataset in the layout the UODB configs read, and counting fates.

Layout: ``Annotations/<id>.xml`` (VOC: ``<filename>``, ``<size>``, objects with ``name``,
``difficult``, ``bndbox``), ``JPEGImages/<id><ext>`` (hard-linked, else copied, or
rendered), ``ImageSets/Main/<split>.txt``. Coordinates are written **0-based, as the
sources' pixels** (x2, y2 the right / bottom edge); the configs read these trees with
``UODBXMLDataset(one_based=False)``, so the loaded box equals the source box.

Every source object gets one fate, counted per source type / tag: ``positive <class>``,
``ignored`` (written with ``difficult=1``) or ``dropped: <why>``.
"""
import collections
import os
import os.path as osp
import shutil
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional
from xml.sax.saxutils import escape

from mmengine.utils import track_parallel_progress, track_progress

from ...datasets.dota import AnnotationError


@dataclass
class Box:
    name: str  # a UODB class
    x1: float
    y1: float
    x2: float
    y2: float
    difficult: bool = False


@dataclass
class Sample:
    """One converted image: its id, its source image (or a renderer), size and boxes."""
    id: str
    source: str
    width: int
    height: int
    boxes: List[Box] = field(default_factory=list)
    render: Optional[Callable[[str], None]] = None  # writes the image to the given path


class Fates:
    """Counts of what became of every source object, per source type."""

    def __init__(self):
        self.counts: Dict[tuple, int] = collections.Counter()

    def positive(self, source_type: str, cls: str) -> None:
        self.counts[(source_type, f'positive {cls}')] += 1

    def ignored(self, source_type: str, why: str) -> None:
        self.counts[(source_type, f'ignored: {why}')] += 1

    def dropped(self, source_type: str, why: str) -> None:
        self.counts[(source_type, f'dropped: {why}')] += 1

    def table(self) -> str:
        rows = sorted(self.counts.items())
        width = max([len('source type')] + [len(t) for (t, _), _ in rows])
        lines = [f'{"source type":<{width}}  {"objects":>8}  fate']
        lines += [f'{t:<{width}}  {n:>8}  {fate}' for (t, fate), n in rows]
        return '\n'.join(lines)


def check_box(box: Box, sample: Sample, where: str) -> None:
    """A box must lie inside its image; a box outside is an error naming the source."""
    if not (0 <= box.x1 <= box.x2 <= sample.width and 0 <= box.y1 <= box.y2 <= sample.height):
        raise AnnotationError(
            f'{where}: box ({box.x1}, {box.y1}, {box.x2}, {box.y2}) lies outside the '
            f'{sample.width}x{sample.height} image {sample.source}')


def annotation_xml(sample: Sample, file_name: str) -> str:
    objects = ''.join(
        f'  <object>\n    <name>{escape(b.name)}</name>\n    <difficult>{int(b.difficult)}'
        f'</difficult>\n    <bndbox><xmin>{b.x1:g}</xmin><ymin>{b.y1:g}</ymin>'
        f'<xmax>{b.x2:g}</xmax><ymax>{b.y2:g}</ymax></bndbox>\n  </object>\n'
        for b in sample.boxes)
    return (f'<annotation>\n  <filename>{escape(file_name)}</filename>\n  <size><width>'
            f'{sample.width}</width><height>{sample.height}</height><depth>3</depth></size>\n'
            f'{objects}</annotation>\n')


def _place_image(source: str, target: str) -> None:
    if osp.exists(target):
        os.remove(target)
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, target)


def _write_one(task) -> str:
    sample, out, ext = task
    file_name = sample.id + ext
    image_path = osp.join(out, 'JPEGImages', file_name)
    if sample.render is not None:
        sample.render(image_path)
    else:
        if not osp.isfile(sample.source):
            raise FileNotFoundError(f'image {sample.source} (sample {sample.id}) is missing')
        _place_image(sample.source, image_path)
    xml_path = osp.join(out, 'Annotations', sample.id + '.xml')
    partial = xml_path + '.partial'
    with open(partial, 'w') as f:
        f.write(annotation_xml(sample, file_name))
    os.replace(partial, xml_path)  # a re-run over a half-written tree never sees half a file
    return sample.id


def write_tree(splits: Dict[str, List[Sample]], out: str, ext: str, workers: int = 4) -> None:
    """Write every split's samples to ``out`` (safe to re-run over an existing ``out``)."""
    for sub in ('Annotations', 'JPEGImages', osp.join('ImageSets', 'Main')):
        os.makedirs(osp.join(out, sub), exist_ok=True)
    unique = {}
    for split, samples in splits.items():
        for sample in samples:
            if unique.setdefault(sample.id, sample).source != sample.source:
                raise ValueError(f'two source images both convert to the id {sample.id!r} '
                                 f'({unique[sample.id].source}, {sample.source})')
    tasks = [(sample, out, ext) for sample in unique.values()]
    if workers > 1 and len(tasks) > 1:
        track_parallel_progress(_write_one, tasks, nproc=workers)
    else:
        track_progress(_write_one, tasks)
    for split, samples in splits.items():
        with open(osp.join(out, 'ImageSets', 'Main', f'{split}.txt'), 'w') as f:
            f.write(''.join(f'{s.id}\n' for s in samples))


def select(samples: Dict[str, Sample], split_ids: Dict[str, List[str]]) -> Dict[str, List[Sample]]:
    """The samples of each split named by ``--split`` id files; an unknown id is an error."""
    splits = {}
    for split, ids in split_ids.items():
        unknown = [i for i in ids if i not in samples]
        if unknown:
            raise ValueError(f'--split {split}: {len(unknown)} ids are not in the source, e.g. '
                             f'{unknown[:3]} (ids look like {next(iter(samples), "?")!r})')
        splits[split] = [samples[i] for i in ids]
    return splits
