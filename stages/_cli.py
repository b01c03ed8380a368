"""The few lines every stage's ``__main__`` shares: argparse with --params, and logging."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, load_params


def parse(description: str, *paths: str, extra: dict[str, dict[str, Any]] | None = None):  # noqa: ANN201
    """Parse ``--params`` plus one required ``--<name>`` Path option per entry of ``paths``.
    Returns (args, params dict), the whole params file checked before the stage reads a video:
    a bad setting stops the stage with one line naming the file, the key and the reason."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name in paths:
        p.add_argument(f"--{name}", type=Path, required=True)
    for name, kw in (extra or {}).items():
        p.add_argument(f"--{name}", **kw)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args, load_params(args.params)
    except ConfigError as e:  # names the file, the key and the reason: a trace would bury it
        raise SystemExit(str(e)) from None
