"""Vector quantization 向量量化: the discrete bottleneck of a VQ-regularised first stage.

The VQ layer of VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation
Learning", Sec. 3) as used by VQGAN and by latent diffusion's VQ autoencoders
(Rombach et al. 2022, Sec. 3.1 and Appendix G), in three steps:

1. the codebook 代码本: K learned vectors e_1 .. e_K of length C (= latent channels);
2. nearest-neighbour search 最近邻搜索: each latent vector z (one per position of the
   (B, C, H, W) feature map) finds k = argmin_j ||z - e_j||^2;
3. the mapping 映射: z is replaced by e_k, so nearby z's all become the same vector.

Step 3 has no useful gradient (argmin is piecewise constant), so the decoder's gradient is
copied straight through to the encoder (Bengio et al. 2013; VQ-VAE eq. 3), and two extra
terms train the codebook and keep the encoder close to it (VQ-VAE eq. 3):

    L_vq = ||sg[z] - e||^2 + beta * ||z - sg[e]||^2      (codebook term + beta * commitment)

Options that keep more of the codebook alive (a plain codebook often "collapses" onto a
few codes: VQGAN with 16,384 codes uses under 12% of them on ImageNet, VQGAN-LC paper):
- ema: codes are running means of the vectors assigned to them (VQ-VAE Appendix A.1,
  Razavi et al. 2019 "VQ-VAE-2"), with Laplace smoothing of the counts;
- restart_dead: a code unused for `dead_after` training calls is moved onto a random
  encoder output of the current batch (the "random restarts" of Dhariwal et al. 2020,
  "Jukebox"; Zeghidour et al. 2021, "SoundStream");
- l2_normalize: codes and z on the unit sphere, i.e. cosine similarity (Yu et al. 2022
  "Vector-quantized Image Modeling with Improved VQGAN", ViT-VQGAN).

The EMA statistics and the usage counters are buffers (saved in the state_dict) and change
only in training mode. Single process: under DDP the EMA sums would need an all-reduce.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


@dataclass
class QuantizerConfig:
    num_codes: int = 512  # K, the codebook size
    dim: int = 4  # length of each code = latent channels C
    beta: float = 0.25  # weight of the commitment term (VQ-VAE eq. 3; LDM uses 0.25)
    ema: bool = False  # codes as EMAs of their assigned vectors instead of gradient descent
    decay: float = 0.99  # EMA decay gamma (VQ-VAE Appendix A.1)
    eps: float = 1e-5  # Laplace smoothing of the EMA cluster counts
    restart_dead: bool = False  # move dead codes onto random encoder outputs of the batch
    dead_after: int = 100  # a code not picked in this many training calls is dead
    l2_normalize: bool = False  # codes and z on the unit sphere: cosine similarity (ViT-VQGAN)


@dataclass
class QuantizerOutput:
    z_q: Tensor  # (B, C, H, W) quantized latents, straight-through: z + (z_q - z).detach()
    loss: Tensor  # scalar: ||sg[z] - e||^2 (absent with EMA) + beta * ||z - sg[e]||^2
    indices: Tensor  # (B, H, W) int64 code per latent position
    perplexity: Tensor  # scalar: exp(entropy of the code histogram of this batch), in [1, K]
    usage: Tensor  # scalar: fraction of the K codes picked at least once in this batch
    restarted: int  # dead codes restarted in this call (0 unless training with restart_dead)


class VectorQuantizer(nn.Module):
    """Replace each latent vector by its nearest code (VQ-VAE, van den Oord et al. 2017).

    z (B, C, H, W) -> QuantizerOutput. Runs in float32 with autocast off: distances in
    bf16 would pick wrong neighbours. The codebook is initialised uniformly in
    [-1/K, 1/K], as taming-transformers does.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = c = config
        K, C = c.num_codes, c.dim
        self.codebook = nn.Parameter(torch.empty(K, C).uniform_(-1.0 / K, 1.0 / K))  # (K, C)
        if c.ema:
            self.codebook.requires_grad_(False)  # moved by the EMA, not by the optimiser
        # EMA state (VQ-VAE Appendix A.1): N_i (counts) and m_i (sums), e_i = m_i / N_i.
        # Started as if each code had been assigned one vector: itself (as Jukebox does),
        # so a code that is never picked stays where it is instead of being divided by ~0.
        self.register_buffer("cluster_size", torch.ones(K))  # (K,) N_i
        self.register_buffer("embed_sum", self.codebook.detach().clone())  # (K, C) m_i
        # usage bookkeeping, in training calls: `step` calls so far; last_used[i] the call
        # that last picked code i; born[i] the call that last (re)initialised it (-1: never)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.full((K,), -1, dtype=torch.long))
        self.register_buffer("born", torch.full((K,), -1, dtype=torch.long))

    def codes(self) -> Tensor:
        """The codebook as used for search and lookup: (K, C), unit rows if l2_normalize."""
        return F.normalize(self.codebook, dim=1) if self.config.l2_normalize else self.codebook

    def nearest(self, z_flat: Tensor) -> Tensor:
        """Nearest-neighbour search: (N, C) -> (N,) int64 argmin_j ||z - e_j||^2.

        ||z - e||^2 = ||z||^2 + ||e||^2 - 2 z.e: one (N, C) x (C, K) matmul instead of an
        (N, K, C) difference tensor. ||z||^2 does not change the argmin but is kept so that
        the expression is the true squared distance.
        """
        with torch.autocast(z_flat.device.type, enabled=False):
            z_flat = z_flat.float()
            if self.config.l2_normalize:
                z_flat = F.normalize(z_flat, dim=1)
            e = self.codes().float()  # (K, C)
            d = (z_flat.square().sum(1, keepdim=True) + e.square().sum(1)[None, :]
                 - 2 * z_flat @ e.T)  # (N, K)
            return d.argmin(dim=1)

    def lookup(self, indices: Tensor) -> Tensor:
        """The mapping 映射 from code indices to vectors: (B, H, W) -> (B, C, H, W)."""
        return self.codes()[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> QuantizerOutput:
        cfg = self.config
        B, C, H, W = z.shape
        if C != cfg.dim:
            raise ValueError(f"z has {C} channels but the codebook has dim={cfg.dim}")
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            if cfg.l2_normalize:
                z = F.normalize(z, dim=1)
            z_flat = z.permute(0, 2, 3, 1).reshape(-1, C)  # (N, C), N = B H W

            # 1-3. search the codebook and map each vector to its code
            idx = self.nearest(z_flat)  # (N,)
            e = self.codes()[idx]  # (N, C), differentiable w.r.t. the codebook

            # VQ-VAE eq. 3. beta weighs the COMMITMENT term, as in the paper. (taming's
            # VectorQuantizer2(legacy=True), used by VQGAN and LDM's code, puts beta on the
            # codebook term instead: beta ||sg[z] - e||^2 + ||z - sg[e]||^2. Not repeated here.)
            commitment = F.mse_loss(z_flat, e.detach())  # moves z only
            if cfg.ema:
                loss = cfg.beta * commitment  # the codebook moves by EMA, not by this loss
            else:
                codebook_loss = F.mse_loss(z_flat.detach(), e)  # moves the codes only
                loss = codebook_loss + cfg.beta * commitment

            # straight-through estimator: forward value e, gradient d z_q / d z = I
            z_q_flat = z_flat + (e - z_flat).detach()
            z_q = z_q_flat.view(B, H, W, C).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)

            counts = torch.bincount(idx, minlength=cfg.num_codes).float()  # (K,)
            p = counts / counts.sum()
            perplexity = torch.exp(-torch.special.xlogy(p, p).sum())
            usage = (counts > 0).float().mean()

            restarted = 0
            if self.training:
                with torch.no_grad():
                    self.last_used[counts > 0] = self.step
                    if cfg.ema:
                        self._ema_update(z_flat.detach(), idx, counts)
                    self.step += 1
                    if cfg.restart_dead:
                        restarted = self._restart_dead(z_flat.detach())
        return QuantizerOutput(z_q=z_q, loss=loss, indices=idx.view(B, H, W),
                               perplexity=perplexity, usage=usage, restarted=restarted)

    def _ema_update(self, z_flat: Tensor, idx: Tensor, counts: Tensor) -> None:
        """VQ-VAE Appendix A.1, eqs. 6-8, with Laplace-smoothed counts (as in Sonnet):

            N_i <- gamma N_i + (1 - gamma) n_i          n_i: vectors assigned to code i now
            m_i <- gamma m_i + (1 - gamma) sum_j z_ij
            e_i  = m_i / N~_i,   N~_i = (N_i + eps) / (n + K eps) * n,   n = sum_i N_i
        """
        cfg = self.config
        sums = torch.zeros_like(self.embed_sum).index_add_(0, idx, z_flat)  # (K, C)
        self.cluster_size.lerp_(counts, 1 - cfg.decay)
        self.embed_sum.lerp_(sums, 1 - cfg.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + cfg.eps) / (n + cfg.num_codes * cfg.eps) * n  # (K,)
        self.codebook.data.copy_(self.embed_sum / smoothed[:, None])

    def dead_codes(self) -> Tensor:
        """(K,) bool: codes neither picked nor (re)initialised in the last `dead_after`
        training calls (the ones since the call that last picked or restarted them)."""
        idle = self.step - 1 - torch.maximum(self.last_used, self.born)  # (K,)
        return idle >= self.config.dead_after

    def _restart_dead(self, z_flat: Tensor) -> int:
        """Move each dead code onto a random encoder output of this batch (Jukebox's random
        restarts): it lands where the data is, so the next search can pick it. Returns how many."""
        dead = self.dead_codes()  # (K,) bool
        num = int(dead.sum())
        if num == 0:
            return 0
        pick = torch.randint(len(z_flat), (num,), device=z_flat.device)
        new = z_flat[pick]  # (num, C)
        self.codebook.data[dead] = new
        self.embed_sum[dead] = new  # restart the EMA as one vector at the new code
        self.cluster_size[dead] = 1.0
        self.born[dead] = self.step - 1  # the call that just ran
        return num

    @torch.no_grad()
    def usage_fraction(self, window: int | None = None) -> float:
        """Fraction of the K codes picked in at least one of the last `window` training
        calls (default dead_after): the running counterpart of QuantizerOutput.usage."""
        window = self.config.dead_after if window is None else window
        recent = (self.last_used >= 0) & (self.last_used >= int(self.step) - window)
        return recent.float().mean().item()

    def extra_repr(self) -> str:
        c = self.config
        bits = math.log2(c.num_codes)
        return (f"num_codes={c.num_codes} ({bits:.1f} bits/position), dim={c.dim}, beta={c.beta}, "
                f"ema={c.ema}, restart_dead={c.restart_dead}, l2_normalize={c.l2_normalize}")
