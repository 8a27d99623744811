"""Progress bars for long phases that stay quiet when output is not a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """A progress bar on a terminal, nothing in logs and pipes."""
    return tqdm(iterable, desc=description, total=total, disable=not sys.stderr.isatty())
