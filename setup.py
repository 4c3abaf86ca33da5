"""Installation of mmoverlock: OverLoCK and GLNet backbones for the OpenMMLab 2.0 stack."""
import re
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_version() -> str:
    text = (ROOT / 'mmoverlock' / 'version.py').read_text()
    return re.search(r"__version__ = '([^']+)'", text).group(1)


setup(
    name='mmoverlock',
    version=read_version(),
    description=('OverLoCK (CVPR 2025) and GLNet (NeurIPS 2024) backbones for mmdet 3.x and '
                 'mmseg 1.x'),
    long_description=(ROOT / 'README.md').read_text() if (ROOT / 'README.md').exists() else '',
    long_description_content_type='text/markdown',
    packages=find_packages(exclude=('tests', 'tests.*', 'configs', 'tools', 'benchmarks')),
    python_requires='>=3.9',
    # The exact, tested pins are in requirements.txt; these are the loose bounds.
    install_requires=['torch>=2.0', 'mmengine>=0.10,<1.0', 'mmcv>=2.0,<2.2', 'timm>=0.9'],
    extras_require={
        'det': ['mmdet>=3.0,<4.0', 'pycocotools'],
        'seg': ['mmsegmentation>=1.0,<2.0', 'ftfy', 'regex'],
        'natten': ['natten>=0.17,<0.18'],
    },
    license='Apache-2.0',
    zip_safe=False,
)
