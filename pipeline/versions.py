"""Versions of the libraries that decide what a cache holds, for its metadata."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = (
    "torch",
    "torchvision",
    "numpy",
    "av",
    "opencv-contrib-python-headless",
    "zarr",
    "h5py",
)


def versions() -> dict[str, str]:
    """{package: version} of the installed libraries (``absent`` for one not installed)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
