"""Stage one's throughput on the real mnist task next to the plain per-sample loop, in one run.

The loop is the public code's way: for each sample, deepcopy the base model and run
torch.optim.Adam on the layer's weight. The pipeline is `run_overfit` on all 5,000 digits,
store writes included, with a fresh store each time (``force``).

Usage: python bench/stage_one.py [--loop-samples 300] [--cache-dir /tmp/ocd-bench]
"""
from __future__ import annotations

import argparse
import time

import torch

from ocd.pipeline.cache import Cache
from ocd.pipeline.cluster import ClusterConfig
from ocd.pipeline.config import BaseConfig, OverfitConfig, build_config
from ocd.pipeline.context import Context
from ocd.pipeline.data import split_arrays
from ocd.pipeline.finetune import finetune_reference_loop
from ocd.stages.base import load_base_model, run_base
from ocd.stages.overfit import adam_settings, run_overfit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loop-samples", type=int, default=300)
    parser.add_argument("--cache-dir", default="/tmp/ocd-bench")
    parser.add_argument("--codecs", default="blosc-lz4,none,zstd")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    ctx = Context("mnist", Cache(args.cache_dir), show_progress=False)
    base = run_base(ctx, build_config(BaseConfig, ctx.task.defaults.get("base")))
    overfit_cfg = build_config(OverfitConfig, ctx.task.defaults.get("overfit"))
    model = load_base_model(ctx, base)
    inputs, labels = split_arrays(ctx.splits["train"])
    n = args.loop_samples
    loop_rates = {}
    for loop_threads in sorted({1, threads}):
        torch.set_num_threads(loop_threads)
        start = time.perf_counter()
        settings = adam_settings(overfit_cfg)
        finetune_reference_loop(model, ctx.task.layer, inputs[:n], labels[:n], ctx.task.loss, settings)
        loop_rates[loop_threads] = n / (time.perf_counter() - start)
        print(f"plain loop (deepcopy + torch.optim.Adam, batch 1), {n} samples, {loop_threads} torch thread(s): "
              f"{loop_rates[loop_threads]:,.0f} samples/s")
    torch.set_num_threads(threads)
    loop_rate = max(loop_rates.values())
    print(f"baseline: the faster loop, {loop_rate:,.0f} samples/s")
    print(f"{'pipeline variant':44s} {'samples':>8s} {'wall s':>7s} {'blocks/s-rate':>14s} {'x loop':>7s} "
          f"{'wall x loop':>11s} {'store MB':>9s}")
    variants = [(f"in-process, 1 thread, {c}", ClusterConfig(workers=0), c) for c in args.codecs.split(",")]
    variants.append(("LocalCluster 2 workers x 1 thread, blosc-lz4", ClusterConfig(workers=2), "blosc-lz4"))
    for name, cluster, codec in variants:
        cfg = build_config(OverfitConfig, ctx.task.defaults.get("overfit"), {"codec": codec})
        start = time.perf_counter()
        result = run_overfit(ctx, base, cfg, cluster, force=True)
        wall = time.perf_counter() - start
        samples = result.summary["samples"]
        rate = result.summary["samples_per_s"]
        print(f"{name:44s} {samples:8d} {wall:7.2f} {rate:14,.0f} {rate / loop_rate:7.1f} "
              f"{samples / wall / loop_rate:11.1f} {result.summary['store_bytes'] / 1e6:9.1f}")
    print("blocks/s-rate: samples / time from the first block's submission to the last block's write "
          "(worker start-up of the cluster excluded, per-worker model/data loading included); "
          "wall: the whole call, cluster start-up and the final statistics included.")


if __name__ == "__main__":
    main()
