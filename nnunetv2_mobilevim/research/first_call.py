"""Where the first forward of a fast-inference MobileViM spends its time (one process per setting).

    python -m nnunetv2_mobilevim.research.first_call 0|1 NETWORK

``0|1``: cuDNN autotuning off / on (``torch.backends.cudnn.benchmark``); NETWORK: a name of
``nnunetv2_mobilevim benchmark --networks`` (MobileViM wrapped in ``FastInference``, nnU-Net's networks
as the benchmark builds them), 1 input channel, 4 classes, one 128^3 volume, fp16 autocast, on the GPU.
Prints one JSON line: the seconds of kernel loading (MobileViM), of the first three calls, and the
steady milliseconds per call (mean of 50).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Optional, Sequence

from ..cli.benchmark import MOBILEVIM_VARIANTS, NETWORKS, build


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m nnunetv2_mobilevim.research.first_call",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cudnn_benchmark", choices=["0", "1"], help="1: cuDNN autotuning on")
    parser.add_argument("network", choices=NETWORKS)
    args = parser.parse_args(argv)

    import torch

    bench = args.cudnn_benchmark == "1"
    name = args.network
    torch.backends.cudnn.benchmark = bench
    res = {"cudnn_benchmark": bench, "network": name}
    if name in MOBILEVIM_VARIANTS:
        from ..acceleration.inference import FastInference
        from ..networks.mobilevim import MobileViM
        from ..ssm import load_kernels

        t = time.perf_counter()
        load_kernels()
        res["load_kernels_s"] = time.perf_counter() - t
        net = FastInference(MobileViM(input_channels=1, num_classes=4, variant=MOBILEVIM_VARIANTS[name])).cuda().eval()
    else:
        net = build(name, 1, 4, [128] * 3).cuda().eval()
    x = torch.randn(1, 1, 128, 128, 128, device="cuda")
    torch.cuda.synchronize()
    for i in range(3):
        t = time.perf_counter()
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
            net(x)
        torch.cuda.synchronize()
        res[f"call{i}_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        for _ in range(50):
            net(x)
    torch.cuda.synchronize()
    res["steady_ms"] = (time.perf_counter() - t) / 50 * 1000
    print(json.dumps(res))


if __name__ == "__main__":
    main()
