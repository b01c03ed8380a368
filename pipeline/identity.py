"""What a features cache's content depends on among the ``features.<stream>`` settings.

The features stage stores it in the cache (``params``); the train stage compares it with
params.yaml (``--params-check``), and dvc.yaml's train stages list exactly these keys under
``params:`` (tests/test_deps.py derives them from this function). A module of its own, without
torch: the train stage imports it, and importing it from the extraction code made every change
to extraction re-run every train stage.
"""

from __future__ import annotations

from pipeline.config import StreamFeaturesConfig


def params_identity(cfg: StreamFeaturesConfig) -> dict:
    """The settings of ``cfg`` that decide the cached features (not batch size, threads or
    device), stored as the cache's ``params`` attribute. Settings that do not apply to the
    chosen output or sampling are left out, so changing them changes nothing."""
    ident: dict = {
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "output": cfg.output,
        "crop": cfg.crop,
        "crops": cfg.crops,
        "sampling": cfg.sampling,
    }
    if cfg.output == "taps":
        ident["taps"] = list(cfg.taps)
    if cfg.sampling == "clips":
        ident.update(clip_len=cfg.clip_len, clip_stride=cfg.clip_stride, max_clips=cfg.max_clips)
    return ident
