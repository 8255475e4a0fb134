"""Evaluate a condensed or selected training set with the paper's protocol (SPEC.md).

    python test.py -d fashion -f 2 --ipc 10 --repeat 3           # published/own IDC data
    python test.py -d fashion --ipc 10 --data_path results/x/data.pt
    python test.py -d fashion --ipc 10 -s random --repeat 3      # first 10 images per class
    python test.py -d cifar10 --ipc 10 -s herding   # needs train.py -d cifar10 --save_ckpt true

`-s idc` reads `--data_path FILE`, else results/{--name}_ipc{ipc}/data.pt, else the folder the
original's test.py reads for the dataset (the published downloads, placed in ./results), and
decodes it with the multi-formation decode (`bound` data are decoded `single`, as the original
evaluates them). `-s dsa` / `-s kip` read the DC/DSA and KIP baselines' files; `-s random` and
`-s herding` select real training images. Each evaluator network is trained `--repeat` times;
the log ends with the original's line `Repeat R => Best, last acc: X Y` per evaluator, and
summary.json holds every run.
"""
import glob
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from coreset import get_features, herding_select, random_select
from data import (DATASETS, TensorLoader, decode_classwise, eval_loader, load_split, to_float)
from misc.device import autocast, resolve_device, setup_backends, slow_amp_warning
from misc.utils import (Logger, UserError, atomic_write_json, run_main, safe_load, save_img,
                        set_seed)
from models import get_model
from train import (build_model, check_setup, jsonable_args, load_weights, net_name, summarize,
                   summary_line, step_kind_name, train_augment, train_model, train_step_kind)

RESULTS = './results'
# File names of the DC/DSA baselines' results, per dataset (res_DSA_{name}_ConvNet_{ipc}ipc.pt).
DSA_NAMES = {'cifar10': 'CIFAR10', 'cifar100': 'CIFAR100', 'svhn': 'SVHN', 'mnist': 'MNIST',
             'fashion': 'FashionMNIST'}


# ------------------------------------------------------------------------------- evaluators
@dataclass(frozen=True)
class Evaluator:
    """A network to train on the data; epochs None means the run's evaluation epochs."""
    net_type: str
    depth: int
    norm_type: str
    width: float = 1.0
    epochs: Optional[int] = None

    @property
    def name(self):
        return net_name(self.net_type, self.depth, self.norm_type, self.width)


RESNET10_BN = Evaluator('resnet', 10, 'batch')


def default_evaluator(args):
    """The network -n names (ConvNet-3 by default, ResNetAP-10 on ImageNet)."""
    return Evaluator(args.net_type, args.depth, args.norm_type, args.width)


def evaluators_for(args):
    """SPEC's evaluators: the -n network, then ResNet-10-BN and DenseNet on CIFAR (DenseNet for 400
    epochs when ipc >= 50 and f > 1 without --same_compute), ResNet-18-BN and EfficientNet-B0 on
    ImageNet."""
    evs = [default_evaluator(args)]
    if args.dataset.startswith('cifar'):
        dense_epochs = 400 if (not args.same_compute and args.ipc >= 50 and args.factor > 1) \
            else None
        evs += [RESNET10_BN, Evaluator('densenet', 0, 'batch', epochs=dense_epochs)]
    elif args.dataset == 'imagenet':
        evs += [Evaluator('resnet', 18, 'batch'), Evaluator('efficient', 0, 'batch')]
    return evs


