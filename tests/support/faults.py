"""The fault-injection suite's results: one row per fault test, printed as one table at the end of
the run (tests/conftest.py pytest_terminal_summary) and kept in docs/reliability.md."""

from __future__ import annotations

#: (fault, injected, what held, figures)
FAULT_RESULTS: list[tuple[str, str, str, str]] = []
