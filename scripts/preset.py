"""Run a paper preset as a DVC experiment: presets/<name>.yaml over params.yaml.

    bash scripts/run.sh preset <name> [dvc exp run arguments, e.g. -n name, --queue]
    bash scripts/run.sh preset <name> --print    # only show the command

The preset is checked first (strictly, as a stage would load it), so a bad preset stops here
with the file and key named, not in the middle of a run. See pipeline/presets.py.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import ConfigError, read_params  # noqa: E402
from pipeline.presets import check_preset, overrides, read_preset  # noqa: E402


def main(argv: list[str]) -> int:
    names = sorted(p.stem for p in (ROOT / "presets").glob("*.yaml"))
    if not argv or argv[0].startswith("-"):
        print(f"usage: bash scripts/run.sh preset <{'|'.join(names)}> [dvc exp run args]")
        return 2
    name, rest = argv[0], argv[1:]
    path = ROOT / "presets" / f"{name}.yaml"
    if not path.is_file():
        print(f"preset: no {path.relative_to(ROOT)} (presets: {', '.join(names)})", file=sys.stderr)
        return 2
    try:
        params = read_params(ROOT / "params.yaml")
        check_preset(path, params)
    except ConfigError as e:
        print(f"preset: {e}", file=sys.stderr)
        return 2
    sets = [a for o in overrides(params, read_preset(path)) for a in ("-S", o)]
    only_print = "--print" in rest
    cmd = ["dvc", "exp", "run", *sets, *(a for a in rest if a != "--print")]
    print(shlex.join(cmd))
    if only_print:
        return 0
    os.chdir(ROOT)
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
