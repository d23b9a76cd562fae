"""mypy with a baseline: fail on type errors that are not in tools/mypy-baseline.txt.

The modules configured strict in pyproject.toml are held to it from now on; elsewhere the errors that were
already there when the checker came in are listed in the baseline, and only new ones fail `make lint`.
An entry is `PATH: MESSAGE  [CODE]` without the line number (edits above an old error move it); an error
that occurs twice in a file is listed twice. Fixing errors never fails: the check says how many entries are
gone and `make mypy-baseline` rewrites the file (sorted, so the diff shows what was fixed).

    python tools/mypy_baseline.py            # check
    python tools/mypy_baseline.py --update   # rewrite the baseline from the tree as it is
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "tools" / "mypy-baseline.txt"
# `src/zephyr/x.py:12: error: message  [code]` (mypy's default output with error codes)
_ERROR = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+)(?::\d+)?: error: (?P<message>.*)$")
# Messages that quote a line number ("already defined on line 40") would move with it too.
_LINE_REF = re.compile(r"\bline \d+\b")


def run_mypy() -> list[tuple[str, str]]:
    """(entry, location) of every error mypy reports on the tree, configured by pyproject.toml."""
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-pretty", "--no-error-summary", "--show-error-codes"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode not in (0, 1):  # 2: mypy itself failed (bad config, crash)
        sys.exit(f"mypy failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    errors = []
    for line in proc.stdout.splitlines():
        match = _ERROR.match(line)
        if match:
            message = _LINE_REF.sub("line N", match["message"])
            errors.append((f"{match['path']}: {message}", f"{match['path']}:{match['line']}"))
    return errors


def read_baseline() -> Counter[str]:
    if not BASELINE.exists():
        return Counter()
    return Counter(line for line in BASELINE.read_text(encoding="utf-8").splitlines() if line.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite the baseline from the current errors")
    args = parser.parse_args()
    errors = run_mypy()
    current = Counter(entry for entry, _ in errors)
    if args.update:
        BASELINE.write_text("".join(f"{e}\n" for e in sorted(current.elements())), encoding="utf-8")
        print(f"{BASELINE.relative_to(ROOT)}: {sum(current.values())} errors")
        return 0
    baseline = read_baseline()
    new = current - baseline
    if new:
        print(f"mypy: {sum(new.values())} new type error(s) (not in {BASELINE.relative_to(ROOT)}):")
        seen: Counter[str] = Counter()
        for entry, location in errors:  # the occurrences of an entry past its count in the baseline
            seen[entry] += 1
            if seen[entry] > baseline[entry]:
                print(f"  {location}: {entry.split(': ', 1)[1]}")
        return 1
    fixed = sum((baseline - current).values())
    note = f"; {fixed} baseline entries fixed (make mypy-baseline drops them)" if fixed else ""
    print(f"mypy: no new errors ({sum(current.values())} known{note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
