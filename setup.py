"""Packaging for damex, an MMDetection 3.x plugin for Dataset-aware Mixture-of-Experts."""
from setuptools import find_packages, setup

setup(
    name='damex',
    version='0.1.0',
    description='Dataset-aware Mixture-of-Experts (DAMEX) detection for MMDetection 3.x',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['damex', 'damex.*']),
    python_requires='>=3.9',
    install_requires=[
        'torch>=2.1,<2.14',
        'mmengine>=0.10.0,<0.11',
        'mmcv>=2.0.0,<2.2.0',
        'mmdet==3.3.0',
        'pycocotools',
        'shapely>=2',
        'matplotlib',
        'openmim',
        # mmcv, mim and mmengine's `mmdet::` config inheritance import pkg_resources.
        'setuptools<82',
    ],
    extras_require={'tests': ['pytest', 'pytest-timeout']},
    license='Apache-2.0',
)
