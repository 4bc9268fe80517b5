"""Inference on new images with only a config and a checkpoint, no data files (issue #13)."""
import glob
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest
from mmengine.runner import Runner

from damex.testing import REPO, tiny_demo_config

pytestmark = pytest.mark.slow
CLASSES = ('Tree', 'plane', 'storage-tank', 'stop', 'yield')


@pytest.fixture(scope='module')
def trained(demo_data, tmp_path_factory):
    """A short demo run's config and checkpoint, and two demo images, copied elsewhere."""
    work = tmp_path_factory.mktemp('work')
    cfg = tiny_demo_config(work, max_iters=2)
    cfg.model.test_cfg.max_per_img = 20
    Runner.from_cfg(cfg).train()
    user = tmp_path_factory.mktemp('user')  # a user who received the model, without data/
    cfg.dump(str(user / 'model.py'))
    shutil.copy(work / 'iter_2.pth', user / 'model.pth')
    (user / 'images').mkdir()
    shutil.copy(osp.join(demo_data, 'signs', 'val', sorted(os.listdir(
        osp.join(demo_data, 'signs', 'val')))[0]), user / 'images' / 'street.png')
    shutil.copy(glob.glob(osp.join(demo_data, 'aerial', 'val', 'images', '*.png'))[0],
                user / 'images' / 'aerial.png')
    return user


def test_det_inferencer_works_without_dataset_files(trained, monkeypatch):
    from mmdet.apis import DetInferencer
    monkeypatch.chdir(trained)
    assert not osp.exists('data')
    inferencer = DetInferencer(model='model.py', weights='model.pth', device='cpu')
    assert tuple(inferencer.model.dataset_meta['classes']) == CLASSES
    out = inferencer(str(trained / 'images' / 'street.png'), return_datasamples=False)
    labels = out['predictions'][0]['labels']
    assert len(labels) == 20 and all(0 <= label < len(CLASSES) for label in labels)


def run_infer(trained, *args, inputs='images'):
    return subprocess.run([sys.executable, osp.join(REPO, 'tools/infer.py'), 'model.py',
                           'model.pth', inputs, '--score-thr', '0', '--device', 'cpu', *args],
                          cwd=trained, capture_output=True, text=True)


def test_infer_tool_with_and_without_a_dataset(trained):
    result = run_infer(trained, '--dataset', 'signs', '--out-dir', 'signs_out')
    assert result.returncode == 0, result.stdout + result.stderr
    records = json.load(open(trained / 'signs_out' / 'predictions.json'))
    assert [osp.basename(r['path']) for r in records] == ['aerial.png', 'street.png']
    for record in records:
        n = len(record['bboxes'])
        assert n == len(record['scores']) == len(record['classes']) == len(record['datasets'])
        assert n > 0 and set(record['classes']) <= {'stop', 'yield'}
        assert set(record['datasets']) == {'signs'}
        assert all(len(box) == 4 and box[0] <= box[2] and box[1] <= box[3]
                   for box in record['bboxes'])
        for layer in ('decoder.layers.0.ffn', 'decoder.layers.2.ffn', 'decoder.layers.4.ffn'):
            shares = record['routing'][layer]
            assert len(shares) == 3 and sum(shares) == pytest.approx(1.0)
    assert osp.getsize(trained / 'signs_out' / 'street.png') > 1000

    result = run_infer(trained, '--out-dir', 'all_out')
    assert result.returncode == 0, result.stdout + result.stderr
    records = json.load(open(trained / 'all_out' / 'predictions.json'))
    owner = dict(zip(CLASSES, ('trees', 'aerial', 'aerial', 'signs', 'signs')))
    for record, scoped in zip(records, json.load(open(trained / 'signs_out' /
                                                      'predictions.json'))):
        assert set(record['classes']) <= set(CLASSES)
        assert record['datasets'] == [owner[c] for c in record['classes']]
        # the whole label space is scored: the best box scores at least the best sign box
        assert max(record['scores']) >= max(scoped['scores']) - 1e-6

    result = run_infer(trained, '--dataset', 'roads')
    assert result.returncode != 0
    assert "unknown --dataset 'roads'; the model knows trees, aerial, signs" in result.stderr


def test_same_stem_inputs_get_distinct_drawings(trained):
    import mmcv
    root = trained / 'same_stem'
    (root / 'sub').mkdir(parents=True)
    shutil.copy(trained / 'images' / 'street.png', root / 'x.png')
    shutil.copy(trained / 'images' / 'aerial.png', root / 'sub' / 'x.png')
    mmcv.imwrite(mmcv.imread(str(trained / 'images' / 'aerial.png')), str(root / 'x.jpg'))
    result = run_infer(trained, '--out-dir', 'same_out', inputs='same_stem')
    assert result.returncode == 0, result.stdout + result.stderr
    records = json.load(open(trained / 'same_out' / 'predictions.json'))
    assert sorted(osp.relpath(r['path'], root) for r in records) == ['sub/x.png', 'x.jpg', 'x.png']
    drawings = [trained / 'same_out' / name for name in ('x.png', 'sub/x.png', 'x.jpg')]
    images = [mmcv.imread(str(path)) for path in drawings]
    assert [image.shape[:2] for image in images] == [
        mmcv.imread(str(root / name)).shape[:2] for name in ('x.png', 'sub/x.png', 'x.jpg')]
    assert images[0].shape != images[1].shape or (images[0] != images[1]).any()


def test_a_corrupt_image_is_skipped_and_the_others_are_still_written(trained):
    root = trained / 'with_corrupt'
    root.mkdir()
    shutil.copy(trained / 'images' / 'street.png', root / 'a.png')
    (root / 'b.png').write_bytes(b'not an image at all')
    shutil.copy(trained / 'images' / 'aerial.png', root / 'c.png')
    result = run_infer(trained, '--out-dir', 'corrupt_out', inputs='with_corrupt')
    assert result.returncode == 1, result.stdout + result.stderr
    records = json.load(open(trained / 'corrupt_out' / 'predictions.json'))
    assert [osp.basename(r['path']) for r in records] == ['a.png', 'c.png']
    assert all(len(r['bboxes']) > 0 for r in records)
    assert f'skipped {root / "b.png"}: it cannot be read as an image' in result.stderr
    assert f'1 image(s) skipped, they could not be read:\n  {root / "b.png"}' in result.stderr
    assert sorted(os.listdir(trained / 'corrupt_out')) == ['a.png', 'c.png', 'predictions.json']
