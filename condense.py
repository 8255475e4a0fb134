"""IDC: condense a dataset by multi-formation gradient matching.

    python condense.py --reproduce -d fashion -f 2 --ipc 10

A storage tensor S (nclass*ipc, C, H, W) in [0, 1] is optimized so that networks trained on its
decoded images (each stored image cut into factor x factor crops, each upsampled) see the same
gradients as on real data. Every outer iteration draws a fresh network; every inner step matches
each class once (one SGD step on S per class) and then trains the network on real data.
Results, checkpoints and logs go to args.save_dir; `--resume` continues a killed run.
"""
import glob
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from argument import parse_args
from data import (DATASETS, ClassSampler, decode, decode_classwise, eval_loader, load_split,
                  stream_generator)
from misc import dist as distributed
from misc.augment import build_match_aug, build_net_aug
from misc.device import (autocast, call_compiled, compiled, setup_backends, slow_amp_warning,
                         want_compile)
from misc.utils import (Logger, UserError, atomic_save, atomic_write_json, get_rank,
                        get_world_size, is_main_process, refuse_overwrite, remove_stale_tmp,
                        run_main, safe_load, save_img, set_seed, to_device)
from test import RESNET10_BN, default_evaluator, evaluate_data
from train import (build_model, check_setup, load_weights, make_train_step, rng_state,
                   set_rng_state, train_epoch, train_step_kind)

CKPT_NAME = 'checkpoint.pt'
# Options that may differ between a run and its --resume (they do not change the result).
RUN_CONTROL = {'resume', 'device', 'workers', 'verbose', 'print_freq', 'time', 'save_dir',
               'data_dir', 'imagenet_dir', 'download', 'skip_checksum', 'explicit', 'derived',
               'repeat', 'test', 'compile', 'match_layout', 'batch_classes', 'cuda_graphs'}


class Synthesizer:
    """The condensed data: storage S (n_classes*ipc, C, H, W), class-major, and its decoding.

    `classes` are the (global) labels this storage holds: all classes, or one partition.
    """

    def __init__(self, classes, ipc, nch, size, factor=1, decode_type='single', device='cpu'):
        self.classes = list(classes)
        self.ipc, self.factor, self.decode_type = ipc, factor, decode_type
        self.size = size
        n = len(self.classes) * ipc
        self.data = torch.zeros(n, nch, size, size, device=device, requires_grad=True)
        self.targets = torch.tensor(self.classes, device=device).repeat_interleave(ipc)

    def slot(self, c):
        """Rows of S that belong to class c."""
        i = self.classes.index(c)
        return slice(i * self.ipc, (i + 1) * self.ipc)

    @torch.no_grad()
    def init(self, sampler, init_type):
        """random: the first ipc real images of each class; noise: clamp(N(0,1)/4 + 0.5);
        mix: the first factor^2*ipc real images, each shrunk into one cell of the grid."""
        if init_type == 'noise':
            self.data.copy_(torch.clamp(torch.randn_like(self.data) / 4 + 0.5, 0, 1))
            return
        for c in self.classes:
            if init_type == 'random':
                img, _ = sampler.class_sample(c, self.ipc, first=True)
                self.data[self.slot(c)] = img
            elif init_type == 'mix':
                img, _ = sampler.class_sample(c, self.ipc * self.factor**2, first=True)
                self.data[self.slot(c)] = mix_grid(img, self.ipc, self.factor, self.size)
            else:
                raise ValueError(f'unknown init {init_type}')

    def decode(self, data, targets, bound=128):
        return decode(data, targets, self.factor, self.decode_type, bound)

    def sample(self, c, max_size=128, generator=None, rows=None):
        """Decoded synthetic images of class c, randomly subsampled to at most max_size.
        `rows`: decode these stored images of class c instead of its rows of S."""
        s = self.slot(c)
        rows = self.data[s] if rows is None else rows
        data, targets = self.decode(rows, self.targets[s], bound=max_size)
        if len(data) > max_size:
            keep = to_device(torch.randperm(len(data), generator=generator)[:max_size],
                             data.device)
            data, targets = data[keep], targets[keep]
        return data, targets

    def decoded(self, bound=128):
        """Every stored image decoded, class-major, detached: the training set it represents."""
        return decode_classwise(self.data.detach(), self.targets, self.ipc, self.factor,
                                self.decode_type, bound)


def mix_grid(img, ipc, factor, size):
    """Fill ipc images with a factor x factor grid of real images (img: (factor^2*ipc, C, H, W)).

    Cell k of stored image i holds real image k*ipc + i, resized (nearest); when size % factor
    != 0 the first size % factor rows/columns of cells are one pixel larger.
    """
    out = img.new_empty(ipc, img.shape[1], size, size)
    s, rem = divmod(size, factor)
    sides = [s + 1 if i < rem else s for i in range(factor)]
    offsets = [sum(sides[:i]) for i in range(factor)]
    k = 0
    for i in range(factor):
        for j in range(factor):
            h, w = sides[i], sides[j]
            part = F.interpolate(img[k * ipc:(k + 1) * ipc], size=(h, w))
            out[:, :, offsets[i]:offsets[i] + h, offsets[j]:offsets[j] + w] = part
            k += 1
    return out


