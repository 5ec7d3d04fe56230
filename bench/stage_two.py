"""Stage two's speed on the mnist shapes (LeNet5 fc1: an 84x120 delta, conditioning 120/84/10).

Prints, per denoiser profile: parameters, training samples/s (one optimisation step of the
denoiser and the scale model), DDIM sampling time per step per sample and per ensemble member for
the whole 1,000-sample test split, and the process's peak memory.

Usage: python bench/stage_two.py [--profiles quick,tiny] [--batch 32] [--steps 10]
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from ocd.diffusion import ScaleModel, create_denoiser, create_diffusion, denoising_loss, log_scale_loss, to_image

COND = {"act_in": 120, "act_out": 84, "output": 10}
SHAPE = (84, 120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", default="quick,tiny")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"{'profile':8s} {'params':>10s} {'canvas':>8s} {'train samples/s':>16s} {'ms/step/sample':>15s} "
          f"{'s/member (1000)':>16s} {'peak RSS MB':>12s}")
    schedule, sampler = create_diffusion()
    for profile in args.profiles.split(","):
        torch.manual_seed(0)
        unet = create_denoiser(profile, COND)
        scale = ScaleModel(COND)
        size = unet.image_shape(SHAPE)
        opt = torch.optim.Adam(unet.parameters(), 2e-4)
        scale_opt = torch.optim.Adam(scale.parameters(), 1e-3)
        cond = {k: torch.randn(args.batch, d) for k, d in COND.items()}
        x0 = to_image(torch.randn(args.batch, *SHAPE), size)
        rho = torch.rand(args.batch) + 0.1
        rates = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            loss = denoising_loss(lambda x, t, u=unet, c=cond: u(x, t, c), schedule, x0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            s_loss = log_scale_loss(scale.log_scale(cond), rho)
            scale_opt.zero_grad()
            s_loss.backward()
            scale_opt.step()
            rates.append(args.batch / (time.perf_counter() - start))
        unet.eval()
        noise = torch.randn(args.batch, 1, *size)
        start = time.perf_counter()
        sampler.sample(lambda x, t, u=unet, c=cond: u(x, t, c), noise, args.steps)
        per_step = (time.perf_counter() - start) / args.steps / args.batch
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        params = sum(p.numel() for p in unet.parameters())
        print(f"{profile:8s} {params:10,d} {size[0]:>3d}x{size[1]:<4d} {sorted(rates[1:])[len(rates) // 2 - 1]:16,.1f} "
              f"{per_step * 1000:15.2f} {per_step * args.steps * 1000:16.1f} {peak:12.0f}")


if __name__ == "__main__":
    main()
