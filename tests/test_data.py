import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import fakedata
from data import (DATASETS, ClassSampler, ImageSet, StreamSet, TensorLoader, decode,
                  decode_classwise, decode_zoom, eval_loader, load_split, read_idx,
                  standard_augment)
from misc.utils import UserError


def cfg(dataset, data_dir, **kw):
    base = dict(dataset=dataset, data_dir=str(data_dir), download=False, skip_checksum=False,
                imagenet_dir=os.path.join(str(data_dir), 'imagenet'), nclass=4, dseed=0,
                class_list='', size=32, load_memory=True)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize('name, n_train, n_test, nclass', [
    ('cifar10', 500, 40, 10),
    ('cifar100', 200, 100, 100),
    ('svhn', 100, 40, 10),
    ('mnist', 200, 50, 10),
    ('fashion', 200, 50, 10),
])
def test_small_datasets_load_with_shapes_and_labels(fake_root, name, n_train, n_test, nclass):
    info = DATASETS[name]
    a = cfg(name, fake_root, skip_checksum=True)
    for train, n in ((True, n_train), (False, n_test)):
        d = load_split(a, train=train)
        assert isinstance(d, ImageSet)
        assert d.images.shape == (n, info.nch, info.size, info.size)
        assert d.images.dtype == torch.uint8
        counts = torch.bincount(d.targets, minlength=nclass)
        assert len(counts) == nclass and (counts == n // nclass).all()


def test_labels_follow_pixels(fake_root):
    # The fake images encode their class in their brightness: labels must stay attached.
    d = load_split(cfg('svhn', fake_root, skip_checksum=True))
    means = d.images.float().mean((1, 2, 3))
    for c in range(10):
        assert means[d.targets == c].mean() == pytest.approx(20 + 22 * c, abs=3)


def test_cifar_checksum_is_kept_for_real_files(fake_root):
    with pytest.raises(UserError, match='MD5'):
        load_split(cfg('cifar10', fake_root))


def test_debian_layout_gz_and_raw(fake_fashion, tmp_path):
    d = load_split(cfg('fashion', fake_fashion), train=True)
    assert d.images.shape == (200, 1, 28, 28)
    raw = fakedata.write_idx(str(tmp_path / 'flat'), gz=False)
    assert len(load_split(cfg('mnist', raw), train=False)) == 50


def test_missing_dataset_message(tmp_path):
    with pytest.raises(UserError) as e:
        load_split(cfg('fashion', tmp_path / 'none'))
    msg = str(e.value)
    assert 'train-images-idx3-ubyte' in msg and 'dataset-fashion-mnist' in msg
    with pytest.raises(UserError, match='--download'):
        load_split(cfg('cifar10', tmp_path))
    with pytest.raises(UserError, match='svhn'):
        load_split(cfg('svhn', tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_truncated_idx_file(tmp_path):
    folder = fakedata.write_idx(str(tmp_path / 'f'), gz=False)
    path = os.path.join(folder, 'train-images-idx3-ubyte')
    data = open(path, 'rb').read()
    open(path, 'wb').write(data[:-100])
    with pytest.raises(UserError, match='truncated'):
        read_idx(path, 3)
    open(path, 'wb').write(b'garbage!' * 4)
    with pytest.raises(UserError, match='not an IDX file'):
        read_idx(path, 3)


def test_imagefolder_subsets(fake_root, tmp_path):
    a = cfg('imagenet', fake_root, nclass=3, size=32)
    d = load_split(a, train=True)
    assert d.images.shape == (12, 3, 32, 32) and d.classes == [f'n{i:08d}' for i in range(3)]
    v = load_split(a, train=False)
    assert len(v) == 6 and torch.bincount(v.targets).tolist() == [2, 2, 2]
    s = load_split(cfg('imagenet', fake_root, nclass=2, size=16, load_memory=False))
    assert isinstance(s, StreamSet) and s[0][0].shape == (3, 16, 16)
    lst = tmp_path / 'classes.txt'
    lst.write_text('n00000003\nn00000001\n')
    d = load_split(cfg('imagenet', fake_root, nclass=2, class_list=str(lst)))
    assert d.classes == ['n00000003', 'n00000001']
    # the first class of the list is label 0 and holds the brightest (class-3) images
    assert d.images[d.targets == 0].float().mean() > d.images[d.targets == 1].float().mean()
    seeded = load_split(cfg('imagenet', fake_root, nclass=2, dseed=5))
    assert len(set(seeded.classes)) == 2
    with pytest.raises(UserError, match='holds only 4 class folders but --nclass asks for 9'):
        load_split(cfg('imagenet', fake_root, nclass=9))


def test_class_list_not_text(fake_root, tmp_path):
    lst = tmp_path / 'classes.txt'
    lst.write_bytes(bytes(range(256)) * 4)  # e.g. an image passed by mistake
    with pytest.raises(UserError, match='not a text file of class folder names'):
        load_split(cfg('imagenet', fake_root, nclass=2, class_list=str(lst)))


def test_class_list_shorter_than_nclass(fake_root, tmp_path):
    lst = tmp_path / 'classes.txt'
    lst.write_text('n00000003\n\nn00000001\n')
    with pytest.raises(UserError) as e:
        load_split(cfg('imagenet', fake_root, nclass=3, class_list=str(lst)))
    assert 'has only 2 class names but --nclass asks for 3' in str(e.value)


def test_class_list_missing_or_repeated_class(fake_root, tmp_path):
    lst = tmp_path / 'classes.txt'
    lst.write_text('n00000003\nn00000007\n')
    with pytest.raises(UserError, match=r"lacks 1 of the 2 classes .*'n00000007'"):
        load_split(cfg('imagenet', fake_root, nclass=2, class_list=str(lst)))
    lst.write_text('n00000003\nn00000003\n')
    with pytest.raises(UserError, match='more than once'):
        load_split(cfg('imagenet', fake_root, nclass=2, class_list=str(lst)))


@pytest.mark.parametrize('nclass', [0, -1])
@pytest.mark.parametrize('class_list', [False, True])
def test_imagenet_nclass_must_be_positive(fake_root, tmp_path, nclass, class_list):
    lst = tmp_path / 'classes.txt'
    lst.write_text('n00000003\nn00000001\n')
    a = cfg('imagenet', fake_root, nclass=nclass, class_list=str(lst) if class_list else '')
    with pytest.raises(UserError, match=f'--nclass {nclass}: .* at least 1'):
        load_split(a)


def _set_first_label(name, root, value, new):
    """Copy the files of `name` from root into the folder `new`, first training label :=
    value; return (new, path of the edited label file)."""
    import pickle
    import shutil
    if name in ('mnist', 'fashion'):
        path = new / 'train-labels-idx1-ubyte'
        fakedata.write_idx(str(new), gz=False)
        data = bytearray(path.read_bytes())
        data[8] = value  # the first label, after the 8-byte header
        path.write_bytes(bytes(data))
    elif name == 'svhn':
        import scipy.io
        shutil.copytree(root / 'svhn', new / 'svhn')
        path = new / 'svhn' / 'train_32x32.mat'
        mat = scipy.io.loadmat(str(path))
        mat['y'][0, 0] = value
        scipy.io.savemat(str(path), {'X': mat['X'], 'y': mat['y']})
    else:
        folder = {'cifar10': 'cifar-10-batches-py', 'cifar100': 'cifar-100-python'}[name]
        shutil.copytree(root / folder, new / folder)
        path = new / folder / ('data_batch_3' if name == 'cifar10' else 'train')
        entry = pickle.loads(path.read_bytes())
        entry['labels' if name == 'cifar10' else 'fine_labels'][0] = value
        path.write_bytes(pickle.dumps(entry))
    return new, path


@pytest.mark.parametrize('name, bad, nclass', [
    ('fashion', 42, 10), ('mnist', 10, 10), ('cifar10', 42, 10), ('cifar10', -1, 10),
    ('cifar100', 100, 100), ('svhn', 11, 10)])
def test_out_of_range_label_names_the_file(fake_root, tmp_path, name, bad, nclass):
    # without the check, such a label fails only in training: 'Target 42 is out of bounds'.
    # (SVHN's label 10, digit 0, is in every fake .mat file: the check comes after its mapping.)
    folder, path = _set_first_label(name, fake_root, bad, tmp_path / 'd')
    with pytest.raises(UserError) as e:
        load_split(cfg(name, folder, skip_checksum=True), train=True)
    msg = str(e.value)
    assert str(path) in msg and f'label {bad}' in msg and f'0..{nclass - 1}' in msg
    load_split(cfg(name, folder, skip_checksum=True), train=False)  # the other split still loads



def test_real_fashion_mnist(fashion_dir):
    a = cfg('fashion', fashion_dir)
    train, test = load_split(a, train=True), load_split(a, train=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.targets).tolist() == [6000] * 10
    assert torch.bincount(test.targets).tolist() == [1000] * 10


def test_class_sampler(fake_root):
    d = load_split(cfg('mnist', fake_root))
    s = ClassSampler(d, batch_size=8, device='cpu', seed=0)
    x, y = s.class_sample(3)
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and (y == 3).all()
    assert 0 <= x.min() and x.max() <= 1
    first, _ = s.class_sample(3, 5, first=True)
    idx = (d.targets == 3).nonzero().flatten()[:5]
    assert torch.equal(first, d.images[idx].float() * (1 / 255))
    # per class, random batches do not repeat an image before the class is used up (20 images)
    seen = torch.cat([s.class_sample(5)[0] for _ in range(2)])
    assert len(torch.unique(seen.flatten(1), dim=0)) == 16
    # restoring the state replays the same draws
    st = s.state_dict()
    a1, b1 = s.class_sample(1)[0], s.sample()[0]
    s.load_state_dict(st)
    a2, b2 = s.class_sample(1)[0], s.sample()[0]
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    with pytest.raises(UserError, match='needed to initialize'):
        s.class_sample(0, 21, first=True)


def test_tensor_loader_normalizes_and_covers_all(fake_root):
    d = load_split(cfg('fashion', fake_root), train=False)
    loader = eval_loader(d, 'fashion', 'cpu', batch_size=16)
    xs, ys = zip(*loader)
    assert sum(len(y) for y in ys) == 50 and len(loader) == 4
    x = torch.cat(xs)
    ref = (d.images.float() * (1 / 255) - 0.2861) / 0.3530
    assert torch.allclose(x, ref, atol=1e-6)
    t = TensorLoader(d.images, d.targets, 16, 'cpu', shuffle=True, drop_last=True, seed=1)
    assert len(list(t)) == 3


def test_decode_layout_and_labels():
    img = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).view(2, 1, 4, 4)
    tgt = torch.tensor([0, 1])
    out, lab = decode_zoom(img, tgt, 2)
    assert out.shape == (8, 1, 4, 4) and lab.tolist() == [0, 1] * 4
    # crop-major, crops row by row: output k*N + n is crop k of image n
    for k, (r, c) in enumerate([(0, 0), (0, 2), (2, 0), (2, 2)]):
        for n in range(2):
            crop = img[n:n + 1, :, r:r + 2, c:c + 2]
            up = F.interpolate(crop, size=(4, 4), mode='bilinear', align_corners=False)
            assert torch.equal(out[k * 2 + n], up[0])


@pytest.mark.parametrize('size, factor', [(28, 3), (7, 2), (32, 3), (28, 1)])
def test_decode_pads_with_half_when_not_divisible(size, factor):
    img = torch.zeros(1, 1, size, size)
    out, _ = decode_zoom(img, torch.tensor([0]), factor)
    assert out.shape == (factor * factor, 1, size, size)
    if size % factor and factor > 1:
        assert out[-1].max() > 0  # the last crop reaches into the 0.5 padding
        assert out[0].max() == 0
    else:
        assert out.max() == 0


def test_decode_multi_and_bound_counts():
    img, tgt = torch.rand(10, 3, 12, 12), torch.zeros(10, dtype=torch.long)
    out, lab = decode(img, tgt, 3, 'multi')
    assert len(out) == 10 * (1 + 4 + 9) == len(lab)
    out, _ = decode(img, tgt, 3, 'bound', bound=40)
    assert len(out) <= 40
    out, _ = decode(img, tgt, 3, 'bound', bound=128)
    assert len(out) == 10 * 9
    x, y = decode_classwise(torch.rand(6, 1, 8, 8), torch.tensor([0, 0, 0, 1, 1, 1]), 3, 2)
    assert y.tolist() == [0] * 12 + [1] * 12


@pytest.mark.parametrize('dataset, size, nch, flips', [
    ('fashion', 28, 1, False), ('mnist', 28, 1, False), ('svhn', 32, 3, False),
    ('cifar10', 32, 3, True)])
def test_standard_augment_crops_and_flips_as_the_original(dataset, size, nch, flips):
    # without DSA: random crop (4 px padding) everywhere, a horizontal flip on CIFAR only
    torch.manual_seed(0)
    ramp = torch.linspace(0.1, 1.0, size).expand(64, nch, size, size)  # brighter to the right
    out = standard_augment(dataset, size)(ramp)
    assert out.shape == ramp.shape
    mirrored = out[:, 0, size // 2, size - 10] < out[:, 0, size // 2, 10]
    assert bool(mirrored.any()) == flips
    if flips:
        assert 10 < int(mirrored.sum()) < 54
    shifted = (out != ramp).flatten(1).any(1)
    assert int(shifted.sum()) > 32  # most images are cropped off-centre
