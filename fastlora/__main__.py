"""``python -m fastlora <command>`` (also the ``fastlora`` console script). Commands: ``bench``.
With no command it prints its help."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    import fastlora
    from fastlora import bench

    parser = argparse.ArgumentParser(
        prog="fastlora", description="fastlora: fused-kernel LoRA for PyTorch. Commands:",
        epilog="Example: python -m fastlora bench --quick   (then see python -m fastlora bench --help)")
    parser.add_argument("--version", action="version", version=f"fastlora {fastlora.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command")
    bench.add_arguments(commands.add_parser(
        "bench", help="benchmark fastlora against PEFT's math and W+BA, with the frozen linear as the floor",
        description=bench.CLI_DESCRIPTION, epilog=bench.CLI_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = argv[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
