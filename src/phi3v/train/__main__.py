"""`python -m phi3v.train {sft,pretrain} ...` (the entry point torchrun will run): the `phi3v train` command."""

import argparse
import sys

from phi3v.cli import train as command
from phi3v.errors import Phi3VError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m phi3v.train", description=command.HELP)
    command.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command.run(args)
    except Phi3VError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
