"""Counts a ginkgo JUnit report: `SUITE: N passed, N failed, N skipped`, or the failures.

    python3 scripts/junit_summary.py SUITE junit.xml [REGEX]
    python3 scripts/junit_summary.py --failures junit.xml
    python3 scripts/junit_summary.py --go-test SUITE go-test.log junit.xml [--parent TEST]
                                     [--skipped NAME=REASON]...

ginkgo lists every spec of e2e.test in its report, most of them skipped because the focus
left them out; only the specs whose name matches REGEX (the suite's focus) are counted.

--go-test writes a JUnit report from the output of a Go test binary run with -test.v (a
suite with no JUnit of its own: network-policy-api's conformance). One test is one subtest
of the parent (TestConformance: one a conformance test, each with cases of its own as
deeper subtests): passed, failed or skipped as its `--- PASS|FAIL|SKIP:` line says. Go
prints those lines when the parent ends: where the binary stopped before (a panic, its
-test.timeout) every subtest that started has none, and is counted failed; a parent that failed with
no failing subtest (its setup did) is one failed test, `PARENT (setup)`. NAME=REASON: a
subtest the run left out (-test.skip), counted skipped for REASON.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


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


@dataclass
class GoTest:
    name: str
    result: str = ""  # passed|failed|skipped; "" while it runs
    seconds: float = 0.0
    output: list[str] = field(default_factory=list)
    failed_cases: list[str] = field(default_factory=list)
    skip_reason: str = ""
    unreported: bool = False


_MARK = re.compile(r"^=== (?:RUN|CONT|NAME|PAUSE)\s+(\S+)")
_RESULT = re.compile(r"^\s*--- (PASS|FAIL|SKIP): (\S+) \(([\d.]+)s\)")
_WORD = {"PASS": "passed", "FAIL": "failed", "SKIP": "skipped"}
MADE_BY = "scripts/junit_summary.py --go-test"


def go_tests(text: str, parent: str = "TestConformance") -> list[GoTest]:
    """The parent's subtests in a `-test.v` log, in the order they started."""
    tests: dict[str, GoTest] = {}
    setup = GoTest(f"{parent} (setup)")
    parent_result = ""
    current: GoTest | None = setup
    for line in text.splitlines():
        mark, result = _MARK.match(line), _RESULT.match(line)
        name = (mark or result).group(1 if mark else 2) if (mark or result) else ""
        parts = name.split("/")
        if name and parts[0] != parent:
            current = None
            continue
        if result and len(parts) == 1:
            parent_result, current = _WORD[result.group(1)], None
            continue
        if mark or result:
            test = tests.setdefault(parts[1], GoTest(parts[1])) if len(parts) > 1 else setup
            current = test
            if result and len(parts) == 2:
                test.result, test.seconds = _WORD[result.group(1)], float(result.group(3))
            elif result and result.group(1) == "FAIL":
                test.failed_cases.append("/".join(parts[2:]))
            if result:
                continue
        if current is not None:
            current.output.append(line)
    out = list(tests.values())
    for test in out:
        if not test.result:  # the binary stopped before its parent reported
            test.result, test.unreported = "failed", True
        if test.result == "skipped":
            test.skip_reason = next((x.strip() for x in reversed(test.output)
                                     if "Skipping" in x or "SKIP" in x), "")
    if parent_result == "failed" and not any(t.result == "failed" for t in out):
        setup.result = "failed"
        out.insert(0, setup)
    elif not out and not parent_result:  # the binary never ran the parent at all
        setup.result = "failed"
        out.insert(0, setup)
    return out


def _failure_message(test: GoTest) -> str:
    """What failed, shortly: its failed cases, and the probes' protocols that failed."""
    protos = sorted({m.group(1) for x in test.output
                     for m in [re.search(r"FAILED Command was .*--protocol=(\w+)", x)] if m})
    parts = ["no result: the test binary stopped before TestConformance reported (the end of "
             "the log says why)"] if test.unreported else []
    if test.failed_cases:
        parts.append(f"{len(test.failed_cases)} case(s) failed: "
                     + "; ".join(c.replace("_", " ") for c in test.failed_cases))
    if protos:
        parts.append(f"failed probes: {', '.join(protos)}")
    if not parts:
        last = [x.strip() for x in test.output if x.strip()]
        parts.append(last[-1] if last else "failed")
    return " | ".join(parts)


def write_go_junit(suite: str, tests: list[GoTest], path: str) -> None:
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=suite, tests=str(len(tests)),
                       failures=str(sum(t.result == "failed" for t in tests)),
                       skipped=str(sum(t.result == "skipped" for t in tests)),
                       time=f"{sum(t.seconds for t in tests):.2f}")
    ET.SubElement(ET.SubElement(ts, "properties"), "property", name="made_by", value=MADE_BY)
    for t in tests:
        case = ET.SubElement(ts, "testcase", classname=suite, name=t.name,
                             time=f"{t.seconds:.2f}")
        if t.result == "failed":
            el = ET.SubElement(case, "failure", message=_failure_message(t))
            el.text = "\n".join(t.output[-400:])
        elif t.result == "skipped":
            ET.SubElement(case, "skipped", message=t.skip_reason)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def go_test_main(argv: list[str]) -> int:
    suite, log, out = argv[0], argv[1], argv[2]
    parent, skipped, rest = "TestConformance", {}, argv[3:]
    while rest:
        if rest[0] == "--parent":
            parent, rest = rest[1], rest[2:]
        elif rest[0] == "--skipped":
            name, _, reason = rest[1].partition("=")
            skipped[name], rest = reason, rest[2:]
        else:
            print(f"junit_summary.py: unknown argument {rest[0]}", file=sys.stderr)
            return 2
    try:
        text = open(log, encoding="utf-8", errors="replace").read()
    except OSError:
        text = ""
    tests = go_tests(text, parent)
    seen = {t.name for t in tests}
    tests += [GoTest(n, "skipped", skip_reason=r) for n, r in skipped.items() if n not in seen]
    write_go_junit(suite, tests, out)
    return 0


def _cases_with_messages(path: str) -> list[tuple[str, str, str]]:
    """cases(), and the failure's message where the report is --go-test's (ginkgo's
    messages are long: not shown)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    ours = any(p.get("name") == "made_by" and p.get("value") == MADE_BY
               for p in root.iter("property"))
    messages = {}
    if ours:
        for c in root.iter("testcase"):
            f = c.find("failure")
            if f is not None:
                messages[c.get("name", "")] = f.get("message", "")
    return [(n, r, messages.get(n, "")) for n, r in cases(path)]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--go-test"]:
        return go_test_main(argv[1:])
    if argv[:1] == ["--failures"]:
        for name, result, message in _cases_with_messages(argv[1]):
            if result == "failed":
                print(f"    FAILED: {name}" + (f" ({message})" if message else ""))
        return 0
    suite, path = argv[0], argv[1]
    match = re.compile(argv[2]) if len(argv) > 2 else None
    results = [r for name, r in cases(path) if match is None or match.search(name)]
    print(f"{suite}: {results.count('passed')} passed, {results.count('failed')} failed, "
          f"{results.count('skipped')} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
