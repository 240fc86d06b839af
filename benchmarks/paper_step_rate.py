"""Step time of the paper's models (ResNet20, WRN-10-2) and what a paper-sized run costs.

Measures one Smooth Transfer training step (128 target + 128 source images, 32x32x3, forward,
backward, SGD) on this machine's CPU, counts its FLOPs with ``torch.utils.flop_counter``, and turns
both into run lengths for the paper's settings (380 epochs of CIFAR-100, 336 of MNIST). The GPU
line is an ESTIMATE, not a measurement: FLOPs per step divided by an assumed sustained throughput
(``--gpu-tflops``, 10 TFLOP/s for fp32 training of small convnets on a recent data-centre GPU).

    python benchmarks/paper_step_rate.py [--steps 10] [--gpu-tflops 10]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from lightning_stl.models.registry import create_backbone
from lightning_stl.models.source_target import SourceTargetClassifier

SETTINGS = {
    # backbone, batchnorm, source classes, source training images, joint epochs
    "cifar10_cifar100": ("resnet20", "shared", 100, 50_000, 380),
    "svhn_mnist": ("wrn10_2", "per_domain", 10, 60_000, 336),
}


def step(model: SourceTargetClassifier, optimizer: torch.optim.Optimizer, batch: tuple) -> None:
    xt, yt, xs, ys = batch
    target_logits, source_logits = model(xt, xs)
    loss = 0.5 * F.cross_entropy(target_logits, yt) + 0.5 * F.cross_entropy(source_logits, ys)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--gpu-tflops", type=float, default=10.0)
    args = parser.parse_args()
    print(f"CPU: {torch.get_num_threads()} threads, torch {torch.__version__}")
    for pair, (name, bn, source_classes, source_size, epochs) in SETTINGS.items():
        model = SourceTargetClassifier(create_backbone(name, in_chans=3), 10, source_classes, bn)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        batch = (
            torch.randn(128, 3, 32, 32),
            torch.randint(0, 10, (128,)),
            torch.randn(128, 3, 32, 32),
            torch.randint(0, source_classes, (128,)),
        )
        with FlopCounterMode(display=False) as counter:
            step(model, optimizer, batch)
        flops = counter.get_total_flops()
        step(model, optimizer, batch)
        start = time.perf_counter()
        for _ in range(args.steps):
            step(model, optimizer, batch)
        cpu = (time.perf_counter() - start) / args.steps
        total = epochs * math.ceil(source_size / 128)
        gpu = flops / (args.gpu_tflops * 1e12)
        print(
            f"{pair:17s} {name:9s} {flops / 1e9:6.1f} GFLOP/step | CPU {cpu * 1e3:7.1f} ms/step "
            f"-> {total * cpu / 3600:6.1f} h per run ({total:,} steps) | GPU ESTIMATE at "
            f"{args.gpu_tflops:g} TFLOP/s: {gpu * 1e3:5.1f} ms/step -> {total * gpu / 60:5.1f} min per "
            f"run, {3600 / (total * gpu):4.1f} runs/hour"
        )


if __name__ == "__main__":
    main()
