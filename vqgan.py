"""
Tokenizers: images <-> grids of discrete codes.

- KMeansTokenizer: the small CPU tokenizer. Each p x p patch is replaced by the nearest of K centroids
  fitted with scipy's k-means (classic vector quantization). Fashion-MNIST 28 px, 4 x 4, K = 256 -> 7 x 7 codes.
- VQGAN: the public taming-transformers VQ-GAN (Esser, Rombach, Ommer, 2021), inference only, in plain
  PyTorch, with taming's module names so that its published checkpoint loads with strict=True; read with
  torch.load(weights_only=True), Lightning classes replaced by inert stand-ins, anything else refused.

Every tokenizer has the same interface, images in [-1, 1]:
    encode(images (B, C, H, W)) -> codes (B, h, w) int64, row-major grid
    decode(codes (B, h, w))     -> images (B, C, H, W)
"""
import hashlib
import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- the k-means patch tokenizer (CPU)

class KMeansTokenizer:
    kind = 'kmeans'

    def __init__(self, codebook, patch, channels):
        self.codebook = codebook.float()  # (K, C*p*p) centroids, pixel values in [-1, 1]
        self.patch = patch                # p: side of a square patch in pixels
        self.channels = channels          # C: 1 for grey, 3 for RGB

    @classmethod
    def fit(cls, images, patch=4, codebook_size=256, n_patches=200_000, seed=0, iters=20):
        """Fit the K centroids on a seeded random sample of patches of `images` (N, C, H, W) in [-1, 1]."""
        from scipy.cluster.vq import kmeans2
        patches = _to_patches(images, patch).reshape(-1, images.shape[1] * patch * patch)  # (N*h*w, C*p*p)
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(patches), size=min(n_patches, len(patches)), replace=False)
        sample = patches[torch.from_numpy(pick)].double().numpy()
        start = _kmeans_pp(sample, codebook_size, rng)
        centroids, _ = kmeans2(sample, start, iter=iters, minit='matrix', missing='warn')
        return cls(torch.from_numpy(centroids), patch, images.shape[1])

    @torch.no_grad()
    def encode(self, images, batch=1024):
        """(B, C, H, W) in [-1, 1] -> (B, H/p, W/p) int64: index of the nearest centroid of each patch."""
        B, C, H, W = images.shape
        out = []
        for i in range(0, B, batch):
            x = _to_patches(images[i:i + batch].float(), self.patch)  # (b, h*w, C*p*p)
            # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; ||x||^2 is the same for every c, so it is left out
            d = (self.codebook ** 2).sum(1) - 2 * x @ self.codebook.T  # (b, h*w, K)
            out.append(d.argmin(-1))
        return torch.cat(out).view(B, H // self.patch, W // self.patch)

    @torch.no_grad()
    def decode(self, codes):
        """(B, h, w) int64 -> (B, C, h*p, w*p): every code replaced by its centroid patch."""
        B, h, w = codes.shape
        p, C = self.patch, self.channels
        x = self.codebook[codes.reshape(B, h * w)]  # (B, h*w, C*p*p)
        return F.fold(x.transpose(1, 2), (h * p, w * p), p, stride=p).view(B, C, h * p, w * p)

    def describe(self):
        """What a token cache made with this tokenizer must agree with."""
        return dict(kind=self.kind, patch=self.patch, codebook_size=len(self.codebook), channels=self.channels,
                    id=codebook_id(self.codebook))

    def record(self):
        """What the tokenizer file of a run holds: everything needed to rebuild it."""
        return dict(kind=self.kind, codebook=self.codebook, patch=self.patch, channels=self.channels)


def _kmeans_pp(data, k, rng):
    """k-means++ seeding (Arthur and Vassilvitskii 2007) of k rows of data (n, d): each next centre
    drawn with probability proportional to the squared distance to the nearest centre so far. The
    same draws from rng as scipy's kmeans2(minit='++'), so the same centres, but the nearest distance
    is kept as it goes (n d k work) instead of recomputed against every centre (n d k^2 / 2: 70 of
    the 85 s of fitting 256 codes)."""
    from scipy.spatial.distance import cdist
    centres = np.empty((k, data.shape[1]))
    centres[0] = data[rng.integers(len(data))]
    nearest = np.full(len(data), np.inf)
    for i in range(1, k):
        nearest = np.minimum(nearest, cdist(centres[i - 1:i], data, metric='sqeuclidean')[0])
        cumulative = (nearest / nearest.sum()).cumsum()
        centres[i] = data[int(np.searchsorted(cumulative, rng.uniform()))]
    return centres


def _to_patches(images, p):
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p), patches in row-major order."""
    return F.unfold(images, p, stride=p).transpose(1, 2)


def codebook_id(codebook):
    """A short fingerprint of a codebook: token caches, checkpoints and orders carry it."""
    return hashlib.sha1(codebook.detach().float().cpu().numpy().tobytes()).hexdigest()[:12]


def load_tokenizer(record, device='cpu'):
    """Rebuild a tokenizer from what its `record()` saved."""
    if record.get('kind') == 'kmeans':
        return KMeansTokenizer(record['codebook'], record['patch'], record['channels'])
    if record.get('kind') == 'vqgan':
        return load_vqgan(record['ckpt'], device)
    raise ValueError(f"unknown tokenizer kind {record.get('kind')!r}")

# ----------------------------------------------------------------------------- the public taming VQ-GAN

@dataclass
class VQGANConfig:
    ch: int = 128                      # channels after the first conv; level i has ch * ch_mult[i]
    ch_mult: tuple = (1, 1, 2, 2, 4)   # one entry per resolution level; len - 1 halvings, so f = 16
    num_res_blocks: int = 2            # ResNet blocks per level in the encoder (the decoder has one more)
    attn_resolutions: tuple = (16,)    # feature-map sides (with a `resolution` input) that get self-attention
    resolution: int = 256              # training image side; only used to place the attention levels
    in_channels: int = 3               # RGB in
    out_ch: int = 3                    # RGB out
    z_channels: int = 256              # channels of the encoder output / decoder input
    embed_dim: int = 256               # dimension of one codebook entry
    n_embed: int = 1024                # codebook size: the vocabulary of the code grid


def swish(x):
    return x * torch.sigmoid(x)


def group_norm(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm -> swish -> conv, twice, plus a skip; a 1x1 conv `nin_shortcut` matches channels when they change."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))  # taming has dropout(p=0) here: nothing at inference
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map, with 1x1 convs as projections."""

    def __init__(self, ch):
        super().__init__()
        self.norm = group_norm(ch)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(ch, ch, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).reshape(B, C, H * W)                  # (B, C, HW)
        v = self.v(h).reshape(B, C, H * W)                  # (B, C, HW)
        att = F.softmax((q @ k) * C ** -0.5, dim=2)         # (B, HW query, HW key)
        h = (v @ att.transpose(1, 2)).reshape(B, C, H, W)   # each query position: weighted mean of values
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        # taming pads right and bottom only, so that (H, W) -> (H/2, W/2) exactly with a 3x3 stride-2 conv
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


