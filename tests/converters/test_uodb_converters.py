"""UODB converters: small files in each owner's format -> the layout the UODB config reads (#23).

Every converted tree is loaded through the UODB config's own dataset entry inside a
DatasetMixture, and its boxes, labels and ignore flags are compared with the source's.
"""
import os
import os.path as osp
import re
import subprocess
import sys

import numpy as np
import pytest
from mmengine.config import Config
from PIL import Image

from damex.converters.uodb import convert, deeplesion, kitchen, kitti, lisa, widerface
from damex.datasets import AnnotationError, DatasetMixture

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
UODB_CONFIG = osp.join(REPO, 'configs', '_base_', 'dino-4scale_r50_8xb2-12e_uodb.py')


@pytest.fixture(scope='module')
def uodb_cfg():
    return Config.fromfile(UODB_CONFIG)


def write_image(path, width=100, height=50, mode='RGB'):
    os.makedirs(osp.dirname(path), exist_ok=True)
    Image.new(mode, (width, height), 128).save(path)


def load(uodb_cfg, name, out, split='train'):
    """{image id: [(class, box, ignore)]} read through the config's entry for ``name``."""
    loader = uodb_cfg.train_dataloader if split == 'train' else uodb_cfg.val_dataloader
    entry = next(e for e in loader.dataset.datasets if e.name == name).to_dict()
    entry['dataset']['data_root'] = str(out) + '/'
    mixture = DatasetMixture(datasets=[entry], pipeline=[])
    dataset = mixture.datasets[0]
    classes = dataset.metainfo['classes']
    found = {}
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        assert osp.isfile(info['img_path']), info['img_path']
        found[info['img_id']] = [(classes[inst['bbox_label']], inst['bbox'], inst['ignore_flag'])
                                 for inst in info['instances']]
    return found


def kitti_line(kind, box, occluded=0):
    return f'{kind} 0.00 {occluded} -1.57 {box[0]} {box[1]} {box[2]} {box[3]} 1.5 1.6 3.9 1 1 10 0.1\n'


@pytest.fixture
def kitti_src(tmp_path):
    src = tmp_path / 'kitti'
    labels = src / 'training' / 'label_2'
    labels.mkdir(parents=True)
    (labels / '000000.txt').write_text(
        kitti_line('Car', (10.5, 5.0, 40.25, 30.0)) + kitti_line('Van', (1, 1, 9, 9))
        + kitti_line('Misc', (2, 2, 8, 8)) + kitti_line('Pedestrian', (50, 10, 60, 40), 3)
        + 'DontCare -1 -1 -10 70.0 0.0 99.0 49.0 -1 -1 -1 -1000 -1000 -1000 -10\n'
        + kitti_line('Cyclist', (0.0, 0.0, 100.0, 50.0)))  # the whole image: border to border
    (labels / '000001.txt').write_text(kitti_line('Car', (20, 20, 30, 30)))
    for stem in ('000000', '000001'):
        write_image(str(src / 'training' / 'image_2' / f'{stem}.png'))
    return src


def test_kitti(kitti_src, tmp_path, uodb_cfg):
    out = tmp_path / 'out'
    fates = convert('kitti', str(kitti_src), str(out), workers=2)
    for _ in range(2):  # re-running over an existing tree is safe and gives the same tree
        assert load(uodb_cfg, 'kitti', out) == {'000000': [
            ('car', [10.5, 5.0, 40.25, 30.0], 0), ('pedestrian', [50.0, 10.0, 60.0, 40.0], 1),
            ('cyclist', [0.0, 0.0, 100.0, 50.0], 0)]}
        assert load(uodb_cfg, 'kitti', out, 'val') == {'000001': [('car', [20.0, 20.0, 30.0, 30.0], 0)]}
        convert('kitti', str(kitti_src), str(out))
    assert dict(fates.counts) == {
        ('Car', 'positive car'): 2, ('Cyclist', 'positive cyclist'): 1,
        ('Pedestrian', 'ignored: occluded=3 (unknown)'): 1,
        ('Van', 'dropped: not a UODB class'): 1, ('Misc', 'dropped: not a UODB class'): 1,
        ('DontCare', 'dropped: a region to ignore, not an object'): 1}
    # --split files replace the default split
    (tmp_path / 'train.txt').write_text('000001\n')
    (tmp_path / 'val.txt').write_text('000000\n')
    convert('kitti', str(kitti_src), str(tmp_path / 'split'),
            dict(train=str(tmp_path / 'train.txt'), val=str(tmp_path / 'val.txt')))
    assert list(load(uodb_cfg, 'kitti', tmp_path / 'split')) == ['000001']
    assert list(load(uodb_cfg, 'kitti', tmp_path / 'split', 'val')) == ['000000']


