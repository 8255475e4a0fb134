"""Speed of condensation and evaluation, measured with the project's own code against the
original's way of computing the same thing.

    python misc/benchmark.py --dataset fashion --data_dir /usr/share/datasets/fashion-mnist \
        --ipc 10 --factor 2 --steps 3

Prints ONE JSON line. Measured in this process, with the project's defaults (`--reproduce`
settings, so `--compile auto` compiles):
- condensation: one warm-up inner step (it includes the compilation: `warmup_s`), then --steps
  timed inner steps of condense.py (matching of every class + the network update): `step_s`,
  `match_s`, `net_s`; FLOPs counted by torch's formulas on one inner step (convolutions and
  matrix products, forward and all backward passes) and the achieved GFLOP/s; the machine's
  convolution peak (a 128->128 3x3 convolution, batch 64, 16x16, channels_last);
- `loop_same_process`: the original's per-class loop (`--match_impl loop`) with this
  process's settings, to separate what the algorithm gains from what the process settings gain;
- evaluation: test.py's training epochs on the decoded data (ipc --eval_ipc) and one validation
  pass over the test set; `eval_1000_epochs_s` = compilation + 1000 epochs + 4 validations,
  the protocol's schedule (compilation: of the training step and, on the CPU, of the
  validation forward pass).
`reference`: the same measurements (same options, --extra included) in fresh processes
(--reference_runs, 3 by default; the median of each figure, `reference_runs` lists each
process's main figures: one process's figures vary by up to a factor of two) run the
original's way: the per-class loop with loss.backward() and one optimizer step per class,
eager training, NCHW inference, and the C library's default memory allocator; its evaluation
reads the data as the original's test.py does (original_loaders: a DataLoader over one image
at a time, a per-image transform, the test split as PIL images through ToTensor and Normalize in 4
worker processes, batches of --batch_size // 2 for validation). `speedup` and `eval_speedup`
compare with it. The machine's speed drifts from minute to minute on shared hosts, so our side
is measured again in fresh processes (`ours_runs`, the first being this process) that alternate
with the reference ones: round k pairs our k-th run with the k-th reference run, and
`speedup_paired` / `eval_speedup_paired` are the medians of the rounds' ratios (each round's
two processes ran minutes apart, in about the same phase of the machine). `machine` says what
it ran on (CPU model, cores, vector instructions, bf16 in hardware, GPU).

This is an entry-point script: it imports condense.py and test.py (nothing imports it).
"""
import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import condense  # noqa: E402
from argument import parse_args  # noqa: E402
from data import (DATASETS, ClassSampler, StreamLoader, StreamSet, TensorLoader,  # noqa: E402
                  eval_loader, load_split, stream_generator)
from misc.augment import build_match_aug, build_net_aug  # noqa: E402
from misc.device import autocast, cpu_has_native_bf16, resolve_device, setup_backends  # noqa: E402
from misc.utils import accuracy, run_main, set_seed  # noqa: E402
from test import eval_epochs  # noqa: E402
from train import (CompiledForward, build_model, make_optimizer, make_train_step,  # noqa: E402
                   train_augment, train_epoch, train_step_kind, validate)


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
        self.total += op_flops(func, args, kwargs, out)
        return out


def op_flops(func, args, kwargs, out):
    """torch's FLOP formula of one op; for a grouped convolution's backward, its weight-gradient
    part divided by the groups (the formula leaves groups out there, so --batch_classes, whose
    vmapped convolutions are grouped by class, counted 2.4x the FLOPs of the same math)."""
    formula = flop_registry.get(func._overloadpacket)
    if formula is None:
        return 0
    if func._overloadpacket is torch.ops.aten.convolution_backward:
        *head, groups, mask = args
        if groups > 1 and mask[1]:
            grad_in = formula(*head, groups, [mask[0], False, mask[2]], **kwargs, out_val=out)
            grad_w = formula(*head, groups, [False, True, False], **kwargs, out_val=out)
            return grad_in + grad_w // groups
    return formula(*args, **kwargs, out_val=out)


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
        # the decision condense.py makes for a run of these settings
        use_compile = condense.compiles(args, device) if impl == 'fast' else (False, None)
        self.compiled = use_compile
        self.matcher, self.net_loss = condense.network_compute(self.model, args, use_compile,
                                                               log=print_err)
        self.ctx = autocast(device, args.amp)

    def match(self):
        a = (self.args, self.synset, self.sampler, self.model, self.optim_img, self.aug_match,
             self.gens, self.ctx)
        if self.impl == 'loop':
            return condense.match_step_loop(*a)
        return condense.match_step(*a, self.matcher)

    def net(self):
        condense.net_step(self.args, self.sampler, self.model, self.optim_net, self.aug_net,
                          self.ctx, self.net_loss)

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
        """FLOPs of one inner step. The network update runs eagerly here: a CUDA graph's replay
        passes no operation through torch's dispatcher, so the counter would miss it (on an
        H200 it counted 491 instead of 638 GFLOP)."""
        counter = FlopCount()
        with counter:
            self.match()
            condense.net_step(self.args, self.sampler, self.model, self.optim_net, self.aug_net,
                              self.ctx, None)
        return counter.total


