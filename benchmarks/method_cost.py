"""Time every merge method on one synthetic module: N random LoRAs of rank r on a d_out x d_in layer.

    .venv/bin/python benchmarks/method_cost.py --d-out 4096 --d-in 4096 --rank 16 --inputs 3 --threads 1

Prints seconds per method (one run each) and the output rank. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import time

import torch

from lora_lego.adapter import Factors
from lora_lego.methods import METHODS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-out", type=int, default=4096)
    p.add_argument("--d-in", type=int, default=4096)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--inputs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--methods", nargs="*", default=None, help="default: all")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    fs = [Factors(torch.randn(args.rank, args.d_in, generator=g) / args.d_in**0.5,
                  torch.randn(args.d_out, args.rank, generator=g)).to(dev) for _ in range(args.inputs)]
    print(f"{args.inputs} inputs of rank {args.rank} on {args.d_out}x{args.d_in}, {args.threads} thread(s), {dev}")
    for name in args.methods or list(METHODS):
        m = METHODS[name]
        weights = [1.0 / args.inputs] * args.inputs
        gen = torch.Generator(device=dev).manual_seed(0)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = m.fn(fs, weights, args.rank if m.takes_rank else None, generator=gen, **m.option_defaults())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        print(f"{name:16s} {time.perf_counter() - start:8.3f} s  rank {out.rank}", flush=True)


if __name__ == "__main__":
    main()
