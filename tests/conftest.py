import os
import sys
from pathlib import Path

# OpenMP threads that spin while waiting make torch crawl when other processes share the cores
# (tests run several at once); sleeping waits cost little here. Set before torch is imported.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import fakedata  # noqa: E402

FASHION_DIR = os.environ.get('IDC_FASHION_DIR', '/usr/share/datasets/fashion-mnist')

# Tests that need a GPU: skipped where torch sees none. CUDA: a 'cuda' device parameter.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
CUDA = pytest.param('cuda', marks=needs_cuda)


@pytest.fixture(scope='session')
def fashion_dir():
    """The real FashionMNIST (Debian package). `make test` installs it; CI must have it."""
    if not os.path.isfile(os.path.join(FASHION_DIR, 'train-images-idx3-ubyte.gz')) and \
            not os.path.isfile(os.path.join(FASHION_DIR, 'train-images-idx3-ubyte')):
        if os.environ.get('CI'):
            pytest.fail(f'real FashionMNIST missing from {FASHION_DIR} (make test installs it)')
        pytest.skip(f'real FashionMNIST not installed in {FASHION_DIR}')
    return FASHION_DIR


@pytest.fixture(scope='session')
def fake_root(tmp_path_factory):
    """One folder holding every tiny dataset in its real on-disk format."""
    root = tmp_path_factory.mktemp('data')
    fakedata.write_idx(str(root / 'FashionMNIST' / 'raw'), gz=False)
    fakedata.write_idx(str(root / 'MNIST' / 'raw'), gz=True, seed=3)
    fakedata.write_cifar10(str(root))
    fakedata.write_cifar100(str(root))
    fakedata.write_svhn(str(root))
    fakedata.write_imagefolder(str(root / 'imagenet'))
    return root


@pytest.fixture(scope='session')
def fake_fashion(tmp_path_factory):
    """FashionMNIST-format IDX files (gzipped, flat: the Debian layout), 20 train / 5 test
    images per class."""
    return fakedata.write_idx(str(tmp_path_factory.mktemp('fashion')), gz=True)
