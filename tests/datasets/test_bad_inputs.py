"""Images that used to be silently misread or to fail deep in training (issue #13)."""
import os.path as osp
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from mmengine.dataset import pseudo_collate
from PIL import Image

from damex.datasets import DatasetMixture

from damex.testing import REPO

PIPELINE = [dict(type='LoadImageFromFile'), dict(type='LoadAnnotations', with_bbox=True),
            dict(type='PackDetInputs')]


def voc_folder(folder, stem, width, height, box, suffix='.jpg'):
    xmin, ymin, xmax, ymax = box
    ET.ElementTree(ET.fromstring(
        f'<annotation><filename>{stem}{suffix}</filename><size><width>{width}</width><height>'
        f'{height}</height></size><object><name>Tree</name><bndbox><xmin>{xmin}</xmin><ymin>'
        f'{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object></annotation>'
    )).write(str(folder / f'{stem}.xml'))


def tree_mixture(folder, pipeline=PIPELINE):
    return DatasetMixture(datasets=[dict(name='trees', dataset=dict(
        type='XMLFolderDataset', ann_file=str(folder), metainfo=dict(classes=('Tree', )),
        pipeline=pipeline))])


def test_exif_rotated_jpeg_keeps_pixels_and_boxes_aligned(tmp_path):
    # stored pixels: 80 wide, 40 high, a white block at x 10..30, y 5..25
    pixels = np.zeros((40, 80, 3), dtype=np.uint8)
    pixels[5:25, 10:30] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    Image.fromarray(pixels).save(tmp_path / 'rot.jpg', exif=exif, quality=100)
    voc_folder(tmp_path, 'rot', 80, 40, (10, 5, 30, 25))
    sample = tree_mixture(tmp_path)[0]
    image = sample['inputs'].numpy().transpose(1, 2, 0)  # (H, W, C) as stored
    assert image.shape[:2] == (40, 80)
    x1, y1, x2, y2 = sample['data_samples'].gt_instances.bboxes.tensor[0].int().tolist()
    assert image[y1 + 2:y2 - 2, x1 + 2:x2 - 2].mean() > 240  # the box covers the block
    assert image[:, 40:].mean() < 10


def corrupt_folder(tmp_path):
    """good.png; bad.png: a PNG whose header reads fine but whose pixel data is broken
    (passes the loaders' size check); cut.jpg: a JPEG cut short."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / 'good.png')
    data = bytearray((tmp_path / 'good.png').read_bytes())
    start = data.find(b'IDAT') + 200
    data[start:start + 60] = bytes(b ^ 0xFF for b in data[start:start + 60])
    (tmp_path / 'bad.png').write_bytes(bytes(data))
    Image.fromarray(noise).save(tmp_path / 'full.jpg', quality=95)
    jpeg = (tmp_path / 'full.jpg').read_bytes()
    (tmp_path / 'full.jpg').unlink()
    (tmp_path / 'cut.jpg').write_bytes(jpeg[:len(jpeg) * 6 // 10])
    for stem, suffix in (('good', '.png'), ('bad', '.png'), ('cut', '.jpg')):
        voc_folder(tmp_path, stem, 400, 300, (5, 5, 30, 30), suffix)
    return tmp_path


@pytest.mark.slow  # trains or spawns a process
def test_print_mixture_check_images_lists_unreadable_files(tmp_path):
    folder = corrupt_folder(tmp_path / 'trees')
    config = tmp_path / 'cfg.py'
    config.write_text(
        f"_base_ = '{REPO}/configs/demo/damex_demo.py'\n"
        "model = dict(bbox_head=dict(num_classes=1), moe=dict(num_experts=1))\n"
        "_mix = dict(_delete_=True, type='DatasetMixture', num_experts=1, datasets=[dict(\n"
        "    name='trees', dataset=dict(type='XMLFolderDataset', "
        f"ann_file='{folder}', metainfo=dict(classes=('Tree', )), pipeline=[]))])\n"
        "train_dataloader = dict(dataset=_mix)\nval_dataloader = dict(dataset=_mix)\n"
        "test_dataloader = dict(dataset=_mix)\n")
    tool = osp.join(REPO, 'tools/misc/print_mixture.py')
    plain = subprocess.run([sys.executable, tool, str(config)], cwd=REPO, capture_output=True,
                           text=True)
    assert plain.returncode == 0, plain.stdout + plain.stderr  # the files exist
    checked = subprocess.run([sys.executable, tool, str(config), '--check-images'], cwd=REPO,
                             capture_output=True, text=True)
    assert checked.returncode == 1
    for name in ('cut.jpg', 'bad.png'):
        assert f'{folder / name} is unreadable' in checked.stdout
    assert 'good.png is unreadable' not in checked.stdout


def test_unreadable_image_in_training_names_dataset_and_file(tmp_path):
    folder = corrupt_folder(tmp_path)
    mixture = tree_mixture(folder)
    paths = [mixture.datasets[0].get_data_info(i)['img_path'] for i in range(len(mixture))]
    with pytest.raises(RuntimeError, match=r"dataset 'trees', image .*bad\.png: loading failed"):
        mixture[paths.index(str(folder / 'bad.png'))]


def test_non_finite_pixels_are_named_as_the_input(demo_data, tmp_path):
    import copy
    from mmdet.registry import DATASETS, MODELS
    from damex.testing import tiny_demo_config
    cfg = tiny_demo_config(tmp_path)
    model = MODELS.build(copy.deepcopy(cfg.model))
    dataset = DATASETS.build(cfg.train_dataloader.dataset)
    batch = model.data_preprocessor(pseudo_collate([dataset[0], dataset[9]]), True)
    batch['inputs'][1, 0, 3, 3] = float('nan')
    paths = [s.img_path for s in batch['data_samples']]
    with pytest.raises(FloatingPointError, match='input images .* hold non-finite pixels') as error:
        model.loss(batch['inputs'], batch['data_samples'])
    assert all(p in str(error.value) for p in paths)


def test_non_finite_tokens_blame_the_input_not_the_router():
    from damex.models.moe import MoEFFN
    layer = MoEFFN(embed_dims=8, feedforward_channels=16, num_experts=2,
                   router=dict(type='SoftmaxTokenChoiceRouter'))
    layer.name = 'decoder.layers.0.ffn'
    x = torch.randn(1, 4, 8)
    x[0, 2, 1] = float('inf')
    with pytest.raises(FloatingPointError, match=r'decoder.layers.0.ffn: the input tokens of this '
                                                 r'layer are not finite'):
        layer(x)
