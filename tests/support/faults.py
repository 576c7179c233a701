"""The fault-injection suite's results: one row per fault test, printed as one table at the end of
the run (tests/conftest.py pytest_terminal_summary) and kept in docs/reliability.md."""

from __future__ import annotations

import re

#: (fault, injected, what held, figures)
FAULT_RESULTS: list[tuple[str, str, str, str]] = []

#: The trainer's log lines a fault row reads: a step done, and the checkpoint a run resumed from.
STEP_LINE = re.compile(r" step (\d+)/\d+ loss")
RESUMED_LINE = re.compile(r"resuming from checkpoint step (\d+) ")
