"""Datasets, class-wise samplers, loaders and the multi-formation decode.

Every dataset is read as uint8 images (N, C, H, W) with integer labels; images become float in
[0, 1] when sampled, and are normalized only where a network sees them (training loops and the
matching augmentation), as in the original. One table, DATASETS, holds the per-dataset facts.
"""
import gzip
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from misc.augment import Normalize
from misc.utils import UserError, to_device


@dataclass(frozen=True)
class DatasetInfo:
    nclass: int
    nch: int
    size: int
    mean: tuple
    std: tuple
    flip: bool  # whether horizontal flips are a valid augmentation
    source: str  # how the files are read (see load_split)


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
DATASETS = {
    'cifar10': DatasetInfo(10, 3, 32, CIFAR_MEAN, CIFAR_STD, True, 'CIFAR10'),
    'cifar100': DatasetInfo(100, 3, 32, CIFAR_MEAN, CIFAR_STD, True, 'CIFAR100'),
    'svhn': DatasetInfo(10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), False,
                        'SVHN'),
    'mnist': DatasetInfo(10, 1, 28, (0.1307, ), (0.3081, ), False, 'MNIST'),
    'fashion': DatasetInfo(10, 1, 28, (0.2861, ), (0.3530, ), True, 'FashionMNIST'),
    'imagenet': DatasetInfo(1000, 3, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), True,
                            'ImageFolder'),
}
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


class ImageSet(torch.utils.data.Dataset):
    """Images held in memory: uint8 or float (N, C, H, W) and long labels (N,)."""

    def __init__(self, images, targets, classes=None):
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.classes = classes

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], int(self.targets[i])


class StreamSet(torch.utils.data.Dataset):
    """Image files read on demand, resized and centre-cropped to `size` (uint8 (C, H, W))."""

    def __init__(self, samples, size, classes):
        self.samples = samples  # list of (path, label)
        self.targets = torch.tensor([s[1] for s in samples], dtype=torch.long)
        self.size = size
        self.classes = classes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return read_image(path, self.size), label


# ---------------------------------------------------------------- reading the files on disk
def load_split(args, train=True, classes=None):
    """The training (train=True) or test split of args.dataset, as an ImageSet (or a StreamSet for
    ImageNet with --load_memory False). `classes` keeps only those labels (global numbering)."""
    name = args.dataset
    if name in ('mnist', 'fashion'):
        images, targets = read_idx_split(name, args.data_dir, train, args.download)
        dset = ImageSet(images, targets, list(range(10)))
    elif name in ('cifar10', 'cifar100', 'svhn'):
        dset = read_torchvision_split(name, args.data_dir, train, args.download,
                                      args.skip_checksum)
    elif name == 'imagenet':
        dset = read_imagenet_split(args, train)
    else:
        raise UserError(f"unknown dataset '{name}'; choose one of {sorted(DATASETS)}")
    if classes is not None:
        dset = subset_classes(dset, classes)
    return dset


def subset_classes(dset, classes):
    keep = torch.isin(dset.targets, torch.as_tensor(list(classes)))
    idx = keep.nonzero().flatten()
    if isinstance(dset, StreamSet):
        return StreamSet([dset.samples[i] for i in idx.tolist()], dset.size, dset.classes)
    return ImageSet(dset.images[idx], dset.targets[idx], dset.classes)


IDX_FILES = {
    True: ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    False: ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}


def find_idx_file(data_dir, folder, base):
    """The IDX file `base` (raw or .gz) in data_dir itself or in torchvision's
    data_dir/{MNIST,FashionMNIST}/raw layout; None when absent."""
    for d in (Path(data_dir), Path(data_dir) / folder / 'raw'):
        for p in (d / base, d / f'{base}.gz'):
            if p.is_file():
                return p
    return None


def read_idx_split(name, data_dir, train, download=False):
    folder = DATASETS[name].source
    bases = IDX_FILES[train]
    paths = [find_idx_file(data_dir, folder, b) for b in bases]
    if None in paths and download:
        import torchvision
        getattr(torchvision.datasets, folder)(data_dir, train=train, download=True)
        paths = [find_idx_file(data_dir, folder, b) for b in bases]
    if None in paths:
        how = ('install the Debian package (apt-get install dataset-fashion-mnist) and pass '
               '--data_dir /usr/share/datasets/fashion-mnist, or ' if name == 'fashion' else '')
        raise UserError(
            f"{folder} not found: expected {', '.join(b + '[.gz]' for b in bases)} in "
            f"{data_dir} or {Path(data_dir) / folder / 'raw'}. To get it, {how}"
            f"add --download on a machine that is online.")
    images = read_idx(paths[0], ndim=3)
    labels = read_idx(paths[1], ndim=1)
    if len(images) != len(labels):
        raise UserError(f'{paths[0]} holds {len(images)} images but {paths[1]} holds '
                        f'{len(labels)} labels: the files do not belong together')
    targets = torch.from_numpy(labels.astype(np.int64))
    check_labels(targets, DATASETS[name].nclass, paths[1])
    return torch.from_numpy(images).unsqueeze(1), targets


