"""What the fuse stage fitted, saved so that new videos' scores can be fused the same way.

Per head and method, ``<head>-<method>/fusion.json`` beside its scores.csv: the streams (sorted)
and per split what was applied to that split's test scores:

- ``{"rule": "sum"}``, ``{"rule": "product", "eps": ...}``, ``{"rule": "weighted",
  "weights": {stream: w}}``: the fixed rules of pipeline/fusion.py;
- ``{"rule": "svm", "per_recurrence": bool, "svm": svm_to_json(SvmFit)}``: the linear SVM with
  its chosen C, coefficients and intercepts (pipeline/fusion_svm.py), over per-video rows or,
  for heads with window scores, per-window rows weighted by the eq. 8 gains;
- ``{"rule": "learned", "kind": "weighted" | "product", "weights": [w per sorted stream]}`` or
  ``{"rule": "learned", "kind": "svm", "per_recurrence": ..., "svm": ...}``: what the learned
  fusion chose (pipeline/fusion_learn.py), the weights exactly as applied.

``apply_fusion`` runs the same functions the stage ran on these, so the stage's test scores fed
back give its fused table to the last digit (tests/test_fusion_saved.py). JSON keeps float64
exactly (every float is written with the digits repr needs).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.fusion import PRODUCT_EPS, check_streams, product_fuse, sum_fuse, weighted_fuse
from pipeline.fusion_learn import Learned, combine
from pipeline.fusion_svm import SvmFit, SvmRows, check_windows, svm_features, window_rows

FORMAT = "vidfeat-fusion/1"
FILE = "fusion.json"


class FusionFileError(ValueError):
    """A saved fusion that cannot be read or applied; names the file and the reason."""


def fixed_spec(method: str, *, weights: Mapping[str, float], streams: list[str]) -> dict:
    """The spec of a fixed rule (sum, product, weighted) over ``streams``."""
    if method == "weighted":
        return {"rule": "weighted", "weights": {s: float(weights[s]) for s in sorted(streams)}}
    if method == "product":
        return {"rule": "product", "eps": PRODUCT_EPS}
    return {"rule": method}


def svm_to_json(fit: SvmFit) -> dict:
    """Exact in JSON: floats are written with every digit repr needs."""
    return {
        "c": fit.c,
        "num_classes": fit.num_classes,
        "classes": fit.classes.tolist(),
        "coef": fit.coef.tolist(),
        "intercept": fit.intercept.tolist(),
    }


def svm_from_json(d: Mapping[str, Any]) -> SvmFit:
    return SvmFit(
        np.asarray(d["coef"], dtype=np.float64).reshape(len(d["intercept"]), -1),
        np.asarray(d["intercept"], dtype=np.float64),
        np.asarray(d["classes"], dtype=np.int64),
        float(d["c"]),
        int(d["num_classes"]),
    )


def svm_spec(fit: SvmFit, *, per_recurrence: bool) -> dict:
    return {"rule": "svm", "per_recurrence": per_recurrence, "svm": svm_to_json(fit)}


def learned_spec(chosen: Learned, *, per_recurrence: bool) -> dict:
    if chosen.kind == "svm":
        assert chosen.svm is not None  # learned_fuse sets it with the svm kind
        svm = svm_spec(chosen.svm, per_recurrence=per_recurrence)
        return {**svm, "rule": "learned", "kind": "svm"}
    return {"rule": "learned", "kind": chosen.kind, "weights": list(chosen.exact_weights or ())}


def write_fusion(
    path: Path, *, head: str, method: str, streams: list[str], splits: Mapping[str, dict]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": FORMAT,
        "head": head,
        "method": method,
        "streams": sorted(streams),
        "splits": {k: splits[k] for k in sorted(splits)},
    }
    path.write_text(json.dumps(doc, indent=1))


def read_fusion(path: Path) -> dict[str, Any]:
    """The saved fusion at ``path``; FusionFileError naming it when missing or not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FusionFileError(
            f"{path}: no saved fusion (the fuse stage writes it; re-run it: dvc repro fuse)"
        ) from None
    except (OSError, json.JSONDecodeError) as e:
        raise FusionFileError(f"{path}: cannot read the saved fusion ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise FusionFileError(f"{path}: format {got!r}, not {FORMAT!r}; re-run the fuse stage")
    missing = [k for k in ("head", "method", "streams", "splits") if k not in doc]
    if missing:
        raise FusionFileError(f"{path}: lacks {missing}; re-run the fuse stage")
    return doc


def _svm_rows(
    spec: Mapping[str, Any],
    probs: Mapping[str, np.ndarray],
    windows: Mapping[str, np.ndarray] | None,
    window_weights: np.ndarray | None,
) -> SvmRows:
    """The SVM's rows of the videos, as the fuse stage built them (pipeline/fusing.py)."""
    if spec.get("per_recurrence"):
        if windows is None or window_weights is None:
            raise FusionFileError("a per-recurrence SVM needs the window scores of every stream")
        w, _ = check_windows(windows, window_weights, what="saved per-recurrence svm fusion")
        return window_rows(w, window_weights)
    streams, _, _ = check_streams(probs, what="saved svm fusion")
    return SvmRows.per_video(svm_features(streams))


def apply_fusion(
    spec: Mapping[str, Any],
    probs: Mapping[str, np.ndarray],
    *,
    windows: Mapping[str, np.ndarray] | None = None,
    window_weights: np.ndarray | None = None,
) -> np.ndarray:
    """One split's saved fusion ``spec`` on {stream: (N, C) probabilities} -> (N, C) fused
    scores, larger = more likely. ``windows``: {stream: (N, M, C)} window probabilities and
    ``window_weights`` (M,), for a per-recurrence SVM."""
    rule = spec.get("rule")
    if rule == "sum":
        return sum_fuse(probs)
    if rule == "product":
        return product_fuse(probs, eps=float(spec.get("eps", PRODUCT_EPS)))
    if rule == "weighted":
        return weighted_fuse(probs, weights=spec["weights"])
    if rule == "svm" or (rule == "learned" and spec.get("kind") == "svm"):
        fit = svm_from_json(spec["svm"])
        return fit.decision(_svm_rows(spec, probs, windows, window_weights))
    if rule == "learned":
        streams, _, _ = check_streams(probs, what="saved learned fusion")
        w = np.asarray(spec["weights"], dtype=np.float64)
        if len(w) != len(streams):
            raise FusionFileError(f"learned fusion: {len(w)} weights for streams {sorted(streams)}")
        return combine(spec["kind"], np.stack([streams[s] for s in sorted(streams)]), w)
    raise FusionFileError(f"unknown fusion rule {rule!r} in a saved fusion")
