"""What the suite's list entries (variants, tasks, gates) share: a name pattern, and where each is written."""
from __future__ import annotations

from pydantic import PrivateAttr

from evalkit.shape import Shape

NAME = r"^[A-Za-z0-9_.-]+$"


class Located(Shape):
    """A list entry of the suite that knows where it is (set by the loader, for messages)."""

    _line: int | None = PrivateAttr(None)
    _index: int = PrivateAttr(0)

    @property
    def line(self) -> int | None:
        return self._line
