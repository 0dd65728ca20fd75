"""``python -m fastlora <command>`` (also the ``fastlora`` console script). Commands: ``bench``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastlora", description="fastlora command line")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)
    from fastlora import bench

    bench.add_arguments(commands.add_parser(
        "bench", help="benchmark fastlora against PEFT's math, W+BA and the frozen linear",
        description=bench.CLI_DESCRIPTION))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
