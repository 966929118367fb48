"""`python -m medassist fit|validate|test|predict ...` (LightningCLI), `... serve ...` (HTTP server), `... merge ...`."""

import sys


def run() -> int | None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command in ("serve", "merge"):  # not Lightning subcommands: plain argparse programs
        from importlib import import_module

        return import_module(f"medassist.{command}").main(sys.argv[2:])
    from medassist.cli import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
