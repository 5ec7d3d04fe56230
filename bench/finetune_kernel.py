"""Samples/s of the per-sample finetuning kernel on LeNet5 fc1 (Linear 120->84), random 28x28 inputs.

Usage: python bench/finetune_kernel.py [--block 256] [--loop-samples 64] [--repeats 5] [--variants]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ocd.pipeline.finetune import AdamSettings, PerSampleFinetuner, finetune_reference_loop


class LeNet5(nn.Module):
    """LeNet5 on 28x28 MNIST-like inputs: conv 6/16/120, fc1 120->84, fc2 84->10."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.conv3 = nn.Conv2d(16, 120, 5)
        self.fc1 = nn.Linear(120, 84)
        self.fc2 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2)
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2)
        x = torch.tanh(self.conv3(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(x)))


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target, reduction="none")


def rates(fns: dict[str, tuple[Callable[[], object], int]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median samples/s of each (fn, samples) by wall clock and per CPU-second (process time, all threads).

    The methods are timed in turn, after one warm-up call each, so machine noise hits them alike; the
    CPU-time figure is the steadier one on a shared, busy machine.
    """
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for fn, _ in fns.values():
        fn()
    for _ in range(repeats):
        for name, (fn, _) in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return {name: (n / statistics.median(wall[name]), n / statistics.median(cpu[name])) for name, (_, n) in fns.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--loop-samples", type=int, default=32, help="samples per timed call of the loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--variants", action="store_true", help="also time the non-default paths")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LeNet5().eval()
    settings = AdamSettings(steps=3, lr=5e-4)
    x = torch.randn(args.block, 1, 28, 28)
    y = torch.randint(0, 10, (args.block,))
    n = args.loop_samples
    fns = {
        "reference loop (batch 1)": (
            lambda: finetune_reference_loop(model, "fc1", x[:n], y[:n], cross_entropy, settings),
            n,
        )
    }
    kernels = {"per_sample: fx + factored Adam": PerSampleFinetuner(model, "fc1")}
    if args.variants:
        kernels["per_sample: fx + full Adam state"] = PerSampleFinetuner(model, "fc1", factored=False)
        kernels["per_sample: hook + factored Adam"] = PerSampleFinetuner(model, "fc1", trace=False)
    for name, kernel in kernels.items():
        fns[f"{name} (block {args.block})"] = (lambda k=kernel: k(x, y, cross_entropy, settings), args.block)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, LeNet5 fc1 (120->84), Adam {settings.steps} steps")
    print(f"{'method':48s} {'wall samples/s':>15s} {'x loop':>7s} {'CPU samples/s':>14s} {'x loop':>7s}")
    results = rates(fns, args.repeats)
    loop_wall, loop_cpu = results["reference loop (batch 1)"]
    for name, (wall, cpu) in results.items():
        print(f"{name:48s} {wall:15.0f} {wall / loop_wall:7.1f} {cpu:14.0f} {cpu / loop_cpu:7.1f}")


if __name__ == "__main__":
    main()
