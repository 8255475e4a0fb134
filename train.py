"""Training networks: one epoch, validation, the evaluation schedule, and full-data baselines.

The loop functions (`train_epoch`, `validate`, `train_model`, `load_weights`) are shared by
condense.py, test.py and this script's `main`, which trains on the whole training set of a dataset
(the paper's "full dataset" baseline) with the evaluation protocol of SPEC.md:
SGD(lr, momentum, wd), MultiStepLR at 2/3 and 5/6 of the epochs (gamma 0.2), DSA per sample (or
torchvision augmentation without DSA) and CutMix with probability mix_p.

    python train.py -d fashion --data_dir /usr/share/datasets/fashion-mnist --epochs 10
"""
import contextlib
import copy
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import (DATASETS, StreamLoader, TensorLoader, eval_loader, load_split, normalizer,
                  standard_augment)
from misc.augment import Compose, DiffAug
from misc.device import (autocast, call_compiled, compiled, error_summary, resolve_device,
                         setup_backends, slow_amp_warning, want_compile, want_graphs)
from misc.utils import (Logger, UserError, atomic_save, atomic_write_json, cutmix,
                        refuse_overwrite, remove_stale_tmp, run_main, safe_load, set_seed,
                        to_device, topk_correct)
from models import get_model

NET_NAMES = {'convnet': 'ConvNet', 'resnet': 'ResNet', 'resnet_ap': 'ResNetAP',
             'densenet': 'DenseNet', 'efficient': 'EfficientNet-B0'}
# Checkpoint entries that must agree for --resume to continue the same schedule.
RESUME_KEYS = ('dataset', 'nclass', 'size', 'net_type', 'depth', 'width', 'norm_type', 'epochs',
               'lr', 'momentum', 'weight_decay', 'batch_size', 'repeat', 'mixup', 'mix_p', 'dsa',
               'dsa_strategy')


# ------------------------------------------------------------------------------- building blocks
def net_name(net_type, depth, norm_type, width=1.0):
    """Readable evaluator name, e.g. ConvNet-3-IN, ResNet-10-BN, DenseNet, EfficientNet-B0."""
    name = NET_NAMES.get(net_type, net_type)
    if net_type in ('convnet', 'resnet', 'resnet_ap'):
        name += f'-{depth}'
        name += {'batch': '-BN', 'instance': '-IN'}.get(norm_type, f'-{norm_type}')
        if width != 1.0 and net_type != 'resnet':  # ResNet has no width multiplier
            name += f'-w{width:g}'
    return name


def build_model(args, net_type=None, depth=None, norm_type=None, width=None):
    """The network args names (or the one given) for args.dataset's images."""
    return get_model(net_type or args.net_type, args.nclass, nch=DATASETS[args.dataset].nch,
                     size=args.size, depth=depth or args.depth, width=width or args.width,
                     norm_type=norm_type or args.norm_type, dataset=args.dataset)


def check_setup(args, match=False):
    """Build the network and the augmentations the options name once, on the CPU, so that a
    choice they cannot be built with (depth, norm type, width, augmentation names, and with
    match=True condense.py's matching augmentation and --f_idx) is a UserError before any file
    is written."""
    name = net_name(args.net_type, args.depth, args.norm_type, args.width)
    if args.net_type == 'convnet' and int(128 * args.width) < 1:
        raise UserError(f'--width {args.width} leaves ConvNet no channel (128 x width must be '
                        f'at least 1)')
    try:
        with torch.random.fork_rng(devices=[]):  # the run's random draws stay as they were
            model = build_model(args)
    except (ValueError, ZeroDivisionError, RuntimeError) as e:
        raise UserError(f'cannot build the network {name} (-n {args.net_type} --depth '
                        f'{args.depth} --norm_type {args.norm_type} --width {args.width}): {e}'
                        ) from e
    strategies = [('--dsa_strategy', args.dsa_strategy)] if args.dsa else []
    if match:
        strategies.append(('--aug_type', args.aug_type))
    for flag, strategy in strategies:
        try:
            DiffAug(strategy, batch=match)
        except ValueError as e:
            raise UserError(f'{flag}: {e}') from e
    if match and args.match == 'feat':
        if not hasattr(model, 'get_feature'):
            raise UserError(f'--match feat needs a network that exposes its features '
                            f'(convnet, resnet, resnet_ap), not {name}')
        a, _, b = args.f_idx.partition(',')
        with torch.no_grad():
            probe = torch.zeros(2, DATASETS[args.dataset].nch, args.size, args.size)
            feats = model.eval().get_feature(probe, int(a), int(b) if b else -1)
        if not feats:
            raise UserError(f"--f_idx '{args.f_idx}' selects no layer of {name}: its features "
                            f'are numbered from 0, see get_feature in models/')


