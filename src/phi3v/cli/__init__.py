"""The `phi3v` command: a small dispatcher over one module per command.

Each command module has HELP (one line), add_arguments(parser) and run(args) -> exit status. Errors a user can
cause are Phi3VError: printed as one `error: ...` line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import Phi3VError

# command name -> module under phi3v.cli (imported only when that command runs, so `phi3v generate` loads no server)
COMMANDS = {
    "generate": "generate",
    "chat": "chat",
    "serve": "serve",
    "bench": "bench",
    "quantize": "quantize",
    "create-random": "create_random",
    "demo": "demo",
    "synth": "synth",
    "train": "train",
    "eval": "eval",
    "recipe": "recipe",
    "unlearn": "unlearn",
}


def command(name: str):
    return importlib.import_module(f"{__name__}.{COMMANDS[name]}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; `only` builds just that command's subparser (the others are listed, not imported)."""
    parser = argparse.ArgumentParser(prog="phi3v", description="Run, serve and train Microsoft's Phi-3 family.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        if only is None or name == only:
            mod = command(name)
            mod.add_arguments(sub.add_parser(name, help=mod.HELP, description=mod.HELP))
        else:
            sub.add_parser(name, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(first if first in COMMANDS else None).parse_args(argv)
    try:
        return command(args.command).run(args) or 0
    except Phi3VError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