# ---------------------------------------------------------------- matching objectives
def dist(x, y, metric='mse'):
    """Distance between two gradients (or features) of the same shape."""
    if metric == 'mse':
        return (x - y).pow(2).sum()
    if metric == 'l1':
        return (x - y).abs().sum()
    if metric == 'l1_mean':
        return (x - y).abs().reshape(x.shape[0], -1).mean(-1).sum()
    if metric == 'l2':
        # Listed but never implemented by the original: here, the Euclidean norm of the
        # difference (a sqrt of mse). Its gradient at exactly zero distance is taken as zero.
        return (x - y).pow(2).sum().clamp_min(1e-12).sqrt()
    if metric == 'cos':
        x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
        return torch.sum(1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1) + 1e-6))
    raise ValueError(f'unknown metric {metric}')


def matched_params(model, bias=False, fc=False):
    """Parameters whose gradients are matched: 1-D ones (bias, norm) only with --bias, 2-D ones
    (the classifier) only with --fc."""
    keep = []
    for p in model.parameters():
        if p.dim() == 1 and not bias or p.dim() == 2 and not fc:
            continue
        keep.append(p)
    return keep


def match_loss(model, img_real, img_syn, lab_real, lab_syn, args):
    """Gradient (or feature) matching loss between a real and a synthetic batch of one class."""
    if args.match == 'feat':
        with torch.no_grad():
            feat_real = model.get_feature(img_real, args.idx_from, args.idx_to)
        feat_syn = model.get_feature(img_syn, args.idx_from, args.idx_to)
        return sum(dist(r.mean(0), s.mean(0), 'mse') for r, s in zip(feat_real, feat_syn))

    params = matched_params(model, args.bias, args.fc)
    if not params:
        raise UserError('no parameter is matched: the network has no conv weights; '
                        'add --fc True or --bias True')
    loss_real = F.cross_entropy(model(img_real), lab_real)
    g_real = [g.detach() for g in torch.autograd.grad(loss_real, params)]
    loss_syn = F.cross_entropy(model(img_syn), lab_syn)
    g_syn = torch.autograd.grad(loss_syn, params, create_graph=True)
    return sum(dist(gr, gs, args.metric) for gr, gs in zip(g_real, g_syn))


# ---------------------------------------------------------------- one outer iteration
def new_network(args, device, sampler, aug_net):
    """A fresh network for the next `fix_iter` outer iterations, as --pt_from/--early say.
    Under torchrun every rank takes rank 0's network, and --early trains it data-parallel."""
    model, optim_net = new_network_shell(args, device)
    if args.pt_from >= 0:
        load_weights(model, pretrained_path(args))
    distributed.broadcast_module(model)
    for _ in range(args.early):
        n_batches = math.ceil(len(sampler.targets) / args.batch_real)
        with distributed.DataParallel(optim_net) as dp:
            train_epoch(model, dp.batches(sampler.sample() for _ in range(n_batches)), optim_net,
                        aug=aug_net, mixup=args.mixup_net, beta=args.beta, mix_p=args.mix_p)
    return model, optim_net


def pretrained_folders(args):
    return sorted(glob.glob(f'./pretrained/{args.datatag}/{args.modeltag}_cut*'))


def pretrained_path(args):
    """A random pretrained run folder and a random epoch in pt_from..pt_from+pt_num-1."""
    folders = pretrained_folders(args)
    folder = folders[np.random.randint(len(folders))]
    epoch = args.pt_from + (np.random.randint(args.pt_num) if args.pt_num > 1 else 0)
    return os.path.join(folder, f'checkpoint{epoch}.pth.tar')


def pretrain_command(args):
    """The train.py command line whose networks --pt_from finds: the options that name the
    ./pretrained folder (dataset and class subset, network), then the epochs."""
    cmd = f'python train.py -d {args.dataset}'
    if args.dataset == 'imagenet':
        cmd += f' --nclass {args.nclass} --dseed {args.dseed}'
    cmd += f' -n {args.net_type} --depth {args.depth} --norm_type {args.norm_type}'
    if args.width != 1.0:
        cmd += f' --width {args.width}'
    return cmd + f' --pt_from {args.pt_from} --pt_num {args.pt_num}'


def check_pretrained(args):
    """Fail before any work when --pt_from names networks that are not there."""
    if args.pt_from < 0:
        return
    folders = pretrained_folders(args)
    if not folders:
        raise UserError(f'--pt_from {args.pt_from}: no pretrained networks in '
                        f'./pretrained/{args.datatag}/{args.modeltag}_cut*; train them with '
                        f'{pretrain_command(args)} (it writes them there)')
    for folder in folders:
        for e in range(args.pt_from, args.pt_from + args.pt_num):
            path = os.path.join(folder, f'checkpoint{e}.pth.tar')
            if not os.path.isfile(path):
                raise UserError(f'--pt_from/--pt_num: {path} is missing')
    # One load tells whether the architecture fits (load_weights names what does not).
    model, _ = new_network_shell(args, torch.device('cpu'))
    load_weights(model, os.path.join(folders[0], f'checkpoint{args.pt_from}.pth.tar'))


