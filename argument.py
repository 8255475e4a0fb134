"""The one command-line configuration shared by condense.py, test.py and train.py.

`get_parser()` builds the parser; `parse_args(argv)` parses and resolves every derived setting in
one place. Precedence: a flag given on the command line > a `--reproduce` preset > a dataset
default > the parser default. The original's transforming rules (lr_img scaling, cutout removed
under CutMix, flip removed for svhn/mnist, the forced mse and f_idx of feature matching, the
ConvNet depth clamp) then apply to whatever value results. Every derived change is recorded in
`args.derived` (one readable line each) for the scripts to log. Parsing reads no disk and touches
no device.
"""
import argparse
import os

from data import DATASETS
from misc.augment import remove_aug
from misc.reproduce import eval_overrides, preset
from models import MODELS

# Image side that lr_img was tuned for, per dataset (the original's tune_lr_img).
LR_IMG_BASE_SIZE = {'imagenet': 224, 'speech': 64, 'mnist': 28}


def str2bool(v):
    if isinstance(v, bool):
        return v
    if v.lower() in ('yes', 'true', 't', 'y', '1'):
        return True
    if v.lower() in ('no', 'false', 'f', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got '{v}'")


def ipc_epoch(ipc, factor, nclass=10, bound=-1):
    """Evaluation epochs on ImageNet subsets, by the number of decoded images per class."""
    n = ipc * max(factor, 1)**2
    if bound > 0:
        n = min(n, bound)
    if n == 1:
        epochs = 3000
    elif n <= 10:
        epochs = 2000
    elif n <= 50:
        epochs = 1500
    elif n <= 200:
        epochs = 1000
    elif n <= 500:
        epochs = 500
    else:
        epochs = 300
    if nclass == 100:
        epochs = int(2 / 3 * epochs)
        epochs -= epochs % 100
    return epochs


def get_parser():
    p = argparse.ArgumentParser(
        description='IDC: dataset condensation with multi-formation (condense.py, test.py, '
        'train.py share these options)')
    a = p.add_argument
    # Dataset
    a('-d', '--dataset', default='cifar10', choices=sorted(DATASETS), help='dataset')
    a('--data_dir', default=os.environ.get('IDC_DATA_DIR', './data'),
      help='folder holding the datasets ($IDC_DATA_DIR or ./data); for mnist/fashion also a '
      'folder holding the four IDX files, e.g. /usr/share/datasets/fashion-mnist')
    a('--imagenet_dir', default='./data/imagenet', help='ImageNet folder with train/ and val/')
    a('--nclass', default=10, type=int, help='number of classes (ImageNet subsets)')
    a('--dseed', default=0, type=int,
      help='seed of the ImageNet class draw when no --class_list is given (0: no draw, the '
      'first class folders in sorted order)')
    a('--size', default=224, type=int, help='image side (ImageNet)')
    a('--phase', default=-1, type=int, help='index of this class partition (with --nclass_sub)')
    a('--nclass_sub', default=-1, type=int, help='classes per partition (class-partitioned runs)')
    a('-l', '--load_memory', type=str2bool, default=True, help='keep training images in memory')
    a('--class_list', default='', help='file of ImageNet class-folder names, one per line')
    a('--download', action='store_true', help='let torchvision download missing datasets')
    a('--skip_checksum', action='store_true',
      help='read CIFAR/SVHN files without checking their MD5 sums (for non-official copies)')
    # Network
    a('-n', '--net_type', default='convnet', choices=sorted(MODELS), help='network')
    a('--norm_type', default='instance',
      choices=['batch', 'instance', 'sn', 'none', 'layer', 'group'])
    a('--depth', default=10, type=int, help='network depth')
    a('--width', default=1.0, type=float, help='network width multiplier')
    # Training
    a('--epochs', default=300, type=int, help='training epochs')
    a('--batch_size', default=64, type=int, help='mini-batch size for training')
    a('--lr', default=0.01, type=float, help='network learning rate')
    a('--momentum', default=0.9, type=float, help='network SGD momentum')
    a('--weight-decay', '--wd', dest='weight_decay', default=5e-4, type=float)
    a('--seed', default=0, type=int, help='random seed (0 is a seed like any other)')
    a('--pretrained', action='store_true',
      help="the original's flag, accepted so its command lines parse; no effect here")
    # Mixup
    a('--mixup', default='cut', choices=('vanilla', 'cut'), help='mixing for evaluation')
    a('--mixup_net', default='cut', choices=('vanilla', 'cut'),
      help='mixing for the networks trained during condensation')
    a('--beta', default=1.0, type=float, help='CutMix beta distribution')
    a('--mix_p', default=1.0, type=float, help='CutMix probability')
    # Logging and run control
    a('--print-freq', '-p', dest='print_freq', default=10, type=int)
    a('--verbose', action='store_true')
    a('-j', '--workers', default=8, type=int, help='data loading workers (streamed data)')
    a('--save_ckpt', type=str2bool, default=False,
      help='train.py: also save model_best.pth.tar, the weights of the best validation '
      '(takes a value: --save_ckpt true; checkpoint.pth.tar, to --resume, is always saved)')
    a('--tag', default='', help='experiment name, prefixed to the folder tag')
    a('--test', action='store_true',
      help='debug run: no evaluation, results in ./results/test unless --save_dir is given')
    a('--time', action='store_true', help='print time spent per step')
    a('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'])
    a('--save_dir', default='', help='output folder (default: derived from the options)')
    a('--resume', action='store_true',
      help='condense.py, train.py: continue the run from its checkpoint')
    a('--amp', action='store_true',
      help='autocast (bf16 on CPU, fp16 on CUDA); off by default. For evaluation (test.py); '
           'condense.py warns: its gradient matching loses precision in bf16')
    # Condense
    a('-i', '--ipc', type=int, default=-1, help='images per class in the condensed storage')
    a('-f', '--factor', type=int, default=1, help='multi-formation factor (1 is IDC-I)')
    a('--decode_type', default='single', choices=['single', 'multi', 'bound'],
      help='multi-formation decode: single (factor x factor cells), multi (the decodes of '
      'every factor 1..f together), bound (factors from f down to 1, at most --batch_syn_max '
      'decoded images per class)')
    a('--init', default='random', choices=['random', 'noise', 'mix'],
      help='initial stored images: random (the first ipc real images of each class, not a '
      'random draw), noise, or mix (the first factor^2*ipc real images of each class, shrunk '
      'into the grid cells; the default when factor > 1)')
    a('-a', '--aug_type', default='color_crop_cutout', help='DSA strategy for matching')
    a('--match', default='grad', choices=['feat', 'grad'])
    a('--metric', default='l1', choices=['mse', 'l1', 'l1_mean', 'l2', 'cos'])
    a('--bias', type=str2bool, default=False, help='match 1-D (bias, norm) gradients too')
    a('--fc', type=str2bool, default=False, help='match the fully connected layer too')
    a('--f_idx', default='4', help="feature-matching layers: 'a' or 'a,b'")
    a('--niter', type=int, default=500,
      help='length of the condensation in hundreds of inner steps (2000: 200,000 inner steps, '
      'i.e. niter*100/inner_loop outer iterations)')
    a('--inner_loop', type=int, default=100,
      help='inner steps (class matchings + network update) per outer iteration')
    a('--early', type=int, default=0, help='real-data epochs for each new network')
    a('--fix_iter', type=int, default=-1, help='outer iterations a network is kept')
    a('--net_epoch', type=int, default=1)
    a('--n_data', type=int, default=500, help='real images per network update')
    a('--pt_from', type=int, default=-1, help='pretrained network epoch (./pretrained)')
    a('--pt_num', type=int, default=1, help='pretrained epochs drawn from pt_from..+pt_num-1')
    a('--batch_real', type=int, default=64, help='real images per class in each matching')
    a('--batch_syn_max', type=int, default=128)
    a('--lr_img', type=float, default=5e-3,
      help='learning rate of the stored images (scaled by ipc/10 and image size; the folder '
      'name shows the given value)')
    a('--mom_img', type=float, default=0.5)
    a('--reproduce', action='store_true', help="the paper's settings for this dataset")
    a('--match_impl', default='fast', choices=['fast', 'loop'],
      help='fast: per-class gradients, then the per-class SGD steps in closed form (the same '
      'math); loop: the original per-class loop with loss.backward()')
    a('--compile', nargs='?', const='on', default='auto', choices=['auto', 'on', 'off'],
      help='torch.compile the matching and the training steps (the same math; tens of '
      'seconds of compilation, faster after). auto: on for work of at least 1000 steps (inner '
      'steps of condense.py, optimizer steps of test.py/train.py) on the CPU or CUDA; a failed '
      'compilation falls back to eager computation')
    a('--match_layout', default='channels_last', choices=['channels_last', 'nchw'],
      help='memory layout of the compiled matching (the same math, other float32 rounding): '
      'channels_last ran it 17%% faster on the CPU')
    a('--batch_classes', type=int, default=None,
      help='classes matched in one batched computation (torch.func.vmap; 0: all). The same '
      'math. Default: all on CUDA (1.9x faster steps on an H200), 1 elsewhere (one class at a '
      'time was faster on the CPU)')
    a('--tf32', action='store_true', help='TF32 matrix products and convolutions on CUDA')
    a('--cuda_graphs', default='auto', choices=['auto', 'on', 'off'],
      help='replay each training step\'s forward and backward pass (network updates, '
      'evaluation, train.py) as a CUDA graph: the same kernels, one launch. auto: on CUDA '
      'without --amp')
    # Test
    a('-s', '--slct_type', default='idc', choices=['idc', 'dsa', 'kip', 'random', 'herding'])
    a('--repeat', default=1, type=int, help='test.py/train.py: networks trained and evaluated')
    a('--dsa', type=str2bool, default=False, help='DSA augmentation for evaluation')
    a('--dsa_strategy', default='color_crop_cutout_flip_scale_rotate')
    a('--rrc', type=str2bool, default=True, help='RandomResizedCrop on ImageNet')
    a('--same_compute', type=str2bool, default=False, help='evaluation epochs / factor^2')
    a('--name', default='', help='test.py reads results/{name}_ipc{ipc}/data.pt')
    a('--data_path', default='', help='test.py: condensed data file to evaluate')
    a('--herding_ckpt', default='', help='test.py -s herding: trained network checkpoint')
    return p


