#!/usr/bin/env python3
"""PyTorch reference for scripts/bench-gpu: the same EfficientNet-B0 + head and training step as
`trainer fit` (TF "same" padding, BN eps 1e-3 / momentum 0.01, swish, SE, drop-connect 0.2,
Dense 512 -> Dense 512 relu -> Dense 11, BCE with logits, Adam lr 1e-4), on a synthetic batch
resident on the GPU (or on the CPU with --device cpu), in eager fp32, its fastest eager settings (bf16 autocast + channels-last +
fused Adam) and torch.compile of the latter. Prints one `mode batch images/s` line per run."""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

STAGES = [(3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
          (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1)]


def bn(c):
    return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class SameConv(nn.Conv2d):
    def forward(self, x):
        if self.stride[0] == 1:
            return F.conv2d(x, self.weight, self.bias, 1, self.kernel_size[0] // 2, 1, self.groups)
        h, w = x.shape[-2:]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
        pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, s, 0, 1, self.groups)


class MBConv(nn.Module):
    def __init__(self, k, cin, cout, expand, stride, drop):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(SameConv(cin, mid, 1, bias=False), bn(mid), nn.SiLU()) if expand != 1 else None
        self.dw = nn.Sequential(SameConv(mid, mid, k, stride, groups=mid, bias=False), bn(mid), nn.SiLU())
        se = max(1, int(cin * 0.25))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), SameConv(mid, se, 1), nn.SiLU(), SameConv(se, mid, 1), nn.Sigmoid())
        self.project = nn.Sequential(SameConv(mid, cout, 1, bias=False), bn(cout))
        self.residual = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.dw(y)
        y = y * self.se(y)
        y = self.project(y)
        if self.residual:
            if self.training and self.drop > 0:
                keep = (torch.rand(y.shape[0], 1, 1, 1, device=y.device) >= self.drop).to(y.dtype)
                y = y * keep / (1 - self.drop)
            y = y + x
        return y


class Tagger(nn.Module):
    def __init__(self, classes=11):
        super().__init__()
        self.stem = nn.Sequential(SameConv(3, 32, 3, 2, bias=False), bn(32), nn.SiLU())
        blocks, total, i = [], sum(s[1] for s in STAGES), 0
        for k, r, cin, cout, e, s in STAGES:
            for j in range(r):
                blocks.append(MBConv(k, cin if j == 0 else cout, cout, e, s if j == 0 else 1, 0.2 * i / total))
                i += 1
        self.blocks = nn.Sequential(*blocks)
        self.top = nn.Sequential(SameConv(320, 1280, 1, bias=False), bn(1280), nn.SiLU())
        self.head = nn.Sequential(nn.Linear(1280, 512), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, classes))

    def forward(self, x):
        x = self.top(self.blocks(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def bench(mode, batch, steps, warmup, device="cuda"):
    torch.manual_seed(0)
    model = Tagger().to(device).train()
    fast = mode != "eager-fp32"
    if fast:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-7, fused=fast)
    x = torch.rand(batch, 3, 224, 224, device=device)
    if fast:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 11, device=device) > 0.5).float()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=fast):
            logits = model(x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if mode == "compile":
        step = torch.compile(step)
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="48,256")
    ap.add_argument("--modes", default="eager-fp32,eager-bf16-cl-fused,compile")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    args = ap.parse_args()
    torch.backends.cudnn.benchmark = True
    for mode in args.modes.split(","):
        for batch in map(int, args.batches.split(",")):
            warmup = args.warmup if args.warmup is not None else (15 if mode == "compile" else 5)
            rate = bench(mode, batch, args.steps, warmup, args.device)
            print(f"{mode} {batch} {rate:.1f}", flush=True)


if __name__ == "__main__":
    main()
