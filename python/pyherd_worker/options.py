"""Command lines of pyherd's Python processes (worker, zygote, guardian): ``--flag value``
pairs only, each process naming the flags it knows."""

from __future__ import annotations

from typing import Iterator, List, Tuple


def flag_pairs(argv: List[str], prog: str) -> Iterator[Tuple[str, str]]:
    """Yields ``(flag, value)``; a flag without its value ends the process, naming it."""
    it = iter(argv)
    for flag in it:
        value = next(it, None)
        if value is None:
            raise SystemExit(f"{prog}: {flag} needs a value")
        yield flag, value