def labels_in_range(targets, nclass):
    return targets.numel() == 0 or (int(targets.min()) >= 0 and int(targets.max()) < nclass)


def check_labels(targets, nclass, source, note=''):
    """A UserError naming `source` when a label lies outside [0, nclass): such a label would
    only fail deep in training (an index out of bounds in the loss)."""
    if not labels_in_range(targets, nclass):
        lo, hi = int(targets.min()), int(targets.max())
        bad = lo if lo < 0 else hi
        raise UserError(f'{source} holds label {bad}; labels must lie in 0..{nclass - 1}{note}. '
                        f'The file is corrupt or not of this dataset: download or install it '
                        f'again.')


def _cifar_label_file(cls, root, train, nclass):
    """The CIFAR batch file of the split holding a label outside [0, nclass) (error path only)."""
    files = cls.train_list if train else cls.test_list
    paths = [os.path.join(root, cls.base_folder, f) for f, _ in files]
    for path in paths:
        try:
            with open(path, 'rb') as f:
                entry = pickle.load(f, encoding='latin1')
            labels = entry['labels'] if 'labels' in entry else entry['fine_labels']
            if any(not 0 <= int(v) < nclass for v in labels):
                return path
        except Exception:  # noqa: BLE001 - only a better file name is at stake
            pass
    return ', '.join(paths)


def read_idx(path, ndim):
    """Read an IDX file of unsigned bytes (gzipped or not) into a numpy array."""
    opener = gzip.open if str(path).endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f'cannot read {path}: {e}. Re-download or reinstall the file.') from None
    if len(raw) < 4 + 4 * ndim or raw[:2] != b'\0\0' or raw[2] != 0x08 or raw[3] != ndim:
        raise UserError(f'{path} is not an IDX file of {ndim}-D unsigned bytes')
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(shape):
        raise UserError(f'{path} is truncated or corrupt: header says {shape} '
                        f'({math.prod(shape)} bytes), the file holds {body.size}')
    return body.reshape(shape).copy()


def _unverified(cls):
    """The torchvision class, reading the same files without comparing MD5 sums."""

    class Unverified(cls):

        def _check_integrity(self):
            if hasattr(self, 'train_list'):
                files = [os.path.join(self.root, self.base_folder, f)
                         for f, _ in self.train_list + self.test_list]
            else:
                files = [os.path.join(self.root, self.filename)]
            return all(os.path.isfile(f) for f in files)

        def _load_meta(self):
            with open(os.path.join(self.root, self.base_folder, self.meta['filename']), 'rb') as f:
                self.classes = pickle.load(f, encoding='latin1')[self.meta['key']]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

    Unverified.__name__ = f'Unverified{cls.__name__}'
    return Unverified


def torchvision_files(name, data_dir):
    """Where torchvision's class looks, and which files it needs."""
    import torchvision.datasets as tvd
    if name == 'svhn':
        root = os.path.join(data_dir, 'svhn')  # the original's layout
        return root, [os.path.join(root, v[1]) for v in tvd.SVHN.split_list.values()]
    cls = getattr(tvd, DATASETS[name].source)
    folder = os.path.join(data_dir, cls.base_folder)
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta['filename']]
    return data_dir, [os.path.join(folder, f) for f in names]


