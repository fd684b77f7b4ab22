"""Peak memory (RSS) and time of the PyTorch selective scan and of a U-Mamba Enc training step on the CPU.

    python -m nnunetv2_mobilevim.research.scan_memory --out scan_memory.json \
        [--measure scan umamba_enc umamba_enc_nomamba] [--patches 32 64] [--limit-gb 16]

Every measurement runs in a fresh Python process (``--child``), so that one measurement's allocations
cannot inflate the next one's peak; the peak is that process's ``ru_maxrss`` (read by the parent with
``os.wait4``), in GB (2^30 bytes), and includes the interpreter and torch themselves: the ``baseline_gb``
of each row is the RSS just before the measured work (inputs and network built), so
``peak_gb - baseline_gb`` is what the work itself added. ``seconds``: wall time of the measured work. A
child whose RSS passes ``--limit-gb`` is killed by the parent (which polls ``/proc``) and reported with
``"killed": true``.

Measurements (all fp32, CPU, ``torch.manual_seed(0)``):

* ``scan``: ``selective_scan_torch`` at batch 2, 64 channels, state 16, 32768 tokens (U-Mamba Enc's
  first stage at a 32^3 patch), groups none, D, z, delta_bias and softplus as ``Mamba`` calls it;
  forward and backward of ``(y * g).sum()`` for a fixed random g.
* ``umamba_enc`` at each ``--patches`` P: one training step of U-Mamba Enc at a P^3 patch, batch 2, one
  input channel, two classes: forward, nnU-Net's deep-supervision weighting of cross-entropy over the
  outputs (1/2^i, the lowest resolution's weight 0, normalised), backward, SGD step (momentum 0.99).
  The network is ``umamba_from_plan(arch_kwargs, "enc")`` with the ``arch_kwargs`` of the 3d_fullres
  configuration nnU-Net 2.8's default planner writes for that patch at isotropic spacing
  (``cli.benchmark.nnunet_configuration``: stride 2 per axis while the axis stays >= 4, features 32
  doubling to 320, 3^3 kernels, two convolutions per stage; U-Mamba reads them as residual blocks
  with its released block counts).
* ``umamba_enc_nomamba``: the same with ``mamba=False`` (the NoMamba twin: identities for the Mamba
  layers), so the scan's share of the step is the difference.

``--env KEY=VALUE`` sets an environment variable in the children (e.g. ``MALLOC_MMAP_THRESHOLD_=65536``
to see the live tensor memory without glibc's heap retention); ``--threads`` sets torch's intra-op
threads in the children (on a shared machine one thread is timed more reliably).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

GB = 2 ** 30
MEASUREMENTS = ("scan", "umamba_enc", "umamba_enc_nomamba")


def _rss_gb() -> float:
    """This process's resident set now (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GB
    raise RuntimeError("no VmRSS in /proc/self/status: this script needs Linux")


def _scan(batch: int = 2, channels: int = 64, state: int = 16, length: int = 32768) -> Dict:
    import torch

    from ..ssm.torch_scan import selective_scan_torch

    torch.manual_seed(0)
    inputs = [torch.randn(batch, channels, length), torch.randn(batch, channels, length),
              -torch.rand(channels, state) - 0.1, torch.randn(batch, state, length), torch.randn(batch, state, length),
              torch.randn(channels), torch.randn(batch, channels, length), torch.randn(channels)]
    u, delta, A, B, C, D, z, bias = (t.requires_grad_() for t in inputs)
    g = torch.randn(batch, channels, length)
    baseline = _rss_gb()
    start = time.perf_counter()
    y = selective_scan_torch(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True)
    forward = time.perf_counter() - start
    (y * g).sum().backward()
    return {"shape": {"batch": batch, "channels": channels, "state": state, "length": length},
            "baseline_gb": baseline, "seconds": time.perf_counter() - start, "forward_seconds": forward}


