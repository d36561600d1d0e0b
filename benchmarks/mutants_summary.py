"""Per-module and per-function counts of a finished ``mutmut run`` (``make mutants``), and every
surviving mutant's name: ``mutmut show NAME`` prints its diff."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path


def main() -> int:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run(
        [str(mutmut), "results", "--all", "true"], capture_output=True, text=True, check=True
    )
    by_module: dict[str, Counter] = {}
    survivors = []
    for line in out.stdout.splitlines():
        m = re.match(r"\s*(\S+)__mutmut_\d+: (.+)$", line)
        if not m:
            continue
        name, status = m.groups()
        module, _, function = name.rpartition(".x")
        by_module.setdefault(module, Counter())[status] += 1
        if status == "survived":
            survivors.append(line.strip().split(":")[0])
    print(f"{'module':36} {'killed':>7} {'survived':>9} {'no tests':>9} {'other':>6}")
    for module, counts in sorted(by_module.items()):
        other = sum(v for k, v in counts.items() if k not in ("killed", "survived", "no tests"))
        print(f"{module:36} {counts['killed']:7} {counts['survived']:9} {counts['no tests']:9} {other:6}")
    print(f"\n{len(survivors)} survivors (explained in docs/mutants.md):")
    for name in survivors:
        print("  ", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
