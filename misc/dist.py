"""torch.distributed for condensation under torchrun; every helper is a no-op in one process.

    torchrun --standalone --nproc_per_node 4 condense.py ...

`init_distributed` joins the process group torchrun describes in its environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): nccl with one GPU per process on CUDA, gloo on
the CPU. A plain `python condense.py` initializes nothing, and then get_rank() is 0,
get_world_size() is 1 and the helpers below return at once (misc.utils answers the queries).

Two timeouts (seconds, from the environment):
- IDC_DIST_TIMEOUT (default 300): how long a collective of the condensation loop waits for the
  other ranks. A rank that dies closes its connections, so the others stop at once with gloo;
  one that hangs (or dies under nccl) stops them when this runs out.
- IDC_DIST_WAIT_TIMEOUT (default 86400): how long ranks wait for work rank 0 does alone
  (evaluations, writing files) and for each other after loading the data. These waits use a
  separate gloo group, so a long evaluation never trips the short timeout.
A failed collective becomes a UserError naming the rank and what it was doing; the last
checkpoint (written atomically by rank 0) stays valid for --resume.
"""
import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from misc.device import resolve_device
from misc.utils import UserError, get_rank, get_world_size, is_dist

TIMEOUT_ENV, WAIT_TIMEOUT_ENV = 'IDC_DIST_TIMEOUT', 'IDC_DIST_WAIT_TIMEOUT'
_WAIT_GROUP = None  # gloo group with the long timeout (see the module docstring)


def launched():
    """True when torchrun (or anything setting RANK and WORLD_SIZE) started this process as one
    of several."""
    return 'RANK' in os.environ and int(os.environ.get('WORLD_SIZE', '1')) > 1


def _seconds(name, default):
    value = os.environ.get(name, '')
    try:
        seconds = float(value) if value else default
    except ValueError:
        raise UserError(f'{name}={value!r}: expected a number of seconds') from None
    if seconds <= 0:
        raise UserError(f'{name}={value!r}: expected a positive number of seconds')
    return datetime.timedelta(seconds=seconds)


def init_distributed(device_pref='auto'):
    """The device of this process; joins torchrun's process group when launched by it.

    Under torchrun: CUDA (when --device is auto or cuda and CUDA is there) gives device
    cuda:LOCAL_RANK and the nccl backend; otherwise the CPU and gloo (mps cannot run
    distributed). Without torchrun: resolve_device(device_pref) and no process group.
    """
    if not launched():
        return resolve_device(device_pref)
    global _WAIT_GROUP
    if device_pref == 'mps':
        raise UserError('--device mps cannot run under torchrun; use --device cpu or cuda')
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    use_cuda = device_pref in ('auto', 'cuda') and torch.cuda.is_available()
    if device_pref == 'cuda' and not use_cuda:
        raise UserError('--device cuda was asked for, but torch sees no CUDA device')
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(f'LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} '
                            f'GPU(s) here: start at most that many processes per node')
        torch.cuda.set_device(local_rank)
        device, backend = torch.device('cuda', local_rank), 'nccl'
    else:
        device, backend = torch.device('cpu'), 'gloo'
    timeout, wait_timeout = _seconds(TIMEOUT_ENV, 300), _seconds(WAIT_TIMEOUT_ENV, 86400)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    try:
        dist.init_process_group(backend, timeout=timeout,
                                device_id=device if use_cuda else None)
        _WAIT_GROUP = dist.new_group(backend='gloo', timeout=wait_timeout)
    except RuntimeError as e:
        raise UserError(f"rank {os.environ['RANK']}: could not join the process group at "
                        f'{where} ({backend}): {_first_line(e)}') from e
    return device


def backend():
    """The process group's backend ('nccl', 'gloo'), or None in one process."""
    return dist.get_backend() if is_dist() else None


def cleanup():
    """Leave the process group (after a run that ended normally)."""
    global _WAIT_GROUP
    if is_dist():
        dist.destroy_process_group()
    _WAIT_GROUP = None


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


@contextlib.contextmanager
def _collective(what):
    """Turn a failed collective (a rank died, or timed out) into a clear UserError."""
    try:
        yield
    except RuntimeError as e:
        raise UserError(f'rank {get_rank()} lost contact with the other ranks during {what} '
                        f'(a rank died or stopped responding? see its log); the last checkpoint '
                        f'stays valid: rerun the same command with --resume. '
                        f'[{_first_line(e)}]') from e