def _umamba_step(patch: int, mamba: bool) -> Dict:
    import torch
    import torch.nn.functional as F

    from ..cli.benchmark import nnunet_configuration
    from ..networks.umamba import count_parameters, umamba_from_plan

    torch.manual_seed(0)
    configuration = nnunet_configuration((patch,) * 3)
    arch_kwargs = configuration["architecture"]["arch_kwargs"]
    net = umamba_from_plan(arch_kwargs, (patch,) * 3, 1, 2, deep_supervision=True, variant="enc", mamba=mamba).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    x = torch.randn(2, 1, patch, patch, patch)
    target = (torch.rand(2, 1, patch, patch, patch) > 0.5).float()
    baseline = _rss_gb()
    start = time.perf_counter()
    outputs = net(x)
    weights = [0.5 ** i for i in range(len(outputs))]
    weights[-1] = 0.0  # nnU-Net's deep supervision: the lowest resolution is not trained
    total = sum(weights)
    loss = sum(w / total * F.cross_entropy(o, F.interpolate(target, size=o.shape[2:], mode="nearest")[:, 0].long())
               for w, o in zip(weights, outputs))
    forward = time.perf_counter() - start
    loss.backward()
    opt.step()
    return {"patch": [patch] * 3, "strides": arch_kwargs["strides"], "features": arch_kwargs["features_per_stage"],
            "parameters": count_parameters(net), "loss": loss.item(), "baseline_gb": baseline,
            "seconds": time.perf_counter() - start, "forward_seconds": forward}


def child(kind: str, patch: Optional[int], threads: Optional[int] = None) -> Dict:
    """One measurement in this process; ``peak_gb`` is the process's peak RSS."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if kind == "scan":
        row = _scan()
    elif kind in ("umamba_enc", "umamba_enc_nomamba"):
        row = _umamba_step(patch, mamba=kind == "umamba_enc")
    else:
        raise ValueError(f"unknown measurement {kind!r}: one of {MEASUREMENTS}")
    row.update(threads=torch.get_num_threads(), torch=torch.__version__)
    row["peak_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    return row


def run_child(kind: str, patch: Optional[int], limit_gb: float, env: Dict[str, str],
              threads: Optional[int] = None) -> Dict:
    """``child(kind, patch, threads)`` in a fresh interpreter, killed if its RSS passes ``limit_gb``."""
    command = [sys.executable, "-m", "nnunetv2_mobilevim.research.scan_memory", "--child", kind]
    if patch is not None:
        command += ["--patch", str(patch)]
    if threads:
        command += ["--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, env={**os.environ, **env}, text=True)
    killed = False
    status_path = f"/proc/{process.pid}/status"
    while True:
        # wait4 rather than Popen.poll: poll reaps the child without its resource usage
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            break
        if not killed:
            with open(status_path) as f:
                rss = next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:")), 0)
            if rss > limit_gb * GB:
                process.send_signal(signal.SIGKILL)
                killed = True
        time.sleep(0.02)
    process.returncode = os.waitstatus_to_exitcode(status)
    output = process.stdout.read()
    row: Dict = {"measurement": kind, "patch": patch, "env": env}
    lines = [line for line in output.splitlines() if line.startswith("{")]
    if lines and not killed and process.returncode == 0:
        row.update(json.loads(lines[-1]))
    else:
        row.update(killed=killed, exit_code=process.returncode, limit_gb=limit_gb,
                   peak_gb=usage.ru_maxrss * 1024 / GB)
    return row


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nnunetv2_mobilevim.research.scan_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    p.add_argument("--measure", nargs="+", default=list(MEASUREMENTS), choices=MEASUREMENTS)
    p.add_argument("--patches", type=int, nargs="+", default=[32, 64], help="isotropic patch edges for U-Mamba Enc")
    p.add_argument("--limit-gb", type=float, default=16.0, help="kill a measurement whose RSS passes this")
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE", help="environment of the children")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in the children (default: torch's)")
    p.add_argument("--child", choices=MEASUREMENTS, help=argparse.SUPPRESS)
    p.add_argument("--patch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.patch, args.threads)), flush=True)
        return 0
    env = dict(item.split("=", 1) for item in args.env)
    rows: List[Dict] = []
    for kind in args.measure:
        for patch in ([None] if kind == "scan" else args.patches):
            row = run_child(kind, patch, args.limit_gb, env, args.threads)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"command": " ".join([Path(sys.executable).name, "-m", "nnunetv2_mobilevim.research.scan_memory",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count()},
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