def explicit_dests(parser, argv):
    """Names of the options given on the command line."""
    quiet = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != 'help':
            kwargs = {'dest': action.dest, 'default': argparse.SUPPRESS}
            if action.nargs == 0:
                quiet.add_argument(*action.option_strings, action='store_const', const=True,
                                   **kwargs)
            else:
                quiet.add_argument(*action.option_strings, nargs=action.nargs, **kwargs)
    known, _ = quiet.parse_known_args(argv)
    return set(vars(known))


class _Resolver:
    """Applies derived values while tracking where each came from."""

    def __init__(self, args, explicit):
        self.args = args
        self.explicit = explicit
        self.lines = []

    def default(self, name, value, why):
        """A preset or dataset default: loses to a flag given on the command line."""
        old = getattr(self.args, name)
        if old == value:
            return
        if name in self.explicit:
            self.lines.append(f"{name}={old!r} (given) kept over {why} {value!r}")
            return
        setattr(self.args, name, value)
        self.lines.append(f"{name}={value!r} ({why})")

    def force(self, name, value, why):
        """A transforming rule: applies to whatever value resulted."""
        old = getattr(self.args, name)
        if old != value:
            setattr(self.args, name, value)
            self.lines.append(f"{name}: {old!r} -> {value!r} ({why})")


