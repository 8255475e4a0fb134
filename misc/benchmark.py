"""Speed of condensation and evaluation, measured with the project's own code.

    python misc/benchmark.py --dataset fashion --data_dir /usr/share/datasets/fashion-mnist \
        --ipc 10 --factor 2 --steps 3

Runs one warm-up and --steps timed inner steps of condense.py (matching of every class + the
network update) for the fast path and for the straightforward per-class loop of the original
(loss.backward() and one optimizer step per class), then a few epochs of test.py's evaluation
training on the decoded data, and prints ONE JSON line. FLOPs are counted by
torch.utils.flop_counter on one inner step (convolutions and matrix products, forward and all
backward passes); the machine's convolution peak is a 128->128 3x3 convolution (batch 64,
16x16, channels_last) timed in the same run.

This is an entry-point script: it imports condense.py and test.py (nothing imports it).
"""
import argparse
import contextlib
import json
import os
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import condense  # noqa: E402
from argument import parse_args  # noqa: E402
from data import DATASETS, ClassSampler, eval_loader, load_split, stream_generator  # noqa: E402
from misc.augment import build_match_aug, build_net_aug  # noqa: E402
from misc.device import autocast, resolve_device, setup_backends  # noqa: E402
from misc.utils import Logger, set_seed  # noqa: E402
from test import default_evaluator, evaluate_data  # noqa: E402


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


class FlopCount(TorchDispatchMode):
    """FLOPs of the convolutions and matrix products dispatched inside the block (torch's own
    formulas; its FlopCounterMode also tracks modules, which autograd.grad on leaves trips)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def conv_peak(device, reps=20):
    """GFLOP/s of a 128->128 3x3 convolution, batch 64 at 16x16, channels_last."""
    conv = torch.nn.Conv2d(128, 128, 3, padding=1).to(device, memory_format=torch.channels_last)
    x = torch.randn(64, 128, 16, 16, device=device).to(memory_format=torch.channels_last)
    flops = 2 * 64 * 16 * 16 * 128 * 128 * 9
    with torch.no_grad():
        for _ in range(3):
            conv(x)
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            conv(x)
        sync(device)
    return flops * reps / (time.perf_counter() - t) / 1e9


class Condenser:
    """The state of condense.py's loop, driven one inner step at a time."""

    def __init__(self, args, device, train_set, impl):
        info = DATASETS[args.dataset]
        self.args, self.device, self.impl = args, device, impl
        set_seed(args.seed)
        self.sampler = ClassSampler(train_set, args.batch_real, device, seed=args.seed)
        self.synset = condense.Synthesizer(range(args.nclass), args.ipc, args.nch, args.size,
                                           args.factor, args.decode_type, device)
        self.synset.init(self.sampler, args.init)
        self.gens = {c: stream_generator(args.seed, 10_000 + c) for c in range(args.nclass)}
        self.aug_match = build_match_aug(args.aug_type, info.mean, info.std)
        self.aug_net = build_net_aug(args.aug_type, info.mean, info.std, args.mixup_net)
        self.optim_img = torch.optim.SGD([self.synset.data], lr=args.lr_img,
                                         momentum=args.mom_img)
        self.model, self.optim_net = condense.new_network(args, device,
                                                          self.sampler, self.aug_net)
        self.matcher = condense.GradMatcher(self.model, args, compile=args.compile)
        self.ctx = autocast(device, args.amp)

    def match(self):
        a = (self.args, self.synset, self.sampler, self.model, self.optim_img, self.aug_match,
             self.gens, self.ctx)
        if self.impl == 'loop':
            return condense.match_step_loop(*a)
        return condense.match_step(*a, self.matcher)

    def net(self):
        condense.net_step(self.args, self.sampler, self.model, self.optim_net, self.aug_net,
                          self.ctx)

    def timed_steps(self, steps):
        match_s = net_s = 0.0
        for _ in range(steps):
            sync(self.device)
            t0 = time.perf_counter()
            self.match()
            sync(self.device)
            t1 = time.perf_counter()
            self.net()
            sync(self.device)
            match_s += t1 - t0
            net_s += time.perf_counter() - t1
        return match_s / steps, net_s / steps

    def flops(self):
        counter = FlopCount()
        with counter:
            self.match()
            self.net()
        return counter.total


