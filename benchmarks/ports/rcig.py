"""The official RCIG meta-step (``yolky/RCIG``, ``algorithms.py``, JAX), ported to PyTorch for timing; see
``benchmarks/bench_e2e.py``."""
from __future__ import annotations

from typing import Optional

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import FlatParamNet, PlainConvNet

MEAN, STD = (0.286,), (0.353,)


class RCIGPort:
    """RCIG's ``do_meta_train_step`` + online pool step (module docstring), ported from the JAX reference."""

    def __init__(self, d, seed: int = 1):
        cfg = d.config
        self.cfg = cfg
        widths = [m.out_channels for m in d.model.modules() if isinstance(m, nn.Conv2d)]
        self.dev = d.images.device
        self.plain = PlainConvNet(widths, norm="none", act="softplus", beta=cfg.softplus_beta).to(self.dev)
        self.plain.requires_grad_(False)
        self.net = FlatParamNet(PlainConvNet(widths, norm="none", act="softplus", beta=cfg.softplus_beta).to(self.dev))
        self.names = [n for n, _ in self.plain.named_parameters()]
        self.shapes = [p.shape for p in self.plain.parameters()]
        self.sizes = [p.numel() for p in self.plain.parameters()]
        self.tangent = [n for n in self.names if n != "classifier.weight"]
        self.images = d.images.detach().clone()
        self.labels = d.labels.detach().clone()
        self.log_temp = d.log_temp.detach().clone()
        self.state = {}  # AdaBelief moments
        self.ema = [torch.zeros_like(self.images), torch.zeros_like(self.labels), torch.zeros_like(self.log_temp)]
        self.ema_count = 0
        self.pool = d.pool_params.clone()
        self.pool_m, self.pool_v = d.pool_m.clone(), d.pool_v.clone()
        self.pool_t = d.pool_t.clone()
        self.pool_it = d.pool_it.clone()
        self.inner_lr = d.inner_lr
        self.hinv_lr = cfg.hinv_lr_init
        self.ridge = cfg.l2_rate * self.images.shape[0]
        self.real = d.train.images
        self.real_labels = d.train.labels
        self.mean = torch.tensor(MEAN, device=self.dev).view(1, -1, 1, 1)
        self.std = torch.tensor(STD, device=self.dev).view(1, -1, 1, 1)
        self.g = torch.Generator().manual_seed(seed)

    # -- the linearised network: jvp of the network at theta0 along psi (primal features, dual logits) --
    def params_of(self, flat):
        return {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def lin(self, params, psi, x):
        from torch.func import functional_call, jvp

        frozen = {"classifier.weight": params["classifier.weight"]}
        prim = {n: params[n] for n in self.tangent}
        tang = {n: t.view(self.shapes[self.names.index(n)]) for n, t in
                zip(self.tangent, psi.split([self.sizes[self.names.index(n)] for n in self.tangent]))}

        def f(p):
            return functional_call(self.plain, {**frozen, **p}, (x,), {"both": True}, strict=False)

        (feat, _), (_, u) = jvp(f, (prim,), (tang,))
        return feat, u

    def inner_loss(self, psi, params, xs, ys):
        feat, u = self.lin(params, psi, xs)
        n, c = ys.shape
        K = feat @ feat.T
        R = ys - u
        alpha = torch.linalg.solve(K + self.ridge * torch.eye(n, device=K.device), R)
        fit = R - K @ alpha
        val = 0.5 * (fit ** 2).sum() + 0.5 * self.ridge * ((alpha * (K @ alpha)).sum() + (psi ** 2).sum())
        return val / (n * c)

    def outer_loss(self, psi, params, xs, ys, tau, real_x, real_y):
        feat_s, u_s = self.lin(params, psi, xs)
        feat_t, u_t = self.lin(params, psi, real_x)
        n = xs.shape[0]
        K = feat_s @ feat_s.T
        alpha = torch.linalg.solve(K + self.ridge * torch.eye(n, device=K.device), ys - u_s)
        pred = u_t + (feat_t @ feat_s.T) @ alpha
        ce = F.cross_entropy(pred * tau.exp(), real_y)
        top = ys.topk(2, dim=1).values
        margin = torch.clamp(top[:, 0] - top[:, 1], max=1.0 / (2 * ys.shape[1])).mean()
        return ce - margin

    @staticmethod
    def adam(fn, x0, lr, steps, b1=0.9, b2=0.999, eps=1e-8):
        x = x0.clone()
        m, v = torch.zeros_like(x), torch.zeros_like(x)
        for t in range(1, steps + 1):
            g = fn(x)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            x = x - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        return x

    def meta(self, flat, images, labels, log_temp, real_x, real_y):
        cfg = self.cfg
        params = {n: t.detach() for n, t in self.params_of(flat).items()}
        P_psi = sum(self.sizes[self.names.index(n)] for n in self.tangent)
        xs_d, ys_d = images.detach(), labels.detach()

        def inner_grad(psi):
            psi = psi.detach().requires_grad_(True)
            with torch.enable_grad():
                val = self.inner_loss(psi, params, xs_d, ys_d)
                return torch.autograd.grad(val, psi)[0]

        psi = self.adam(inner_grad, torch.zeros(P_psi, device=self.dev), self.inner_lr, cfg.n_inner_steps)
        # outer loss, g_psi and the direct gradient
        x = images.detach().clone().requires_grad_(True)
        y = labels.detach().clone().requires_grad_(True)
        tau = log_temp.detach().clone().requires_grad_(True)
        p = psi.detach().requires_grad_(True)
        loss = self.outer_loss(p, params, x, y, tau, real_x, real_y)
        g_psi, d_x, d_y, d_tau = torch.autograd.grad(loss, [p, x, y, tau])
        # v = H^-1 g_psi: Adam on 1/2 v^T H v - g^T v, H v forward-over-reverse
        grad_fn = torch.func.grad(lambda q: self.inner_loss(q, params, xs_d, ys_d))
        psi_star = psi.detach()

        def quad_grad(v):
            _, hv = torch.func.jvp(grad_fn, (psi_star,), (v,))
            return hv - g_psi

        v = self.adam(quad_grad, torch.zeros_like(g_psi), self.hinv_lr, cfg.n_hinv_steps)
        # implicit gradient -d/dS [v . grad_psi L_in(psi*, S)]
        p = psi_star.clone().requires_grad_(True)
        x2 = images.detach().clone().requires_grad_(True)
        y2 = labels.detach().clone().requires_grad_(True)
        gin = torch.autograd.grad(self.inner_loss(p, params, x2, y2), p, create_graph=True)[0]
        i_x, i_y = torch.autograd.grad((gin * v).sum(), [x2, y2])
        i_x, i_y = -i_x, -i_y

        def clip(i, dd):
            ni, nd = i.norm(), dd.norm()
            return i * (nd / ni) if ni > nd else i

        return float(loss), d_x + clip(i_x, d_x), d_y + clip(i_y, d_y), d_tau, d_x

    def adabelief(self, tensors, grads, lrs, b1=0.9, b2=0.999, eps=1e-16, eps_root=1e-16):
        out = []
        for i, (p, g, lr) in enumerate(zip(tensors, grads, lrs)):
            st = self.state.setdefault(i, {"t": 0, "m": torch.zeros_like(p), "s": torch.zeros_like(p)})
            st["t"] += 1
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["s"] = b2 * st["s"] + (1 - b2) * (g - st["m"]) ** 2 + eps_root
            mh = st["m"] / (1 - b1 ** st["t"])
            sh = st["s"] / (1 - b2 ** st["t"])
            out.append(p - lr * mh / (sh.sqrt() + eps))
        return out

    def pool_train(self, k, steps):
        cfg = self.cfg
        x, y = self.images, self.labels
        p, m, v, t = self.pool[k].clone(), self.pool_m[k].clone(), self.pool_v[k].clone(), int(self.pool_t[k])
        for _ in range(steps):
            w = p.detach().requires_grad_(True)
            loss = 0.5 * ((self.net(w, x) - y) ** 2).mean()
            g = torch.autograd.grad(loss, w)[0]
            t += 1
            m = 0.9 * m + 0.1 * g
            v = 0.999 * v + 0.001 * g * g
            p = p - cfg.pool_lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
        self.pool[k], self.pool_m[k], self.pool_v[k], self.pool_t[k] = p, m, v, t
        self.pool_it[k] += steps

    def iteration(self, n_pool: Optional[int] = None) -> float:
        cfg = self.cfg
        k = int(torch.randint(cfg.pool_model_count, (1,), generator=self.g))
        sel = torch.randperm(self.real.shape[0], generator=self.g)[:cfg.real_batch_size]
        real_x = (self.real[sel] - self.mean) / self.std
        real_y = self.real_labels[sel]
        loss, gx, gy, gt, _ = self.meta(self.pool[k], self.images, self.labels, self.log_temp, real_x, real_y)
        self.images, self.labels, self.log_temp = self.adabelief(
            [self.images, self.labels, self.log_temp], [gx, gy, gt], [cfg.proto_lr, cfg.proto_lr, cfg.temp_lr])
        dcy = cfg.ema_decay
        self.ema = [dcy * h + (1 - dcy) * p for h, p in zip(self.ema, (self.images, self.labels, self.log_temp))]
        self.ema_count += 1
        if n_pool is None:
            n_pool = int(torch.randint(1, cfg.n_max_steps_pool, (1,), generator=self.g))
        self.pool_train(k, n_pool)
        if int(self.pool_it[k]) >= cfg.max_online_steps:
            self.pool[k] = torch.cat([(torch.randn(s, generator=self.g) / math.sqrt(max(1, s[1:].numel()))).reshape(-1)
                                      if len(s) > 1 else torch.zeros(s).reshape(-1) for s in self.shapes]).to(self.dev)
            self.pool_m[k].zero_()
            self.pool_v[k].zero_()
            self.pool_t[k] = 0
            self.pool_it[k] = 0
        return loss
