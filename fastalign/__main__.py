"""Command line: `python -m fastalign [info]`."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastalign", description="fastalign utilities")
    # `info` is the only command, so a bare `python -m fastalign` (what a newcomer types first) runs it.
    parser.add_argument("command", nargs="?", default="info", choices=["info"],
                        help="info (the default): versions, devices and live backends")
    parser.parse_args(argv)
    from .info import report

    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