def bench_condense(args, device, train_set, impl, steps):
    c = Condenser(args, device, train_set, impl)
    c.timed_steps(1)  # warm-up (and compilation with --compile)
    match_s, net_s = c.timed_steps(steps)
    return c, {'step_s': match_s + net_s, 'match_s': match_s, 'net_s': net_s}


def bench_eval(args, device, condenser, val_set, epochs):
    """Seconds per evaluation epoch (training on the decoded data) and per validation pass."""
    images, targets = condenser.synset.decoded(bound=args.batch_syn_max)
    val = eval_loader(val_set, args.dataset, device)
    quiet = Logger(None, enabled=False)
    args.epochs = epochs
    args.repeat = 1
    t = time.perf_counter()
    evaluate_data(args, images, targets, val, device, quiet, evaluators=[default_evaluator(args)])
    total = time.perf_counter() - t
    # time one validation pass to split the total into training epochs and validations
    from train import build_model, validate
    model = build_model(args).to(device)
    t = time.perf_counter()
    validate(model, val)
    val_s = time.perf_counter() - t
    # the schedule of train.train_model: every epochs // 4 epochs and at the last one
    every = max(1, epochs // 4)
    n_val = sum(1 for e in range(1, epochs + 1) if e % every == 0 or e == epochs)
    return {'eval_images': len(images), 'eval_epoch_s': (total - n_val * val_s) / epochs,
            'val_pass_s': val_s,
            'eval_1000_epochs_s': 1000 * (total - n_val * val_s) / epochs + 4 * val_s}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dataset', default='fashion')
    p.add_argument('--data_dir', default=os.environ.get('IDC_DATA_DIR', './data'))
    p.add_argument('--ipc', type=int, default=10)
    p.add_argument('--factor', type=int, default=2)
    p.add_argument('--steps', type=int, default=3, help='timed inner steps per implementation')
    p.add_argument('--eval_epochs', type=int, default=20)
    p.add_argument('--eval_ipc', type=int, default=1, help='ipc of the evaluated decoded data')
    p.add_argument('--device', default='auto')
    p.add_argument('--skip_loop', action='store_true', help='do not time the per-class loop')
    p.add_argument('--extra', default='', help='more condense.py options, e.g. "--compile"')
    opt = p.parse_args()

    line = (f'-d {opt.dataset} --data_dir {opt.data_dir} --ipc {opt.ipc} -f {opt.factor} '
            f'--reproduce --device {opt.device} --test {opt.extra}')
    args = parse_args(line.split(), mode='condense')
    device = resolve_device(args.device)
    setup_backends(device, args.tf32)
    train_set = load_split(args, train=True)
    val_set = load_split(args, train=False)

    out = {'dataset': opt.dataset, 'ipc': opt.ipc, 'factor': opt.factor, 'device': str(device),
           'threads': torch.get_num_threads(), 'torch': torch.__version__,
           'options': opt.extra, 'steps': opt.steps}
    out['conv_peak_gflops'] = conv_peak(device)
    fast, res = bench_condense(args, device, train_set, 'fast', opt.steps)
    out.update(res)
    flops = fast.flops()
    out['gflop_per_step'] = flops / 1e9
    out['gflops'] = flops / 1e9 / res['step_s']
    if not opt.skip_loop:
        _, ref = bench_condense(args, device, train_set, 'loop', opt.steps)
        out['loop'] = ref
        out['speedup'] = ref['step_s'] / res['step_s']
    eval_args = parse_args(line.replace(f'--ipc {opt.ipc}', f'--ipc {opt.eval_ipc}').split(),
                           mode='condense')
    with contextlib.redirect_stderr(open(os.devnull, 'w')):
        ev = Condenser(eval_args, device, train_set, 'fast')
        out.update(bench_eval(eval_args, device, ev, val_set, opt.eval_epochs))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == '__main__':
    main()