def print_err(msg):
    print(msg, file=sys.stderr, flush=True)


def bench_condense(args, device, train_set, impl, steps):
    c = Condenser(args, device, train_set, impl)
    t = time.perf_counter()
    c.timed_steps(1)  # warm-up (and compilation)
    warmup_s = time.perf_counter() - t
    match_s, net_s = c.timed_steps(steps)
    return c, {'step_s': match_s + net_s, 'match_s': match_s, 'net_s': net_s,
               'warmup_s': warmup_s, 'compiled_match': c.compiled[0],
               'net_steps': step_label(c.compiled[1], c.net_loss)}


def step_label(kind, step):
    """How the training steps ran: 'eager', 'compile', 'graphs', or 'graphs failed: eager'
    when a graph capture failed (its warning is on stderr)."""
    if kind is None:
        return 'eager'
    return f'{kind} failed: eager' if getattr(step, 'failed', False) else kind


class PerImage(torch.utils.data.Dataset):
    """One (transform(image), label) at a time, as the original's datasets serve them: for
    training, its TensorDataset of the decoded images with a Normalize; for validation,
    torchvision's dataset classes, which make each uint8 image a PIL image (`pil=True`) for
    ToTensor and Normalize."""

    def __init__(self, images, targets, transform, pil=False):
        self.images, self.targets = images, torch.as_tensor(targets, dtype=torch.long)
        self.transform, self.pil = transform, pil

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.images[i]
        if self.pil:
            arr = img.permute(1, 2, 0).numpy()  # (H, W, C) uint8
            img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
        return self.transform(img), int(self.targets[i])


