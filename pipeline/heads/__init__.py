"""The temporal-head registry (after torchvision's ``models/_api.py``).

Every head maps features (B, T, D) to logits (B, num_classes), takes keyword-only constructor
arguments ``(*, in_dim, num_classes, ...)`` and is registered under its params.yaml name.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

HEADS: dict[str, type[nn.Module]] = {}


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


def get_head_class(name: str) -> type[nn.Module]:
    if name not in HEADS:
        raise KeyError(f"unknown head '{name}' (registered: {', '.join(sorted(HEADS))})")
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


def _import_all() -> None:
    """Import every module of this package: each registers its head(s) on import."""
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


_import_all()
