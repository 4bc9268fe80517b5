"""DOTA txt and VOC XML folders: the real samples load completely; bad input fails loudly."""
import os
import os.path as osp
import shutil
import warnings
import xml.etree.ElementTree as ET

import numpy as np
import pytest

import damex  # noqa: F401
from damex.datasets import DOTA_CLASSES, AnnotationError, DOTADataset, XMLFolderDataset


def dota(ann_dir, img_dir, **kwargs):
    return DOTADataset(ann_file=str(ann_dir), data_prefix=dict(img_path=str(img_dir)),
                       pipeline=[], **kwargs)


def read_dota_objects(path):
    with open(path) as f:
        rows = [line.split() for line in f if not line.startswith(('imagesource', 'gsd'))]
    return [r for r in rows if r]


def test_dota_sample_loads_every_object_with_polygon_bounds(sample_data):
    root = osp.join(sample_data, 'dota_sample')
    dataset = dota(osp.join(root, 'labelTxt'), osp.join(root, 'images'))
    assert len(dataset) == 4
    classes = DOTA_CLASSES['1.0']
    for index in range(len(dataset)):
        info = dataset.get_data_info(index)
        stem = osp.splitext(osp.basename(info['img_path']))[0]
        rows = read_dota_objects(osp.join(root, 'labelTxt', stem + '.txt'))
        assert len(info['instances']) == len(rows), stem
        for inst, row in zip(info['instances'], rows):
            xs, ys = [float(v) for v in row[0:8:2]], [float(v) for v in row[1:8:2]]
            assert inst['bbox'] == [min(xs), min(ys), max(xs), max(ys)]
            assert classes[inst['bbox_label']] == row[8]
            assert inst['ignore_flag'] == int(row[9] != '0')
    p0168 = dataset.get_data_info([i for i in range(4) if 'P0168' in
                                   dataset.get_data_info(i)['img_path']][0])
    assert (p0168['width'], p0168['height']) == (2304, 1792)
    assert dataset.metainfo['classes'] == classes


def test_dota_versions_choose_class_lists():
    assert len(DOTA_CLASSES['1.0']) == 15 and len(DOTA_CLASSES['1.5']) == 16
    assert DOTA_CLASSES['2.0'][-2:] == ('airport', 'helipad')
    with pytest.raises(ValueError, match='unknown DOTA version'):
        DOTADataset(ann_file='x', version='3.0', lazy_init=True)


