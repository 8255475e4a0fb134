"""Small shared helpers: seeding, meters, accuracy, CutMix, logging, atomic files, safe loading,
and distributed queries that degrade to a single process."""
import datetime
import json
import math
import os
import random
import re
import signal
import sys
import uuid
import warnings

import numpy as np
import torch
import torch.nn.functional as F


class UserError(Exception):
    """A problem the user can fix (bad path, wrong file). Scripts turn it into exit code 2."""


# ---------------------------------------------------------------------------------------------
# Seeding and distributed queries


def set_seed(seed):
    """Seed python, numpy and torch (torch.manual_seed also seeds every CUDA/MPS device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy only takes 32-bit seeds
    torch.manual_seed(seed)


def is_dist():
    """True when torch.distributed is available and a process group is initialized."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank():
    return torch.distributed.get_rank() if is_dist() else 0


def get_world_size():
    return torch.distributed.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


# ---------------------------------------------------------------------------------------------
# Metrics


def accuracy(output, target, topk=(1,)):
    """Top-k accuracies in percent (python floats) of logits `output` (N, K) for `target` (N,).

    k larger than the number of classes counts every sample as correct (instead of failing).
    """
    n = max(target.shape[0], 1)
    return [c * 100.0 / n for c in topk_correct(output, target, topk).tolist()]


def topk_correct(output, target, topk=(1,)):
    """How many samples have their target among the top k logits, for each k: one float tensor
    on output's device, so that a training loop can sum it without waiting for the GPU."""
    maxk = min(max(topk), output.shape[1])
    _, pred = output.topk(maxk, 1, True, True)  # (N, maxk)
    correct = pred.eq(target.reshape(-1, 1))  # (N, maxk)
    return torch.stack([correct[:, :min(k, maxk)].any(1).sum() for k in topk]).float()


def to_device(t, device):
    """A CPU tensor (random draws, indices) on `device` without making the host wait for the
    GPU: a plain copy from pageable memory synchronises with the stream, once per class and per
    augmentation draw in the matching. CUDA copies go through pinned memory, non-blocking (torch's
    pinned-memory cache keeps the buffer until the copy is done)."""
    device = torch.device(device)
    if device.type == 'cuda' and t.device.type == 'cpu':
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---------------------------------------------------------------------------------------------
# CutMix


def _gen_device(generator):
    return generator.device if generator is not None else 'cpu'