def _level(blocks, attns, resample_name=None, resample=None):
    """A bare container, so that names read `down.<i>.block.<j>`, `down.<i>.attn.<j>`, `down.<i>.downsample`."""
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    if resample is not None:
        setattr(level, resample_name, resample)
    return level


def _run_level(level, h):
    for j, block in enumerate(level.block):  # each ResNet block is followed by its attention, if the level has any
        h = block(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


def _middle(ch):
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(ch, ch), AttnBlock(ch), ResnetBlock(ch, ch)
    return mid


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        n_levels = len(c.ch_mult)
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        ch_in, res = c.ch, c.resolution
        for i in range(n_levels):
            ch_out = c.ch * c.ch_mult[i]
            blocks = [ResnetBlock(ch_in if j == 0 else ch_out, ch_out) for j in range(c.num_res_blocks)]
            attns = [AttnBlock(ch_out) for _ in blocks] if res in c.attn_resolutions else []
            last = i == n_levels - 1
            self.down.append(_level(blocks, attns, 'downsample', None if last else Downsample(ch_out)))
            ch_in, res = ch_out, res if last else res // 2
        self.mid = _middle(ch_in)
        self.norm_out = group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, c.z_channels, 3, padding=1)  # taming's double_z=False

    def forward(self, x):                      # (B, 3, H, W)
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, 'downsample'):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        n_levels = len(c.ch_mult)
        ch_in, res = c.ch * c.ch_mult[-1], c.resolution // 2 ** (n_levels - 1)
        self.conv_in = nn.Conv2d(c.z_channels, ch_in, 3, padding=1)
        self.mid = _middle(ch_in)
        # Built from the coarsest level up, but indexed by level like the encoder: up[i] works at the
        # resolution of down[i], so names such as `decoder.up.4.attn.0` match taming's checkpoint.
        levels = []
        for i in reversed(range(n_levels)):
            ch_out = c.ch * c.ch_mult[i]
            blocks = [ResnetBlock(ch_in if j == 0 else ch_out, ch_out) for j in range(c.num_res_blocks + 1)]
            attns = [AttnBlock(ch_out) for _ in blocks] if res in c.attn_resolutions else []
            levels.insert(0, _level(blocks, attns, 'upsample', Upsample(ch_out) if i != 0 else None))
            ch_in, res = ch_out, res * 2 if i != 0 else res
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(ch_in)
        self.conv_out = nn.Conv2d(ch_in, c.out_ch, 3, padding=1)

    def forward(self, z):                      # (B, z_channels, h, w)
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):        # coarsest level first
            h = _run_level(level, h)
            if hasattr(level, 'upsample'):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, out_ch, h*f, w*f), no tanh


