"""The official DANCE iteration (``Hansong-Zhang/DANCE``, ``DANCE.py``), ported to plain PyTorch for timing;
see ``benchmarks/bench_e2e.py``."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .common import C, _load_flat_plain, _plain_net_from_template

MEAN, STD = (0.286,), (0.353,)


def ref_decode(img, factor):
    """IDC's decode_zoom: pad to a multiple of factor (value 0.5), cut factor x factor tiles, resize each back."""
    h = img.shape[-1]
    rem = h % factor
    if rem:
        img = F.pad(img, (0, factor - rem, 0, factor - rem), value=0.5)
    s = math.ceil(h / factor)
    tiles = []
    for i in range(factor):
        for j in range(factor):
            tiles.append(img[:, :, i * s:(i + 1) * s, j * s:(j + 1) * s])
    return F.interpolate(torch.cat(tiles), size=(h, h), mode="bilinear", align_corners=False)


class DANCEPort:
    """The official DANCE iteration (module docstring) on its own copy of the stored images."""

    def __init__(self, d, tmpdir: str, seed: int = 1):
        cfg = d.config
        self.cfg = cfg
        self.dev = d.data.device
        self.mid = _plain_net_from_template(d.pool.template).train().to(self.dev)
        self.expert = _plain_net_from_template(d.pool.template).train().to(self.dev)
        for m in (self.mid, self.expert):
            m.requires_grad_(False)
        self.files = []
        for k in range(cfg.num_premodel):
            pair = []
            for kind, flat in (("init", d.pool.inits[k]), ("final", d.pool.finals[k])):
                _load_flat_plain(self.mid, flat)
                path = os.path.join(tmpdir, f"premodel{k}_{kind}.pth.tar")
                torch.save({n: t.clone() for n, t in self.mid.state_dict().items()}, path)
                pair.append(path)
            self.files.append(pair)
        self.data = d.data.detach().clone().requires_grad_(True)
        self.opt = torch.optim.SGD([self.data], lr=cfg.lr_img_resolved, momentum=cfg.mom_img)
        real, lab = d._real, d.train.labels
        self.real_by_class = [real[lab == c] for c in range(C)]
        self.mean = torch.tensor(MEAN, device=self.dev).view(1, -1, 1, 1)
        self.std = torch.tensor(STD, device=self.dev).view(1, -1, 1, 1)
        self.aug = d.aug
        self.g = torch.Generator().manual_seed(seed)

    def norm(self, x):
        return (x - self.mean) / self.std

    def load_models(self, k, lam):
        sd_init = torch.load(self.files[k][0], weights_only=True, map_location=self.dev)
        sd_final = torch.load(self.files[k][1], weights_only=True, map_location=self.dev)
        self.mid.load_state_dict({n: lam * sd_init[n] + (1 - lam) * sd_final[n] for n in sd_init})
        self.expert.load_state_dict(sd_final)

    def syn_class(self, c):
        ipc = self.cfg.ipc
        x = ref_decode(self.data[c * ipc:(c + 1) * ipc], self.cfg.factor)
        if x.shape[0] > self.cfg.batch_syn_max:
            x = x[torch.randperm(x.shape[0], generator=self.g)[:self.cfg.batch_syn_max]]
        return x

    def pltda(self, real, syn, seed):
        n = real.shape[0]
        x = self.aug(self.norm(torch.cat([real, syn])), seed)
        f = self.mid.embed(x)
        return ((f[:n].mean(0) - f[n:].mean(0)) ** 2).sum()

    def calib(self, syn, c, seed):
        out = self.expert(self.aug(self.norm(syn), seed))
        return F.cross_entropy(out, torch.full((syn.shape[0],), c, dtype=torch.long, device=self.dev))

    def _seed(self):
        return int(torch.randint(2 ** 62, (1,), generator=self.g))

    def iteration(self) -> float:
        cfg = self.cfg
        k = int(torch.randint(cfg.num_premodel, (1,), generator=self.g))
        lam = float(torch.rand(1, generator=self.g))
        self.load_models(k, lam)
        with torch.no_grad():
            self.data.clamp_(0.0, 1.0)
        total = 0.0
        for c in range(C):
            pool = self.real_by_class[c]
            real = pool[torch.randperm(pool.shape[0], generator=self.g)[:cfg.batch_real]]
            loss = self.pltda(real, self.syn_class(c), self._seed())
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            total += loss.item()
        for _ in range(cfg.iter_calib):
            for c in range(C):
                loss = self.calib(self.syn_class(c), c, self._seed())
                self.opt.zero_grad()
                loss.backward()
                self.opt.step()
                total += loss.item()
        return total
