"""features: a 2D or 3D CNN per stream (rgb frames or clips, stacked flow or flow clips), written
per video as float16 into a pack cache: pooled (T, D), multi-level taps, or conv maps, with
centre or 10-crops. Resumable like flow (damaged entries recomputed), and sharded over ranks
under torchrun:

    torchrun --nproc_per_node 4 -m stages.features --stream rgb --input data/decode --out data/features/rgb
"""

from __future__ import annotations

from pathlib import Path

from pipeline.backbones import WeightsError
from pipeline.cache import CacheError
from pipeline.config import (
    DEFAULT_CACHE,
    CacheConfig,
    ConfigError,
    StreamFeaturesConfig,
    section,
)
from pipeline.extract import extract_features
from pipeline.plan import PlanError
from pipeline.runner import Counts
from pipeline.world import SharedDirError


def main(
    cfg: StreamFeaturesConfig,
    *,
    stream: str,
    source: Path,
    out: Path,
    cache_cfg: CacheConfig = DEFAULT_CACHE,
) -> Counts:
    return extract_features(
        cfg=cfg,
        stream=stream,
        source=source,
        cache=out / "cache",
        failures_file=out / "failures.csv",
        cache_cfg=cache_cfg,
    )


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(
        __doc__, "input", "out", extra={"stream": {"required": True, "choices": ["rgb", "flow"]}}
    )
    try:
        main(
            section(params, f"features.{args.stream}", StreamFeaturesConfig),
            stream=args.stream,
            source=args.input,
            out=args.out,
            cache_cfg=section(params, "cache", CacheConfig),
        )
    except (CacheError, ConfigError, PlanError, SharedDirError, WeightsError) as e:
        # each names the file and the reason (a damaged cache or full disk, settings that do
        # not fit the frames upstream, a plan from another decoder, ranks that do not share the
        # output, weights that cannot be had): a trace would only bury it
        raise SystemExit(f"features ({args.stream}): {e}") from None
