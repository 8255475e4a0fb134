import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from misc import utils
from misc.utils import (Logger, UserError, accuracy, atomic_save, atomic_write_json,
                        atomic_write_text, cutmix, rand_bbox, safe_load, save_img, set_seed)


class Opaque:
    """A custom class: pickling it is exactly what weights_only loading must refuse."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_set_seed_reproducible():
    draws = []
    for _ in range(2):
        set_seed(0)  # seed 0 is a valid seed
        draws.append((random.random(), np.random.rand(), torch.rand(1).item()))
    assert draws[0] == draws[1]
    set_seed(1)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) != draws[0]


def test_distributed_defaults():
    assert not utils.is_dist()
    assert utils.get_rank() == 0 and utils.get_world_size() == 1 and utils.is_main_process()


def test_accuracy_hand_made():
    output = torch.tensor([[0.9, 0.1, 0.0],   # top1 0, top2 {0,1}
                           [0.2, 0.7, 0.1],   # top1 1, top2 {1,0}
                           [0.5, 0.1, 0.4],   # top1 0, top2 {0,2}
                           [0.1, 0.3, 0.6]])  # top1 2, top2 {2,1}
    target = torch.tensor([0, 0, 2, 0])
    top1, top2, top5 = accuracy(output, target, topk=(1, 2, 5))
    assert isinstance(top1, float)
    assert top1 == pytest.approx(25.0)
    assert top2 == pytest.approx(75.0)
    assert top5 == pytest.approx(100.0)  # k beyond the class count: every sample counts


@pytest.mark.parametrize('lam', [0.5, 0.75, 0.9, 0.99])
def test_rand_bbox_inside_and_area(lam):
    size = (4, 3, 100, 100)
    g = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(300):
        x1, y1, x2, y2 = rand_bbox(size, lam, generator=g)
        assert 0 <= x1 <= x2 <= 100 and 0 <= y1 <= y2 <= 100
        areas.append((x2 - x1) * (y2 - y1) / 100**2)
    # clipping at the border only shrinks the box; a centre far enough inside keeps it whole
    side = int(100 * (1 - lam) ** 0.5) // 2 * 2  # unclipped box side
    assert max(areas) == pytest.approx(side**2 / 100**2)
    assert max(areas) == pytest.approx(1 - lam, abs=0.03)


def test_rand_bbox_seeded():
    a = rand_bbox((1, 1, 32, 32), 0.5, torch.Generator().manual_seed(7))
    b = rand_bbox((1, 1, 32, 32), 0.5, torch.Generator().manual_seed(7))
    assert a == b and all(isinstance(v, int) for v in a)


def test_cutmix():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 1, 16, 16).contiguous()
    target = torch.arange(4)
    mixed, ta, tb, lam = cutmix(x, target, beta=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[:, 0, 0, 0], torch.arange(4.0))  # input untouched
    assert torch.equal(ta, target)
    # every pixel of sample i comes from sample i or its partner tb[i]; lam is the kept fraction
    for i in range(4):
        kept = (mixed[i] == i).float().mean().item()
        assert ((mixed[i] == i) | (mixed[i] == tb[i].item())).all()
        if tb[i] != i:
            assert kept == pytest.approx(lam)
    assert 0.0 <= lam <= 1.0


def test_atomic_save_roundtrip(tmp_path):
    path = tmp_path / 'sub' / 'data.pt'
    atomic_save([torch.ones(2), torch.zeros(3, dtype=torch.long)], path)
    data = safe_load(path, what='condensed data')
    assert torch.equal(data[0], torch.ones(2))
    assert os.listdir(path.parent) == ['data.pt']


def test_atomic_save_never_partial(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    atomic_save({'it': 1}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b'half a checkpoint')  # some bytes reach the disk, then the writer dies
        raise RuntimeError('disk full')

    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(RuntimeError, match='disk full'):
        atomic_save({'it': 2}, path)
    assert path.read_bytes() == before  # the old file is intact
    assert os.listdir(tmp_path) == ['ckpt.pt']  # and no temporary file is left behind


def test_atomic_text_and_json(tmp_path):
    atomic_write_text(tmp_path / 'a.txt', 'hello\n')
    assert (tmp_path / 'a.txt').read_text() == 'hello\n'
    atomic_write_json(tmp_path / 'a.json', {'x': torch.tensor(2.5), 'y': [1, 2], 'z': float('nan')})
    assert json.loads((tmp_path / 'a.json').read_text()) == {'x': 2.5, 'y': [1, 2], 'z': None}


def test_safe_load_missing(tmp_path):
    path = tmp_path / 'nothing.pt'
    with pytest.raises(UserError, match='nothing.pt.*condensed data'):
        safe_load(path, what='condensed data')


def test_safe_load_truncated(tmp_path):
    path = tmp_path / 'data.pt'
    torch.save([torch.randn(64, 3, 8, 8), torch.arange(64)], path)
    blob = path.read_bytes()
    path.write_bytes(blob[:len(blob) // 2])
    with pytest.raises(UserError, match='data.pt'):
        safe_load(path, what='condensed data')


def test_safe_load_foreign_object(tmp_path):
    path = tmp_path / 'evil.pt'
    torch.save(Opaque(), path)  # torch format, but holds a custom class
    with pytest.raises(UserError, match='evil.pt'):
        safe_load(path)
    raw = tmp_path / 'raw.pkl'
    raw.write_bytes(pickle.dumps(Opaque()))  # a plain pickle, not a torch file
    with pytest.raises(UserError, match='raw.pkl'):
        safe_load(raw)


def test_logger_files(tmp_path, capsys):
    log = Logger(tmp_path / 'run')
    log('first line')
    log.json({'epoch': 1, 'acc': torch.tensor(55.5), 'loss': np.float32(0.25), 'bad': float('inf')})
    log.json({'epoch': 2, 'acc': 60.0})
    assert 'first line' in capsys.readouterr().out
    assert (tmp_path / 'run' / 'log.txt').read_text() == 'first line\n'
    lines = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r['epoch'] for r in records] == [1, 2]
    assert records[0]['acc'] == pytest.approx(55.5) and records[0]['bad'] is None
    assert all('time' in r for r in records)


def test_logger_stdout_only_and_disabled(tmp_path, capsys):
    Logger(None)('to stdout')
    Logger(None).json({'a': 1})  # no file to write: silently ignored
    assert 'to stdout' in capsys.readouterr().out
    quiet = Logger(tmp_path / 'rank1', enabled=False)
    quiet('nothing')
    quiet.json({'a': 1})
    assert capsys.readouterr().out == ''
    assert not (tmp_path / 'rank1').exists()


def test_deferred_logger_writes_only_once_opened(tmp_path, capsys):
    log = Logger(tmp_path / 'run', defer=True)
    log('checking the input')
    log.json({'event': 'start'})
    assert 'checking the input' in capsys.readouterr().out  # printed at once
    assert not (tmp_path / 'run').exists()  # a refusal here would leave nothing behind
    log.open()
    log('training')
    assert (tmp_path / 'run' / 'log.txt').read_text() == 'checking the input\ntraining\n'
    assert json.loads((tmp_path / 'run' / 'metrics.jsonl').read_text())['event'] == 'start'


def test_logger_in_a_folder_that_cannot_be_made(tmp_path):
    (tmp_path / 'afile').write_text('a file where the folder should be')
    for target in (tmp_path / 'afile', tmp_path / 'afile' / 'sub'):
        with pytest.raises(UserError, match='cannot write the output folder.*--save_dir'):
            Logger(target)


def test_stale_temporary_files_of_killed_writers_are_removed(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f'.checkpoint.pt.{dead}.{"a" * 32}.tmp'
    mine = tmp_path / f'.data.pt.{os.getpid()}.{"b" * 32}.tmp'  # a write in progress
    other = tmp_path / '.notes.tmp'
    for f in (stale, mine, other):
        f.write_bytes(b'x')
    assert utils.remove_stale_tmp(tmp_path) == [stale.name]
    assert sorted(os.listdir(tmp_path)) == sorted([mine.name, other.name])


def test_save_img(tmp_path):
    from PIL import Image
    path = tmp_path / 'img.png'
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    img = torch.randn(30, 3, 64, 64)  # normalized space, outside [0, 1] once unnormalized
    save_img(path, img, unnormalize=(mean, std), max_num=20, size=32, nrow=10)
    with Image.open(path) as im:
        # 2 rows x 10 columns of 32 px tiles with torchvision's 2 px padding
        assert im.size == (10 * 34 + 2, 2 * 34 + 2)
    assert os.listdir(tmp_path) == ['img.png']


# ---------------------------------------------------------------- SIGTERM
posix_signals = pytest.mark.skipif(not hasattr(signal, 'SIGTERM') or sys.platform == 'win32',
                                   reason='POSIX signals')


def _terminated(_args):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)  # the handler raises before this ends
    return 'not stopped'


@posix_signals
def test_sigterm_exits_143_with_the_hint_and_restores_the_handlers(capsys):
    def on_child(signum, frame):  # as DataLoader installs one
        pass

    before = signal.getsignal(signal.SIGTERM)
    before_child = signal.signal(signal.SIGCHLD, on_child)
    try:
        t0 = time.time()
        with pytest.raises(SystemExit) as e:
            utils.run_main(_terminated, None, interrupted=': rerun with --resume')
        assert time.time() - t0 < 10
        assert e.value.code == 143
        assert capsys.readouterr().err.strip() == 'stopped by SIGTERM: rerun with --resume'
        assert signal.getsignal(signal.SIGTERM) == before
        assert signal.getsignal(signal.SIGCHLD) is on_child
    finally:
        signal.signal(signal.SIGCHLD, before_child)


@posix_signals
def test_sigterm_names_the_rank_under_torchrun(monkeypatch, capsys):
    monkeypatch.setattr(utils, 'get_world_size', lambda: 2)
    monkeypatch.setattr(utils, 'get_rank', lambda: 1)
    with pytest.raises(SystemExit) as e:
        utils.run_main(_terminated, None)
    assert e.value.code == 143
    assert capsys.readouterr().err.strip().startswith('rank 1: stopped by SIGTERM (torchrun')


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs fork')
def test_a_forked_child_still_dies_of_sigterm_quietly(capfd):
    """A forked child inherits the handler: it must end as before, not run the script's exit
    path."""
    def main(_args):
        pid = os.fork()
        if pid == 0:  # the child
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            finally:
                os._exit(0)
        return os.waitpid(pid, 0)[1]

    status = utils.run_main(main, None)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
    assert 'SIGTERM' not in capfd.readouterr().err


@pytest.mark.skipif(not hasattr(os, 'killpg'), reason='POSIX process groups')
def test_sigterm_to_the_job_stops_dataloader_workers_without_traceback(tmp_path):
    """A scheduler's SIGTERM reaches the main process and its DataLoader workers together: one
    line, exit 143, no traceback."""
    script = tmp_path / 'job.py'
    script.write_text(f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
import torch
from torch.utils.data import DataLoader, Dataset
from misc.utils import run_main

class Slow(Dataset):
    def __len__(self):
        return 10 ** 6

    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.zeros(3)

def main(_):
    for i, _x in enumerate(DataLoader(Slow(), batch_size=4, num_workers=2)):
        if i == 5:
            print('running', flush=True)
        time.sleep(0.02)

run_main(main, None, interrupted=': resume')
""")
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    assert p.stdout.readline().strip() == 'running'
    os.killpg(p.pid, signal.SIGTERM)  # every process of the job, as schedulers do
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert err.strip() == 'stopped by SIGTERM: resume'