def test_kitti_bad_input_names_file_and_line(kitti_src, tmp_path):
    label = kitti_src / 'training' / 'label_2' / '000001.txt'
    label.write_text(kitti_line('Car', (20, 20, 30, 30)) + 'Car 0.00 0 -1.57 1 2 3\n')
    with pytest.raises(AnnotationError, match=rf'{label}:2: a KITTI label line has 15 fields, '
                                              r'this one has 7'):
        convert('kitti', str(kitti_src), str(tmp_path / 'out'))
    label.write_text(kitti_line('Car', (20, 20, 130, 30)))
    with pytest.raises(AnnotationError, match=rf'{label}:1: box \(20.0, 20.0, 130.0, 30.0\) lies '
                                              r'outside the 100x50 image'):
        convert('kitti', str(kitti_src), str(tmp_path / 'out'))
    label.write_text(kitti_line('Car', (20, 20, 30, 30)))
    os.remove(kitti_src / 'training' / 'image_2' / '000001.png')
    with pytest.raises(FileNotFoundError, match=r'000001.txt: its image .*000001.png is missing'):
        convert('kitti', str(kitti_src), str(tmp_path / 'out'))


def test_widerface(tmp_path, uodb_cfg):
    src = tmp_path / 'wider'
    (src / 'wider_face_split').mkdir(parents=True)
    (src / 'wider_face_split' / 'wider_face_train_bbx_gt.txt').write_text(
        '0--Parade/0_Parade_a.jpg\n3\n'
        '10 10 20 30 0 0 0 0 0 0 \n'  # a face (trailing space as distributed)
        '5 5 0 10 0 0 0 0 0 0 \n'  # zero width: dropped
        '30 5 10 10 2 0 0 1 0 0 \n'  # invalid: ignored
        '0--Parade/0_Parade_Parade_0_452.jpg\n0\n0 0 0 0 0 0 0 0 0 0 \n')  # no face
    (src / 'wider_face_split' / 'wider_face_val_bbx_gt.txt').write_text(
        '1--Handshaking/1_b.jpg\n1\n0 0 100 50 0 0 0 0 0 0 \n')
    for path in ('WIDER_train/images/0--Parade/0_Parade_a.jpg',
                 'WIDER_train/images/0--Parade/0_Parade_Parade_0_452.jpg',
                 'WIDER_val/images/1--Handshaking/1_b.jpg'):
        write_image(str(src / path))
    out = tmp_path / 'out'
    fates = convert('widerface', str(src), str(out))
    assert load(uodb_cfg, 'widerface', out) == {
        '0--Parade_0_Parade_a': [('face', [10.0, 10.0, 30.0, 40.0], 0),
                                 ('face', [30.0, 5.0, 40.0, 15.0], 1)],
        '0--Parade_0_Parade_Parade_0_452': []}
    assert load(uodb_cfg, 'widerface', out, 'val') == {
        '1--Handshaking_1_b': [('face', [0.0, 0.0, 100.0, 50.0], 0)]}
    assert dict(fates.counts) == {('face', 'positive face'): 2, ('face', 'ignored: invalid=1'): 1,
                                  ('face', 'dropped: zero width or height'): 1}


LISA_HEADER = ('Filename;Annotation tag;Upper left corner X;Upper left corner Y;Lower right '
               'corner X;Lower right corner Y;Occluded,On another road;Origin file;Origin frame '
               'number;Origin track;Origin track frame number\n')