def test_neon_xml_boxes_equal_the_xml_and_tif_name_is_resolved(sample_data):
    root = osp.join(sample_data, 'neon_trees')
    # SOAP_061 labels its trees 'Alive' / 'Dead' (a real-world quirk): strict by default...
    with pytest.raises(AnnotationError, match=r"SOAP_061.xml \(object 0\): unknown class 'Dead'"):
        XMLFolderDataset(ann_file=root, metainfo=dict(classes=('Tree', )), pipeline=[])
    # ... and one alias map away from a 1-class tree dataset
    with pytest.warns(UserWarning, match=r'OSBS_029.tif -> OSBS_029.png'):
        dataset = XMLFolderDataset(ann_file=root, metainfo=dict(classes=('Tree', )), pipeline=[],
                                   class_aliases=dict(Alive='Tree', Dead='Tree'))
    assert len(dataset) == 2
    counts = {}
    for index in range(2):
        info = dataset.get_data_info(index)
        stem = osp.splitext(osp.basename(info['img_path']))[0]
        objects = ET.parse(osp.join(root, stem + '.xml')).getroot().findall('object')
        expected = [[float(o.find('bndbox').findtext(k)) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
                    for o in objects]
        assert [inst['bbox'] for inst in info['instances']] == expected
        assert info['img_path'].endswith('.png') and (info['width'], info['height']) == (400, 400)
        counts[stem] = len(info['instances'])
    assert counts == {'OSBS_029': 61, 'SOAP_061': 37}


@pytest.fixture
def dota_folder(tmp_path, sample_data):
    """A writable DOTA folder with one real image, for corrupt-annotation cases."""
    (tmp_path / 'images').mkdir()
    (tmp_path / 'labelTxt').mkdir()
    shutil.copy(osp.join(sample_data, 'dota_sample', 'images', 'P0075.png'), tmp_path / 'images')
    return tmp_path


def write_ann(folder, *lines):
    (folder / 'labelTxt' / 'P0075.txt').write_text('imagesource:x\ngsd:1\n' + '\n'.join(lines))
    return str(folder / 'labelTxt' / 'P0075.txt')


GOOD = '10 10 50 10 50 40 10 40 plane 0'


def test_unknown_class_and_malformed_line_raise_naming_file_and_line(dota_folder):
    path = write_ann(dota_folder, GOOD, '10 10 50 10 50 40 10 40 spaceship 0')
    with pytest.raises(AnnotationError, match=rf"{path}:4: unknown class 'spaceship'"):
        dota(dota_folder / 'labelTxt', dota_folder / 'images')
    path = write_ann(dota_folder, GOOD, '10 10 50 ten 50 40 10 40 plane 0')
    with pytest.raises(AnnotationError, match=rf'{path}:4: non-numeric'):
        dota(dota_folder / 'labelTxt', dota_folder / 'images')
    write_ann(dota_folder, '10 10 50 plane')
    with pytest.raises(AnnotationError, match='expected'):
        dota(dota_folder / 'labelTxt', dota_folder / 'images')


def test_lenient_mode_skips_with_a_counted_warning(dota_folder):
    path = write_ann(dota_folder, GOOD, '1 2 3 plane', '10 10 50 10 50 40 10 40 ufo 0')
    with pytest.warns(UserWarning, match=rf'skipped 2 objects: 2 malformed lines or unknown '
                                         rf'classes \(e.g. {path}:4\)'):
        dataset = dota(dota_folder / 'labelTxt', dota_folder / 'images', strict=False)
    assert len(dataset.get_data_info(0)['instances']) == 1


@pytest.mark.parametrize('line, problem', [
    ('10 10 10 10 10 10 10 10 plane 0', 'degenerate'),
    ('0 0 40 40 40 0 0 40 plane 0', 'self-intersecting'),
])
def test_invalid_polygons_warn_or_fail(dota_folder, line, problem):
    write_ann(dota_folder, GOOD, line)
    with pytest.warns(UserWarning, match=f'1 {problem} polygons'):
        dataset = dota(dota_folder / 'labelTxt', dota_folder / 'images')
    assert len(dataset.get_data_info(0)['instances']) == 1
    with pytest.raises(AnnotationError, match=f'P0075.txt:4: {problem}'):
        dota(dota_folder / 'labelTxt', dota_folder / 'images', invalid_polygon='error')


def test_difficult_objects_are_ignored_and_counted(dota_folder):
    write_ann(dota_folder, GOOD, '10 10 50 10 50 40 10 40 ship 1')
    dataset = dota(dota_folder / 'labelTxt', dota_folder / 'images')
    assert [i['ignore_flag'] for i in dataset.get_data_info(0)['instances']] == [0, 1]
    assert dataset.report.summary() == 'marked 1 difficult objects as ignore'
    kept = dota(dota_folder / 'labelTxt', dota_folder / 'images', difficult_as_ignore=False)
    assert [i['ignore_flag'] for i in kept.get_data_info(0)['instances']] == [0, 0]


def test_missing_image_names_the_folder(dota_folder):
    write_ann(dota_folder, GOOD)
    (dota_folder / 'labelTxt' / 'P9999.txt').write_text(GOOD)
    with pytest.raises(FileNotFoundError, match=r'no image named P9999\.\*'):
        dota(dota_folder / 'labelTxt', dota_folder / 'images')


def test_unreadable_xml_and_unknown_voc_class_name_the_file(tmp_path, sample_data):
    shutil.copy(osp.join(sample_data, 'neon_trees', 'SOAP_061.png'), tmp_path)
    (tmp_path / 'SOAP_061.xml').write_text('<annotation><object>')
    with pytest.raises(AnnotationError, match='SOAP_061.xml: unreadable XML'):
        XMLFolderDataset(ann_file=str(tmp_path), metainfo=dict(classes=('Tree', )), pipeline=[])
    shutil.copy(osp.join(sample_data, 'neon_trees', 'SOAP_061.xml'), tmp_path)
    with pytest.raises(AnnotationError, match=r"SOAP_061.xml \(object 0\): unknown class 'Dead'"):
        XMLFolderDataset(ann_file=str(tmp_path), metainfo=dict(classes=('Bush', )), pipeline=[])
    with pytest.raises(ValueError, match='needs its class names'):
        XMLFolderDataset(ann_file=str(tmp_path), pipeline=[])


# --- issue #13: inputs that used to fail without naming the file, or fail wrongly ---

def write_voc(folder, stem, difficult):
    ET.ElementTree(ET.fromstring(
        f'<annotation><filename>{stem}.png</filename><size><width>64</width><height>48'
        f'</height></size><object><name>Tree</name><difficult>{difficult}</difficult><bndbox>'
        '<xmin>5</xmin><ymin>6</ymin><xmax>30</xmax><ymax>40</ymax></bndbox></object>'
        '</annotation>')).write(str(folder / f'{stem}.xml'))
    from PIL import Image
    Image.new('RGB', (64, 48)).save(folder / f'{stem}.png')


def test_voc_difficult_true_false_and_bad_values(tmp_path):
    for stem, flag in (('a', 'true'), ('b', 'False'), ('c', '1')):
        write_voc(tmp_path, stem, flag)
    dataset = XMLFolderDataset(ann_file=str(tmp_path), metainfo=dict(classes=('Tree', )),
                               pipeline=[])
    flags = {osp.basename(dataset.get_data_info(i)['img_path']):
             dataset.get_data_info(i)['instances'][0]['ignore_flag'] for i in range(3)}
    assert flags == {'a.png': 1, 'b.png': 0, 'c.png': 1}
    write_voc(tmp_path, 'd', 'maybe')
    with pytest.raises(AnnotationError, match=r"d\.xml \(object 0\): <difficult> must be an "
                                              r"integer or true/false, got 'maybe'"):
        XMLFolderDataset(ann_file=str(tmp_path), metainfo=dict(classes=('Tree', )), pipeline=[])


def test_dota_file_with_a_utf8_bom_loads(tmp_path):
    from PIL import Image
    (tmp_path / 'images').mkdir()
    (tmp_path / 'labelTxt').mkdir()
    Image.new('RGB', (100, 100)).save(tmp_path / 'images' / 'x.png')
    (tmp_path / 'labelTxt' / 'x.txt').write_bytes(
        '\ufeffimagesource:GoogleEarth\ngsd:1\n10 10 60 10 60 50 10 50 plane 0\n'.encode())
    dataset = dota(tmp_path / 'labelTxt', tmp_path / 'images')
    assert dataset.get_data_info(0)['instances'][0]['bbox'] == [10.0, 10.0, 60.0, 50.0]
