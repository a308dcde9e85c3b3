"""The ``cps4`` command line.

Each sub-command lives in a module ``cps4_engine/cli/cmd_<name>.py`` that defines
``register(subparsers)``: it adds its parser and sets ``func`` (a callable taking the
parsed namespace and returning an exit code). Modules import torch lazily inside their
``func`` so that ``cps4 --help`` stays fast.

Errors the user caused are :class:`~cps4_engine.errors.CPS4Error`; ``main`` prints them as
one line on stderr and exits with status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import os
import importlib
import pkgutil
import sys

from cps4_engine import __version__
from cps4_engine.errors import CPS4Error, os_error_message


class OneLineParser(argparse.ArgumentParser):
    """Bad options end in one line and exit status 2, like every other bad input
    (argparse would print the whole usage first; ``--help`` still shows it)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="cps4",
        description="Class-prompt driven semi-supervised spine MR segmentation (CPS4).",
    )
    parser.add_argument("--version", action="version", version=f"cps4 {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    package_path = __path__  # type: ignore[name-defined]
    for module_info in sorted(pkgutil.iter_modules(package_path), key=lambda m: m.name):
        if module_info.name.startswith("cmd_"):
            module = importlib.import_module(f"{__name__}.{module_info.name}")
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers' own "Loading weights" bars would break into our progress lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CPS4Error as error:
        print(f"cps4 {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cps4 {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) closed the pipe; silence the flush at exit too.
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as error:
        print(f"cps4 {args.command}: error: {os_error_message(error)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"cps4 {args.command}: error: out of memory; try a smaller --batch-size or preset", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
