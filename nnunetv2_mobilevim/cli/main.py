"""The ``nnunetv2_mobilevim`` command: summary, ext-path, check, demo, predict, augment-check, benchmark.

Each sub-command lives in its own module; this file only parses arguments and turns expected
failures (bad arguments, missing packages) into a one-line message and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .. import __version__


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _cmd_summary(args: argparse.Namespace) -> int:
    from .summary import format_summary, summarize

    if args.network:
        from .listing import format_network_summary, summarize_network

        try:
            info = summarize_network(args.network, args.configuration, args.dataset, args.plans)
        except ValueError as err:
            raise UserError(str(err)) from None
        print(json.dumps(info, indent=2) if args.json else format_network_summary(info))
        return 0
    patch = args.patch * 3 if len(args.patch) == 1 else args.patch
    if len(patch) != 3:
        raise UserError(f"--patch takes 1 or 3 sizes (D H W), got {len(args.patch)}: {args.patch}")
    try:
        info = summarize(args.variant, args.in_channels, args.classes, patch)
    except ValueError as err:
        raise UserError(str(err)) from None
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from .listing import run_list

    try:
        return run_list(args.dataset, args.plans, args.json)
    except ValueError as err:
        raise UserError(str(err)) from None


def _cmd_ext_path(args: argparse.Namespace) -> int:
    from ..nnunet.registration import ext_trainer_dir

    print(ext_trainer_dir())
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .check import format_report, run_checks

    report = run_checks()
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(workdir=args.workdir, epochs=args.epochs, iterations=args.iterations, device=args.device,
                    trainer=args.trainer)


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import run_benchmark

    return run_benchmark(args)


def _cmd_augment_check(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .augment_check import run_augment_check

    try:
        return run_augment_check(args.dataset, args.configuration, Path(args.output), plans=args.plans,
                                 cases=args.cases, draws=args.draws, device=args.device, seed=args.seed)
    except ValueError as err:
        raise UserError(str(err)) from None


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    try:
        return run_predict(args)
    except ValueError as err:
        raise UserError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnunetv2_mobilevim",
        description="MobileViM and the field's Mamba networks for stock nnU-Net v2: list, describe, check, "
                    "register, demo, predict, augment-check, benchmark.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("summary", help="parameters, MACs and output shapes of a MobileViM")
    p.add_argument("--variant", default="s", help="s, xs, or the path of a network config JSON (default s)")
    p.add_argument("--in-channels", type=_positive, default=1, help="input image channels (default 1)")
    p.add_argument("--classes", type=_positive, default=4, help="output classes incl. background (default 4)")
    p.add_argument("--patch", type=_positive, nargs="+", default=[128], metavar="N",
                   help="patch size: one size for a cube or D H W (default 128)")
    p.add_argument("--network", default=None, metavar="TRAINER",
                   help="describe the network a shipped trainer builds (any name `list` prints) for a plan instead")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="with --network: the plan's configuration")
    p.add_argument("-d", "--dataset", default=None, help="with --network: a preprocessed dataset's plans "
                   "(default: the example plans)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="with -d: the plans identifier")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_summary)

    p = sub.add_parser("list", help="every trainer: paper, network, parameters for a plan, 2D/3D, recipe")
    p.add_argument("-d", "--dataset", default=None, help="count parameters for this preprocessed dataset's plans "
                   "(default: the example plans shipped with the package)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="the plans identifier (default nnUNetPlans)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("ext-path", help="print the folder to export as nnUNet_extTrainer")
    p.set_defaults(func=_cmd_ext_path)

    p = sub.add_parser("check", help="check the installation: torch, CUDA, nnU-Net, kernels, environment")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("demo", help="train and evaluate on the embedded real-anatomy dataset")
    p.add_argument("--workdir", default=None,
                   help="folder for nnU-Net's raw/preprocessed/results and the outputs (default: a new temp dir)")
    p.add_argument("--epochs", type=_positive, default=None, help="epochs (default: 4 on CPU, 20 on GPU)")
    p.add_argument("--iterations", type=_positive, default=None,
                   help="training iterations per epoch (default: 25 on CPU, 50 on GPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--trainer", default="nnUNetTrainerMobileViM", help="trainer class (default MobileViM_s)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("predict", help="nnUNetv2_predict's command: same flags and outputs, any nnU-Net model")
    from .predict import add_arguments as add_predict_arguments

    add_predict_arguments(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("augment-check", help="compare the device augmentation with nnU-Net's on a dataset")
    p.add_argument("-d", "--dataset", required=True, help="dataset id or name (preprocessed)")
    p.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default 3d_fullres)")
    p.add_argument("-o", "--output", required=True, help="folder for augment_check.json and augment_check.png")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--cases", type=_positive, default=4, help="cases loaded with nnU-Net's loader (default 4)")
    p.add_argument("--draws", type=_positive, default=32, help="random draws per transform and case (default 32)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_augment_check)

    p = sub.add_parser("benchmark", help="side-by-side GPU benchmark against nnU-Net's networks")
    from .benchmark import add_arguments

    add_arguments(p)
    p.set_defaults(func=_cmd_benchmark)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as err:
        print(f"nnunetv2_mobilevim {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
