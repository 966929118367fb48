"""medassist: fine-tune Gemma with LoRA into an educational medical assistant, and answer with a safety layer."""

__version__ = "0.1.0"


class UserError(ValueError):
    """A problem the user can fix (bad data, a missing model, a bad option): shown as one message, no traceback."""

    def line(self, command: str) -> str:
        """How every command shows it (then exits with status 2): `medassist <command>: error: <message>`."""
        return f"medassist {command}: error: {self}"
