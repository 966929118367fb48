"""`python -m medassist <command> ...`: see medassist/commands.py."""
import sys

from medassist.commands import main

if __name__ == "__main__":
    sys.exit(main())
