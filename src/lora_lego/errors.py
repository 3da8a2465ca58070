"""The one exception type that the CLI turns into a one-line message and exit code 2."""

from __future__ import annotations


class LoraLegoError(Exception):
    """A refusal the user can act on: bad input, bad option, unsafe output path.

    The message is a single line that names the file and, where one is involved, the module.
    """

    def __init__(self, message: str, *, path: object | None = None, module: str | None = None):
        parts = []
        if path is not None:
            parts.append(str(path))
        if module is not None:
            parts.append(f"module {module}")
        prefix = ": ".join(parts)
        full = f"{prefix}: {message}" if prefix else message
        super().__init__(" ".join(full.split()))  # one line, always
        self.path = path
        self.module = module
