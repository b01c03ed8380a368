"""Copy data/evaluate/results.md (written by the evaluate stage from metrics.json) into the
README section between the results markers, so the README's table is never typed by hand.

    python scripts/update_readme_results.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"


def main() -> None:
    table = (ROOT / "data/evaluate/results.md").read_text()
    metrics = json.loads((ROOT / "data/evaluate/metrics.json").read_text())
    n = next(iter(next(iter(metrics["streams"].values())).values()))["n"]
    readme = ROOT / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"{readme}: no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    note = f"\n_Generated from `data/evaluate/metrics.json` ({n} test videos; chance = 1/6)._\n\n"
    readme.write_text(head + START + note + table + END + tail)
    print(f"{readme}: results table updated")


if __name__ == "__main__":
    main()