# ---------------------------------------------------------------------------------------------
# Collectives (all no-ops in one process)


def my_share(items):
    """This rank's items of a list shared out round-robin: items[rank::world]."""
    return list(items)[get_rank()::get_world_size()]


def _flat_groups(tensors):
    """Tensors grouped by (device, dtype), in order: one flat buffer per group."""
    groups = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups.values()


def all_reduce_sum_(tensors, what='a collective'):
    """Replace each tensor by its sum over the ranks, in place (one collective per dtype)."""
    if not is_dist():
        return
    for group in _flat_groups(tensors):
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        with _collective(what):
            dist.all_reduce(flat)
        _unflatten_into(flat, group)


def broadcast_(tensors, what='a broadcast'):
    """Copy rank 0's values of the tensors into every rank's, in place."""
    if not is_dist():
        return
    for group in _flat_groups(tensors):
        flat = torch.cat([t.detach().reshape(-1) for t in group])
        with _collective(what):
            dist.broadcast(flat, src=0)
        _unflatten_into(flat, group)


def _unflatten_into(flat, group):
    offset = 0
    with torch.no_grad():
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_module(model, what='sharing the fresh network'):
    """Every rank takes rank 0's parameters and buffers (robust even if RNG streams differ)."""
    broadcast_([*model.parameters(), *model.buffers()], what)


def broadcast_object(obj, what='sharing rank 0 state'):
    """Rank 0's obj (any picklable), returned on every rank. Uses the long-timeout group."""
    if not is_dist():
        return obj
    box = [obj if get_rank() == 0 else None]
    with _collective(what):
        dist.broadcast_object_list(box, src=0, group=_WAIT_GROUP)
    return box[0]


def all_gather_object(obj, what='gathering state'):
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] in one process."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    with _collective(what):
        dist.all_gather_object(out, obj, group=_WAIT_GROUP)
    return out


def barrier(what='waiting for the other ranks'):
    """Wait for every rank, with the long timeout (e.g. while rank 0 evaluates)."""
    if not is_dist():
        return
    with _collective(what):
        dist.barrier(group=_WAIT_GROUP)


# ---------------------------------------------------------------------------------------------
# Data-parallel training with an unmodified training loop


def shard(n):
    """(rows, weight): this rank's rows of a batch of n rows that every rank drew, and the
    weight of its mean-loss gradient in the whole batch's (None, 1.0 in one process).

    Rows rank, rank + world, ... (weight rows/n). A batch with fewer rows than ranks gives rank r
    row r % n, and each of the ranks sharing a row the weight 1 / (n * sharers), so that no rank
    trains on an empty batch and the weighted sum is still the batch mean."""
    rank, world = get_rank(), get_world_size()
    if world == 1:
        return None, 1.0
    if n >= world:
        rows = torch.arange(rank, n, world)
        return rows, len(rows) / n
    j = rank % n
    return torch.tensor([j]), 1.0 / (n * len(range(j, world, n)))


class DataParallel:
    """Every rank trains the same network on its share of each batch; the optimizer's step then
    uses the whole batch's gradient (the ranks' gradients, weighted by their shares, summed with
    one all_reduce), so the weights stay identical on every rank. In one process: the batches
    as they are, and the optimizer untouched.

        with DataParallel(optimizer) as dp:
            train_epoch(model, dp.batches(batches), optimizer, ...)

    All ranks must draw the same batches (the same sampler stream). Batch norm statistics are
    per rank (as DistributedDataParallel without SyncBatchNorm); augmentation draws are each
    rank's own.
    """

    def __init__(self, optimizer, what='the network update'):
        self.optimizer, self.what = optimizer, what
        self.weight, self._hook = 1.0, None

    def __enter__(self):
        if is_dist():
            self._hook = self.optimizer.register_step_pre_hook(self._average)
        return self

    def __exit__(self, *exc):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return False

    def batches(self, batches):
        for x, y in batches:
            rows, self.weight = shard(len(y))
            if rows is None:
                yield x, y
            else:
                yield x[rows.to(x.device)], y[rows.to(y.device)]

    def _average(self, optimizer, args, kwargs):
        # The same parameters have gradients on every rank (same network, same code path).
        grads = [p.grad for g in optimizer.param_groups for p in g['params']
                 if p.grad is not None]
        for g in grads:
            g.mul_(self.weight)
        all_reduce_sum_(grads, self.what)