def read_torchvision_split(name, data_dir, train, download=False, skip_checksum=False):
    import torchvision.datasets as tvd
    cls = getattr(tvd, DATASETS[name].source)
    root, files = torchvision_files(name, data_dir)
    if skip_checksum:
        cls = _unverified(cls)
    split = {'split': 'train' if train else 'test'} if name == 'svhn' else {'train': train}
    if name == 'svhn':
        files = [f for f in files if os.path.basename(f).startswith(split['split'])]
    try:
        dset = cls(root, download=download, **split)
    except RuntimeError:
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise UserError(
                f"{name} not found: missing {', '.join(missing)}. Add --download on a machine "
                f"that is online, or put torchvision's files there.") from None
        raise UserError(
            f"{name} files in {root} do not match torchvision's MD5 sums. Download them again "
            f"(--download), or pass --skip_checksum to read a non-official copy.") from None
    except Exception as e:  # a corrupt pickle or .mat file
        raise UserError(f'cannot read {name} from {root}: {type(e).__name__}: {e}') from None
    nclass = DATASETS[name].nclass
    if name == 'svhn':
        # torchvision has already mapped the .mat file's label 10 (digit 0) to 0
        images, targets = torch.from_numpy(dset.data), torch.from_numpy(dset.labels)
        check_labels(targets, nclass, files[0], note=' (1..10 in the .mat file, 10 for digit 0)')
    else:
        images = torch.from_numpy(dset.data).permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        targets = torch.tensor(dset.targets, dtype=torch.long)
        if not labels_in_range(targets, nclass):  # name the batch file that holds the label
            check_labels(targets, nclass, _cifar_label_file(cls, root, train, nclass))
    return ImageSet(images.contiguous(), targets, getattr(dset, 'classes', list(range(10))))


# ---------------------------------------------------------------- ImageNet subsets
def imagenet_classes(args, root):
    """The class folders of the subset: --class_list, else a draw by --dseed, else the first
    --nclass folders in sorted order."""
    if not os.path.isdir(root):
        raise UserError(f'ImageNet folder {root} not found: expected {root}/<class>/<images> '
                        f'(set --imagenet_dir to the folder holding train/ and val/)')
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if args.nclass < 1:
        raise UserError(f'--nclass {args.nclass}: the number of ImageNet classes must be at '
                        f'least 1')
    if args.class_list:
        names = read_class_list(args.class_list)
        if len(names) < args.nclass:
            raise UserError(f'--class_list {args.class_list} has only {len(names)} class '
                            f'names but --nclass asks for {args.nclass}: list more classes '
                            f'(one folder name per line) or lower --nclass')
        classes = names[:args.nclass]
        twice = sorted({c for c in classes if classes.count(c) > 1})
        if twice:
            raise UserError(f'--class_list {args.class_list} names {twice[:3]} more than once '
                            f'among its first {args.nclass} lines: each class must appear once')
    elif len(folders) < args.nclass:
        raise UserError(f'{root} holds only {len(folders)} class folders but --nclass asks for '
                        f'{args.nclass}')
    elif args.dseed != 0:
        order = np.random.RandomState(args.dseed).permutation(len(folders))
        classes = [folders[i] for i in order[:args.nclass]]
    else:
        classes = folders[:args.nclass]
    missing = [c for c in classes if c not in folders]
    if missing:
        raise UserError(f'{root} lacks {len(missing)} of the {args.nclass} classes that '
                        f'--class_list {args.class_list} asks for (e.g. {missing[:3]}); '
                        f'{len(folders)} class folders are there')
    return classes


def read_class_list(path):
    """The non-blank lines of a --class_list file, stripped."""
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except OSError as e:
        raise UserError(f'cannot read --class_list {path}: {e.strerror}') from None
    except UnicodeDecodeError:
        text = '\0'
    if '\0' in text:
        raise UserError(f'--class_list {path} is not a text file of class folder names, one '
                        f'per line (UTF-8 text, e.g. n01440764)')
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def read_imagenet_split(args, train):
    root = os.path.join(args.imagenet_dir, 'train' if train else 'val')
    classes = imagenet_classes(args, os.path.join(args.imagenet_dir, 'train'))
    samples = []
    for label, c in enumerate(classes):
        folder = os.path.join(root, c)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMG_EXTENSIONS)) \
            if os.path.isdir(folder) else []
        if not files:
            raise UserError(f'no images for class {c} in {folder}')
        samples += [(os.path.join(folder, f), label) for f in files]
    stream = StreamSet(samples, args.size, classes)
    if not args.load_memory:
        return stream
    images = torch.stack([stream[i][0] for i in range(len(stream))])
    return ImageSet(images, stream.targets, classes)


def read_image(path, size):
    """One image file as uint8 (3, size, size): shorter side resized to size, centre crop."""
    from PIL import Image
    import torchvision.transforms.functional as TF
    try:
        with Image.open(path) as im:
            im = im.convert('RGB')
    except OSError as e:
        raise UserError(f'cannot read image {path}: {e}') from None
    im = TF.center_crop(TF.resize(im, size), size)
    return TF.pil_to_tensor(im)


# ---------------------------------------------------------------- sampling and loading
def to_float(x):
    """uint8 images -> float in [0, 1]; float images pass through. A product with the float32
    1/255 gives the same values on every device (CUDA computes a division by a scalar as that
    product, the CPU divides, and the two differ by an ulp for half of the 256 values)."""
    return x.float().mul_(1 / 255) if x.dtype == torch.uint8 else x.float()


