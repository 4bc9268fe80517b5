"""Write the demo mixture under data/demo/: three datasets, three formats, three domains.

The writer is :func:`damex.synthetic.make_demo_data`; this is its command line.
"""
import argparse
import os.path as osp

from damex.synthetic import make_demo_data
from damex.synthetic.demo_data import ROOT


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default=osp.join(ROOT, 'data', 'demo'))
    parser.add_argument('--force', action='store_true', help='rewrite even if present')
    args = parser.parse_args()
    print(f'demo mixture in {make_demo_data(args.out, args.force)}')


if __name__ == '__main__':
    main()
