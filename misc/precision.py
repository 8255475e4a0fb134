"""Float32 rounding of one class's matching gradient, per memory layout and implementation.

    python misc/precision.py --data_dir /usr/share/datasets/fashion-mnist --draws 8

Gradient matching differentiates the difference of two gradients, so its float32 result is
sensitive to rounding (a ReLU that flips changes the gradient by a finite step). For --draws
random draws (a fresh ConvNet-3, a real batch of one class, a synthetic batch of decoded real
images, one augmentation draw; FashionMNIST's `--reproduce` settings, --ipc 10, factor 2), this
computes d loss / d synthetic batch in float32 four ways (eager and compiled, NCHW and
channels_last), and a fifth way under --amp's autocast (bf16 on the CPU, eager NCHW:
`eager_nchw_amp`), and prints ONE JSON line with each one's relative distance to the same
computation in float64: per draw, median and max. It is the evidence behind --match_layout's
default and behind the advice not to condense with --amp.

This is an entry-point script: it imports condense.py (nothing imports it).
"""
import argparse
import copy
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import condense  # noqa: E402
from argument import parse_args  # noqa: E402
from data import DATASETS, ClassSampler, load_split, stream_generator  # noqa: E402
from misc.augment import build_match_aug  # noqa: E402
from misc.device import autocast, setup_backends  # noqa: E402

LAYOUTS = {'nchw': torch.contiguous_format, 'channels_last': torch.channels_last}


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data_dir', default=os.environ.get('IDC_DATA_DIR', './data'))
    p.add_argument('--draws', type=int, default=8)
    p.add_argument('--ipc', type=int, default=10)
    p.add_argument('--extra', default='', help='more condense.py options')
    opt = p.parse_args()
    args = parse_args(f'-d fashion --data_dir {opt.data_dir} --ipc {opt.ipc} -f 2 --reproduce '
                      f'--device cpu {opt.extra}'.split(), mode='condense')
    setup_backends(torch.device('cpu'))
    info = DATASETS[args.dataset]
    sampler = ClassSampler(load_split(args), args.batch_real, 'cpu', seed=0)
    synset = condense.Synthesizer(range(10), args.ipc, args.nch, args.size, args.factor)
    synset.init(sampler, args.init)
    aug = build_match_aug(args.aug_type, info.mean, info.std)
    model, _ = condense.new_network_shell(args, torch.device('cpu'))
    compiled = {name: condense.GradMatcher(
        model, argparse.Namespace(**{**vars(args), 'match_layout': name}), compile=True,
        log=lambda msg: sys.exit(msg)) for name in LAYOUTS}
    eager = condense.GradMatcher(model, args)
    errors = {f'{impl}_{name}': [] for impl in ('eager', 'compiled') for name in LAYOUTS}
    errors['eager_nchw_amp'] = []
    for draw in range(opt.draws):
        torch.manual_seed(draw)
        model.load_state_dict(condense.new_network_shell(args, torch.device('cpu'))[0]
                              .state_dict())
        c = draw % 10
        with torch.no_grad():
            inputs = condense.class_inputs(args, synset, sampler, c, aug,
                                           stream_generator(draw, c))
        real, syn, lab_real, lab_syn = (t.detach() for t in inputs)
        model64 = copy.deepcopy(model).double()
        _, g64 = condense.GradMatcher(model64, args)(real.double(), syn.double(), lab_real,
                                                     lab_syn)

        def err(g):
            return ((g.double() - g64).norm() / g64.norm()).item()

        for name, fmt in LAYOUTS.items():
            model.to(memory_format=fmt)
            _, g = eager(real.to(memory_format=fmt), syn.to(memory_format=fmt), lab_real,
                         lab_syn)
            model.to(memory_format=torch.contiguous_format)
            errors[f'eager_{name}'].append(err(g))
            errors[f'compiled_{name}'].append(err(compiled[name](real, syn, lab_real,
                                                                 lab_syn)[1]))
        with autocast(torch.device('cpu'), True):  # what condense.py --amp runs
            _, g = eager(real, syn, lab_real, lab_syn)
        errors['eager_nchw_amp'].append(err(g))
    out = {'draws': opt.draws, 'torch': torch.__version__}
    for k, v in errors.items():
        out[k] = {'median': float(f'{statistics.median(v):.2g}'),
                  'max': float(f'{max(v):.2g}'), 'per_draw': [float(f'{e:.2g}') for e in v]}
    print(json.dumps(out))


if __name__ == '__main__':
    main()
