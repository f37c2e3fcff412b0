"""Counts a ginkgo JUnit report: `SUITE: N passed, N failed, N skipped`, or the failures.

    python3 scripts/junit_summary.py SUITE junit.xml [REGEX]
    python3 scripts/junit_summary.py --failures junit.xml

ginkgo lists every spec of e2e.test in its report, most of them skipped because the focus
left them out; only the specs whose name matches REGEX (the suite's focus) are counted.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET


def cases(path: str) -> list[tuple[str, str]]:
    """(name, passed|failed|skipped) for every spec in the report."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    out = []
    for case in root.iter("testcase"):
        name = case.get("name", "")
        if name.startswith(("[SynchronizedBeforeSuite]", "[SynchronizedAfterSuite]",
                            "[BeforeSuite]", "[AfterSuite]", "[ReportAfterSuite]",
                            "[ReportBeforeSuite]", "[DeferCleanup (Suite)]")):
            if case.find("failure") is None and case.find("error") is None:
                continue
        if case.find("failure") is not None or case.find("error") is not None:
            out.append((name, "failed"))
        elif case.find("skipped") is not None or case.get("status") == "skipped":
            out.append((name, "skipped"))
        else:
            out.append((name, "passed"))
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["--failures"]:
        for name, result in cases(argv[1]):
            if result == "failed":
                print(f"    FAILED: {name}")
        return 0
    suite, path = argv[0], argv[1]
    match = re.compile(argv[2]) if len(argv) > 2 else None
    results = [r for name, r in cases(path) if match is None or match.search(name)]
    print(f"{suite}: {results.count('passed')} passed, {results.count('failed')} failed, "
          f"{results.count('skipped')} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