def train_augment(args):
    """(normalize, aug) for training: the loader normalizes and `aug` applies per-sample DSA on
    normalized images (as the original), or, without DSA, the loader leaves images in [0, 1] and
    `aug` is torchvision augmentation followed by normalization."""
    norm = normalizer(args.dataset)
    if args.dsa:
        return norm, DiffAug(args.dsa_strategy, batch=False)
    std_aug = standard_augment(args.dataset, args.size, rrc=args.rrc)
    return None, Compose([lambda x, generator=None: std_aug(x), norm])


def make_optimizer(args, model, epochs):
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[2 * epochs // 3, 5 * epochs // 6], gamma=0.2)
    return optimizer, scheduler


# ------------------------------------------------------------------------------- one epoch
def train_step_kind(args, device, steps):
    """How this run computes its training steps: 'graphs' (GraphedStep, --cuda_graphs),
    'compile' (CompiledLoss, --compile) or None (eager). `steps`: the optimizer steps of the
    run, for --compile auto. The one decision for condense.py, test.py, train.py and the
    benchmark."""
    if want_graphs(getattr(args, 'cuda_graphs', 'off'), device, getattr(args, 'amp', False)):
        return 'graphs'
    if want_compile(args.compile, device, steps, 'training'):
        return 'compile'
    return None


def step_kind_name(kind):
    """How a log line names a train_step_kind."""
    return {'graphs': 'CUDA graphs', 'compile': 'torch.compile'}.get(kind, 'eager')


def make_train_step(kind, model, log=None):
    """The step helper `kind` (train_step_kind) of `model`, for train_epoch's `step`."""
    if kind == 'graphs':
        return GraphedStep(model, log)
    if kind == 'compile':
        return CompiledLoss(model, log)
    return None


class CompiledLoss:
    """The training loss of a batch, lam * CE(model(x), y_a) + (1 - lam) * CE(model(x), y_b),
    and the logits, as one torch.compile'd function of the network's parameters: inductor fuses
    the element-wise work of the forward and the backward; the optimizer is untouched. One
    compilation serves every network of the same architecture. Networks with buffers (batch
    norm statistics) stay eager. If compilation fails, `log` says so and calls return None
    (the caller computes eagerly)."""
    does_backward = False  # train_epoch calls loss.backward()

    def __init__(self, model, log=None):
        self.log = log or (lambda msg: None)
        self.key = None if list(model.buffers()) else \
            compiled(('train', repr(model)), lambda: _mixed_loss_fn(model))

    def __call__(self, model, x, y_a, y_b, lam):
        if self.key is None:
            return None
        # a tensor, so that a new value does not recompile; copied without waiting for the GPU
        lam = to_device(torch.tensor(lam, dtype=torch.float32), x.device)
        return call_compiled(self.key, (dict(model.named_parameters()), x, y_a, y_b, lam),
                             self.log)


def mixed_loss(out, y_a, y_b, lam):
    """The CutMix training loss lam * CE(out, y_a) + (1 - lam) * CE(out, y_b) (lam a float or
    a 0-d tensor)."""
    return lam * F.cross_entropy(out, y_a) + (1 - lam) * F.cross_entropy(out, y_b)


def _mixed_loss_fn(template):
    from torch.func import functional_call

    def fn(params, x, y_a, y_b, lam):
        out = functional_call(template, params, (x, ))
        return mixed_loss(out, y_a, y_b, lam), out
    return fn


class GraphedStep:
    """The forward pass, the loss lam * CE(out, y_a) + (1 - lam) * CE(out, y_b) and the
    backward pass of a training batch, replayed as one CUDA graph (--cuda_graphs). A small
    network's step on a GPU is hundreds of short kernels whose launches the host cannot issue
    as fast as the GPU runs them; a graph launches them all at once.

    The same math: the graph holds the kernels of the eager step, run on the batch copied into
    fixed input buffers. With lam = 1 (no CutMix) the loss and its gradient equal CE(out, y)
    exactly (1 * a + 0 * b). The gradients the graph writes become the parameters' .grad, and
    the caller's optimizer steps eagerly, so learning-rate schedules, momentum and the
    data-parallel gradient sum work as without graphs.

    Per batch shape: WARMUP eager steps on a side stream (cuDNN autotuning and lazy
    initialisation must not happen during capture), then one capture, then replays. The graph
    holds this network's parameter addresses: every network gets its own GraphedStep. If a
    capture fails, `log` says so and calls return None (the caller computes eagerly).
    """
    does_backward = True  # the parameters' .grad is set: the caller only steps the optimizer
    WARMUP = 2

    def __init__(self, model, log=None):
        self.model, self.log = model, log or (lambda msg: None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.stream = None
        self.graphs = {}  # batch key -> (graph, input buffers, outputs)
        self.warm = {}  # batch key -> eager warm-up steps so far
        self.failed = False

    def __call__(self, model, x, y_a, y_b, lam):
        """(loss, logits) of the batch with the parameters' gradients set, or None (compute
        the step eagerly)."""
        if self.failed or model is not self.model or x.device.type != 'cuda':
            return None
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=x.device)
        lam = to_device(torch.tensor(lam, dtype=torch.float32), x.device)
        key = (tuple(x.shape), x.dtype, tuple(y_a.shape), model.training)
        entry = self.graphs.get(key)
        if entry is None:
            done = self.warm.get(key, 0)
            if done < self.WARMUP:
                self.warm[key] = done + 1
                return self._warm_up(x, y_a, y_b, lam)
            try:
                entry = self.graphs[key] = self._capture(x, y_a, y_b, lam)
            except Exception as e:  # noqa: BLE001 -- an operation a graph cannot hold
                self.failed = True
                for p in self.params:
                    p.grad = None
                self.log(f'warning: CUDA graph capture failed ({error_summary(e)}); continuing '
                         f'without graphs (--cuda_graphs off skips the attempt)')
                return None
        graph, buffers, (loss, out, grads) = entry
        for buf, t in zip(buffers, (x, y_a, y_b, lam)):
            buf.copy_(t)
        graph.replay()
        self._set_grads(grads)
        # the graph's outputs are overwritten by its next replay
        return loss.clone(), out.clone()

    def _step(self, x, y_a, y_b, lam):
        out = self.model(x)
        loss = mixed_loss(out, y_a, y_b, lam)
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        return loss.detach(), out.detach(), grads

    def _set_grads(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = g

    def _warm_up(self, x, y_a, y_b, lam):
        main = torch.cuda.current_stream(x.device)
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            loss, out, grads = self._step(x, y_a, y_b, lam)
        main.wait_stream(self.stream)
        for t in (loss, out, *grads):  # made on the side stream, used on the main one
            if t is not None:
                t.record_stream(main)
        self._set_grads(grads)
        return loss, out

    def _capture(self, x, y_a, y_b, lam):
        buffers = [torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
                   for t in (x, y_a, y_b, lam)]
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (a DataLoader's pinning thread) may go on using CUDA
        with torch.cuda.graph(graph, stream=self.stream, capture_error_mode='thread_local'):
            outputs = self._step(*buffers)
        return graph, buffers, outputs


def train_epoch(model, batches, optimizer, aug=None, mixup='vanilla', beta=1.0, mix_p=0.0,
                n_data=None, ctx=None, progress=None, step=None):
    """One pass over `batches` ((x, y) on the model's device); returns dict(loss, top1, top5).

    aug: x -> x, applied without gradient per batch (e.g. DSA, or Compose with normalization).
    CutMix with probability mix_p when mixup == 'cut' (one draw per batch, as the original).
    n_data: stop once at least n_data samples were seen (for endless iterators).
    ctx: optional autocast context. progress: optional tqdm bar updated per batch.
    step: a CompiledLoss (the loss through torch.compile) or a GraphedStep (forward and
    backward as a CUDA graph) of `model` (make_train_step); None: eager.
    """
    model.train()
    # The epoch's sums (loss x samples, top-1 and top-5 hits) and its first non-finite loss stay
    # on the device; the host reads them every 20 batches and at the end of the epoch. Reading
    # them per batch would make the host wait for the GPU at every batch.
    sums, last, seen = None, None, 0

    def read():
        *totals, bad = torch.cat([sums, last.view(1)]).tolist()
        if not math.isfinite(bad):
            raise UserError(f'training loss became {bad} within {seen} samples of this epoch; '
                            f'lower --lr or check the training images')
        return sample_means(totals, seen)

    for i, (x, y) in enumerate(batches):
        if aug is not None:
            with torch.no_grad():
                x = aug(x)
        with ctx or contextlib.nullcontext():
            mixed = mixup == 'cut' and torch.rand(1).item() < mix_p
            if mixed:
                x, y_a, y_b, lam = cutmix(x, y, beta)
            else:
                y_a, y_b, lam = y, y, 1.0
            res = step(model, x, y_a, y_b, lam) if step is not None else None
            if res is not None:
                loss, out = res
            elif mixed:
                out = model(x)
                loss = mixed_loss(out, y_a, y_b, lam)
            else:
                out = model(x)
                loss = F.cross_entropy(out, y)
        if res is None or not step.does_backward:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()

        row = batch_sums(loss, out, y)
        sums = row if sums is None else sums + row
        # the latest loss until one is not finite, then that one
        loss = loss.detach().float()
        last = loss if last is None else torch.where(torch.isfinite(last), loss, last)
        seen += len(y)
        if (i + 1) % 20 == 0:
            so_far = read()
            if progress is not None:
                progress.set_postfix(loss=f"{so_far['loss']:.3f}", top1=f"{so_far['top1']:.1f}",
                                     refresh=False)
        if progress is not None:
            progress.update(1)
        if n_data is not None and seen >= n_data:
            break
    return read() if sums is not None else dict(loss=0.0, top1=0.0, top5=0.0)


@torch.no_grad()
def validate(model, loader, ctx=None, forward=None):
    """Top-1, top-5 accuracy (%) and mean loss of `model` (eval mode) on normalized batches.

    On the CPU the network's tensors are channels_last while it validates (inference
    convolutions ran about 1.8x faster so on the CPU here; the same math) and contiguous again
    after, and `forward` (a CompiledForward of the network, when the run compiles) computes the
    logits there. On an H200 channels_last was slower (a validation pass of ConvNet-3 on
    FashionMNIST took 83 ms against 64). The sums stay on the device until the end of the
    pass."""
    model.eval()
    on_cpu = next(model.parameters(), torch.empty(0)).device.type == 'cpu'
    if on_cpu:
        model.to(memory_format=torch.channels_last)
    try:
        sums, seen = None, 0
        for x, y in loader:
            with ctx or contextlib.nullcontext():
                out = forward(model, x) if forward is not None and on_cpu else None
                if out is None:
                    out = model(x)
            out = out.float()
            row = batch_sums(F.cross_entropy(out, y), out, y)
            sums = row if sums is None else sums + row
            seen += len(y)
    finally:
        if on_cpu:
            model.to(memory_format=torch.contiguous_format)
    return sample_means(sums.tolist(), seen) if sums is not None else \
        dict(loss=0.0, top1=0.0, top5=0.0)


class CompiledForward:
    """A network's logits in eval mode as one torch.compile'd function of its parameters and
    buffers, channels_last: inductor fuses each block's norm, activation and pooling, which
    eager inference runs as separate passes over memory (on this project's 2-core CPU a batch of
    500 FashionMNIST images through ConvNet-3 took 0.14 s against 0.20 s). For validation on the
    CPU; one compilation serves every network of the same architecture. If compilation fails,
    `log` says so and calls return None (the caller computes eagerly)."""

    def __init__(self, model, log=None):
        self.log = log or (lambda msg: None)
        self.key = compiled(('eval', repr(model)), lambda: _forward_fn(model))

    def __call__(self, model, x):
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        return call_compiled(self.key, (state, x), self.log,
                             memory_format=torch.channels_last)


def _forward_fn(model):
    from torch.func import functional_call
    template = copy.deepcopy(model).eval()  # its own tensors are never used

    def fn(state, x):
        return functional_call(template, state, (x, ))
    return fn


def batch_sums(loss, out, y):
    """(mean loss x samples, top-1 hits, top-5 hits) of one batch: a tensor on its device, to
    be summed over batches there and read by the host once (sample_means)."""
    return torch.cat([(loss.detach().float() * len(y)).view(1),
                      topk_correct(out.detach().float(), y, (1, 5))])


def sample_means(totals, seen):
    """dict(loss, top1, top5), the per-sample means (accuracies in %) of summed batch_sums."""
    loss, top1, top5 = totals
    return dict(loss=loss / seen, top1=top1 * 100 / seen, top5=top5 * 100 / seen)


# ------------------------------------------------------------------------------- checkpoints
def weights_of(ckpt, path):
    """The state dict inside a loaded checkpoint: the object itself, or its 'state_dict' or
    'model' entry, with DataParallel's 'module.' prefixes stripped."""
    state = ckpt
    if isinstance(ckpt, dict):
        for key in ('state_dict', 'model'):
            if isinstance(ckpt.get(key), dict):
                state = ckpt[key]
                break
    if not isinstance(state, dict) or not state or \
            not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f'{path}: holds no network weights (expected a state dict, or a dict '
                        f"with 'state_dict' or 'model')")
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state.items()}


def load_state(model, state, path):
    """model.load_state_dict(state), with a UserError naming `path` and what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:2])})")
        raise UserError(f"{path}: weights do not fit the network {type(model).__name__}: "
                        f"{', '.join(parts)} parameters. Check -n/--depth/--width/--norm_type.")
    model.load_state_dict(state)


def load_weights(model, path):
    """Load network weights from `path` into `model` (weights_only loading); returns the loaded
    object.

    Accepts a raw state dict, or a checkpoint with the weights under 'state_dict' or 'model'
    (this project's and the original's), with or without DataParallel's 'module.' prefixes.
    A missing or unreadable file, or weights of another architecture, raise UserError.
    """
    ckpt = safe_load(path, what='network weights (a state dict or a checkpoint)')
    load_state(model, weights_of(ckpt, path), path)
    return ckpt


def rng_state(loader=None):
    """Every random state a training run draws from (global torch/numpy/python, CUDA, loader)."""
    np_state = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'python': random.getstate(),
             'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                       *np_state[2:])}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    if loader is not None and hasattr(loader, 'g'):
        state['loader'] = loader.g.get_state()
    return state


def set_rng_state(state, loader=None):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    kind, keys, *rest = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    if loader is not None and 'loader' in state and hasattr(loader, 'g'):
        loader.g.set_state(state['loader'])


# ------------------------------------------------------------------------------- the schedule
def train_model(args, model, train_loader, val_loader, device, logger, epochs, aug=None,
                num_val=4, val_every=None, ctx=None, resume=None, on_epoch_end=None, desc='',
                batch_bar=False, step_kind=None):
    """Train `model` for `epochs` with the evaluation protocol; returns
    dict(best, last, best5, last5, history) (top-1/top-5 in %).

    train_loader: re-iterable batches (x, y) on `device` (TensorLoader, StreamLoader), or a
    function returning a fresh iterable per epoch. aug: see train_epoch (mixup, beta, mix_p come
    from args). Validation every `val_every` epochs (default epochs // num_val) and at the last
    epoch. resume: a state from `on_epoch_end` to continue from. on_epoch_end(state, is_best) is
    called after every epoch with the whole training state (for checkpoints). step_kind: how
    training steps are computed (train_step_kind: 'graphs', 'compile' or None).
    """
    model.to(device)  # before the optimizer, so that its loaded state lands on the device
    step = make_train_step(step_kind, model, logger)
    forward = CompiledForward(model, logger) if step_kind == 'compile' else None
    optimizer, scheduler = make_optimizer(args, model, epochs)
    val_every = max(1, val_every or epochs // num_val)
    res = dict(best=0.0, best5=0.0, last=0.0, last5=0.0, history=[])
    start = 1
    if resume is not None:
        load_state(model, resume['model'], resume.get('path', 'the checkpoint'))
        if resume.get('optimizer') is not None:
            optimizer.load_state_dict(resume['optimizer'])
        if resume.get('scheduler') is not None:
            scheduler.load_state_dict(resume['scheduler'])
        else:  # the original's checkpoints keep no scheduler: replay its epochs
            with warnings.catch_warnings():
                warnings.filterwarnings('ignore', message='Detected call of `lr_scheduler')
                for _ in range(resume['epoch']):
                    scheduler.step()
        res = {k: resume['result'][k] for k in res}
        start = resume['epoch'] + 1
    mixup = getattr(args, 'mixup', 'vanilla')

    bar = tqdm(range(start, epochs + 1), desc=desc or 'train', initial=start - 1, total=epochs,
               disable=None, leave=False, dynamic_ncols=True, file=sys.stderr)
    for epoch in bar:
        batches = train_loader() if callable(train_loader) else train_loader
        inner = None
        if batch_bar:
            inner = tqdm(total=len(batches) if hasattr(batches, '__len__') else None,
                         desc=f'epoch {epoch}/{epochs}', disable=None, leave=False,
                         dynamic_ncols=True, file=sys.stderr)
        tr = train_epoch(model, batches, optimizer, aug=aug, mixup=mixup, beta=args.beta,
                         mix_p=args.mix_p, ctx=ctx, progress=inner, step=step)
        if inner is not None:
            inner.close()
        scheduler.step()
        bar.set_postfix(loss=f"{tr['loss']:.3f}", top1=f"{tr['top1']:.1f}", refresh=False)

        is_best = False
        if epoch % val_every == 0 or epoch == epochs:
            va = validate(model, val_loader, ctx, forward)
            res['last'], res['last5'] = va['top1'], va['top5']
            if va['top1'] > res['best']:
                is_best = True
                res['best'], res['best5'] = va['top1'], va['top5']
            res['history'].append(dict(epoch=epoch, train_loss=tr['loss'], train_top1=tr['top1'],
                                       top1=va['top1'], top5=va['top5'], loss=va['loss']))
            logger(f"[{desc + ' ' if desc else ''}epoch {epoch}/{epochs}] "
                   f"(Train) Top1 {tr['top1']:.1f} Loss {tr['loss']:.3f} | "
                   f"(Test) Top1 {va['top1']:.1f} Top5 {va['top5']:.1f} Loss {va['loss']:.3f} | "
                   f"best {res['best']:.1f}")
            logger.json(dict(event='val', run=desc, epoch=epoch, epochs=epochs,
                             lr=optimizer.param_groups[0]['lr'], train_loss=tr['loss'],
                             train_top1=tr['top1'], top1=va['top1'], top5=va['top5'],
                             loss=va['loss'], best=res['best']))
        if on_epoch_end is not None:
            on_epoch_end(dict(epoch=epoch, model=model.state_dict(),
                              optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                              result=dict(res)), is_best)
    bar.close()
    return res


def mean_std(values):
    v = np.asarray(values, dtype=np.float64)
    return (float(v.mean()), float(v.std())) if len(v) else (float('nan'), float('nan'))


def summarize(runs):
    """Mean and std (over repeats, ddof 0) of each run's best and last top-1."""
    best_mean, best_std = mean_std([r['best'] for r in runs])
    last_mean, last_std = mean_std([r['last'] for r in runs])
    return dict(runs=[{k: r[k] for k in ('best', 'last', 'best5', 'last5')} for r in runs],
                best_mean=best_mean, best_std=best_std, last_mean=last_mean, last_std=last_std)


def summary_line(repeat, summary):
    """The original's summary line: the two mean accuracies and nothing after them."""
    return f"Repeat {repeat} => Best, last acc: {summary['best_mean']:.1f} " \
           f"{summary['last_mean']:.1f}"


def jsonable_args(args):
    return json.loads(json.dumps(vars(args), default=str))


# ------------------------------------------------------------------------------- full-data run
def output_dir(args):
    """--save_dir, else ./pretrained/{datatag}/{modeltag}{tag}_{seed} when per-epoch checkpoints
    for condensation are asked for (--pt_from, as the original's pretrain.py), else the folder
    argument.py derives."""
    if 'save_dir' in args.explicit or args.pt_from < 0:
        return args.save_dir
    return f'./pretrained/{args.datatag}/{args.modeltag}{args.tag}_{args.seed}'


def full_train_loader(args, dset, device, normalize):
    if hasattr(dset, 'images'):
        return TensorLoader(dset.images, dset.targets, args.batch_size, device, normalize,
                            shuffle=True, seed=args.seed)
    return StreamLoader(dset, args.batch_size, device, normalize, shuffle=True,
                        workers=args.workers)


class Checkpointer:
    """Writes train.py's checkpoints in args.save_dir, atomically.

    checkpoint.pth.tar (every epoch): everything to continue with --resume — model,
    optimizer, scheduler, epoch, best accuracy, finished repeats, RNG states, args.
    model_best.pth.tar (with --save_ckpt): weights of the best validation so far.
    checkpoint{E}.pth.tar (with --pt_from E [--pt_num K]): weights after epochs E..E+K-1, the
    pretrained networks condense.py's --pt_from loads.
    """

    def __init__(self, args, loader, finished):
        self.args, self.loader, self.finished = args, loader, finished
        self.path = os.path.join(args.save_dir, 'checkpoint.pth.tar')
        self.pt_epochs = range(args.pt_from, args.pt_from + args.pt_num) if args.pt_from >= 0 \
            else range(0)
        self.repeat = 0

    def __call__(self, state, is_best):
        a, epoch = self.args, state['epoch']
        meta = dict(arch=a.net_type, epoch=epoch, args=jsonable_args(a))
        # always, so that a killed run continues from its last finished epoch
        atomic_save(dict(state, repeat=self.repeat, finished=list(self.finished),
                         rng=rng_state(self.loader), **meta), self.path)
        if a.save_ckpt and is_best:
            atomic_save(dict(state_dict=state['model'], best_acc1=state['result']['best'],
                             best_acc5=state['result']['best5'], **meta),
                        os.path.join(a.save_dir, 'model_best.pth.tar'))
        if epoch in self.pt_epochs:
            atomic_save(dict(state_dict=state['model'], **meta),
                        os.path.join(a.save_dir, f'checkpoint{epoch}.pth.tar'))


def load_resume(args, logger):
    path = os.path.join(args.save_dir, 'checkpoint.pth.tar')
    if not os.path.isfile(path):
        logger(f'--resume: no checkpoint at {path}; starting from the beginning')
        return None
    ckpt = safe_load(path, what='a train.py checkpoint')
    if isinstance(ckpt, dict) and 'model' not in ckpt and 'state_dict' in ckpt and 'args' in ckpt:
        raise UserError(f'{path} holds network weights only (a model_best.pth.tar or '
                        f'checkpoint{{E}}.pth.tar of this train.py), not a state to resume; '
                        f'train.py writes those with --save_ckpt true or --resume')
    if isinstance(ckpt, dict) and 'model' not in ckpt and 'epoch' in ckpt and 'state_dict' in ckpt:
        # The original train.py's checkpoint: weights, optimizer, epoch, best accuracy.
        logger(f'{path}: a checkpoint of the original code; continuing its first run')
        return dict(path=path, repeat=0, finished=[], epoch=int(ckpt['epoch']),
                    model=weights_of(ckpt, path), optimizer=ckpt.get('optimizer'),
                    scheduler=None, rng=None,
                    result=dict(best=float(ckpt.get('best_acc1', 0.0)),
                                best5=float(ckpt.get('best_acc5', 0.0)), last=0.0, last5=0.0,
                                history=[]))
    needed = {'epoch', 'repeat', 'model', 'args', 'result', 'finished', 'rng'}
    if not isinstance(ckpt, dict) or not needed <= set(ckpt):
        missing = sorted(needed - set(ckpt)) if isinstance(ckpt, dict) else sorted(needed)
        raise UserError(f"{path}: not a train.py checkpoint (no {', '.join(missing)} "
                        f"entries)")
    ckpt['path'] = path
    old = ckpt['args']
    diff = [f'{k}: {old.get(k)!r} there, {getattr(args, k)!r} now' for k in RESUME_KEYS
            if k in old and old[k] != getattr(args, k)]
    if diff:
        raise UserError(f"{path} was written by a run with other settings ({'; '.join(diff)}); "
                        f"give the same options to resume it, or another --save_dir")
    return ckpt


def main(args):
    if args.pt_from >= 0 and args.repeat > 1:
        raise UserError('--pt_from writes one network per folder: run train.py once per --seed '
                        'instead of --repeat')
    device = resolve_device(args.device)
    setup_backends(device, args.tf32, cuda_graphs=args.cuda_graphs)
    check_setup(args)
    args.save_dir = output_dir(args)
    if not args.resume:
        refuse_overwrite(args.save_dir, 'checkpoint.pth.tar',
                         resumed=' (a finished run then reports its summary again)')
    # Nothing goes to disk before the data and the checkpoint to resume have been checked.
    logger = Logger(args.save_dir, defer=True)
    set_seed(args.seed)
    ctx = autocast(device, args.amp)
    logger(f'train.py: {args.dataset} full training set, save dir {args.save_dir}, '
           f'device {device}')
    for line in args.derived:
        logger(f'  {line}')
    if (warning := slow_amp_warning(device, args.amp)):
        logger(warning)

    trainset = load_split(args, train=True)
    valset = load_split(args, train=False)
    normalize, aug = train_augment(args)
    loader = full_train_loader(args, trainset, device, normalize)
    val_loader = eval_loader(valset, args.dataset, device, batch_size=500, workers=args.workers)
    name = net_name(args.net_type, args.depth, args.norm_type, args.width)
    step_kind = train_step_kind(args, device, args.epochs * len(loader))
    logger(f'{len(trainset)} training / {len(valset)} test images; {name}; '
           f"{'DSA ' + args.dsa_strategy if args.dsa else 'standard augmentation'}, "
           f"mixup {args.mixup} (p {args.mix_p}); {args.epochs} epochs; training steps "
           f"{step_kind_name(step_kind)}")

    finished, resume = [], None
    if args.resume:
        resume = load_resume(args, logger)
        if resume is not None:
            finished = list(resume['finished'])
            logger(f"resumed from {args.save_dir}/checkpoint.pth.tar: repeat "
                   f"{resume['repeat'] + 1}, epoch {resume['epoch']}")
    logger.open()
    remove_stale_tmp(args.save_dir, logger)
    atomic_write_json(os.path.join(args.save_dir, 'args.json'), jsonable_args(args))
    saver = Checkpointer(args, loader, finished)
    start = time.time()
    for r in range(len(finished), args.repeat):
        saver.repeat = r
        state = resume if resume is not None and resume['repeat'] == r else None
        if state is not None and state['epoch'] >= args.epochs:  # killed before the summary
            if state['rng'] is not None:
                set_rng_state(state['rng'], loader)
            finished.append({k: state['result'][k] for k in ('best', 'last', 'best5', 'last5')})
            continue
        model = build_model(args)
        if state is not None and state['rng'] is not None:
            set_rng_state(state['rng'], loader)  # after building: init draws were made before
        if r == 0 and state is None:
            n_par = sum(p.numel() for p in model.parameters())
            logger(f'=> {name}: {n_par / 1e6:.2f}M parameters')
        res = train_model(args, model, loader, val_loader, device, logger, args.epochs, aug=aug,
                          val_every=args.epoch_print_freq, ctx=ctx, resume=state,
                          on_epoch_end=saver, desc=f'repeat {r + 1}/{args.repeat}',
                          batch_bar=True,
                          step_kind=step_kind)
        finished.append({k: res[k] for k in ('best', 'last', 'best5', 'last5')})
        logger(f"repeat {r + 1}: best {res['best']:.2f} (top-5 {res['best5']:.2f}), "
               f"last {res['last']:.2f} (top-5 {res['last5']:.2f})")
    summary = summarize(finished)
    logger(summary_line(args.repeat, summary))
    atomic_write_json(os.path.join(args.save_dir, 'summary.json'), dict(
        dataset=args.dataset, selection='full', nclass=args.nclass, evaluator=name,
        net_type=args.net_type, depth=args.depth, norm_type=args.norm_type, width=args.width,
        epochs=args.epochs, repeat=args.repeat, n_train=len(trainset), seed=args.seed,
        wall_s=round(time.time() - start, 1), **summary))
    return summary


if __name__ == '__main__':
    from argument import parse_args
    run_main(main, parse_args(mode='train'),
             interrupted=': checkpoint.pth.tar holds the last finished epoch; run the same '
             'command with --resume to continue')