class Codebook(nn.Module):
    """taming's VectorQuantizer at inference: nearest entry by squared L2 distance, and lookup."""

    def __init__(self, n_embed, embed_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest(self, z):                      # (B, D, h, w) -> (B, h, w) int64
        B, D, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*h*w, D), row-major over the grid
        e = self.embedding.weight                 # (K, D)
        # ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e, written out as taming does, so argmin ties break alike
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()  # (B*h*w, K)
        return d.argmin(1).view(B, h, w)

    def lookup(self, codes):                   # (B, h, w) int64 -> (B, D, h, w)
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class VQGAN(nn.Module):
    kind = 'vqgan'

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.ckpt = None  # the file it was loaded from: the tokenizer record points to it
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = Codebook(config.n_embed, config.embed_dim)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def downsample_factor(self):
        return 2 ** (len(self.config.ch_mult) - 1)

    def describe(self):
        """What a token cache made with this tokenizer must agree with (same keys as KMeansTokenizer's)."""
        return dict(kind=self.kind, patch=self.downsample_factor, codebook_size=self.config.n_embed,
                    channels=self.config.in_channels, id=codebook_id(self.quantize.embedding.weight))

    def record(self):
        """The tokenizer file points to the checkpoint rather than copying its weights."""
        return dict(kind=self.kind, ckpt=self.ckpt)

    @torch.no_grad()
    def encode(self, images):
        """(B, 3, H, W) in [-1, 1] -> (B, H/f, W/f) int64 codes."""
        f, w = self.downsample_factor, self.quant_conv.weight
        if images.dim() != 4 or images.shape[-1] % f or images.shape[-2] % f:
            raise ValueError(f"VQ-GAN encode wants images (B, C, H, W) with H and W multiples of {f}, "
                             f"got {tuple(images.shape)}")
        z = self.quant_conv(self.encoder(images.to(device=w.device, dtype=w.dtype)))  # (B, D, H/f, W/f)
        return self.quantize.nearest(z)

    @torch.no_grad()
    def decode(self, codes):
        """(B, h, w) int64 codes -> (B, 3, h*f, w*f) images clamped to [-1, 1]."""
        n = self.config.n_embed
        if codes.dim() != 3 or codes.numel() and (codes.min() < 0 or codes.max() >= n):
            raise ValueError(f"VQ-GAN decode wants codes (B, h, w) in [0, {n}), got shape {tuple(codes.shape)}")
        z_q = self.quantize.lookup(codes.to(self.quant_conv.weight.device).long())  # (B, D, h, w)
        return self.decoder(self.post_quant_conv(z_q)).clamp(-1, 1)