def class_inputs(args, synset, sampler, c, aug_match, gen, rows=None):
    """The random draws of class c's matching: a real batch, the decoded synthetic images
    (subsampled to batch_syn_max) and ONE augmentation draw shared by both (normalization
    first). `gen` is class c's own generator; `rows`: class c's stored images (default: its
    rows of S). Returns (real, syn, real labels, syn labels), syn differentiable w.r.t. rows."""
    img_real, lab_real = sampler.class_sample(c)
    img_syn, lab_syn = synset.sample(c, args.batch_syn_max, generator=gen, rows=rows)
    n = len(img_real)
    img_aug = aug_match(torch.cat([img_real, img_syn]), generator=gen)
    return img_aug[:n], img_aug[n:], lab_real, lab_syn


def match_step_loop(args, synset, sampler, model, optim_img, aug_match, gens, ctx):
    """Step 1 of an inner iteration literally as the original computes it: for each class in
    order, the matching loss, loss.backward() and one SGD step on the whole of S (its single
    momentum buffer moves every class). The reference for the faster match_step."""
    total = 0.0
    for c in synset.classes:
        inputs = class_inputs(args, synset, sampler, c, aug_match, gens[c])
        with ctx:
            loss = match_loss(model, *inputs, args)
        optim_img.zero_grad()
        loss.backward()
        optim_img.step()
        total += loss.item()
    return total


def geometric(m, k):
    """m + m^2 + ... + m^k, elementwise over the tensor k."""
    if m == 1:
        return k.to(torch.float)
    return m * (1 - m**k) / (1 - m)


def momentum_closed_form(p, buf, grad, pos, nsteps, lr, m):
    """The per-class SGD steps of one inner iteration in closed form.

    Row block k (pos = k) is matched at step k of nsteps: first k steps without gradient move it
    by -lr*buf*(m + ... + m^k) and leave buf*m^k; its own step does buf = m*buf + g,
    p -= lr*buf; the nsteps-1-k steps after it move it without gradient again. Returns
    (p, buf) after all nsteps, from p and buf before the first. pos: (N,) position of each
    row's class; grad: each row's gradient at its own step.
    """
    shape = (-1, ) + (1, ) * (p.dim() - 1)
    pre = pos.to(p.dtype).view(shape)
    post = (nsteps - 1 - pos).to(p.dtype).view(shape)
    p = p - lr * buf * geometric(m, pre)
    buf = m * buf * m**pre + grad
    p = p - lr * buf
    return p - lr * buf * geometric(m, post), buf * m**post


def matched_position(args, synset, optim_img):
    """S as each class sees it when its turn comes in the per-class loop, and the data the
    closed form needs: (S_seen, buf, pos, lr, m)."""
    group = optim_img.param_groups[0]
    if group['weight_decay'] or group['dampening'] or group['nesterov']:
        raise ValueError('the closed form covers plain SGD with momentum only')
    lr, m = group['lr'], group['momentum']
    S = synset.data
    buf = optim_img.state[S].get('momentum_buffer')
    buf = torch.zeros_like(S) if buf is None else buf
    pos = torch.arange(len(synset.classes), device=S.device).repeat_interleave(synset.ipc)
    with torch.no_grad():
        seen = S - lr * buf * geometric(m, pos.to(S.dtype)).view(-1, 1, 1, 1)
    return seen, buf, pos, lr, m


