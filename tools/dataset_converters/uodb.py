"""Convert a UODB member from its owner's format into the layout the UODB config reads.

    python tools/dataset_converters/uodb.py DATASET --src SRC --out OUT
        [--split NAME=IDS_FILE ...] [--workers N] [--window LO HI] [--single-slice]

DATASET: kitti, widerface, lisa, deeplesion, kitchen. SRC is the unpacked download, its
folders named as distributed; OUT gets ``Annotations/``, ``JPEGImages/`` and
``ImageSets/Main/{train,val}.txt`` (e.g. ``data/uodb/kitti``). ``--split`` replaces the
default split by files of ids (one per line). Prints the fate of every source object
(positive, ignored or dropped, per source type) as a table. Re-running over OUT is safe.
See README "Reproducing UODB" for each dataset's download, split and rules.
"""
import argparse
import sys

from damex.converters.uodb import CONVERTERS, convert
from damex.datasets import AnnotationError


def parse_split(text: str):
    name, sep, path = text.partition('=')
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f'--split takes NAME=IDS_FILE, got {text!r}')
    return name, path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('dataset', choices=sorted(CONVERTERS))
    parser.add_argument('--src', required=True, help='the dataset as distributed (unpacked)')
    parser.add_argument('--out', required=True, help='output folder, e.g. data/uodb/kitti')
    parser.add_argument('--split', type=parse_split, action='append', default=[],
                        metavar='NAME=IDS_FILE', help='a split from a file of ids (repeatable)')
    parser.add_argument('--workers', type=int, default=4, help='processes writing the tree')
    parser.add_argument('--window', type=float, nargs=2, metavar=('LO', 'HI'),
                        help='deeplesion: HU window rendered to 0..255 (default -1024 3071)')
    parser.add_argument('--single-slice', action='store_true',
                        help='deeplesion: the key slice in all three channels (default: '
                             'the slices before, at and after it)')
    args = parser.parse_args(argv)
    options = {}
    if args.dataset == 'deeplesion':
        options = dict(single_slice=args.single_slice)
        if args.window:
            options['window'] = tuple(args.window)
    elif args.window or args.single_slice:
        parser.error('--window and --single-slice apply to deeplesion only')
    try:
        fates = convert(args.dataset, args.src, args.out, dict(args.split), args.workers,
                        **options)
    except (AnnotationError, FileNotFoundError, ValueError) as error:
        print(f'error: {error}', file=sys.stderr)
        return 1
    print(f'\n{args.dataset}: {args.src} -> {args.out}\n{fates.table()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