def normalizer(dataset):
    info = DATASETS[dataset]
    return Normalize(info.mean, info.std)


def stream_generator(seed, stream):
    """A CPU generator for one independent random stream of a run (e.g. one per class)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % 2**62)


class _Cycler:
    """Random batches without replacement, reshuffled when exhausted (a repeating
    SubsetRandomSampler + BatchSampler, as the original's class samplers)."""

    def __init__(self, n, batch, drop_last, generator):
        self.n, self.batch, self.drop_last, self.g = n, batch, drop_last, generator
        self.perm, self.pos = None, n

    def next(self):
        remain = self.n - self.pos
        if remain <= 0 or (self.drop_last and remain < self.batch):
            self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
        out = self.perm[self.pos:self.pos + self.batch]
        self.pos += len(out)
        return out

    def state_dict(self):
        return {'perm': self.perm, 'pos': self.pos, 'g': self.g.get_state()}

    def load_state_dict(self, s):
        self.perm, self.pos = s['perm'], s['pos']
        self.g.set_state(s['g'])


class ClassSampler:
    """Class-wise sampling of real images for condensation.

    class_sample(c): a random batch of `batch_size` images of class c (float [0, 1], on device);
    class_sample(c, n, first=True): the first n images of class c in dataset order (init).
    sample(): a random batch over all (kept) classes, for the network updates.
    Images of an ImageSet live on the device; a StreamSet is read from disk batch by batch.
    Index draws use local CPU generators, one per class and one for sample(), so that a class
    gets the same batches whichever process (rank) samples it, and a checkpoint restores them.
    """

    def __init__(self, dataset, batch_size, device, seed=0):
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.stream = isinstance(dataset, StreamSet)
        self.dataset = dataset
        self.images = None if self.stream else dataset.images.to(self.device)
        self.targets = dataset.targets.to(self.device)
        labels = dataset.targets
        self.classes = sorted(set(labels.tolist()))
        self.cls_idx = {c: (labels == c).nonzero().flatten() for c in self.classes}
        self.cls_cycler = {c: _Cycler(len(i), min(batch_size, len(i)), True,
                                      stream_generator(seed, 1 + c))
                           for c, i in self.cls_idx.items()}
        self.all_cycler = _Cycler(len(labels), batch_size, False, stream_generator(seed, 0))

    def _fetch(self, idx):
        on_device = to_device(idx, self.device)
        x = torch.stack([self.dataset[i][0] for i in idx.tolist()]).to(self.device) \
            if self.stream else self.images[on_device]
        return to_float(x), self.targets[on_device]

    def class_sample(self, c, n=None, first=False):
        if c not in self.cls_idx:
            raise UserError(f'class {c} has no training images here')
        if first:
            avail = len(self.cls_idx[c])
            if n > avail:
                raise UserError(f'class {c} has {avail} training images; {n} are needed to '
                                f'initialize the condensed data')
            idx = self.cls_idx[c][:n]
        else:
            idx = self.cls_idx[c][self.cls_cycler[c].next()]
        return self._fetch(idx)

    def sample(self):
        return self._fetch(self.all_cycler.next())

    def state_dict(self):
        return {'all': self.all_cycler.state_dict(),
                'cls': {c: s.state_dict() for c, s in self.cls_cycler.items()}}

    def load_state_dict(self, s):
        self.all_cycler.load_state_dict(s['all'])
        for c, st in s['cls'].items():
            self.cls_cycler[int(c)].load_state_dict(st)


class TensorLoader:
    """Mini-batches of an in-memory image tensor on `device`, normalized, optionally shuffled
    (with a local generator) — for training on condensed data and for fast evaluation."""

    def __init__(self, images, targets, batch_size, device, normalize=None, shuffle=False,
                 drop_last=False, seed=0):
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.targets = torch.as_tensor(targets, dtype=torch.long).to(self.device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.normalize = normalize
        self.g = torch.Generator().manual_seed(seed)

    def __len__(self):
        n = len(self.targets)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.targets)
        order = to_device(torch.randperm(n, generator=self.g), self.device) if self.shuffle \
            else None
        for b in range(len(self)):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            idx = order[sl] if order is not None else sl
            x = to_float(self.images[idx])
            yield (self.normalize(x) if self.normalize else x), self.targets[idx]


class StreamLoader:
    """Batches of a dataset that serves images one at a time (a StreamSet's files, for one)
    read by DataLoader workers (none for workers=0), moved to `device` and normalized."""

    def __init__(self, dataset, batch_size, device, normalize=None, shuffle=False, workers=4):
        self.device = torch.device(device)
        self.normalize = normalize
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                                  num_workers=workers,
                                                  persistent_workers=workers > 0)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            x = to_float(x.to(self.device, non_blocking=True))
            yield (self.normalize(x) if self.normalize else x), y.to(self.device)