def rand_bbox(size, lam, generator=None):
    """CutMix box for a batch of `size` (N, C, H, W): side ratio sqrt(1 - lam), centre uniform,
    clipped to the image. Returns python ints (bbx1, bby1, bbx2, bby2): bbx along dim 2, bby
    along dim 3 (the original's naming)."""
    W, H = size[2], size[3]
    cut_rat = math.sqrt(1.0 - lam)
    cut_w, cut_h = int(W * cut_rat), int(H * cut_rat)
    device = _gen_device(generator)
    cx = int(torch.randint(W, (1,), generator=generator, device=device).item())
    cy = int(torch.randint(H, (1,), generator=generator, device=device).item())
    bbx1, bbx2 = min(max(cx - cut_w // 2, 0), W), min(max(cx + cut_w // 2, 0), W)
    bby1, bby2 = min(max(cy - cut_h // 2, 0), H), min(max(cy + cut_h // 2, 0), H)
    return bbx1, bby1, bbx2, bby2


def _sample_beta(beta, generator=None):
    # torch's Beta/Gamma samplers take no generator, so seed a numpy sampler from the torch
    # stream: the draw then follows `generator` (or the global torch seed) like everything else.
    seed = torch.randint(2**62, (1,), generator=generator, device=_gen_device(generator)).item()
    return float(np.random.default_rng(seed).beta(beta, beta))


def cutmix(input, target, beta, generator=None):
    """CutMix a batch with a random permutation of itself.

    Returns (mixed_input, target_a, target_b, lam): the loss is
    lam * CE(out, target_a) + (1 - lam) * CE(out, target_b), lam being the kept-area fraction.
    The input is not modified in place.
    """
    lam = _sample_beta(beta, generator)
    perm = torch.randperm(input.shape[0], generator=generator, device=_gen_device(generator))
    perm = to_device(perm, input.device)
    bbx1, bby1, bbx2, bby2 = rand_bbox(input.shape, lam, generator)
    mixed = input.clone()
    mixed[:, :, bbx1:bbx2, bby1:bby2] = input[perm, :, bbx1:bbx2, bby1:bby2]
    lam = 1.0 - (bbx2 - bbx1) * (bby2 - bby1) / (input.shape[-1] * input.shape[-2])
    return mixed, target, target[perm], lam


# ---------------------------------------------------------------------------------------------
# Atomic files: write to a temporary file in the same folder, then os.replace, so a reader (or a
# resumed run) never sees a half-written file.


def _tmp_path(folder, name):
    """A fresh temporary name in `folder` for a file to become `name`; it records the writing
    process, so that remove_stale_tmp can tell a dead writer's leftover from a live write."""
    return os.path.join(folder, f'.{name}.{os.getpid()}.{uuid.uuid4().hex}.tmp')


_TMP_NAME = re.compile(r'^\..+\.(\d+)\.[0-9a-f]{32}\.tmp$')  # what _tmp_path makes


def _atomic_write(path, write, mode='wb'):
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = _tmp_path(folder, os.path.basename(path))
    try:
        with open(tmp, mode.replace('w', 'x')) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def remove_stale_tmp(folder, log=None):
    """Delete the temporary files of _atomic_write in `folder` whose writing process is gone (a
    run killed while writing, e.g. with SIGKILL, leaves one; a checkpoint's can be large).
    Says so through `log` (a Logger) when it removed any; returns their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TMP_NAME.match(name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    if removed and log is not None:
        log(f'removed {len(removed)} unfinished temporary file(s) of a killed run: '
            f'{removed[0]} ...')
    return removed


def refuse_overwrite(folder, ckpt_name, resumed=''):
    """UserError when `folder` holds a run's checkpoint `ckpt_name`: a run started afresh there
    would overwrite that work. `resumed`: what --resume then does, if worth saying."""
    if os.path.isfile(os.path.join(folder, ckpt_name)):
        raise UserError(f'{folder} already holds a run ({ckpt_name}); starting afresh would '
                        f'overwrite it. Add --resume to continue it{resumed}, or give another '
                        f'--save_dir (or delete the folder) to start a new one')


def atomic_save(obj, path):
    """torch.save(obj, path), atomically."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path, text):
    _atomic_write(path, lambda f: f.write(text), mode='w')


def atomic_write_json(path, obj, indent=2):
    atomic_write_text(path, json.dumps(_to_json(obj), indent=indent, allow_nan=False) + '\n')


def save_img(path, img, unnormalize=None, max_num=200, size=None, nrow=10):
    """Save up to `max_num` images (N, C, H, W) as one PNG grid.

    unnormalize: (mean, std) to undo a normalization, or None for images already in [0, 1].
    size: images wider than `size` are resized (nearest, as the original) to size x size.
    """
    from torchvision.utils import save_image  # only needed here; keeps `import misc.utils` light

    img = img[:max_num].detach().to('cpu', torch.float32)
    if unnormalize is not None:
        mean, std = unnormalize
        img = img * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    img = img.clamp(0.0, 1.0)
    if size is not None and img.shape[-1] > size:
        img = F.interpolate(img, size=size)
    _atomic_write(path, lambda f: save_image(img, f, nrow=nrow, format='png'))


def _load_error_reason(e):
    """The informative sentence of a torch.load error (its messages run to a screenful)."""
    text = ' '.join(str(e).split())
    marker = 'WeightsUnpickler error:'  # weights_only refusals explain themselves after this
    if marker in text:
        text = text.split(marker, 1)[1].strip()
    text = text.split(' Check the documentation')[0].split('. ')[0][:200] or 'file ends early'
    return f'{type(e).__name__}: {text}'


def safe_load(path, what='file'):
    """torch.load restricted to tensors and plain containers; any failure is a UserError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: not found (expected {what})")
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of foreign files just before refusing them
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed globals, ...
        raise UserError(f"{path}: cannot be read as {what}; expected a complete torch file "
                        f"holding only tensors and plain containers ({_load_error_reason(e)})"
                        ) from e


# ---------------------------------------------------------------------------------------------
# Logging


def _to_json(obj):
    """Convert tensors, numpy values and paths to JSON types; non-finite floats become null."""
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return _to_json(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)  # paths, devices, ...


class Logger:
    """Readable lines to stdout and save_dir/log.txt; JSON records to save_dir/metrics.jsonl.

    save_dir=None logs to stdout only. enabled=False (non-zero distributed ranks) logs nothing.
    Files are appended to, so a resumed run keeps its earlier history. defer=True writes
    nothing to disk until open(): lines logged before are kept and written then, so a run
    refused for bad input (a UserError before open()) leaves no folder or file behind.
    """

    def __init__(self, save_dir=None, enabled=True, defer=False):
        self.enabled = enabled
        self.save_dir = None if save_dir is None else os.fspath(save_dir)
        self._pending = []
        if not defer:
            self.open()

    def open(self):
        """Create save_dir and write what was logged so far; a folder that cannot be written
        is a UserError."""
        pending, self._pending = self._pending, None
        if pending is None or not self.enabled or self.save_dir is None:
            return
        try:
            ensure_writable_dir(self.save_dir)
            for name, text in pending:
                self._append(name, text)
        except OSError as e:
            raise UserError(f'cannot write the output folder {self.save_dir} '
                            f'({e.strerror or e}); choose another one with --save_dir') from e

    def _append(self, name, text):
        if self.save_dir is None:
            return
        if self._pending is not None:
            self._pending.append((name, text))
            return
        with open(os.path.join(self.save_dir, name), 'a') as f:
            f.write(text)

    def __call__(self, msg='', end='\n'):
        if not self.enabled:
            return
        print(msg, end=end, file=sys.stdout, flush=True)
        # a progress line (end != '\n') is kept on the same line in the file, as the original
        self._append('log.txt', f'{msg}\n' if end == '\n' else f'{msg} ')

    def json(self, record):
        """Append one JSON object (with a 'time' stamp) as a line of metrics.jsonl."""
        if not self.enabled:
            return
        stamped = {'time': datetime.datetime.now().isoformat(timespec='seconds'), **record}
        self._append('metrics.jsonl', json.dumps(_to_json(stamped), allow_nan=False) + '\n')


def ensure_writable_dir(path):
    """Create the folder `path` (and its parents) and check a file can be created in it;
    raises OSError otherwise (e.g. a file in the way, a read-only mount)."""
    os.makedirs(path, exist_ok=True)
    probe = _tmp_path(path, 'write_test')  # a kill right here leaves what remove_stale_tmp clears
    with open(probe, 'w'):
        pass
    os.remove(probe)


class Stopped(BaseException):
    """Raised in the main process by SIGTERM (the default signal of kill, of torchrun stopping
    the other ranks when one fails, and of batch schedulers) while run_main runs."""


def _sigterm_raises():
    """Make SIGTERM raise Stopped in this process, so that run_main says what was stopped and
    how to continue, and exits 143; returns a function restoring the previous handlers. A
    forked child inherits the handler: there it takes the default action, as before (DataLoader
    workers install their own)."""
    if not hasattr(signal, 'SIGTERM'):
        return lambda: None
    owner, child_handler = os.getpid(), []

    def handler(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if hasattr(signal, 'SIGCHLD'):
            # A scheduler signals the DataLoader workers too, and they die at once; their deaths
            # would raise DataLoader's "worker killed" error while the loaders are shut down.
            child_handler.append(signal.signal(signal.SIGCHLD, signal.SIG_DFL))
        raise Stopped()

    def restore():
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        if child_handler and child_handler[0] is not None:
            signal.signal(signal.SIGCHLD, child_handler[0])

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return lambda: None
    return restore


def run_main(main, args, interrupted=''):
    """Run a script's main(args): a UserError becomes one `error: ...` line on stderr and exit
    code 2 (prefixed with the rank under torchrun); Ctrl-C one line, `interrupted` followed by
    the text `interrupted` (e.g. how to resume), and exit code 130; SIGTERM the same with
    `stopped by SIGTERM` and exit code 143. Files are written atomically, so a stop leaves the
    last complete ones in place."""
    restore = _sigterm_raises()
    try:
        return main(args)
    except KeyboardInterrupt:
        print(f'\ninterrupted{interrupted}', file=sys.stderr, flush=True)
        sys.exit(130)
    except Stopped:
        if get_world_size() > 1:
            why = (f'rank {get_rank()}: stopped by SIGTERM (torchrun stops every rank when one '
                   f'fails; its summary names that rank)')
        else:
            why = 'stopped by SIGTERM'
        print(f'\n{why}{interrupted}', file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGTERM)
    except UserError as e:
        msg = str(e)
        if get_world_size() > 1 and not msg.startswith('rank '):
            msg = f'rank {get_rank()}: {msg}'
        print(f'error: {msg}', file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        restore()
