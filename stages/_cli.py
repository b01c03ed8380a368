"""The few lines every stage's ``__main__`` shares: argparse with --params, and logging."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from pipeline.config import load_params


def parse(description: str, *paths: str, extra: dict[str, dict[str, Any]] | None = None):  # noqa: ANN201
    """Parse ``--params`` plus one required ``--<name>`` Path option per entry of ``paths``.
    Returns (args, params dict)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    for name in paths:
        p.add_argument(f"--{name}", type=Path, required=True)
    for name, kw in (extra or {}).items():
        p.add_argument(f"--{name}", **kw)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args, load_params(args.params)
