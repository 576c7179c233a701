"""One line with the test counts per target, from the JUnit XML files of `make test`'s three runs:
    python .ci/test-summary.py build/test-results/{emulator,real,node}.xml"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

TARGETS = {"emulator": "emulator", "real": "real control plane", "node": "real node"}


def counts(path: Path) -> str:
    if not path.exists():
        return "not run"
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    passed = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    text = f"{passed} passed, {total['failures'] + total['errors']} failed, {total['skipped']} skipped"
    if total["tests"] and total["skipped"] == total["tests"]:  # e.g. no real control plane here: say why
        reason = next((s.get("message", "") for s in root.iter("skipped")), "")
        text += f" ({reason})" if reason else ""
    return text


def main(paths: list[str]) -> None:
    parts = [f"{TARGETS.get(Path(p).stem, Path(p).stem)}: {counts(Path(p))}" for p in paths]
    print("tests by target: " + "; ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1:])