def original_loaders(args, images, targets, val_set, device):
    """The original test.py's data path for DSA evaluation: the decoded images one at a time
    through a Normalize, batches of --batch_size, no workers; the test split through
    ToTensor and Normalize per image in 4 workers, batches of --batch_size // 2. Each batch
    moves to `device` as it arrives, as the original's did."""
    info = DATASETS[args.dataset]
    norm = T.Normalize(info.mean, info.std)
    train = StreamLoader(PerImage(images.cpu(), targets.cpu(), norm), args.batch_size, device,
                         shuffle=True, workers=0)
    if isinstance(val_set, StreamSet):  # ImageNet files: read by workers already
        return train, eval_loader(val_set, args.dataset, device, batch_size=args.batch_size // 2)
    val = StreamLoader(PerImage(val_set.images, val_set.targets,
                                T.Compose([T.ToTensor(), norm]), pil=True),
                       args.batch_size // 2, device, workers=4)
    return train, val


@torch.no_grad()
def plain_validate(model, loader, ctx):
    """Validation the original's way: NCHW, one batch after the other, the loss and the
    accuracies read by the host per batch."""
    model.eval()
    for x, y in loader:
        with ctx:
            out = model(x).float()
        F.cross_entropy(out, y).item()
        accuracy(out, y, topk=(1, 5))


def bench_eval(args, device, images, targets, val_set, epochs, reference):
    """Seconds per training epoch on `images` (the protocol's augmentation, CutMix, optimizer),
    per validation pass, and the protocol's 1000 epochs + 4 validations (+ compilation)."""
    normalize, aug = train_augment(args)
    if reference and args.dsa:
        loader, val = original_loaders(args, images, targets, val_set, device)
    else:
        loader = TensorLoader(images, targets, args.batch_size, device, normalize, shuffle=True)
        val = eval_loader(val_set, args.dataset, device)
    model = build_model(args).to(device)
    optimizer, _ = make_optimizer(args, model, 1000)
    full = eval_epochs(args)
    kind = None if reference else train_step_kind(args, device, full * len(loader))
    step = make_train_step(kind, model, print_err)
    ctx = autocast(device, args.amp)  # test.py's: --amp applies to the evaluation too

    def run(n):
        sync(device)
        t = time.perf_counter()
        for _ in range(n):
            train_epoch(model, loader, optimizer, aug=aug, mixup=args.mixup, beta=args.beta,
                        mix_p=args.mix_p, ctx=ctx, step=step)
        sync(device)
        return time.perf_counter() - t

    first = run(1)  # warm-up, and compilation (or graph capture)
    epoch_s = run(epochs) / epochs
    # test.py's validation: compiled on the CPU when the training steps are
    forward = CompiledForward(model, print_err) if kind == 'compile' else None

    def val_pass():
        sync(device)
        t = time.perf_counter()
        if reference:
            plain_validate(model, val, ctx)
        else:
            validate(model, val, ctx, forward=forward)
        sync(device)
        return time.perf_counter() - t

    val_first = val_pass()  # warm-up, and compilation
    val_s = val_pass()
    compile_s = max(0.0, first - epoch_s) if kind is not None else 0.0
    if forward is not None and device.type == 'cpu':
        compile_s += max(0.0, val_first - val_s)
    return {'eval_images': len(images), 'eval_epoch_s': epoch_s, 'val_pass_s': val_s,
            'eval_compile_s': compile_s, 'eval_steps': step_label(kind, step),
            f'eval_{full}_epochs_s': compile_s + full * epoch_s + 4 * val_s}


def measure(opt, reference):
    """The figures of one process: ours, or (reference=True) the original's way."""
    line = (f'-d {opt.dataset} --data_dir {opt.data_dir} --ipc {opt.ipc} -f {opt.factor} '
            f'--reproduce --device {opt.device} --test {opt.extra}')
    args = parse_args(line.split(), mode='condense')
    device = resolve_device(args.device)
    setup_backends(device, args.tf32, allocator=not reference, cuda_graphs=args.cuda_graphs)
    train_set = load_split(args, train=True)
    val_set = load_split(args, train=False)

    out = {'conv_peak_gflops': conv_peak(device)}
    main_impl = 'loop' if reference else 'fast'
    cond, res = bench_condense(args, device, train_set, main_impl, opt.steps)
    out.update(res)
    flops = cond.flops()
    out['gflop_per_step'] = flops / 1e9
    out['gflops'] = flops / 1e9 / res['step_s']
    if not reference and not opt.skip_loop:
        _, out['loop_same_process'] = bench_condense(args, device, train_set, 'loop', opt.steps)

    eval_args = parse_args(line.replace(f'--ipc {opt.ipc}', f'--ipc {opt.eval_ipc}').split(),
                           mode='condense')
    with contextlib.redirect_stderr(open(os.devnull, 'w')):
        small = Condenser(eval_args, device, train_set, 'loop')  # its initialization only
    images, targets = small.synset.decoded(bound=eval_args.batch_syn_max)
    out.update(bench_eval(eval_args, device, images, targets, val_set, opt.eval_epochs,
                          reference))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dataset', default='fashion')
    p.add_argument('--data_dir', default=os.environ.get('IDC_DATA_DIR', './data'))
    p.add_argument('--ipc', type=int, default=10)
    p.add_argument('--factor', type=int, default=2)
    p.add_argument('--steps', type=int, default=3, help='timed inner steps per implementation')
    p.add_argument('--eval_epochs', type=int, default=20, help='timed evaluation epochs')
    p.add_argument('--eval_ipc', type=int, default=1, help='ipc of the evaluated decoded data')
    p.add_argument('--device', default='auto')
    p.add_argument('--skip_loop', action='store_true',
                   help='do not time the per-class loop in this process')
    p.add_argument('--skip_reference', action='store_true',
                   help='do not run the reference process (the original\'s way)')
    p.add_argument('--reference_runs', type=int, default=3,
                   help='reference processes to run, alternating with as many of ours (this '
                        'process is the first); their median figures are compared (one process '
                        'varies by up to a factor of two, with its memory allocator and the '
                        'machine\'s load)')
    p.add_argument('--reference', action='store_true',
                   help='measure the original\'s way only (what the reference process runs)')
    p.add_argument('--ours', action='store_true',
                   help='measure our way only, without the loop (what our extra processes run)')
    p.add_argument('--extra', default='',
                   help='more condense.py options, e.g. --extra="--compile off"')
    opt = p.parse_args()
    if opt.reference_runs < 1:
        p.error(f'--reference_runs must be at least 1, not {opt.reference_runs} '
                f'(--skip_reference leaves the reference out)')
    if opt.reference and opt.ours:
        p.error('--reference and --ours measure one side each; give one of them')
    child = opt.reference or opt.ours
    opt.skip_loop = opt.skip_loop or child

    out = {'dataset': opt.dataset, 'ipc': opt.ipc, 'factor': opt.factor, 'steps': opt.steps,
           'eval_ipc': opt.eval_ipc, 'options': opt.extra, 'torch': torch.__version__,
           'threads': torch.get_num_threads()}
    out.update(measure(opt, opt.reference))
    device = resolve_device(opt.device)
    out['device'] = str(device)
    out['machine'] = machine(device)
    if not child and not opt.skip_reference:
        compare(opt, out)
    print(json.dumps(rounded(out)))


def compare(opt, out):
    """Rounds of the reference process and (from the second round on) one more process of ours,
    alternating: `reference` (median figures), `reference_runs`, `ours_runs`, the speedups."""
    def child(side, what):
        cmd = [sys.executable, os.path.abspath(__file__), side, '--dataset', opt.dataset,
               '--data_dir', opt.data_dir, '--ipc', str(opt.ipc), '--factor', str(opt.factor),
               '--steps', str(opt.steps), '--eval_epochs', str(opt.eval_epochs),
               '--eval_ipc', str(opt.eval_ipc), '--device', opt.device, f'--extra={opt.extra}']
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f'{what} failed:\n{r.stderr[-2000:]}')
        return json.loads(r.stdout.strip().splitlines()[-1])

    ours, refs = [out], []
    for k in range(opt.reference_runs):
        if k > 0:
            ours.append(child('--ours', f'our process of round {k + 1}'))
        refs.append(child('--reference', 'the reference process'))
    ref = median_figures(refs)
    out['reference'] = {k: v for k, v in ref.items() if k not in out or out[k] != v}
    key = next(k for k in ref if k.startswith('eval_') and k.endswith('_epochs_s'))
    if len(refs) > 1:
        keys = ('step_s', 'eval_epoch_s', 'val_pass_s', key, 'conv_peak_gflops')
        out['reference_runs'] = [{k: r[k] for k in keys} for r in refs]
        out['ours_runs'] = [{k: r[k] for k in keys} for r in ours]
    out['speedup'] = ref['step_s'] / out['step_s']
    out['eval_speedup'] = ref[key] / out[key]
    out['speedup_paired'] = median([r['step_s'] / o['step_s'] for o, r in zip(ours, refs)])
    out['eval_speedup_paired'] = median([r[key] / o[key] for o, r in zip(ours, refs)])


def machine(device):
    """What the figures were measured on: the CPU's model name (from /proc/cpuinfo where there
    is one), its logical cores, the vector instructions torch's CPU kernels use, whether it
    computes bf16 in hardware (what --amp needs to gain on a CPU), and the GPU's name when the
    run used one. This project's development machines changed from session to session, and
    their figures differed by 2x."""
    name = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            name = next(line.split(':', 1)[1].strip() for line in f
                        if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == 'cuda' else None
    return {'cpu': name, 'cores': os.cpu_count(),
            'cpu_capability': torch.backends.cpu.get_cpu_capability(),
            'cpu_bf16': cpu_has_native_bf16(), 'gpu': gpu}


def median(values):
    """The middle value (the lower middle one for an even count)."""
    return sorted(values)[(len(values) - 1) // 2]


def median_figures(runs):
    """One dict of the runs' figures: the median of each number (the lower middle one for an
    even count), the first run's value of anything else."""
    out = dict(runs[0])
    for k, v in out.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = median([r[k] for r in runs])
    return out


def rounded(obj):
    if isinstance(obj, float):
        return round(obj, 4)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


if __name__ == '__main__':
    run_main(lambda _: main(), None)
