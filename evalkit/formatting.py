"""How numbers are written in evalkit's messages: the CLI summary, gate messages, training logs and
judge prompts. Each caller picks its precision; what a missing value reads as is decided here."""
from __future__ import annotations

MISSING = "n/a"


def fmt_number(x: float | None, spec: str = ".3g", *, scale: float = 1) -> str:
    """`x * scale` in the format `spec`; "n/a" for None or NaN (a metric with no valid score).
    fmt_number(0.8123, "5.1f", scale=100) -> " 81.2"; fmt_number(None) -> "n/a"."""
    if x is None or x != x:
        return MISSING
    return format(x * scale if scale != 1 else x, spec)


def plain_number(x: float) -> str:
    """A number as a person writes it in running text: 1.0 -> "1", 2.5 -> "2.5" (scale endpoints
    in judge prompts: the text is part of the judge's cache key, so keep it stable)."""
    return str(int(x)) if float(x).is_integer() else str(x)


def listed(names: list[str], noun: str = "variants", limit: int = 4) -> str:
    """Names in a one-line message, or their count past `limit` (a sweep's trials would fill a screen)."""
    return ", ".join(names) if len(names) <= limit else f"{len(names)} {noun}"
