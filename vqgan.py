"""
Tokenizers: images <-> grids of discrete codes (PAPER.md section 8).

- KMeansTokenizer: the small CPU tokenizer. Each p x p patch is replaced by the nearest of K centroids
  fitted with scipy's k-means (classic vector quantization). Fashion-MNIST 28 px, 4 x 4, K = 256 -> 7 x 7 codes.

Every tokenizer has the same interface, images in [-1, 1]:
    encode(images (B, C, H, W)) -> codes (B, h, w) int64, row-major grid
    decode(codes (B, h, w))     -> images (B, C, H, W)
"""
import hashlib

import numpy as np
import torch
import torch.nn.functional as F


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
        centroids, _ = kmeans2(sample, codebook_size, iter=iters, minit='++', seed=rng, missing='warn')
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
                    id=hashlib.sha1(self.codebook.numpy().tobytes()).hexdigest()[:12])

    def state_dict(self):
        return dict(kind=self.kind, codebook=self.codebook, patch=self.patch, channels=self.channels)


def _to_patches(images, p):
    """(B, C, H, W) -> (B, (H/p)*(W/p), C*p*p), patches in row-major order."""
    return F.unfold(images, p, stride=p).transpose(1, 2)


def load_tokenizer(state):
    """Rebuild a tokenizer from what `state_dict()` saved."""
    if state.get('kind') == 'kmeans':
        return KMeansTokenizer(state['codebook'], state['patch'], state['channels'])
    raise ValueError(f"unknown tokenizer kind {state.get('kind')!r}")
