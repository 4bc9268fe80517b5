"""A synthetic mixture is written once, and rewritten when its writer changed."""
import os

from damex.synthetic.demo_data import write_once


def test_a_finished_copy_is_reused_only_for_the_same_version(tmp_path):
    calls = []

    def write(out):
        calls.append(out)
        os.makedirs(out)
        (tmp_path / 'data' / 'file').write_text(str(len(calls)))

    out = str(tmp_path / 'data')
    write_once(out, write, version='splits=6')
    write_once(out, write, version='splits=6')
    assert len(calls) == 1
    write_once(out, write, version='splits=24')  # e.g. more validation images
    assert len(calls) == 2 and (tmp_path / 'data' / 'file').read_text() == '2'
    assert (tmp_path / 'data' / '.complete').read_text() == 'splits=24'
    write_once(out, write, force=True, version='splits=24')
    assert len(calls) == 3