class GradMatcher:
    """The matching loss of each class and its gradient w.r.t. the synthetic batch.

    Eager: autograd, asking only for the gradient of the synthetic batch (no second-order
    gradients of the network parameters). compile=True: the same computation written with
    torch.func and compiled by torch.compile, which fuses the element-wise work of the double
    backward (grad matching on networks without buffers only), on tensors in the memory layout
    of --match_layout (channels_last by default: 17% faster on the CPU here; against float64 it
    rounds about 1e-3 as a rule, NCHW 1e-6 in most draws and up to 3e-3 in others, and both
    condense to the same accuracy: README). If compilation fails (no C++ compiler, say), `log`
    says so and the eager computation takes over for the rest of the run.

    --batch_classes N (N != 1) matches N classes (0: all) in one computation: the torch.func
    function vmapped over classes (compiled or not), for GPUs, which a single class leaves
    mostly idle (the default on CUDA: all classes). Same math; networks with buffers or feature
    matching stay per class.
    """

    def __init__(self, model, args, compile=False, log=None):
        self.model, self.args, self.log = model, args, log or (lambda msg: None)
        functional = args.match == 'grad' and not list(model.buffers())
        self.key = self.batched_key = self.batched = None
        per_call = args.batch_classes
        if per_call is None:  # the default: all classes at once on CUDA, one at a time elsewhere
            per_call = 0 if next(model.parameters()).device.type == 'cuda' else 1
        self.per_call = per_call if functional else 1
        if compile and functional:
            self.key = compiled_class_match(model, args)
        if self.per_call != 1:
            self.batched = batched_class_match(model, args)
            if compile:
                self.batched_key = compiled(('match_batched', ) + match_key(model, args),
                                            lambda: self.batched)
        self.memory_format = torch.contiguous_format if args.match_layout == 'nchw' else \
            torch.channels_last

    def groups(self, classes):
        """`classes` in the groups matched by one call each, in order."""
        n = len(classes) if self.per_call == 0 else self.per_call
        return [classes[i:i + n] for i in range(0, len(classes), max(1, n))]

    def __call__(self, img_real, img_syn, lab_real, lab_syn):
        # The real batch shares the augmentation graph of the synthetic one, but its gradient
        # is a constant of the matching: detached, autograd keeps nothing for it.
        img_real, img_syn = img_real.detach(), img_syn.detach()
        if self.key is not None:
            params = {n: p.detach() for n, p in self.model.named_parameters()}
            out = call_compiled(self.key, (params, img_real, lab_real, img_syn, lab_syn),
                                self.log, memory_format=self.memory_format)
            if out is not None:
                return out
        img_syn.requires_grad_()
        loss = match_loss(self.model, img_real, img_syn, lab_real, lab_syn, self.args)
        (grad, ) = torch.autograd.grad(loss, img_syn)
        return loss.detach(), grad

    def many(self, inputs):
        """[(loss, grad)] of a list of classes' (real, syn, real labels, syn labels): in one
        batched computation when there is one and the classes' batches have equal shapes."""
        same = len({tuple(t.shape for t in i) for i in inputs}) == 1
        if self.batched is None or len(inputs) == 1 or not same:
            return [self(*i) for i in inputs]
        real, syn, lab_real, lab_syn = (torch.stack([i[k].detach() for i in inputs])
                                        for k in range(4))
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        args = (params, real, lab_real, syn, lab_syn)
        out = call_compiled(self.batched_key, args, self.log) \
            if self.batched_key is not None else None
        loss, grad = out if out is not None else self.batched(*args)
        return list(zip(loss.unbind(), grad.unbind()))


def outer_iterations(args):
    """The number of outer iterations: --niter counts hundreds of inner steps."""
    return args.niter * 100 // args.inner_loop


def compiles(args, device):
    """(matching, network updates): whether this run compiles the matching (--compile, by the
    number of inner steps), and how it computes the network updates' training steps
    (train_step_kind: 'graphs', 'compile' or None). The literal loop does neither."""
    steps = outer_iterations(args) * args.inner_loop
    if args.match_impl != 'fast':
        return False, None
    return (want_compile(args.compile, device, steps),
            train_step_kind(args, device, steps))


def network_compute(model, args, use_compile, log):
    """(matcher, training step helper) of a network: eager, compiled with torch.compile or
    (updates) CUDA-graphed, as `use_compile` (matching, network updates) says."""
    return (GradMatcher(model, args, compile=use_compile[0], log=log),
            make_train_step(use_compile[1], model, log))


def matched_names(model, args):
    keep = {id(p) for p in matched_params(model, args.bias, args.fc)}
    return [n for n, p in model.named_parameters() if id(p) in keep]


def match_key(model, args):
    """What a compiled matching function depends on: the architecture, metric, matched names."""
    return repr(model), args.metric, tuple(matched_names(model, args))


def class_match_fn(model, args):
    """(params, real, real labels, syn, syn labels) -> (loss, d loss / d syn), the matching of
    one class written with torch.func: `model` serves as a template through functional_call."""
    from torch.func import functional_call, grad, grad_and_value
    names, metric = matched_names(model, args), args.metric

    def fn(params, img_real, lab_real, img_syn, lab_syn):
        rest = {n: p for n, p in params.items() if n not in names}

        def ce(matched, x, y):
            return F.cross_entropy(functional_call(model, {**rest, **matched}, (x, )), y)

        matched = {n: params[n] for n in names}
        g_real = grad(ce)(matched, img_real, lab_real)

        def syn_loss(x):
            g_syn = grad(ce)(matched, x, lab_syn)
            return sum(dist(g_real[n], g_syn[n], metric) for n in names)

        g, loss = grad_and_value(syn_loss)(img_syn)
        return loss, g
    return fn


def compiled_class_match(model, args):
    """The compile key of class_match_fn; one compilation serves every network of the same
    architecture."""
    return compiled(('match', ) + match_key(model, args), lambda: class_match_fn(model, args))


def batched_class_match(model, args):
    """class_match_fn over a leading class dimension of the batches and labels (torch.func.vmap;
    the parameters are shared): (params, real, ...) -> (loss per class, gradient per class)."""
    from torch.func import vmap
    return vmap(class_match_fn(model, args), in_dims=(None, 0, 0, 0, 0))


