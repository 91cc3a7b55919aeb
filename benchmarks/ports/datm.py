"""The official DATM / MTT iteration (``NUS-HPC-AI-Lab/DATM``, ``distill/DATM.py``) and its TESLA variant
(``distill/DATM_tesla.py``), ported to plain PyTorch for timing; see ``benchmarks/bench_e2e.py``."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from .common import FlatParamNet, _plain_net_from_template


class DATMPort:
    """The official DATM / TESLA iteration (module docstring) on its own copies of the learnables."""

    def __init__(self, d, mode: str, seed: int = 1):
        cfg = d.config
        self.mode = mode
        self.cfg = cfg
        self.dev = d.image_syn.device
        self.net = FlatParamNet(_plain_net_from_template(d._template).to(self.dev))
        self.net.net.train()
        sizes = self.net.numels
        # the replay buffer as the official code stores it: per expert, per epoch, a list of parameter tensors
        ex = d.experts
        self.buffer = [[list(t.clone() for t in ex.snapshot(k, e).split(sizes)) for e in range(ex.num_epochs + 1)]
                       for k in range(ex.num_experts)]
        self.image_syn = d.image_syn.detach().clone().requires_grad_(True)
        self.label_syn = d.label_syn.detach().clone().requires_grad_(True)
        self.syn_lr = d.syn_lr.detach().clone().requires_grad_(True)
        self.opt_img = torch.optim.SGD([self.image_syn], lr=cfg.lr_img, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=cfg.lr_lr, momentum=0.5)
        self.opt_y = torch.optim.SGD([self.label_syn], lr=cfg.lr_y, momentum=cfg.momentum_y)
        self.dsa = d._dsa
        self.g = torch.Generator().manual_seed(seed)
        self.order: List[int] = []

    def _criterion(self, out, y):
        return F.cross_entropy(out, F.softmax(y, dim=1))

    def _segment(self):
        cfg = self.cfg
        if not self.order:
            self.order = torch.randperm(len(self.buffer), generator=self.g).tolist()
        traj = self.buffer[self.order.pop()]
        t = int(torch.randint(cfg.min_start_epoch, cfg.max_start_epoch, (1,), generator=self.g))
        # the official loop keeps the buffer on the host and moves each segment to the device per iteration
        start = torch.cat([p.to(self.dev).reshape(-1) for p in traj[t]])
        target = torch.cat([p.to(self.dev).reshape(-1) for p in traj[t + cfg.expert_epochs]])
        return start, target

    def _plan(self):
        cfg = self.cfg
        n = self.image_syn.shape[0]
        bs = n if cfg.batch_syn == 0 else min(cfg.batch_syn, n)
        chunks, plan = [], []
        for _ in range(cfg.syn_steps):
            if not chunks:
                chunks = list(torch.split(torch.randperm(n, generator=self.g), bs))
            seed = int(torch.randint(1 << 62, (1,), generator=self.g))
            plan.append((chunks.pop(), seed))
        return plan

    def iteration(self, start=None, target=None, plan=None, step=True) -> float:
        if start is None:
            start, target = self._segment()
        if plan is None:
            plan = self._plan()
        for o in (self.opt_img, self.opt_lr, self.opt_y):
            o.zero_grad()
        loss = self._unroll(start, target, plan) if self.mode == "unroll" else self._tesla(start, target, plan)
        if step and loss <= self.cfg.threshold:
            self.opt_y.step()
            self.opt_img.step()
            self.opt_lr.step()
        return float(loss)

    def _unroll(self, start, target, plan):
        student = [start.clone().requires_grad_(True)]
        for idx, seed in plan:
            x = self.dsa(self.image_syn[idx], seed)
            y = self.label_syn[idx]
            out = self.net(student[-1], x)
            ce = self._criterion(out, y)
            grad = torch.autograd.grad(ce, student[-1], create_graph=True)[0]
            student.append(student[-1] - self.syn_lr * grad)
        P = self.net.P
        param_loss = F.mse_loss(student[-1], target, reduction="sum") / P
        param_dist = F.mse_loss(start, target, reduction="sum") / P
        grand = param_loss / param_dist
        grand.backward()
        del student
        return grand.detach()

    def _tesla(self, start, target, plan):
        lr = self.syn_lr.item()
        student = [start.clone().requires_grad_(True)]
        G = torch.zeros_like(start)
        for idx, seed in plan:  # pass 1 (create_graph kept, as DATM_tesla.py)
            x = self.dsa(self.image_syn[idx], seed)
            out = self.net(student[-1], x)
            ce = self._criterion(out, self.label_syn[idx])
            grad = torch.autograd.grad(ce, student[-1], create_graph=True)[0]
            dg = grad.detach().clone()
            student.append(student[-1] - lr * dg)
            G += dg
            del grad
        P = self.net.P
        param_loss = F.mse_loss(student[-1], target, reduction="sum") / P
        param_dist = F.mse_loss(start, target, reduction="sum") / P
        grand = (param_loss / param_dist).detach()
        den = param_dist.detach() * P
        gx = torch.zeros_like(self.image_syn)
        gy = torch.zeros_like(self.label_syn)
        for i, (idx, seed) in enumerate(plan):  # pass 2, one step's graph at a time
            th = student[i].detach().requires_grad_(True)
            x = self.dsa(self.image_syn[idx], seed)
            out = self.net(th, x)
            ce = self._criterion(out, self.label_syn[idx])
            g_i = torch.autograd.grad(ce, th, create_graph=True)[0]
            single = lr * (target - start)
            square = lr ** 2 * G
            s = 2 * ((single + square) @ g_i) / den
            a, b = torch.autograd.grad(s, [self.image_syn, self.label_syn])
            gx += a
            gy += b
        self.image_syn.grad = gx
        self.label_syn.grad = gy
        end = start - lr * G
        self.syn_lr.grad = (-2 * (G @ (end - target)) / den).reshape(())
        return grand
