"""Device choice, made once per run and passed down (no hard-coded device anywhere else), and
the process-wide settings that make it fast."""
import contextlib
import ctypes
import ctypes.util
import sys

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


def cpu_has_native_bf16():
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX). Elsewhere oneDNN
    emulates it, and bf16 autocast is slower than fp32."""
    probes = [getattr(torch.cpu, name, None)
              for name in ('_is_avx512_bf16_supported', '_is_amx_tile_supported')]
    return any(probe() for probe in probes if probe is not None)


def slow_amp_warning(device, amp):
    """The line a script logs when --amp would make it slower: bf16 autocast on a CPU
    without bf16 instructions (on a 2-core Xeon with AVX-512 but no BF16, the benchmark's
    inner step took 15.7 s against 4.4 in fp32 and the 1000-epoch evaluation 500 s against
    125). None when there is nothing to say."""
    if not amp or device.type != 'cpu' or cpu_has_native_bf16():
        return None
    return ('Warning: --amp on this CPU: it has no bf16 instructions (AVX512-BF16 or AMX), so '
            'bf16 is emulated and runs about 3 to 4 times slower than fp32; leave --amp off here')


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def tune_cpu_allocator():
    """Keep freed CPU tensor memory in the process instead of returning it to the system.

    glibc serves every block above its mmap threshold (at most 32 MiB by default) with a fresh
    mmap and unmaps it on free, so each activation of a batch of 64 images at 32 x 32 x 128
    (32 MiB) costs page faults on every use: on a 2-core machine more than a third of a
    condensation step was spent in the kernel. Raising the mmap and trim thresholds to 1 GiB
    lets such blocks be reused from the heap. The math is unchanged. Only glibc (Linux) has
    mallopt; elsewhere this does nothing. Returns True when the setting was applied.
    """
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))


def setup_backends(device, tf32=False, allocator=True, cuda_graphs='auto'):
    """Process-wide speed settings that keep the math: the CPU allocator (tensors are made on
    the CPU on every device; allocator=False leaves the C library's default, as the benchmark's
    reference does), cuDNN autotuning; TF32 only when asked, since it rounds fp32 products.
    Also the check that --cuda_graphs on has a CUDA device (a UserError before any file is
    written)."""
    if cuda_graphs == 'on' and device.type != 'cuda':
        raise UserError(f'--cuda_graphs on needs a CUDA device, and this run uses {device}; '
                        f'leave --cuda_graphs at auto (CUDA only) or choose --device cuda')
    if allocator:
        tune_cpu_allocator()
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


# ---------------------------------------------------------------- torch.compile with a way out
COMPILE_MIN_STEPS = 1000  # --compile auto: runs this long repay tens of seconds of compilation

_COMPILED = {}  # key -> torch.compile'd function, or None once its compilation failed
_COMPILED_OK = set()  # keys whose compiled function has run


def want_compile(mode, device, steps, what='matching'):
    """--compile on/off, or auto: on for work of at least COMPILE_MIN_STEPS steps (inner steps
    of condensation, optimizer steps of training). auto compiles the matching (`what`
    'matching') on the CPU and CUDA, and training steps ('training') on the CPU only: on an H200
    the compiled training step of ConvNet-3 was slower than the eager one (a network update on
    500 images 57 against 36 ms, an evaluation epoch on 40 images 6.7 against 4.8 ms), where
    the GPU waits on the host either way. inductor's MPS support is young."""
    if mode == 'auto':
        devices = ('cpu', 'cuda') if what == 'matching' else ('cpu', )
        return device.type in devices and steps >= COMPILE_MIN_STEPS
    return mode == 'on'


def want_graphs(mode, device, amp=False):
    """--cuda_graphs on/off, or auto: on for CUDA without --amp (autocast's cast cache cannot
    live in a graph; argument.py rejects on with --amp)."""
    if mode == 'auto':
        return device.type == 'cuda' and not amp
    return mode == 'on'


def compiled(key, build):
    """Register torch.compile(build()) under `key`, once per process: the compiled function
    takes the parameters as inputs, so every network of the same architecture shares it."""
    if key not in _COMPILED:
        try:
            _COMPILED[key] = torch.compile(build(), dynamic=False)
        except Exception as e:  # noqa: BLE001 -- e.g. a Python version dynamo does not support
            _COMPILED[key] = _raiser(e)  # reported by the first call_compiled
    return key


def _raiser(error):
    def fn(*args):
        raise error
    return fn


def call_compiled(key, args, log, memory_format=torch.contiguous_format):
    """The compiled function of `key` applied to args, or None when there is none or its
    compilation failed (a missing C++ compiler, an unsupported operation): the caller then
    computes the same thing eagerly. A failure is said once through `log`.

    Tensor arguments are passed with the standard strides of `memory_format` (4-D tensors) and
    never aliased: compiled code is specialised to both, and augmentation outputs vary in them
    (a 1-channel batch may come out with channel stride 1 or H*W), which would otherwise
    compile again and again."""
    fn = _COMPILED.get(key)
    if fn is None:
        return None
    seen = set()
    args = tuple(_plain(a, seen, memory_format) for a in args)
    if key in _COMPILED_OK:
        return fn(*args)
    try:  # the first call compiles
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 -- whatever broke the compiler, go on eagerly
        _COMPILED[key] = None
        log(f'warning: torch.compile failed ({error_summary(e)}); continuing without '
            f'compilation (--compile off skips the attempt)')
        return None
    _COMPILED_OK.add(key)
    return out


def error_summary(e):
    """'Type: first line of the message' (at most 300 characters of it), for a one-line
    warning about a failed speed-up."""
    lines = str(e).strip().splitlines()
    return f'{type(e).__name__}: {lines[0][:300] if lines else ""}'


def _plain(a, seen, fmt):
    """A tensor with the standard strides of `fmt` (4-D) or of a contiguous tensor, copied when
    it has other strides or was already passed (`seen`); dicts of tensors element by element."""
    if isinstance(a, dict):
        return {k: _plain(v, seen, fmt) for k, v in a.items()}
    if not isinstance(a, torch.Tensor):
        return a
    a = a.clone() if id(a) in seen else standard_layout(a, fmt if a.dim() == 4 else
                                                          torch.contiguous_format)
    seen.add(id(a))
    return a


def standard_layout(x, memory_format=torch.contiguous_format):
    """x with the strides a new tensor of `memory_format` has (a copy only where they differ).

    `contiguous()` is not enough: it accepts any stride on a dimension of size 1, so a
    1-channel batch with channel stride 1 passes, and convolutions and norms then run it as
    channels_last.
    """
    if x.stride() != torch.empty(x.shape, device='meta', memory_format=memory_format).stride():
        x = x.clone(memory_format=memory_format)
    return x