def eval_loader(dataset, name, device, batch_size=500, workers=4):
    """Normalized batches of a test split, in order."""
    if isinstance(dataset, StreamSet):
        return StreamLoader(dataset, batch_size, device, normalizer(name), workers=workers)
    return TensorLoader(dataset.images, dataset.targets, batch_size, device, normalizer(name))


# ---------------------------------------------------------------- standard augmentation
class Lighting:
    """AlexNet-style PCA lighting noise on a float (3, H, W) image."""
    eigval = torch.tensor([0.2175, 0.0188, 0.0045])
    eigvec = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140],
                           [-0.5836, -0.6948, 0.4203]])

    def __init__(self, alphastd=0.1):
        self.alphastd = alphastd

    def __call__(self, img):
        alpha = torch.randn(3) * self.alphastd
        rgb = (self.eigvec * alpha * self.eigval).sum(1)
        return img + rgb.to(img.device, img.dtype).view(3, 1, 1)


def standard_augment(dataset, size, rrc=True):
    """Per-sample torchvision augmentation for runs without DSA, applied to an unnormalized
    float batch (N, C, H, W). ImageNet: RandomResizedCrop (scale 0.5-1), flip, colour jitter
    0.4, lighting; the small datasets: random crop with 4 px padding, and a flip on CIFAR only
    (as the original's transform_cifar; its SVHN, MNIST and FashionMNIST transforms crop only,
    although DSA keeps its flip on FashionMNIST)."""
    import torchvision.transforms as T
    if dataset == 'imagenet':
        ops = ([T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True)] if rrc else [])
        ops += [T.RandomHorizontalFlip(), T.ColorJitter(0.4, 0.4, 0.4), Lighting(0.1)]
    else:
        ops = [T.RandomCrop(size, padding=4)]
        if dataset.startswith('cifar'):
            ops.append(T.RandomHorizontalFlip())
    per_sample = T.Compose(ops)

    def apply(x):
        return torch.stack([per_sample(img) for img in x])

    return apply


# ---------------------------------------------------------------- multi-formation decode
def decode_zoom(img, target, factor):
    """Cut each image (N, C, H, W) into a factor x factor grid and upsample every crop to H x W.

    Crops are taken row by row; the output is crop-major (all first crops, then all second...),
    labels repeated factor^2 times. When H is not a multiple of the factor the image is padded
    right/bottom with 0.5 and crops are ceil(H / factor) wide.
    """
    h, w = img.shape[-2:]
    if factor == 1:
        return img, target
    rem = h % factor
    if rem:
        img = F.pad(img, (0, factor - rem, 0, factor - rem), value=0.5)
    s = math.ceil(h / factor)
    crops = [img[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s]
             for i in range(factor) for j in range(factor)]
    out = F.interpolate(torch.cat(crops), size=(h, w), mode='bilinear', align_corners=False)
    return out, target.repeat(factor * factor)


def decode(img, target, factor, decode_type='single', bound=128):
    """Multi-formation of stored images into training images (see SPEC: single, multi, bound)."""
    if factor <= 1:
        return img, target
    if decode_type == 'single':
        return decode_zoom(img, target, factor)
    if decode_type == 'multi':
        parts = [decode_zoom(img, target, f) for f in range(1, factor + 1)]
    elif decode_type == 'bound':
        parts = decode_bound_parts(img, target, factor, bound)
    else:
        raise ValueError(f'unknown decode_type {decode_type}')
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def decode_bound_parts(img, target, factor_max, bound):
    """Spend factors from factor_max down to 1 so that the decoded count stays within bound."""
    budget, idx, total = len(img), 0, 0
    room = bound - len(img)
    parts = []
    for f in range(factor_max, 0, -1):
        n = min(room // f**2, budget) if f > 1 else budget
        parts.append(decode_zoom(img[idx:idx + n], target[idx:idx + n], f))
        idx, budget, total = idx + n, budget - n, total + n * f**2
        room = bound - total - budget
        if budget == 0:
            break
    return parts


def decode_classwise(data, targets, ipc, factor, decode_type='single', bound=128):
    """Decode a class-major store (ipc images per class) class by class, keeping the class-major
    order of the output."""
    xs, ys = [], []
    for c0 in range(0, len(data), ipc):
        x, y = decode(data[c0:c0 + ipc], targets[c0:c0 + ipc], factor, decode_type, bound)
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)
