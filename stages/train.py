"""train: one temporal head on one stream's cached features (or several streams' features
concatenated along D, e.g. rgb+flow for TS-LSTM and RTSAE), for every split of the manifest.
Writes per-video softmax scores (test videos, and out-of-fold scores for training videos), the
trained weights and, with --curves, the training curves of every split as DVC plots written
with dvclive (pipeline/curves.py). Reads only its head's params section and the `train`
section (and, with --params-check, the `features.<stream>` sections the caches must have been
written with).

The protocol: pipeline/training.py; cache layouts, views, the resampling of unequal lengths
to `train.steps` (25 by default), and features streamed from the caches when they exceed
`train.memory_gb`: pipeline/streams.py."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cache import CacheError
from pipeline.config import ConfigError, StreamFeaturesConfig, TrainConfig, head_section, section
from pipeline.curves import CurvesError, write_curves
from pipeline.heads import get_head_class
from pipeline.identity import params_identity
from pipeline.streams import StreamError
from pipeline.training import TrainError, train_head


def main(
    head: str,
    stream: str,
    *,
    head_params: dict,
    cfg: TrainConfig,
    features: list[Path],
    manifest: Path,
    out: Path,
    expected: list[dict] | None = None,
    curves: Path | None = None,
) -> None:
    """expected: one params_identity per --features cache (None: not checked). curves: the
    folder of the training curves (None: not written)."""
    try:
        trained = train_head(
            head=head,
            stream=stream,
            head_params=head_params,
            cfg=cfg,
            features=features,
            manifest=manifest,
            out=out,
            expected=expected,
        )
    except (StreamError, CacheError, TrainError) as e:  # each names the cache or the split
        raise SystemExit(f"train: {e}") from None
    if curves is not None:
        try:
            write_curves(trained.log, curves)
        except CurvesError as e:
            raise SystemExit(f"train: {curves}: {e}") from None


def expected_params(params: dict, stream: str, n_caches: int) -> list[dict]:
    """params_identity of features.<s> in params.yaml for each s of ``stream`` split on '+'."""
    names = stream.split("+")
    if len(names) != n_caches:
        raise SystemExit(
            f"train: --stream {stream} names {len(names)} streams, --features {n_caches}"
        )
    try:
        return [
            params_identity(section(params, f"features.{s}", StreamFeaturesConfig)) for s in names
        ]
    except ConfigError as e:
        raise SystemExit(f"train: --params-check: {e}") from None


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(
        __doc__,
        "manifest",
        "out",
        extra={
            "head": {"required": True},
            "stream": {"required": True},
            "features": {"type": Path, "nargs": "+", "required": True},
            "curves": {
                "type": Path,
                "default": None,
                "help": "folder of the training curves (dvclive); not written when absent",
            },
            "params-check": {
                "action": argparse.BooleanOptionalAction,
                "default": False,
                "help": "fail unless each cache was written with params.yaml's features.<stream>",
            },
        },
    )
    try:  # the head's section against its constructor, before any cache is opened
        head = get_head_class(args.head)
    except KeyError as e:  # its message lists the heads there are
        raise SystemExit(f"train: {e.args[0]}") from None
    try:
        # joint.<head> changes heads.<head> for the stage on two streams or more
        joint = "+" in args.stream
        hp = head_section(params, args.head, head, source=str(args.params), joint=joint)
    except ConfigError as e:
        raise SystemExit(f"train: {e}") from None
    main(
        args.head,
        args.stream,
        head_params=hp,
        cfg=section(params, "train", TrainConfig),
        features=args.features,
        manifest=args.manifest,
        out=args.out,
        expected=(
            expected_params(params, args.stream, len(args.features)) if args.params_check else None
        ),
        curves=args.curves,
    )
