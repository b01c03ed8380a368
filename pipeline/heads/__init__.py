"""The temporal-head registry (after torchvision's ``models/_api.py``).

Every head maps features (B, T, D) to logits (B, num_classes), takes keyword-only constructor
arguments ``(*, in_dim, num_classes, ...)`` and is registered under its params.yaml name, in the
module of the same name (``pipeline/heads/<name>.py``).

Heads are imported when first asked for, not all at once: a train stage imports only its own
head's module, so dvc.yaml can list that one file as its dependency (tests/test_deps.py) and a
change to one head re-runs that head's stages only. ``head_names()`` lists the heads without
importing them; ``load_all()`` imports every one (tests, the config check of params.yaml).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

from torch import nn

HEADS: dict[str, type[nn.Module]] = {}  # the heads imported so far (see load_all)


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def wrap(cls: type[nn.Module]) -> type[nn.Module]:
        if name in HEADS:
            raise ValueError(f"head '{name}' is already registered by {HEADS[name].__name__}")
        HEADS[name] = cls
        return cls

    return wrap


def head_arguments(name: str) -> set[str]:
    """The constructor's own keyword arguments (in_dim and num_classes excluded)."""
    cls = get_head_class(name)
    params = inspect.signature(cls.__init__).parameters
    return {k for k, p in params.items() if p.kind is p.KEYWORD_ONLY} - {"in_dim", "num_classes"}


def head_names() -> list[str]:
    """Every head's name (its module's name), sorted, without importing any of them."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_all() -> dict[str, type[nn.Module]]:
    """Import every head module -> HEADS, every registered head."""
    for name in head_names():
        get_head_class(name)
    return HEADS


def get_head_class(name: str) -> type[nn.Module]:
    if name not in HEADS and name in head_names():
        importlib.import_module(f"{__name__}.{name}")  # registers it
    if name not in HEADS:
        raise KeyError(f"unknown head '{name}' (registered: {', '.join(head_names())})")
    return HEADS[name]


def build_head(name: str, *, in_dim: int, num_classes: int, **kwargs: Any) -> nn.Module:
    """Instantiate a registered head; unknown keyword arguments raise TypeError naming them."""
    cls = get_head_class(name)
    unknown = set(kwargs) - head_arguments(name)
    if unknown:
        raise TypeError(
            f"head '{name}' has no argument(s) {sorted(unknown)} "
            f"(it takes {sorted(head_arguments(name))})"
        )
    return cls(in_dim=in_dim, num_classes=num_classes, **kwargs)
