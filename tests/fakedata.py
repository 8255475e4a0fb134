"""Tiny datasets written in the exact on-disk formats torchvision and the Debian package use.

Images are random but class-dependent (the class sets the mean brightness), so that a network can
learn them quickly and tests can check accuracy above chance.
"""
import gzip
import os
import pickle

import numpy as np


def class_images(n_per_class, nclass, shape, seed=0):
    """uint8 images (N, *shape), class-major then shuffled, and labels (N,)."""
    rng = np.random.RandomState(seed)
    labels = np.repeat(np.arange(nclass), n_per_class)
    rng.shuffle(labels)
    base = (labels * (200 // max(nclass - 1, 1)) + 20).reshape((-1, ) + (1, ) * len(shape))
    noise = rng.randint(-20, 21, size=(len(labels), ) + tuple(shape))
    return np.clip(base + noise, 0, 255).astype(np.uint8), labels


def _idx_bytes(arr):
    header = bytes([0, 0, 0x08, arr.ndim]) + b''.join(int(d).to_bytes(4, 'big') for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(folder, n_train=20, n_test=5, gz=True, seed=0):
    """MNIST-style IDX files (the Debian fashion-mnist layout when gz=True)."""
    os.makedirs(folder, exist_ok=True)
    for prefix, n in (('train', n_train), ('t10k', n_test)):
        x, y = class_images(n, 10, (28, 28), seed=seed + (prefix == 't10k'))
        for kind, arr in (('images-idx3-ubyte', x), ('labels-idx1-ubyte', y)):
            path = os.path.join(folder, f'{prefix}-{kind}')
            data = _idx_bytes(arr)
            if gz:
                with gzip.open(path + '.gz', 'wb') as f:
                    f.write(data)
            else:
                with open(path, 'wb') as f:
                    f.write(data)
    return folder


def write_cifar10(root, n_train=10, n_test=4, seed=0):
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    for b in range(1, 6):
        x, y = class_images(n_train, 10, (3, 32, 32), seed=seed + b)
        _dump(os.path.join(folder, f'data_batch_{b}'), {'data': x.reshape(len(x), -1),
                                                        'labels': y.tolist()})
    x, y = class_images(n_test, 10, (3, 32, 32), seed=seed + 9)
    _dump(os.path.join(folder, 'test_batch'), {'data': x.reshape(len(x), -1),
                                               'labels': y.tolist()})
    _dump(os.path.join(folder, 'batches.meta'), {'label_names': [f'c{i}' for i in range(10)]})
    return root


def write_cifar100(root, n_train=2, n_test=1, seed=0):
    folder = os.path.join(root, 'cifar-100-python')
    os.makedirs(folder, exist_ok=True)
    for name, n in (('train', n_train), ('test', n_test)):
        x, y = class_images(n, 100, (3, 32, 32), seed=seed + (name == 'test'))
        _dump(os.path.join(folder, name), {'data': x.reshape(len(x), -1),
                                           'fine_labels': y.tolist(),
                                           'coarse_labels': (y // 5).tolist()})
    _dump(os.path.join(folder, 'meta'), {'fine_label_names': [f'c{i}' for i in range(100)]})
    return root


def write_svhn(root, n_train=10, n_test=4, seed=0):
    """root/svhn/{train,test}_32x32.mat: X (32, 32, 3, N), y (N, 1) with 10 meaning digit 0."""
    import scipy.io
    folder = os.path.join(root, 'svhn')
    os.makedirs(folder, exist_ok=True)
    for name, n in (('train', n_train), ('test', n_test)):
        x, y = class_images(n, 10, (32, 32, 3), seed=seed + (name == 'test'))
        y_mat = np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)
        scipy.io.savemat(os.path.join(folder, f'{name}_32x32.mat'),
                         {'X': np.ascontiguousarray(x.transpose(1, 2, 3, 0)), 'y': y_mat})
    return root


def write_imagefolder(root, nclass=4, n_train=4, n_val=2, size=40, seed=0):
    """root/{train,val}/n0000000k/*.png|*.jpg with images of size x (size + 8)."""
    from PIL import Image
    for split, n in (('train', n_train), ('val', n_val)):
        x, y = class_images(n, nclass, (size, size + 8, 3), seed=seed + (split == 'val'))
        for i, (img, label) in enumerate(zip(x, y)):
            folder = os.path.join(root, split, f'n{label:08d}')
            os.makedirs(folder, exist_ok=True)
            ext = 'png' if i % 2 else 'jpg'
            Image.fromarray(img).save(os.path.join(folder, f'img{i}.{ext}'))
    return root


def _dump(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f)
