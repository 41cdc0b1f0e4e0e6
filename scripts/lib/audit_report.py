"""Reads pip-audit's JSON reports of the locks (scripts/audit) and says what they mean, in its exit status:
0 every locked package was audited and none has a known vulnerability; 1 some have (listed); 3 the audit is not
whole: the vulnerability service could not be asked, or could not answer for some packages (listed), so nothing
can be said about them. Torch's local CPU build (a `+cpu` version) is not on PyPI: it is audited as its release.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VULNERABLE, NOT_AUDITED = 1, 3


def verdict(reports: dict[str, Path | None]) -> tuple[int, list[str]]:
    """The exit status and the lines to print for each lock's report (None: pip-audit wrote none, it failed)."""
    found: list[str] = []
    missing: list[str] = []
    for lock, report in reports.items():
        if report is None or not report.exists():
            missing.append(f"{lock}: the vulnerability service could not be asked")
            continue
        dependencies = json.loads(report.read_text())["dependencies"]
        skipped = [d["skip_reason"] for d in dependencies if "skip_reason" in d]
        if skipped:  # one line per lock: the count and the first reason (they are alike)
            missing.append(f"{lock}: {len(skipped)} of {len(dependencies)} packages not audited, e.g. {skipped[0]}")
        for dependency in dependencies:
            for vuln in dependency.get("vulns", []):
                fixed = ", ".join(vuln.get("fix_versions", [])) or "no fixed release"
                found.append(f"{lock}: {dependency['name']} {dependency['version']}: {vuln['id']} (fixed in: {fixed})")
    if found:
        return VULNERABLE, found
    return (NOT_AUDITED, missing) if missing else (0, [])


def main(argv: list[str]) -> int:
    """argv: LOCK=REPORT pairs; an empty REPORT means pip-audit failed before writing one."""
    reports = {lock: Path(report) if report else None for lock, report in (arg.split("=", 1) for arg in argv)}
    status, lines = verdict(reports)
    for line in lines:
        print(line, file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