def match_step(args, synset, sampler, model, optim_img, aug_match, gens, ctx, matcher=None):
    """Step 1 of an inner iteration, computing what match_step_loop computes.

    Class c's loss depends on its own rows of S only, and those rows, when c's turn comes, have
    been moved by momentum alone: so every class is matched at its known position, gradients
    are taken class by class without a step in between, and the per-class steps are applied
    together in closed form (momentum_closed_form). No host synchronisation per class.
    """
    matcher = matcher or GradMatcher(model, args)
    seen, buf, pos, lr, m = matched_position(args, synset, optim_img)
    grad = torch.zeros_like(seen)
    total = torch.zeros((), device=seen.device)
    # all classes in one process; --batch_classes groups them into batched computations
    for group in matcher.groups(distributed.my_share(synset.classes)):
        rows = [seen[synset.slot(c)].requires_grad_() for c in group]
        inputs = [class_inputs(args, synset, sampler, c, aug_match, gens[c], rows=r)
                  for c, r in zip(group, rows)]
        with ctx:
            outs = matcher.many(inputs)
        grads = torch.autograd.grad([i[1] for i in inputs], rows,
                                    [g.to(i[1].dtype) for (_, g), i in zip(outs, inputs)])
        for c, g, (loss, _) in zip(group, grads, outs):
            grad[synset.slot(c)] = g
            total += loss.float()
    # Under torchrun each rank matched its share of the classes (zeros elsewhere): one sum gives
    # every rank every class's gradient, and every rank takes the same closed-form step.
    distributed.all_reduce_sum_([grad, total], 'the matching step')
    with torch.no_grad():
        p, new_buf = momentum_closed_form(synset.data, buf, grad, pos, len(synset.classes), lr,
                                          m)
        synset.data.copy_(p)
    optim_img.state[synset.data]['momentum_buffer'] = new_buf
    return total.item()


def net_step(args, sampler, model, optim_net, aug_net, ctx, step=None):
    """Step 2 of an inner iteration: train the network on n_data real images, net_epoch times.
    Under torchrun data-parallel: every rank draws the same batches, trains on its share of
    each, and the optimizer steps with the whole batch's gradient."""
    for _ in range(args.net_epoch):
        with distributed.DataParallel(optim_net) as dp:
            train_epoch(model, dp.batches(real_batches(sampler, args.n_data)), optim_net,
                        aug=aug_net, mixup=args.mixup_net, beta=args.beta, mix_p=args.mix_p,
                        ctx=ctx, step=step)


def real_batches(sampler, n_data):
    """Random real batches of all classes until at least n_data images were drawn."""
    seen = 0
    while seen < n_data:
        x, y = sampler.sample()
        seen += len(y)
        yield x, y


# ---------------------------------------------------------------- checkpoints
def config_of(args):
    return {k: v for k, v in sorted(vars(args).items()) if k not in RUN_CONTROL}


def load_checkpoint(path, args):
    """The checkpoint at `path`, checked against this run's options. --niter alone may differ
    (a finished or stopped run can be extended, or ended sooner): nothing in an outer
    iteration depends on the total, so the data equal those of a run started with the new
    --niter; only its files' schedule (data.pt, img*.png, evaluations) follows the new total."""
    ckpt = safe_load_ckpt(path)
    theirs, ours = ckpt.get('config', {}), config_of(args)
    # (the folder tag names --niter too; the options it is made of are compared one by one)
    diff = sorted(k for k in set(theirs) | set(ours)
                  if theirs.get(k) != ours.get(k) and k not in ('niter', 'tag'))
    if diff:
        shown = ', '.join(f'{k}: {theirs.get(k)!r} -> {ours.get(k)!r}' for k in diff[:5])
        raise UserError(f'{path} belongs to a different configuration ({shown}); resume with '
                        f'the same options, or choose another --save_dir')
    done, total = ckpt['it'], outer_iterations(args)
    if done > total:
        least = -(-done * args.inner_loop // 100)
        raise UserError(f'{path} has done {done} outer iterations (--niter {theirs.get("niter")})'
                        f', more than the {total} of --niter {args.niter}: resume with --niter '
                        f'{least} or more')
    return ckpt


def safe_load_ckpt(path):
    ckpt = safe_load(path, what='condensation checkpoint')
    needed = ('data', 'it', 'optim_img', 'sampler', 'gens', 'rng')
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in needed):
        raise UserError(f'{path} is not a condensation checkpoint written by condense.py '
                        f"(it needs the entries {', '.join(needed)})")
    return ckpt


# ---------------------------------------------------------------- the run
def my_classes(args):
    """The classes this run condenses: all, or partition --phase of --nclass_sub classes."""
    if args.nclass_sub > 0:
        return list(range(args.nclass_sub * args.phase, args.nclass_sub * (args.phase + 1)))
    return list(range(args.nclass))