def parse_args(argv=None, mode='condense'):
    """Parse and resolve the configuration.

    mode: 'condense' (ipc >= 1 required), 'test' (applies the original test.py's evaluation
    overrides) or 'train'.
    """
    parser = get_parser()
    args = parser.parse_args(argv)
    explicit = explicit_dests(parser, argv)
    resolve(args, explicit, mode=mode, error=parser.error)
    return args


def resolve(args, explicit, mode='condense', error=None):
    if error is None:
        def error(msg):
            raise ValueError(msg)
    validate(args, mode, error)
    r = _Resolver(args, explicit)
    args.explicit = sorted(explicit)

    if args.reproduce:
        for k, v in preset(args.dataset, args.factor, args.ipc, args.nclass).items():
            r.default(k, v, 'reproduce preset')
    if mode == 'test':
        for k, v in eval_overrides(args.dataset, args.factor, args.ipc).items():
            r.default(k, v, 'evaluation setting of the original test.py')
    apply_dataset_defaults(r)
    validate_resolved(args, error)

    args.datatag = args.dataset
    if args.dataset == 'imagenet':
        args.datatag += f'{args.nclass}'
        if args.dseed != 0:
            args.datatag += f'-seed{args.dseed}'

    if args.net_type == 'convnet':
        if args.depth > 4:
            r.force('depth', 3, 'ConvNet depth > 4 becomes 3')
        r.force('f_idx', str(args.depth - 1), 'ConvNet feature layer is depth-1')
    args.modeltag = model_tag(args)

    if args.factor > 1:
        r.default('init', 'mix', 'default initialization for factor > 1')
    args.lr_img_base = args.lr_img
    args.tag = experiment_tag(args, r)

    if args.save_dir:
        pass
    elif args.test:
        args.save_dir = './results/test'
    else:
        args.save_dir = f'./results/{args.datatag}/{args.modeltag}{args.tag}'

    # Evaluation epochs for condensed data.
    if args.ipc > 0:
        if args.dataset == 'imagenet':
            bound = args.batch_syn_max if args.decode_type == 'bound' else -1
            r.default('epochs', ipc_epoch(args.ipc, args.factor, args.nclass, bound=bound),
                      'ImageNet evaluation epochs for this ipc and factor')
            args.epoch_print_freq = max(1, args.epochs // 100)
        else:
            r.default('epochs', 1000, 'evaluation epochs on condensed data')
            args.epoch_print_freq = args.epochs
    else:
        args.epoch_print_freq = 1

    if args.mixup == 'cut':
        r.force('dsa_strategy', remove_aug(args.dsa_strategy, 'cutout'),
                'CutMix replaces cutout in evaluation')
    args.augment = not args.dsa
    args.derived = r.lines
    return args


def validate(args, mode, error):
    """Reject values no run can use, before anything is derived from them."""
    if mode == 'condense' and args.ipc < 1:
        error(f'--ipc must be at least 1 for condensation (got {args.ipc})')
    reads_file = args.slct_type == 'idc' and args.data_path
    if mode == 'test' and args.ipc < 1 and not reads_file:
        error(f'--ipc must be at least 1 to select or evaluate condensed data (got {args.ipc})')
    if mode == 'test' and args.resume:
        error('test.py has no --resume: an evaluation starts over (condense.py and train.py '
              'resume)')
    if args.factor < 1:
        error(f'--factor must be at least 1 (got {args.factor}); 1 is IDC-I')
    if args.depth < 1:
        error(f'--depth must be at least 1 (got {args.depth})')
    for name in ('niter', 'inner_loop', 'batch_syn_max', 'batch_real', 'batch_size', 'repeat',
                 'net_epoch'):
        if getattr(args, name) < 1:
            error(f'--{name} must be at least 1 (got {getattr(args, name)})')
    if args.epochs < 1:
        error(f'--epochs must be at least 1 (got {args.epochs})')
    if args.batch_classes is not None and args.batch_classes < 0:
        error(f'--batch_classes must be 0 (all classes at once) or more (got '
              f'{args.batch_classes})')
    if args.cuda_graphs == 'on' and args.amp:
        error('--cuda_graphs on and --amp do not go together (autocast\'s cast cache cannot '
              'live in a CUDA graph); drop one of them')
    if args.width <= 0:
        error(f'--width must be positive (got {args.width})')
    if (args.nclass_sub > 0) != (args.phase >= 0):
        error('--nclass_sub and --phase go together: give both (class-partitioned run) or '
              'neither')
    if args.match == 'feat':
        try:
            idx = [int(s) for s in args.f_idx.split(',')]
        except ValueError:
            idx = []
        if not 1 <= len(idx) <= 2 or min(idx) < 0:
            error(f"--f_idx must be 'a' or 'a,b' with integers >= 0 (got '{args.f_idx}')")
        if len(idx) == 2 and idx[0] > idx[1]:
            error(f"--f_idx '{args.f_idx}': the first layer must not come after the second")
    # Values the optimizers, samplers and loaders would refuse only after files are written.
    for name in ('lr', 'momentum', 'weight_decay', 'lr_img', 'mom_img'):
        if getattr(args, name) < 0:
            flag = '--wd' if name == 'weight_decay' else f'--{name}'
            error(f'{flag} must not be negative (got {getattr(args, name)})')
    if args.beta <= 0:
        error(f'--beta (the CutMix beta distribution\'s parameter) must be positive (got '
              f'{args.beta})')
    if not 0 <= args.mix_p <= 1:
        error(f'--mix_p is a probability, between 0 and 1 (got {args.mix_p})')
    if args.nclass < 1:
        error(f'--nclass must be at least 1 (got {args.nclass})')
    if args.workers < 0:
        error(f'--workers must be 0 (load in the main process) or more (got {args.workers})')
    if args.pt_from != -1 and args.pt_from < 1:
        error(f'--pt_from is an epoch, 1 or more (got {args.pt_from}); -1, the default, '
              f'means no pretrained networks')
    if args.pt_num < 1:
        error(f'--pt_num must be at least 1 (got {args.pt_num})')
    if mode == 'train' and args.pt_from + args.pt_num - 1 > args.epochs:
        error(f'--pt_from {args.pt_from} --pt_num {args.pt_num} asks for networks after the '
              f'last epoch (--epochs {args.epochs}): they would never be saved')


def validate_resolved(args, error):
    size = args.size
    if args.factor > size:
        error(f'--factor {args.factor} is larger than the image side {size}')
    if args.nclass_sub > 0:
        if args.nclass % args.nclass_sub != 0:
            error(f'--nclass {args.nclass} is not a multiple of --nclass_sub {args.nclass_sub}')
        if args.phase >= args.nclass // args.nclass_sub:
            error(f'--phase {args.phase} is out of range: {args.nclass // args.nclass_sub} '
                  f'partitions of {args.nclass_sub} classes')


def apply_dataset_defaults(r):
    args = r.args
    info = DATASETS[args.dataset]
    args.nch = info.nch
    if args.dataset != 'imagenet':
        # Fixed facts of the dataset files, not preferences.
        r.force('nclass', info.nclass, f'{args.dataset} has {info.nclass} classes')
        r.force('size', info.size, f'{args.dataset} images are {info.size} px')
        r.default('mix_p', 0.5, f'{args.dataset} default')
        r.default('dsa', True, f'{args.dataset} default')
        if not info.flip:
            r.force('dsa_strategy', remove_aug(args.dsa_strategy, 'flip'),
                    f'no flips on {args.dataset}')
        return
    if args.net_type == 'convnet':
        r.default('net_type', 'resnet_ap', 'ImageNet default network')
    r.default('size', info.size, 'ImageNet default')
    if args.nclass >= 100:
        r.default('load_memory', False, 'ImageNet-100 streams from disk')
        r.default('lr', 0.1, 'ImageNet-100 default')
        r.default('weight_decay', 1e-4, 'ImageNet-100 default')
        r.default('batch_size', max(128, args.batch_size), 'ImageNet-100 minimum')
        r.default('batch_real', max(128, args.batch_real), 'ImageNet-100 minimum')


def model_tag(args):
    if args.net_type == 'convnet':
        tag = f'conv{args.depth}'
    elif args.net_type == 'resnet_ap':
        tag = f'resnet{args.depth}ap'
    else:
        tag = f'{args.net_type}{args.depth}'
    if args.norm_type == 'instance':
        tag += 'in'
    if args.width != 1.0:
        tag += f'_w{args.width}'
    return tag


def experiment_tag(args, r):
    """The folder tag of the original argument.py; also scales lr_img for condensation."""
    tag = f'_{args.tag}' if args.tag else ''
    if args.ipc <= 0:
        return tag + (f'_{args.mixup}' if args.mixup != 'vanilla' else '')
    if args.slct_type == 'random':
        return tag + f'_rand{args.ipc}'
    if args.slct_type != 'idc':
        return tag

    if args.match == 'feat':
        tag += f'_f{args.f_idx}'
        idx = [int(s) for s in args.f_idx.split(',')]
        args.idx_from, args.idx_to = (idx + [-1])[:2]
        r.force('metric', 'mse', 'feature matching uses mse')
    else:
        tag += f'_{args.match}'
        tag += '_b' if args.bias else ''
        tag += '_fc' if args.fc else ''
    tag += f'_{args.metric}'
    if args.pt_from >= 0:
        tag += f'_pt{args.pt_from}' + (f'_{args.pt_num}' if args.pt_num > 1 else '')
    if args.fix_iter > 0:
        tag += f'_fix{args.fix_iter}'
    if args.early > 0:
        tag += f'_ely{args.early}'
    if args.n_data >= 0:
        tag += f'_nd{args.n_data}'
        if args.inner_loop != 100:
            tag += f'_inloop{args.inner_loop}'
    if args.mixup_net == 'cut':
        tag += '_cut'
    if args.lr != 0.01:
        tag += f'_nlr{args.lr}'
    if args.weight_decay != 5e-4:
        tag += f'_wd{args.weight_decay}'
    if args.niter != 500:
        tag += f'_niter{args.niter}'
    tag += f'_factor{args.factor}'
    if args.decode_type != 'single':
        tag += f'_{args.decode_type}'
    if args.aug_type != 'color_crop_cutout':
        tag += f'_{args.aug_type}'

    tag += f'_lr{args.lr_img}'
    base = LR_IMG_BASE_SIZE.get(args.dataset, 32)
    r.force('lr_img', args.lr_img * (args.ipc / 10) * (args.size / base)**2,
            f'lr_img scaled by (ipc/10)*(size/{base})^2')
    if args.momentum != 0.9:
        tag += f'_mom{args.momentum}'
    if args.batch_real != 64:
        tag += f'_b_real{args.batch_real}'
    if args.batch_syn_max != 128:
        tag += f'_synmax{args.batch_syn_max}'
    tag += f'_{args.init}_ipc{args.ipc}'
    if args.nclass_sub > 0:
        tag += f'_{args.nclass_sub}'
    if args.phase >= 0:
        tag += f'_phase{args.phase}'
    return tag
