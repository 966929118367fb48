"""`python -m medassist fit|validate|test|predict ...` (LightningCLI)."""

from medassist.cli import main

if __name__ == "__main__":
    main()
