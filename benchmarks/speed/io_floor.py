"""The I/O floor of a merge: a process that only reads every input tensor and writes one adapter of the
output's size, the least any merge must do. It imports torch (and sets its objects aside from the garbage
collector, as the CLI does) and reads each tensor into a torch tensor, as a merge does, but computes
nothing; the output (zeros of the output's shapes, in the inputs' dtype) is written and fsync'ed like
lora-lego's atomic output.

    python benchmarks/speed/io_floor.py ADAPTER... -o OUT --rank R [--no-torch]

--rank R: the output rank per module (16 for lego/linear/ties at rank 16, the summed rank for concat).
--no-torch: read into plain bytearrays without importing torch (the bare floor of the disk and page cache).
"""

from __future__ import annotations

import argparse
import json
import os
import struct
from pathlib import Path

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}


def read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("inputs", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--no-torch", action="store_true")
    args = p.parse_args()
    if not args.no_torch:
        import gc

        import torch

        torch.set_num_threads(1)
        # as lora-lego's CLI does: torch's objects are set aside from the garbage collector. Without it, the
        # interpreter's shutdown collects them, ~0.33 s on this machine (`python -c "import torch"` 1.24 s,
        # with gc.freeze() 0.91 s): a floor without it was that much slower than any merge could be.
        gc.freeze()
    total = 0
    for adapter in args.inputs:
        path = adapter / "adapter_model.safetensors"
        base, header = read_header(path)
        with open(path, "rb") as f:
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                f.seek(base + start)
                if args.no_torch:
                    buf = bytearray(end - start)
                    f.readinto(buf)
                else:
                    t = torch.empty(end - start, dtype=torch.uint8)
                    f.readinto(t.numpy())
                total += end - start
    # one adapter of the output's size: every module of the first input at rank R
    _, header = read_header(args.inputs[0] / "adapter_model.safetensors")
    out_bytes = 0
    for key, info in header.items():
        if key.endswith("lora_A.weight"):
            out_bytes += info["shape"][1] * args.rank * ITEMSIZE[info["dtype"]]
        elif key.endswith("lora_B.weight"):
            out_bytes += info["shape"][0] * args.rank * ITEMSIZE[info["dtype"]]
    args.output.mkdir(parents=True, exist_ok=True)
    target = args.output / "adapter_model.safetensors"
    chunk = bytes(1 << 24)
    with open(target, "wb") as f:
        left = out_bytes
        while left > 0:
            f.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        f.flush()
        os.fsync(f.fileno())
    (args.output / "adapter_config.json").write_text(json.dumps({"read_bytes": total, "written_bytes": out_bytes}))


if __name__ == "__main__":
    main()
