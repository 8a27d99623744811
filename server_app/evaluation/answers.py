"""GSM8K answer extraction: the number after "####" or "The answer is", else the last one."""

from __future__ import annotations

import re

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_MARKED = (
    re.compile(rf"####\s*({_NUMBER})"),
    re.compile(rf"[Tt]he (?:final )?answer is[:\s]*\$?\s*({_NUMBER})"),
)
_ANY = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
    """``"$1,200.00"`` -> ``"1200"``; ``None`` when ``text`` is not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str) -> str | None:
    """The normalized final answer of a GSM8K solution or a model's generation."""
    for pattern in _MARKED:
        match = pattern.search(text)
        if match:
            return normalize_number(match.group(1))
    numbers = _ANY.findall(text)
    return normalize_number(numbers[-1]) if numbers else None
