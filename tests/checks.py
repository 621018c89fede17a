"""tests/checks.py: what the Python test scripts share: each check prints one line ("ok   NAME"
or "FAIL NAME: detail") and is counted; the script ends with the runner's summary line."""
import sys

counts = {"passed": 0, "failed": 0}


def check(name, ok, detail=""):
    counts["passed" if ok else "failed"] += 1
    print(f"ok   {name}" if ok else f"FAIL {name}" + (f": {detail}" if detail else ""))
    sys.stdout.flush()


def summary():
    """Prints "N passed, N failed"; returns the exit status (1 when a check failed)."""
    print(f"{counts['passed']} passed, {counts['failed']} failed")
    return 1 if counts["failed"] else 0