def condense(args, logger, device, train_set, val_set, ckpt=None):
    """Optimize the condensed data; returns the Synthesizer. `ckpt`: a checkpoint to resume.

    Under torchrun every rank holds all of S and the same network; each matches its share of
    the classes (match_step sums the gradients over the ranks) and trains the network on its
    share of each real batch (net_step); rank 0 alone evaluates and writes files.
    """
    info = DATASETS[args.dataset]
    classes = my_classes(args)
    sampler = ClassSampler(train_set, args.batch_real, device, seed=args.seed)
    ctx = autocast(device, args.amp)
    use_compile = compiles(args, device)
    aug_match = build_match_aug(args.aug_type, info.mean, info.std)
    aug_net = build_net_aug(args.aug_type, info.mean, info.std, args.mixup_net)

    synset = Synthesizer(classes, args.ipc, args.nch, args.size, args.factor, args.decode_type,
                         device)
    # One random stream per class for the matching draws (subsampling and augmentation), so a
    # class gets the same draws whichever process condenses it.
    gens = {c: stream_generator(args.seed, 10_000 + c) for c in classes}
    mine = distributed.my_share(classes)  # the classes this rank matches (all in one process)
    optim_img = torch.optim.SGD([synset.data], lr=args.lr_img, momentum=args.mom_img)
    n_iter = outer_iterations(args)
    it_log = max(1, n_iter // 50)
    it_save = {n_iter // 10, n_iter // 5, n_iter // 2, n_iter}
    val_loader = eval_loader(val_set, args.dataset, device, workers=args.workers) \
        if val_set is not None else None
    ckpt_path = os.path.join(args.save_dir, CKPT_NAME)

    start, model, optim_net = 0, None, None
    if ckpt is not None:
        with torch.no_grad():
            synset.data.copy_(ckpt['data'].to(device))
        optim_img.load_state_dict(ckpt['optim_img'])
        sampler.load_state_dict(ckpt['sampler'])
        for c, state in ckpt['gens'].items():
            gens[int(c)].set_state(state)
        set_rng_state(rank_rng_state(ckpt, logger))
        start = ckpt['it']
        if ckpt.get('model') is not None:
            model, optim_net = new_network_shell(args, device)
            model.load_state_dict(ckpt['model'])
            optim_net.load_state_dict(ckpt['optim_net'])
            matcher, net_loss = network_compute(model, args, use_compile, logger)
        logger(f'Resumed from {ckpt_path} at outer iteration {start}/{n_iter}')
        if (before := ckpt.get('config', {}).get('niter', args.niter)) != args.niter:
            logger(f'  --niter {before} -> {args.niter}: the run continues to {n_iter} outer '
                   f'iterations')
    else:
        if args.resume:
            logger(f'--resume: no checkpoint in {args.save_dir} yet, starting afresh')
            if 'niter' in args.explicit and 'save_dir' not in args.explicit and not args.test:
                logger('  (the default folder\'s name includes --niter: to extend a run with '
                       'another --niter, give that run\'s --save_dir)')
        synset.init(sampler, args.init)
        distributed.broadcast_([synset.data], 'sharing the initial data')  # noise init
        if is_main_process():
            # The initialization in data.pt's format, so that test.py can evaluate it too.
            atomic_save([synset.data.detach().cpu(), synset.targets.cpu()],
                        os.path.join(args.save_dir, 'init.pt'))
            save_img(os.path.join(args.save_dir, 'init.png'), synset.data)
            sample, _ = synset.sample(synset.classes[0], max_size=args.batch_syn_max)
            save_img(os.path.join(args.save_dir, 'aug.png'), aug_match(sample),
                     unnormalize=(info.mean, info.std))
        if val_loader is not None:  # rank 0 only
            evaluate(args, synset, val_loader, device, logger, it=0, bench=False)
        distributed.barrier('the wait for rank 0 to evaluate the initialization')

    world = get_world_size()
    compiled_what = [w for w, on in (('matching', use_compile[0]),
                                     ('network updates', use_compile[1] == 'compile')) if on]
    if compiled_what:
        logger(f'{" and ".join(compiled_what).capitalize()} compiled with torch.compile '
               f'(--compile {args.compile}): the first inner step includes the compilation')
    if use_compile[1] == 'graphs':
        logger(f'Network updates replayed as CUDA graphs (--cuda_graphs {args.cuda_graphs})')
    if args.amp:
        logger(f'Warning: --amp runs the matching in {"fp16" if device.type == "cuda" else "bf16"}'
               f' autocast. The matching differentiates a difference of two gradients: on the CPU'
               f' (bf16) its gradient was 6% from float64\'s against 0.2% in fp32'
               f' (misc/precision.py). Its accuracy was checked only on short CPU runs (200'
               f' and 600 inner steps, FashionMNIST ipc 1: the same as fp32 within noise; README);'
               f' longer runs and fp16 on CUDA are unchecked. --amp is meant for test.py.')
        if (warning := slow_amp_warning(device, args.amp)):
            logger(warning)
    logger(f'Condensing {len(classes)} classes x {args.ipc} images (factor {args.factor}) with '
           f'{args.match} matching: {n_iter} outer x {args.inner_loop} inner iterations' +
           (f'; {world} ranks, rank r matches classes r, r+{world}, ... and trains on its share '
            f'of each real batch' if world > 1 else ''))
    if len(classes) < world:
        logger(f'note: {world - len(classes)} rank(s) have no class to match (more ranks than '
               f'classes); they share the network updates only')
    # the bar is closed before an interrupt's message, which stays the last line
    with tqdm(total=n_iter * args.inner_loop, initial=start * args.inner_loop, unit='step',
              disable=not is_main_process(), dynamic_ncols=True, file=sys.stderr) as bar:
        for it in range(start, n_iter):
            if it % max(1, args.fix_iter) == 0 or model is None:
                model, optim_net = new_network(args, device, sampler, aug_net)
                matcher, net_loss = network_compute(model, args, use_compile, logger)
            with torch.no_grad():
                synset.data.clamp_(0, 1)
            loss_total, t0 = 0.0, time.time()
            for inner in range(args.inner_loop):
                if args.match_impl == 'loop':
                    loss_total += match_step_loop(args, synset, sampler, model, optim_img,
                                                  aug_match, gens, ctx)
                else:
                    loss_total += match_step(args, synset, sampler, model, optim_img, aug_match,
                                             gens, ctx, matcher)
                if args.n_data > 0:
                    net_step(args, sampler, model, optim_net, aug_net, ctx, net_loss)
                bar.update(1)
                # the mean matching loss per class and inner step so far, as the log line says it
                bar.set_postfix(it=it, loss=f'{loss_total / len(classes) / (inner + 1):.1f}')
            loss = loss_total / len(classes) / args.inner_loop
            step_s = (time.time() - t0) / args.inner_loop
            if it % it_log == 0:
                logger(f'(Iter {it:3d}) loss: {loss:.4f}  ({step_s:.2f} s/inner step)')
                logger.json({'event': 'loss', 'iter': it, 'loss': loss, 'step_s': step_s})
            if it + 1 in it_save and is_main_process():
                save_img(os.path.join(args.save_dir, f'img{it + 1}.png'), synset.data)
                atomic_save([synset.data.detach().cpu(), synset.targets.cpu()],
                            os.path.join(args.save_dir, 'data.pt'))
                logger(f'Saved data.pt and img{it + 1}.png at iteration {it + 1}')
                if val_loader is not None:
                    evaluate(args, synset, val_loader, device, logger, it=it + 1, bench=True)
            keep_net = args.fix_iter > 1 and (it + 1) % args.fix_iter != 0
            streams, gen_states, rngs = gather_streams(sampler, gens, mine, synset, model, logger)
            if is_main_process():
                atomic_save({'data': synset.data.detach().cpu(),
                             'optim_img': optim_img.state_dict(), 'sampler': streams,
                             'rng': rngs[0], 'rng_ranks': rngs, 'it': it + 1,
                             'gens': gen_states, 'config': config_of(args),
                             'model': model.state_dict() if keep_net else None,
                             'optim_net': optim_net.state_dict() if keep_net else None},
                            ckpt_path)
            # The other ranks wait for rank 0's evaluation and files with the long timeout.
            distributed.barrier('the wait for rank 0 to evaluate and write the checkpoint')
    return synset


def gather_streams(sampler, gens, mine, synset, model, logger):
    """(sampler state, per-class generator states, [global RNG state of each rank]) for the
    checkpoint. A rank advances only its own classes' streams, so rank 0 takes each class's
    from its owner; the stream of the network batches is the same on every rank. Also checks
    that the ranks still hold the same S and network (they must, bit for bit)."""
    state = sampler.state_dict()
    own = ({c: state['cls'][c] for c in mine}, {c: gens[c].get_state() for c in mine},
           rng_state(), fingerprint(synset, model))
    parts = distributed.all_gather_object(own, 'gathering the random streams')
    gen_states = {c: g.get_state() for c, g in gens.items()}
    for cls_states, own_gens, _, _ in parts:
        state['cls'].update(cls_states)
        gen_states.update(own_gens)
    prints = [p[3] for p in parts]
    if any(p != prints[0] for p in prints):
        logger(f'warning: the ranks hold different synthetic data or networks (sums per rank: '
               f'{prints}); please report this')
    return state, gen_states, [p[2] for p in parts]


def fingerprint(synset, model):
    """Sums of S and of the network's parameters, in float64."""
    with torch.no_grad():
        return (synset.data.sum(dtype=torch.float64).item(),
                sum(p.sum(dtype=torch.float64).item() for p in model.parameters()))


def rank_rng_state(ckpt, logger):
    """This rank's global RNG state from a checkpoint (rank 0's for ranks it did not have)."""
    states = ckpt.get('rng_ranks') or [ckpt['rng']]
    if len(states) != get_world_size():
        logger(f'note: the checkpoint was written by {len(states)} process(es), this run has '
               f'{get_world_size()}: the class streams continue exactly, the augmentation draws '
               f'of the network updates do not')
    return states[get_rank()] if get_rank() < len(states) else ckpt['rng']


def new_network_shell(args, device):
    """A network and optimizer to load a checkpointed state into (no pretraining)."""
    model = build_model(args).to(device)
    model.train()
    optim_net = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    return model, optim_net


def evaluate(args, synset, val_loader, device, logger, it, bench):
    """Train evaluators on the decoded data; the RNG streams of the condensation stay as they
    were, so evaluating (or not, with --test) does not change the condensed data."""
    images, targets = synset.decoded(bound=args.batch_syn_max)
    evaluators = [default_evaluator(args)]
    if bench and args.dataset not in ('mnist', 'fashion'):
        evaluators.append(RESNET10_BN)
    state = rng_state()
    result = evaluate_data(args, images, targets, val_loader, device, logger,
                           evaluators=evaluators, tag=f'iter {it}')
    set_rng_state(state)
    logger.json({'event': 'eval', 'iter': it, 'result': result})
    return result


def check_init_images(args, train_set):
    """Fail before any file is written when a class has too few real images to initialize
    the stored images (--init random: ipc of them, mix: ipc x factor^2)."""
    if args.init == 'noise':
        return
    need = args.ipc * (args.factor ** 2 if args.init == 'mix' else 1)
    counts = torch.bincount(train_set.targets.long().flatten(), minlength=args.nclass)
    short = [c for c in my_classes(args) if counts[c] < need]
    if short:
        c = short[0]
        raise UserError(f'--init {args.init} needs {need} real images of each class '
                        f'(ipc {args.ipc}' + (f' x factor^2 {args.factor ** 2}'
                                              if args.init == 'mix' else '') +
                        f'), but class {c} has {int(counts[c])} ({len(short)} class(es) short): '
                        f'lower --ipc, or use --init noise')


def read_checkpoint(args):
    """The checkpoint to resume, or None: rank 0 reads and checks it and every rank gets it
    (so only rank 0's machine needs the save folder). Without --resume, a folder that already
    holds a checkpoint is refused rather than overwritten (its work would be lost); the
    scratch folder of --test runs without --save_dir is the exception."""
    ckpt_path = os.path.join(args.save_dir, CKPT_NAME)
    ckpt, error = None, None
    scratch = args.test and 'save_dir' not in args.explicit
    if is_main_process():
        try:
            if args.resume and os.path.isfile(ckpt_path):
                ckpt = load_checkpoint(ckpt_path, args)
            elif not args.resume and not scratch:
                refuse_overwrite(args.save_dir, CKPT_NAME)
        except UserError as e:
            error = str(e)
    # Also the ranks' meeting point after loading the data (with the long timeout).
    ckpt, error = distributed.broadcast_object((ckpt, error), 'sharing the checkpoint')
    if error is not None:
        raise UserError(error)
    return ckpt


def main(args):
    """Condense; under torchrun, as one rank of the process group torchrun set up."""
    device = distributed.init_distributed(args.device)
    setup_backends(device, args.tf32, cuda_graphs=args.cuda_graphs)
    set_seed(args.seed)  # the same seed on every rank (rank 0's network is shared anyway)
    # Check what can be checked before anything is written.
    if outer_iterations(args) < 1:
        raise UserError(f'--niter {args.niter} with --inner_loop {args.inner_loop} gives no '
                        f'outer iteration (niter*100 // inner_loop must be at least 1)')
    if args.match_impl == 'loop' and get_world_size() > 1:
        raise UserError('--match_impl loop steps S once per class and runs in one process; '
                        'under torchrun use the default --match_impl fast (the same math)')
    check_pretrained(args)
    check_setup(args, match=True)
    train_set = load_split(args, train=True)
    partition = my_classes(args) if args.nclass_sub > 0 else None
    val_set = None if args.test or not is_main_process() else \
        load_split(args, train=False, classes=partition)
    ckpt = read_checkpoint(args)
    if ckpt is None:
        check_init_images(args, train_set)

    logger = Logger(args.save_dir, enabled=is_main_process())
    if is_main_process():
        remove_stale_tmp(args.save_dir, logger)
    world = get_world_size()
    logger(f'Save dir: {args.save_dir} (device {device}' +
           (f', {world} processes, {distributed.backend()})' if world > 1 else ')'))
    for line in args.derived:
        logger(f'  derived: {line}')
    if is_main_process():
        atomic_write_json(os.path.join(args.save_dir, 'args.json'), vars(args))
    synset = condense(args, logger, device, train_set, val_set, ckpt)
    logger(f'Done: {os.path.join(args.save_dir, "data.pt")}')
    distributed.cleanup()
    return synset


def run_cli(argv=None):
    run_main(main, parse_args(argv, mode='condense'),
             interrupted=f': {CKPT_NAME} holds the last finished outer iteration; run the same '
             f'command with --resume to continue')

if __name__ == '__main__':
    run_cli()
