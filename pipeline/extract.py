"""What a features cache holds, decided by a stream's params: shared by the features stage
(which records it in the cache metadata) and the train stage (which checks it)."""

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
        ident.update(
            clip_len=cfg.clip_len, clip_stride=cfg.clip_stride, max_clips=cfg.max_clips
        )
    return ident
