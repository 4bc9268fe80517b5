"""Write the held-out benchmark mixture under data/heldout/ (five datasets, three domains).

The writer is :func:`damex.synthetic.make_heldout_data`; this is its command line.
"""
import argparse
import os.path as osp

from damex.synthetic import make_heldout_data
from damex.synthetic.demo_data import ROOT


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=osp.join(ROOT, 'data', 'heldout'))
    parser.add_argument('--force', action='store_true')
    args = parser.parse_args()
    print(f'held-out mixture in {make_heldout_data(args.out, args.force)}')


if __name__ == '__main__':
    main()
