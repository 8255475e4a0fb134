"""Device choice, made once per run and passed down (no hard-coded device anywhere else)."""
import contextlib

import torch

from misc.utils import UserError


def resolve_device(name='auto'):
    """'auto' picks cuda, then mps, then cpu; an explicit choice that is unavailable is a
    UserError (exit code 2 in the scripts)."""
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise UserError('--device cuda was asked for, but torch sees no CUDA device')
    if name == 'mps' and not (getattr(torch.backends, 'mps', None) is not None
                              and torch.backends.mps.is_available()):
        raise UserError('--device mps was asked for, but MPS is not available')
    return torch.device(name)


def autocast(device, enabled=False):
    """One context object for optional mixed precision: bf16 on CPU, fp16 on CUDA; off by
    default, since the paper's numbers are fp32."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == 'cuda' else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def setup_backends(device, tf32=False):
    """cuDNN autotuning (same math); TF32 only when asked, since it rounds fp32 products."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