def test_lisa(tmp_path, uodb_cfg):
    src = tmp_path / 'lisa'
    rows = ['vid0/f0.png;stop;10;10;30;30;"0,0";v0.avi;1;t.avi;1',  # quoted 7th field
            'vid0/f0.png;speedLimit35;40;5;60;40;0,1;v0.avi;1;t.avi;1',
            'vid1/f1.png;yield;1;1;20;20;0,0;v1.avi;1;t.avi;1',  # mapped to no class: dropped
            'vid1/f1.png;noLeftTurn;0;0;99;49;1,0;v1.avi;1;t.avi;1',
            'vid2/f2.png;signalAhead;5;5;15;15;0,0;v2.avi;1;t.avi;1',
            'vid3/f3.png;stopAhead;5;5;15;15;0,0;v3.avi;1;t.avi;1',
            'vid4/f4.png;speedLimit25;5;5;15;15;0,0;v4.avi;1;t.avi;1']
    src.mkdir()
    (src / 'allAnnotations.csv').write_text(LISA_HEADER + '\n'.join(rows) + '\n')
    for i in range(5):
        write_image(str(src / f'vid{i}' / f'f{i}.png'))
    out = tmp_path / 'out'
    fates = convert('lisa', str(src), str(out))
    assert load(uodb_cfg, 'lisa', out) == {
        'vid0_f0': [('stop', [10.0, 10.0, 30.0, 30.0], 0), ('speedlimit', [40.0, 5.0, 60.0, 40.0], 0)],
        'vid1_f1': [('noturn', [0.0, 0.0, 99.0, 49.0], 0)],
        'vid2_f2': [('warning', [5.0, 5.0, 15.0, 15.0], 0)],
        'vid3_f3': [('warning', [5.0, 5.0, 15.0, 15.0], 0)]}
    # the default split holds out every 5th source video
    assert load(uodb_cfg, 'lisa', out, 'val') == {'vid4_f4': [('speedlimit', [5.0, 5.0, 15.0, 15.0], 0)]}
    assert fates.counts[('yield', 'dropped: regulatory, none of the four superclasses')] == 1
    assert fates.counts[('speedLimit35', 'positive speedlimit')] == 1

    (src / 'allAnnotations.csv').write_text(LISA_HEADER + rows[0] + '\n'
                                            + 'vid0/f0.png;bogusTag;1;1;5;5;0,0;v0.avi;1;t;1\n')
    with pytest.raises(AnnotationError, match=r"allAnnotations.csv:3: tag 'bogusTag' is not in "
                                              r"the class map .*lisa_to_uodb.json"):
        convert('lisa', str(src), str(out))


def test_lisa_class_map_covers_the_47_tags_and_only_the_four_classes():
    class_map = lisa.read_class_map()
    assert len(class_map['tags']) == 47
    assert set(class_map['tags'].values()) == set(lisa.CLASSES) | {None}
    dropped = {tag for tag, cls in class_map['tags'].items() if cls is None}
    assert dropped == set(class_map['dropped_because'])


DL_HEADER = ('File_name,Patient_index,Study_index,Series_ID,Key_slice_index,'
             'Measurement_coordinates,Bounding_boxes,Lesion_diameters_Pixel_,'
             'Normalized_lesion_location,Coarse_lesion_type,Possibly_noisy,Slice_range,'
             'Spacing_mm_px_,Image_size,DICOM_windows,Patient_gender,Patient_age,Train_Val_Test\n')


def dl_row(name, box, split):
    return (f'{name},1,1,1,10,"1, 2, 3, 4","{box}","5, 6","0.5, 0.5, 0.5",-1,0,"9, 11",'
            f'"0.8, 0.8, 5","64, 32","-175, 275",M,50,{split}\n')


def write_slice(path, hu):
    os.makedirs(osp.dirname(path), exist_ok=True)
    Image.fromarray((np.asarray(hu) + 32768).astype(np.uint16)).save(path)


