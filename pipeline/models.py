"""Saved models: the train stage's ``model_split<s>.pt``, one self-describing checkpoint per
split, and the one loader that rebuilds the head from it.

A checkpoint says what its model is without params.yaml or the caches: the head's name, the
settings it was trained with, the constructor arguments it was built with (in_dim, num_classes,
stream_dims, ...), the class names in manifest order (score column k is class k), the streams
and each stream's features identity (the cache's params identity, backbone and weights), and the
T its sequences were brought to (train.steps). So ``predict`` can compute the same features for
a new video and feed the head what it was trained on, and refuse a model that does not fit.

The file is a plain dict of strings, numbers, lists and tensors, read with
``torch.load(weights_only=True)``: no pickled code runs when a model file is opened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.heads import build_head

# The format tag: a file without it (a bare state_dict, from before) or with another is refused.
FORMAT = "vidfeat-model/1"
KEYS = (
    "format",
    "head",
    "stream",
    "split",
    "params",
    "kwargs",
    "classes",
    "features",
    "steps",
    "state_dict",
)


class ModelFileError(ValueError):
    """A model file that is not a checkpoint this code can load; names the file and why."""


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint says of its model.

    stream: "rgb", "flow" or "rgb+flow" (streams concatenated along D in this order);
    kwargs: the constructor arguments, in_dim and num_classes included; classes: (C,) names in
    manifest order; features: one dict per stream (stream, params, backbone, weights, layout);
    steps: the T every sequence was brought to (None: the training set had no video)."""

    path: Path
    head: str
    stream: str
    split: str
    params: dict[str, Any]
    kwargs: dict[str, Any]
    classes: tuple[str, ...]
    features: tuple[dict[str, Any], ...]
    steps: int | None

    @property
    def streams(self) -> list[str]:
        return self.stream.split("+")


def checkpoint(
    *,
    head: str,
    stream: str,
    split: str,
    params: Mapping[str, Any],
    kwargs: Mapping[str, Any],
    classes: Sequence[str],
    features: Sequence[Mapping[str, Any]],
    steps: int | None,
    state_dict: Mapping[str, torch.Tensor],
) -> dict[str, Any]:
    """The checkpoint dict of one trained model (what ``save_model`` writes)."""
    return {
        "format": FORMAT,
        "head": head,
        "stream": stream,
        "split": str(split),
        "params": dict(params),
        "kwargs": dict(kwargs),
        "classes": list(classes),
        "features": [dict(f) for f in features],
        "steps": steps,
        "state_dict": dict(state_dict),
    }


def save_model(path: Path, ckpt: Mapping[str, Any]) -> None:
    torch.save(dict(ckpt), path)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dict at ``path``; ModelFileError naming the file when it cannot be read,
    is not a checkpoint (a bare state_dict from before this format), is of another format or
    lacks a key."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file") from None
    except Exception as e:  # a damaged file, or one that needs pickled code
        raise ModelFileError(f"{path}: not a model file torch can read safely ({e})") from None
    if not isinstance(data, dict) or "format" not in data:
        what = "a bare state_dict (weights only)" if isinstance(data, dict) else type(data).__name__
        raise ModelFileError(
            f"{path}: {what}, not a model checkpoint ({FORMAT}): it does not say which head, "
            "classes and features it belongs to; re-run the train stage (dvc repro)"
        )
    if data["format"] != FORMAT:
        raise ModelFileError(
            f"{path}: checkpoint format {data['format']!r}, this code reads {FORMAT!r}; "
            "re-run the train stage (dvc repro)"
        )
    missing = [k for k in KEYS if k not in data]
    if missing:
        raise ModelFileError(f"{path}: checkpoint lacks {missing}; re-run the train stage")
    for key in ("params", "kwargs", "state_dict"):
        if not isinstance(data[key], dict):
            raise ModelFileError(f"{path}: '{key}' is {type(data[key]).__name__}, not a dict")
    return data


def load_model(path: Path, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelInfo]:
    """The head saved at ``path``, rebuilt with its constructor arguments, its weights loaded
    (every key, strictly), in eval mode on ``device`` -> (model, ModelInfo). ModelFileError
    names the file and the reason when it is not such a checkpoint or does not load."""
    path = Path(path)
    data = read_checkpoint(path)
    kwargs = dict(data["kwargs"])
    classes = tuple(str(c) for c in data["classes"])
    if kwargs.get("num_classes") != len(classes):
        raise ModelFileError(
            f"{path}: num_classes {kwargs.get('num_classes')} but {len(classes)} class names"
        )
    try:
        model = build_head(data["head"], **kwargs)
        model.load_state_dict(data["state_dict"])
    except (KeyError, TypeError, RuntimeError) as e:  # unknown head or argument, other weights
        reason = " ".join(str(e).split())  # load_state_dict's list of keys, on one line
        raise ModelFileError(f"{path}: cannot rebuild head {data['head']!r} ({reason})") from None
    model.to(device).eval()
    info = ModelInfo(
        path=path,
        head=str(data["head"]),
        stream=str(data["stream"]),
        split=str(data["split"]),
        params=dict(data["params"]),
        kwargs=kwargs,
        classes=classes,
        features=tuple(dict(f) for f in data["features"]),
        steps=None if data["steps"] is None else int(data["steps"]),
    )
    return model, info
