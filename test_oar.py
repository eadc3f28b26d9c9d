"""Tests: seconds on a CPU, tiny shapes, data written by the tests themselves. Run: python -m pytest -q"""
import gzip
import math
import os
import shutil
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import oar
import vqgan

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
    oar.main(['train', '--out', out, '--order', 'any', '--steps', '40', *TINY])
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
    ds = oar.load_dataset(data, None)
    assert ds['train'].shape == (5, 1, 8, 8) and ds['test'].shape == (3, 1, 8, 8)
    assert ds['train'].dtype == torch.uint8 and ds['train_labels'].shape == (5,)
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(str(tmp_path / 'x.gz'), arr)
    assert np.array_equal(oar.read_idx(str(tmp_path / 'x.gz')), arr)
    with gzip.open(tmp_path / 'short.gz', 'wb') as f:
        f.write(bytes([0, 0, 8, 2]) + struct.pack('>2I', 10, 10) + b'\x00' * 7)
    with pytest.raises(oar.OARError, match='truncated'):
        oar.read_idx(str(tmp_path / 'short.gz'))


def test_image_folder_skips_corrupt_file(tmp_path, capsys):
    for cls, n in (('bags', 2), ('shoes', 2)):
        os.makedirs(tmp_path / cls)
        for i in range(n):
            Image.new('RGB', (40 + 10 * i, 30), (50 * i, 100, 200)).save(tmp_path / cls / f'{i}.png')
    (tmp_path / 'shoes' / 'broken.jpg').write_bytes(b'not a jpeg at all')
    ds = oar.load_dataset(str(tmp_path), 16)
    assert 'skipped 1 unreadable' in capsys.readouterr().out
    assert len(ds['train']) + len(ds['test']) == 4
    assert ds['train'].shape[1:] == (3, 16, 16) and ds['classes'] == ['bags', 'shoes']
    assert sorted(torch.cat([ds['train_labels'], ds['test_labels']]).tolist()) == [0, 0, 1, 1]


def test_tokenizer_roundtrip_exact_on_centroid_patches():
    torch.manual_seed(0)
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    tok = vqgan.KMeansTokenizer.fit(images, patch=2, codebook_size=16, seed=0)
    codes = torch.randint(0, 16, (5, 4, 4))
    again = tok.encode(tok.decode(codes))
    assert torch.equal(again, codes), f"{(again != codes).sum().item()} codes changed"
    state = vqgan.load_tokenizer(tok.state_dict())
    assert torch.equal(state.decode(codes), tok.decode(codes))


# ----------------------------------------------------------------------------- training, checkpoints, errors

def test_resume_equals_uninterrupted(tiny_run, tmp_path, monkeypatch):
    out = copy_run(tiny_run, tmp_path)
    args = ['train', '--out', out, '--order', 'any', '--steps', '6', '--save-every', '100', *TINY]
    oar.main(args + ['--ckpt', f'{out}/whole.pt'])
    real_lr = oar.lr_at

    def interrupt_at_3(step, a):  # Ctrl-C arrives during step 3
        if step == 3:
            raise KeyboardInterrupt
        return real_lr(step, a)
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
    err = run_error(['train', '--out', out, '--order', 'any', '--resume', *TINY, '--n-embd', '32'], capsys)
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


# ----------------------------------------------------------------------------- orders: extraction and sampling

def is_permutation(orders):
    return torch.equal(orders.sort(1).values, torch.arange(orders.shape[1]).expand_as(orders))


def test_orders_are_permutations_and_large_lam_is_local():
    model = tiny_model(H=4, W=4)
    codes = torch.randint(0, 11, (6, 16))
    for kw in (dict(teacher=codes, score='likelihood'), dict(teacher=codes, score='confidence'), dict()):
        _, order = oar.generate(model, 6, **kw)
        assert is_permutation(order)
        _, local = oar.generate(model, 6, lam=1e4, **kw)
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


def test_extraction_finds_the_predictable_position():
    """Position 5 always holds code 7, the rest is noise: extraction must place position 5 first."""
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (256, 9))
    codes[:, 5] = 7
    model = tiny_model(V=8).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(150):
        idx = torch.randint(0, 256, (64,), generator=g)
        loss = oar.order_loss(model, codes[idx], oar.random_orders(64, 9, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    _, order = oar.generate(model, 32, teacher=codes[:32], score='likelihood')
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
    extract = ['extract', '--out', out, '--n', '48', '--batch-size', '16', '--save-every', '1', '--eval-n', '16']
    with pytest.raises(SystemExit):
        oar.main(extract)
    assert torch.load(f'{out}/orders.pt', weights_only=True)['done'] == 16
    monkeypatch.setattr(oar, 'generate', real_generate)
    oar.main(extract)
    oar.main(extract + ['--orders', f'{out}/straight.pt'])
    resumed = torch.load(f'{out}/orders.pt', weights_only=True)
    straight = torch.load(f'{out}/straight.pt', weights_only=True)
    assert resumed['done'] == 48 and torch.equal(resumed['orders'], straight['orders'])
    assert is_permutation(resumed['orders'].long()) and is_permutation(resumed['test_orders'].long())
    assert '| extracted |' in capsys.readouterr().out

    # fine-tuning lowers the loss under the extracted orders
    data = oar.load_tokens(oar.build_parser().parse_args(['sample', '--out', out]))
    codes, orders = data['train'].flatten(1)[:48], resumed['orders'].long()
    before = oar.heldout_bits(oar.load_model(f'{out}/any.pt', data['meta'], 'cpu'), codes, 'extracted', orders=orders)
    oar.main(['finetune', '--out', out, '--steps', '60', '--lr', '3e-3', '--batch-size', '16', '--eval-n', '16',
              '--eval-every', '1000', '--warmup', '2'])
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


def test_mean_jump_of_raster_order():
    W = 7  # 6 unit steps per row, then a wrap of sqrt(6^2 + 1) to the next row
    want = (7 * 6 + 6 * math.sqrt(37)) / 48
    assert abs(oar.mean_jump(oar.raster_orders(1, 49), W) - want) < 1e-6