def test_deeplesion(tmp_path, uodb_cfg):
    src = tmp_path / 'dl'
    src.mkdir()
    (src / 'DL_info.csv').write_text(
        DL_HEADER + dl_row('000001_01_01_010.png', '11, 21, 41, 31', 1)
        + dl_row('000001_01_01_010.png', '1, 1, 64, 32', 1)  # a second lesion, to the border
        + dl_row('000002_01_01_005.png', '5, 5, 9, 9', 2) + dl_row('000003_01_01_007.png',
                                                                   '3, 3, 8, 8', 3))
    ramp = np.tile(np.linspace(-2000, 4000, 64), (32, 1)).round()
    write_slice(str(src / 'Images_png' / '000001_01_01' / '009.png'), ramp - 100)
    write_slice(str(src / 'Images_png' / '000001_01_01' / '010.png'), ramp)
    write_slice(str(src / 'Images_png' / '000001_01_01' / '011.png'), ramp + 100)
    write_slice(str(src / 'Images_png' / '000002_01_01' / '005.png'), np.zeros((32, 64)))
    write_slice(str(src / 'Images_png' / '000003_01_01' / '007.png'), np.zeros((32, 64)))
    out = tmp_path / 'out'
    convert('deeplesion', str(src), str(out))
    # 1-based source boxes: 1 is subtracted; train = Train_Val_Test 1 and 2, val = 3
    assert load(uodb_cfg, 'deeplesion', out) == {
        '000001_01_01_010': [('lesion', [10.0, 20.0, 40.0, 30.0], 0),
                             ('lesion', [0.0, 0.0, 63.0, 31.0], 0)],
        '000002_01_01_005': [('lesion', [4.0, 4.0, 8.0, 8.0], 0)]}
    assert list(load(uodb_cfg, 'deeplesion', out, 'val')) == ['000003_01_01_007']

    def windowed(hu, lo=-1024, hi=3071):
        return np.round((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8)

    rendered = np.asarray(Image.open(out / 'JPEGImages' / '000001_01_01_010.png'))
    assert rendered.shape == (32, 64, 3) and rendered.dtype == np.uint8
    for channel, offset in enumerate((-100, 0, 100)):  # before, at and after the key slice
        np.testing.assert_array_equal(rendered[..., channel], windowed(ramp + offset))
    assert rendered[0, 0, 1] == 0 and rendered[0, -1, 1] == 255  # -2000 HU and 4000 HU clip
    assert deeplesion.window_to_uint8(np.array([32768]), (-1024, 3071))[0] == 64  # 0 HU
    missing_neighbours = np.asarray(Image.open(out / 'JPEGImages' / '000002_01_01_005.png'))
    assert (missing_neighbours == windowed(np.zeros((32, 64)))[..., None]).all()

    convert('deeplesion', str(src), str(tmp_path / 'narrow'), window=(-100, 100),
            single_slice=True)
    narrow = np.asarray(Image.open(tmp_path / 'narrow' / 'JPEGImages' / '000001_01_01_010.png'))
    for channel in range(3):
        np.testing.assert_array_equal(narrow[..., channel], windowed(ramp, -100, 100))


def kitchen_xml(objects):
    return '<annotation>' + ''.join(
        f'<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}'
        f'</xmax><ymax>{b[3]}</ymax></bndbox></object>' for n, b in objects) + '</annotation>'


def test_kitchen_from_two_scenes(tmp_path, uodb_cfg):
    src = tmp_path / 'gmu'
    for scene, objects in (('gmu_scene_001', [('coca_cola_glass_bottle', (1, 1, 100, 50)),
                                              ('red_bull', (11, 21, 31, 41))]),
                           ('gmu_scene_007', [('pringles_bbq', (5, 5, 10, 10))])):
        (src / scene / 'Annotations').mkdir(parents=True)
        (src / scene / 'Annotations' / 'rgb_1.xml').write_text(kitchen_xml(objects))
        write_image(str(src / scene / 'Images' / 'rgb_1.png'))
    out = tmp_path / 'out'
    convert('kitchen', str(src), str(out))
    # 1-based GMU boxes: 1 subtracted; a box at the border (1..W, 1..H) -> (0..W-1, 0..H-1)
    assert load(uodb_cfg, 'kitchen', out) == {'gmu_scene_001_rgb_1': [
        ('coca_cola_glass_bottle', [0.0, 0.0, 99.0, 49.0], 0),
        ('red_bull', [10.0, 20.0, 30.0, 40.0], 0)]}
    assert load(uodb_cfg, 'kitchen', out, 'val') == {
        'gmu_scene_007_rgb_1': [('pringles_bbq', [4.0, 4.0, 9.0, 9.0], 0)]}
    (src / 'gmu_scene_007' / 'Annotations' / 'rgb_1.xml').write_text(
        kitchen_xml([('advil_liqui_gels', (5, 5, 10, 10))]))
    with pytest.raises(AnnotationError, match=r"rgb_1.xml \(object 0\): unknown instance "
                                              r"'advil_liqui_gels'"):
        convert('kitchen', str(src), str(out))


def test_voc_as_distributed_is_read_one_based(tmp_path, uodb_cfg):
    """The other coordinate rule: VOC's own XML, 1-based; a box at the image border."""
    root = tmp_path / 'voc'
    (root / 'Annotations').mkdir(parents=True)
    (root / 'ImageSets' / 'Main').mkdir(parents=True)
    (root / 'ImageSets' / 'Main' / 'train.txt').write_text('2007_000001\n')
    (root / 'Annotations' / '2007_000001.xml').write_text(
        '<annotation><size><width>100</width><height>50</height></size><object><name>dog'
        '</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>100</xmax>'
        '<ymax>50</ymax></bndbox></object></annotation>')
    write_image(str(root / 'JPEGImages' / '2007_000001.jpg'))
    assert load(uodb_cfg, 'voc', root) == {'2007_000001': [('dog', [0.0, 0.0, 99.0, 49.0], 1)]}
    (root / 'Annotations' / '2007_000001.xml').write_text(
        '<annotation><size><width>100</width><height>50</height></size><object><name>doggo'
        '</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>'
        '</object></annotation>')
    with pytest.raises(AnnotationError, match=r"2007_000001.xml \(object 0\): unknown class "
                                              r"'doggo'"):
        load(uodb_cfg, 'voc', root)


def test_config_class_lists_equal_uodb(uodb_cfg):
    lists = {name: classes for name, classes, _, _, _ in uodb_cfg.UODB}
    assert lists['kitchen'] == kitchen.CLASSES == (
        'coca_cola_glass_bottle', 'coffee_mate_french_vanilla',
        'honey_bunches_of_oats_honey_roasted', 'hunts_sauce', 'mahatma_rice',
        'nature_valley_soft_baked_oatmeal_squares_cinnamon_brown_sugar',
        'nature_valley_sweet_and_salty_nut_almond', 'palmolive_orange',
        'pop_secret_light_butter', 'pringles_bbq', 'red_bull')
    assert lists['kitti'] == kitti.CLASSES == ('car', 'pedestrian', 'cyclist')
    assert lists['widerface'] == widerface.CLASSES == ('face', )
    assert lists['lisa'] == lisa.CLASSES == ('speedlimit', 'stop', 'warning', 'noturn')
    assert lists['deeplesion'] == deeplesion.CLASSES == ('lesion', )


@pytest.mark.slow
def test_cli_prints_the_fate_table(kitti_src, tmp_path):
    result = subprocess.run([sys.executable, 'tools/dataset_converters/uodb.py', 'kitti', '--src',
                             str(kitti_src), '--out', str(tmp_path / 'out')],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r'\nDontCare +1  dropped: a region to ignore, not an object\n', result.stdout)
    assert re.search(r'\nCar +2  positive car\n', result.stdout)
    (kitti_src / 'training' / 'label_2' / '000000.txt').write_text('Car 1 2\n')
    result = subprocess.run([sys.executable, 'tools/dataset_converters/uodb.py', 'kitti', '--src',
                             str(kitti_src), '--out', str(tmp_path / 'out')],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and '000000.txt:1: a KITTI label line has 15 fields' in result.stderr


@pytest.mark.slow
def test_print_mixture_reports_a_converted_tree(kitti_src, tmp_path):
    convert('kitti', str(kitti_src), str(tmp_path / 'uodb' / 'kitti'))
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'damex',
                                   'damex-dino-e8_r50_4scale_8xb2-12e_uodb.py'))
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.datasets = [e for e in loader.dataset.datasets if e.name == 'kitti']
        loader.dataset.datasets[0].dataset.data_root = str(tmp_path / 'uodb' / 'kitti') + '/'
    cfg.model.bbox_head.num_classes = 3
    cfg.dump(str(tmp_path / 'kitti_only.py'))
    result = subprocess.run([sys.executable, 'tools/misc/print_mixture.py',
                             str(tmp_path / 'kitti_only.py'), '--check-images'],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert 'boxes: car 1, pedestrian 0 (+1 ignored), cyclist 1' in result.stdout
    assert 'boxes: car 1, pedestrian 0, cyclist 0' in result.stdout  # val
    assert 'all files found' in result.stdout