def eval_epochs(args):
    """Evaluation epochs: args.epochs, divided by factor^2 with --same_compute."""
    if args.same_compute and args.factor > 1:
        return max(1, args.epochs // args.factor**2)
    return args.epochs


def evaluate_data(args, images, targets, val_loader, device, logger, evaluators=None, repeat=None,
                  tag=''):
    """Train each evaluator `repeat` times on decoded training images and validate it.

    images: float (N, C, H, W) in [0, 1], not normalized, on any device; targets: long (N,).
    evaluators: list of Evaluator (default: the network args names). Augmentation: per-sample
    DSA (args.dsa_strategy) on normalized images when args.dsa, else torchvision augmentation;
    CutMix with args.mix_p when args.mixup == 'cut'. Returns {evaluator name: dict(evaluator,
    net_type, depth, norm_type, width, epochs, repeat, runs=[{best, last, best5, last5}],
    best_mean, best_std, last_mean, last_std)}.
    """
    repeat = repeat or args.repeat
    evaluators = evaluators or [default_evaluator(args)]
    normalize, aug = train_augment(args)
    seed = int(torch.randint(2**31, (1,)).item())  # follows the global seed
    loader = TensorLoader(images.detach().float(), targets, args.batch_size, device, normalize,
                          shuffle=True, seed=seed)
    num_val = 100 if args.dataset == 'imagenet' else 4
    ctx = autocast(device, getattr(args, 'amp', False))
    prefix = f'{tag} ' if tag else ''
    out = {}
    for ev in evaluators:
        epochs = ev.epochs or eval_epochs(args)
        kind = train_step_kind(args, device, epochs * len(loader))
        logger(f'{prefix}=> {ev.name}: {len(images)} training images, {epochs} epochs, '
               f'{repeat} run(s); training steps {step_kind_name(kind)}')
        runs = []
        for r in range(repeat):
            model = get_model(ev.net_type, args.nclass, nch=DATASETS[args.dataset].nch,
                              size=args.size, depth=ev.depth, width=ev.width,
                              norm_type=ev.norm_type, dataset=args.dataset)
            runs.append(train_model(args, model, loader, val_loader, device, logger, epochs,
                                    aug=aug, num_val=num_val, ctx=ctx,
                                    desc=f'{prefix}{ev.name} {r + 1}/{repeat}',
                                    step_kind=kind))
        result = dict(evaluator=ev.name, **asdict(ev), repeat=repeat, **summarize(runs))
        result['epochs'] = epochs
        logger(f'{prefix}{ev.name} best {result["best_mean"]:.2f} +- {result["best_std"]:.2f}, '
               f'last {result["last_mean"]:.2f} +- {result["last_std"]:.2f}')
        logger(summary_line(repeat, result))
        logger.json(dict(event='eval', tag=tag, **result))
        out[ev.name] = result
    return out


# ------------------------------------------------------------------------------- reading data
def check_images(path, data, targets, args, nclass, ipc):
    """One clear UserError when the tensors cannot be nclass*ipc images of args.dataset."""
    info = DATASETS[args.dataset]
    if not (isinstance(data, torch.Tensor) and isinstance(targets, torch.Tensor)):
        raise UserError(f'{path}: expected image and label tensors, found '
                        f'{type(data).__name__} and {type(targets).__name__}')
    if data.layout != torch.strided or targets.layout != torch.strided:
        raise UserError(f'{path}: images and labels must be dense tensors (found '
                        f'{data.layout} and {targets.layout})')
    if targets.dtype == torch.bool:
        raise UserError(f'{path}: labels must be integer class indices, found booleans')
    if data.ndim != 4 or not data.is_floating_point():
        raise UserError(f'{path}: images must be a float tensor (N, C, H, W); found '
                        f'{data.dtype} of shape {tuple(data.shape)}')
    n, c, h, w = data.shape
    if c != info.nch or h != args.size or w != args.size:
        raise UserError(f'{path}: images are {c}x{h}x{w} (C x H x W), {args.dataset} needs '
                        f'{info.nch}x{args.size}x{args.size}')
    if targets.ndim != 1 or len(targets) != n or targets.is_floating_point():
        raise UserError(f'{path}: labels must be integers (N,) matching {n} images; found '
                        f'{targets.dtype} of shape {tuple(targets.shape)}')
    if ipc > 0 and n != nclass * ipc:
        raise UserError(f'{path}: holds {n} images, expected nclass*ipc = {nclass}*{ipc} = '
                        f'{nclass * ipc}; check --ipc (and -d/--nclass)')
    if ipc <= 0 and (n == 0 or n % nclass):
        raise UserError(f'{path}: holds {n} images, not a multiple of {nclass} classes')
    if n and (targets.min() < 0 or targets.max() >= args.nclass):
        raise UserError(f'{path}: labels range over {int(targets.min())}..{int(targets.max())}, '
                        f'outside 0..{args.nclass - 1}')
    if not torch.isfinite(data).all():
        raise UserError(f'{path}: images hold NaN or infinite values')


def load_condensed(path, args, nclass=None, ipc=None):
    """[images (N, C, H, W) float, labels (N,)] from a condensed data.pt (weights_only), checked:
    N must be nclass*ipc (default args.nclass, args.ipc; any multiple of nclass when ipc <= 0),
    channels and size must be the dataset's. Returns (images, labels long)."""
    nclass = nclass or args.nclass
    ipc = args.ipc if ipc is None else ipc
    obj = safe_load(path, what='condensed data [images (N, C, H, W), labels (N,)]')
    if not (isinstance(obj, (list, tuple)) and len(obj) == 2):
        raise UserError(f'{path}: not condensed data; expected a pair [images, labels], found '
                        f'{type(obj).__name__}' + (f' of {len(obj)} items'
                                                    if isinstance(obj, (list, tuple)) else ''))
    data, targets = obj
    check_images(path, data, targets, args, nclass, ipc)
    return data.float(), targets.long()


def load_baseline(path, args):
    """DSA results (a dict whose 'data' holds [images, labels] pairs; the last is used) or KIP
    data (NHWC images first, labels arange(nclass) per class); both normalized: returned in
    [0, 1] pixel space like condensed data."""
    obj = safe_load(path, what='DSA or KIP data')
    if isinstance(obj, dict) and 'data' in obj:
        pairs = obj['data']
        if not (isinstance(pairs, (list, tuple)) and pairs
                and isinstance(pairs[-1], (list, tuple)) and len(pairs[-1]) >= 2):
            raise UserError(f"{path}: 'data' should be a list of [images, labels] pairs")
        data, targets = pairs[-1][0], pairs[-1][1]
    elif isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], torch.Tensor) \
            and obj[0].ndim == 4:
        data = obj[0].permute(0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
        targets = torch.arange(args.nclass).repeat_interleave(len(data) // args.nclass)
    else:
        raise UserError(f"{path}: neither DSA results (a dict with 'data') nor KIP data "
                        f'(a list whose first item is NHWC images)')
    check_images(path, data, targets, args, args.nclass, args.ipc)
    info = DATASETS[args.dataset]
    mean = torch.tensor(info.mean).view(-1, 1, 1)
    std = torch.tensor(info.std).view(-1, 1, 1)
    return data.float() * std + mean, targets.long()


def published_folder(args):
    """results/{name}_ipc{ipc}: the folder the original's test.py reads for the dataset (its
    return_data_path; downloads go to ./results). Datasets it has none for use the folder
    argument.py derives for the same options (this project's condense.py output)."""
    f = args.factor
    init = 'mix' if f > 1 else 'random'
    names = {
        'cifar10': f'cifar10/conv3in_grad_mse_nd2000_cut_niter2000_factor{f}_lr0.005_{init}',
        'cifar100': f'cifar100/conv3in_grad_mse_nd2000_cut_niter2000_factor{f}_lr0.005_{init}',
        'svhn': f'svhn/conv3in_grad_mse_nd500_cut_niter2000_factor{f}_lr0.005_{init}',
        'fashion': f'fashion/conv3in_grad_l1_nd500_cut_niter2000_factor{f}_lr0.0001_{init}',
        'mnist': (f'mnist/conv3in_grad_l1_nd500_cut_niter2000_factor{f}_lr0.0001_{init}'
                  if f == 1 else
                  f'mnist/conv3in_grad_l1_nd500_niter2000_factor{f}_color_crop_lr0.0001_{init}'),
    }
    if args.dataset == 'imagenet' and args.nclass == 10:
        name = f'imagenet10/resnet10apin_grad_l1_ely10_nd500_cut_factor{f}_{init}'
    elif args.dataset == 'imagenet' and args.nclass == 100:
        name = (f'imagenet100/resnet10apin_grad_l1_pt5_nd500_cut_nlr0.1_wd0.0001_factor{f}'
                f'_lr0.001_b_real128_{init}')
    else:
        name = names.get(args.dataset)
    if name is None:
        return args.save_dir
    return os.path.join(RESULTS, f'{name}_ipc{args.ipc}')


def idc_sources(args):
    """(folder for outputs, [data.pt paths]): --data_path, --name, or the published folder; a
    folder without data.pt but with class-partition folders {folder}_{n}_phase{k} gives those."""
    if args.data_path:
        return os.path.dirname(os.path.abspath(args.data_path)), [args.data_path]
    base = os.path.join(RESULTS, f'{args.name}_ipc{args.ipc}') if args.name \
        else published_folder(args)
    single = os.path.join(base, 'data.pt')
    if os.path.isfile(single):
        return base, [single]
    phases = {}
    for folder in glob.glob(glob.escape(base) + '_*_phase*'):
        m = re.fullmatch(re.escape(base) + r'_(\d+)_phase(\d+)', folder)
        if m:
            phases.setdefault(int(m.group(1)), {})[int(m.group(2))] = folder
    if phases:
        nsub = min(phases)
        want = args.nclass // nsub
        missing = [k for k in range(want) if k not in phases[nsub]]
        if args.nclass % nsub or missing:
            raise UserError(f'class-partitioned data {base}_{nsub}_phase*: phases {missing} of '
                            f'0..{want - 1} are missing')
        return base, [os.path.join(phases[nsub][k], 'data.pt') for k in range(want)]
    how = '--name X (reads results/X_ipc{ipc}/data.pt) or --data_path FILE'
    raise UserError(f'no condensed data: {single} not found. Condense it first, download the '
                    f"original's data into {RESULTS}/, or give {how}")


def read_idc(args, paths, logger):
    """Load (and concatenate class partitions of) condensed data and decode it."""
    if len(paths) == 1:
        data, targets = load_condensed(paths[0], args)
    else:
        nsub = args.nclass // len(paths)
        parts = [load_condensed(p, args, nclass=nsub) for p in paths]
        data, targets = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        logger(f'concatenated {len(paths)} class partitions of {nsub} classes')
    ipc = len(data) // args.nclass
    if args.ipc < 1:
        adopt_ipc(args, ipc, logger)
    logger(f'condensed data {tuple(data.shape)} ({ipc} per class) from '
           f"{paths[0] if len(paths) == 1 else os.path.dirname(paths[0])}")
    decode_type = 'single' if args.decode_type == 'bound' else args.decode_type
    if args.decode_type == 'bound':
        logger('data condensed with decode bound are decoded single (as the original evaluates)')
    if args.factor > 1:
        data, targets = decode_classwise(data, targets, ipc, args.factor, decode_type,
                                         args.batch_syn_max)
        logger(f'decoded ({decode_type}, factor {args.factor}): {tuple(data.shape)}')
    return data, targets


def gather(dset, idx):
    """Images idx of a training split as float [0, 1] (N, C, H, W), with their labels."""
    if hasattr(dset, 'images'):
        images = dset.images[idx]
    else:  # StreamSet: read only the chosen files
        images = torch.stack([dset[i][0] for i in idx.tolist()])
    return to_float(images), dset.targets[idx]


def herding_ckpt(args):
    """--herding_ckpt, else the best network train.py writes by default for -n (CutMix)."""
    if args.herding_ckpt:
        return args.herding_ckpt
    return os.path.join(RESULTS, args.datatag, f'{args.modeltag}_cut', 'model_best.pth.tar')


def check_herding_ckpt(args):
    path = herding_ckpt(args)
    if not os.path.isfile(path):
        raise UserError(
            f'herding needs a network trained on the full training set: {path} not found. '
            f'Train one with `python train.py -d {args.dataset} -n {args.net_type} '
            f'--save_ckpt true` (writes model_best.pth.tar) or give --herding_ckpt PATH')
    return path


def select_herding(args, trainset, device, logger):
    path = check_herding_ckpt(args)
    model = build_model(args)
    load_weights(model, path)
    model.to(device)
    # A middle layer, as the original: the ConvNet's last block (2), a ResNet's pooled features.
    f_idx = 5 if args.dataset == 'imagenet' else 2
    if args.net_type == 'convnet':
        f_idx = min(f_idx, args.depth - 1)
    batches = eval_loader(trainset, args.dataset, device, batch_size=500, workers=args.workers)
    features, labels = get_features(model, batches, f_idx)
    logger(f'herding on features {tuple(features.shape)} of layer {f_idx} of {path}')
    del model
    return herding_select(features, labels, args.ipc, args.nclass)


def reduce_resolution(images, factor):
    """The original's herding on ImageNet with f > 1: downsample by f and upsample back, so a
    selected image carries the information of one multi-formed crop."""
    size = images.shape[-1]
    small = F.interpolate(images, size=(size // factor, size // factor))
    return F.interpolate(small, size=size, mode='bilinear', align_corners=False)


def select_data(args, paths, device, logger):
    """Training images (float [0, 1], (N, C, H, W)) and labels for args.slct_type."""
    if args.slct_type == 'idc':
        return read_idc(args, paths, logger)
    if args.slct_type in ('dsa', 'kip'):
        data, targets = load_baseline(paths[0], args)
        logger(f'{args.slct_type} data {tuple(data.shape)} from {paths[0]}')
        if args.factor > 1:  # as the original
            data, targets = decode_classwise(data, targets, args.ipc, args.factor)
        return data, targets
    trainset = load_split(args, train=True)
    if args.slct_type == 'random':
        seed = args.seed if 'seed' in args.explicit else None
        idx = random_select(trainset.targets, args.ipc, args.nclass, seed=seed)
        logger('random selection: ' + (f'a draw with seed {seed}' if seed is not None else
                                        f'the first {args.ipc} images of each class'))
        return gather(trainset, idx)
    idx = select_herding(args, trainset, device, logger)
    images, targets = gather(trainset, idx)
    if args.dataset == 'imagenet' and args.factor > 1:
        images = reduce_resolution(images, args.factor)
    return images, targets


def baseline_path(args):
    if args.data_path:
        return args.data_path
    if args.slct_type == 'dsa':
        name = DSA_NAMES.get(args.dataset, args.datatag)
        return os.path.join(RESULTS, args.datatag, 'dsa',
                            f'res_DSA_{name}_ConvNet_{args.ipc}ipc.pt')
    return os.path.join(RESULTS, args.datatag, 'kip', f'kip_ipc{args.ipc}.pt')


def sources(args):
    """(output folder, input files): --save_dir, else beside idc data, else the derived folder
    (with _{selection}{ipc} for dsa/kip/herding, which argument.py gives no tag)."""
    paths = []
    if args.slct_type == 'idc':
        out, paths = idc_sources(args)
    elif args.slct_type in ('dsa', 'kip'):
        paths = [baseline_path(args)]
    elif args.slct_type == 'herding':
        check_herding_ckpt(args)  # before any output folder is made
    if args.slct_type != 'idc':
        out = args.save_dir
        suffix = f'_{args.slct_type}{args.ipc}'
        if args.slct_type != 'random' and not out.endswith(suffix):
            out += suffix
    if 'save_dir' in args.explicit:
        out = args.save_dir
    return out, paths


def adopt_ipc(args, ipc, logger):
    """--data_path without --ipc: take ipc from the file and derive what argument.py derives
    from it (evaluation epochs, the original's svhn/mnist evaluation settings)."""
    from argument import ipc_epoch
    from misc.reproduce import eval_overrides
    args.ipc = ipc
    logger(f'ipc={ipc} (from the data file)')
    if 'epochs' not in args.explicit:
        bound = args.batch_syn_max if args.decode_type == 'bound' else -1
        args.epochs = ipc_epoch(ipc, args.factor, args.nclass, bound) \
            if args.dataset == 'imagenet' else 1000
        logger(f'epochs={args.epochs} (evaluation epochs for this ipc)')
    for k, v in eval_overrides(args.dataset, args.factor, ipc).items():
        if k not in args.explicit and getattr(args, k) != v:
            setattr(args, k, v)
            logger(f'{k}={v!r} (evaluation setting of the original test.py)')


def save_grid(path, images, targets, dataset):
    """Up to 10 training images of each of the first 20 classes, one class per row."""
    classes = targets.unique()[:20]
    per = min(10, int(min((targets == c).sum() for c in classes)))
    idx = torch.cat([(targets == c).nonzero().flatten()[:per] for c in classes])
    save_img(path, images[idx.to(images.device)], nrow=per,
             size=112 if dataset == 'imagenet' else None)


def main(args):
    device = resolve_device(args.device)
    setup_backends(device, args.tf32, cuda_graphs=args.cuda_graphs)
    set_seed(args.seed)
    check_setup(args)
    out, paths = sources(args)
    beside_data = args.slct_type == 'idc' and 'save_dir' not in args.explicit
    args.save_dir = out
    # Nothing goes to disk before the data to evaluate and the test split have been read.
    logger = Logger(out, defer=True)
    start = time.time()
    logger(f'test.py: {args.dataset}, selection {args.slct_type}, ipc {args.ipc}, factor '
           f'{args.factor}; outputs in {out}; device {device}')
    for line in args.derived:
        logger(f'  {line}')
    if (warning := slow_amp_warning(device, args.amp)):
        logger(warning)

    images, targets = select_data(args, paths, device, logger)
    valset = load_split(args, train=False)
    val_loader = eval_loader(valset, args.dataset, device, batch_size=500, workers=args.workers)
    logger.open()
    # condense.py's args.json lives beside its data.pt: keep it.
    atomic_write_json(os.path.join(out, 'test_args.json' if beside_data else 'args.json'),
                      jsonable_args(args))
    save_grid(os.path.join(out, 'test.png'), images, targets, args.dataset)
    logger(f'{len(images)} training images {tuple(images.shape[1:])}, {len(valset)} test images; '
           f"{'DSA ' + args.dsa_strategy if args.dsa else 'standard augmentation'}, mixup "
           f'{args.mixup} (p {args.mix_p})')
    results = evaluate_data(args, images, targets, val_loader, device, logger,
                            evaluators=evaluators_for(args))
    results = list(results.values())
    main_result = results[0]
    summary = dict(dataset=args.dataset, selection=args.slct_type, ipc=args.ipc,
                   factor=args.factor, decode_type=args.decode_type,
                   source=paths if paths else None, n_train=len(targets), seed=args.seed,
                   evaluator=main_result['evaluator'], epochs=main_result['epochs'],
                   repeat=main_result['repeat'],
                   **{k: main_result[k] for k in ('runs', 'best_mean', 'best_std', 'last_mean',
                                                  'last_std')},
                   results=results, wall_s=round(time.time() - start, 1))
    atomic_write_json(os.path.join(out, 'summary.json'), summary)
    return summary


if __name__ == '__main__':
    from argument import parse_args
    run_main(main, parse_args(mode='test'))