def config_from_state_dict(sd, resolution=256):
    """Read the architecture off a taming VQ-GAN state dict. The image resolution is not in the weights:
    attention levels are stored as levels, and turned into `attn_resolutions` relative to `resolution`."""
    def indices(prefix):  # distinct integers i in keys `<prefix><i>.`
        return sorted({int(k[len(prefix):].split('.')[0]) for k in sd if k.startswith(prefix)})

    n_embed, embed_dim = sd['quantize.embedding.weight'].shape
    ch, in_channels = sd['encoder.conv_in.weight'].shape[:2]
    levels = indices('encoder.down.')
    ch_mult = tuple(sd[f'encoder.down.{i}.block.0.conv1.weight'].shape[0] // ch for i in levels)
    attn_levels = [i for i in levels if f'encoder.down.{i}.attn.0.norm.weight' in sd]
    return VQGANConfig(ch=ch, ch_mult=ch_mult, num_res_blocks=len(indices('encoder.down.0.block.')),
                       attn_resolutions=tuple(resolution // 2 ** i for i in attn_levels), resolution=resolution,
                       in_channels=in_channels, out_ch=sd['decoder.conv_out.weight'].shape[0],
                       z_channels=sd['encoder.conv_out.weight'].shape[0], embed_dim=embed_dim, n_embed=n_embed)


WEIGHTS_HELP = ("the public weights are `last.ckpt` of vqgan_imagenet_f16_1024, published by the "
                "taming-transformers authors and linked from the README of "
                "https://github.com/CompVis/taming-transformers")


class _LightningStandIn:
    """Inert placeholder for a pytorch_lightning class named in a .ckpt (e.g. the ModelCheckpoint class used
    as a key of 'callbacks'): building one only stores what the pickle hands it, no Lightning code runs."""

    def __new__(cls, *args, **kwargs):
        self = super().__new__(cls)
        self.args = args
        return self

    def __setstate__(self, state):
        self.state = state


def _read_checkpoint(path):
    """torch.load(weights_only=True), with stand-ins allow-listed for Lightning globals and nothing else."""
    try:
        with open(path, 'rb') as fh:
            is_zip = fh.read(4) == b'PK\x03\x04'  # torch.save's format since torch 1.6 is a zip archive
    except FileNotFoundError:
        raise FileNotFoundError(f"no VQ-GAN checkpoint at {path}: {WEIGHTS_HELP}") from None
    try:  # list the globals the pickle names without running it (only possible on the zip format)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path) if is_zip else []
    except Exception as e:
        raise ValueError(f"refused {path}: not a torch.save checkpoint ({e})") from None
    lightning = [g for g in unsafe if g.startswith(('pytorch_lightning.', 'lightning.'))]
    others = sorted(set(unsafe) - set(lightning))
    if others:
        raise ValueError(f"refused {path}: its pickle names {', '.join(others)}, which could run code on load; "
                         f"only tensors, plain containers and Lightning bookkeeping are accepted")
    stand_ins = [(type(g.rsplit('.', 1)[1], (_LightningStandIn,), {'__module__': g.rsplit('.', 1)[0]}), g)
                 for g in lightning]  # one class per name, so two Lightning keys of a dict stay distinct
    try:
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # UnpicklingError for a refused global, other errors for a file that is no checkpoint
        lines = str(e).strip().splitlines() or ['']
        reason = next((line for line in lines if 'GLOBAL' in line), lines[0]).strip().split('. ')[0][:300]
        if isinstance(e, pickle.UnpicklingError):
            raise ValueError(f"refused {path}: torch.load(weights_only=True) would not unpickle it: {reason}") from None
        raise ValueError(f"refused {path}: not a torch checkpoint ({type(e).__name__}: {reason})") from None


def load_vqgan(path, device='cpu'):
    """A taming VQ-GAN from a Lightning .ckpt or a plain state dict (.pt/.pth), every key and shape checked."""
    ckpt = _read_checkpoint(path)
    sd = ckpt['state_dict'] if isinstance(ckpt, dict) and 'state_dict' in ckpt else ckpt
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no state dict of tensors (nor a dict with one under 'state_dict')")
    sd = {k: v for k, v in sd.items() if not k.startswith('loss.')}  # the training-only LPIPS + discriminator
    try:
        config = config_from_state_dict(sd)
    except KeyError as e:
        raise ValueError(f"{path} is not a taming VQ-GAN state dict: it has no {e} tensor") from None
    with torch.device('meta'):  # no memory, no random init: every tensor will come from the checkpoint
        model = VQGAN(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} (checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k])})"
             for k in expected if k in sd and sd[k].shape != expected[k]]
    if missing or unexpected or wrong:
        def few(names):
            return ', '.join(names[:8]) + (f' and {len(names) - 8} more' if len(names) > 8 else '') or 'none'
        raise ValueError(f"{path} does not fit the VQ-GAN it describes: missing {few(missing)}; "
                         f"unexpected {few(unexpected)}; wrong shape {few(wrong)}")
    model.load_state_dict(sd, strict=True, assign=True)  # assign: take the checkpoint's tensors as parameters
    model.ckpt = os.path.abspath(path)
    return model.to(device).eval()
