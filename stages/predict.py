"""predict: the action of new videos with a trained run (the data/ folder of a repro, or of a
pulled experiment). Per video: the fused label and probability, the top 5 classes and each
model's own top-1, as preds/predictions.csv and predictions.json. Not a dvc.yaml stage:

    python -m stages.predict --run data --out preds VIDEO [VIDEO ...]
    python -m stages.predict --run data --out preds --folder DIR [--head H] [--fusion F]
    python -m stages.predict --run data --out preds --csv FILE [--split S] [--device cuda]

The features are computed with the settings the run's caches record; the model is the one the
evaluation picked unless --head / --fusion name another (pipeline/predict.py)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from pipeline.fusion_saved import FusionFileError
from pipeline.models import ModelFileError
from pipeline.predict import PredictError, Prediction, predict_videos
from pipeline.predict_features import RunSettingsError
from pipeline.predict_io import csv_videos, folder_videos, write_predictions

log = logging.getLogger(__name__)


def batch_sizes(params: Path) -> dict[str, int]:
    """features.<stream>.batch_size of the run's params.yaml, when there is one: the caches do
    not record it, and on the CPU it decides the last bits of the features (oneDNN picks its
    kernels by batch size)."""
    try:
        features = yaml.safe_load(params.read_text()).get("features", {})
        return {s: int(c["batch_size"]) for s, c in features.items() if "batch_size" in c}
    except (OSError, AttributeError, TypeError, ValueError, yaml.YAMLError) as e:
        # not an error (the features are the same to ~1e-6), but said: they may then differ
        # from the caches' in their last bits
        log.warning(
            "%s: cannot read features.<stream>.batch_size (%s): the features batch size "
            "defaults, and the features may differ from the run's caches in the last bits",
            params,
            e,
        )
        return {}


def main(
    videos: Sequence[Path],
    *,
    run: Path,
    out: Path,
    head: str | None = None,
    fusion: str | None = None,
    split: str | None = None,
    device: str = "auto",
    params: Path | None = None,
) -> list[Prediction]:
    params = params if params is not None else run.resolve().parent / "params.yaml"
    try:
        preds = predict_videos(
            videos,
            run=run,
            head=head,
            fusion=fusion,
            splits=(split,) if split else (),
            device=device,
            batch_sizes=batch_sizes(params),
        )
    # each names the file or setting and the reason: a run whose settings cannot be recovered,
    # a model or fusion file that is not one, a choice the run does not have
    except (PredictError, RunSettingsError, ModelFileError, FusionFileError) as e:
        raise SystemExit(f"predict: {e}") from None
    write_predictions(preds, out)
    return preds


def cli(argv: Sequence[str] | None = None) -> None:
    """The console entry point (vidfeat-predict)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("videos", nargs="*", type=Path, help="video files")
    p.add_argument("--folder", type=Path, help="every video file under this folder")
    p.add_argument("--csv", type=Path, help="a CSV with a 'path' column (or paths in column 1)")
    p.add_argument("--run", type=Path, required=True, help="the run's data/ folder")
    p.add_argument("--out", type=Path, required=True, help="folder for predictions.csv/json")
    p.add_argument("--head", help="a trained head (default: the evaluation's pick)")
    p.add_argument("--fusion", help="a fusion method, or one model: rgb, flow, rgb+flow")
    p.add_argument("--split", help="one split's models (default: every split, averaged)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--params", type=Path, help="the run's params.yaml (batch sizes; default: beside --run)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if sum(bool(x) for x in (args.videos, args.folder, args.csv)) != 1:
        p.error("give video files, or --folder DIR, or --csv FILE (one of them)")
    try:
        if args.folder:
            videos = folder_videos(args.folder)
        elif args.csv:
            videos = csv_videos(args.csv)
        else:
            videos = list(args.videos)
    except (OSError, ValueError) as e:
        raise SystemExit(f"predict: {e}") from None
    preds = main(
        videos,
        run=args.run,
        out=args.out,
        head=args.head,
        fusion=args.fusion,
        split=args.split,
        device=args.device,
        params=args.params,
    )
    failed = sum(p.status != "ok" for p in preds)
    print(
        f"predict: {len(preds) - failed} predicted, {failed} failed -> "
        f"{args.out / 'predictions.csv'}, {args.out / 'predictions.json'}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    cli()
