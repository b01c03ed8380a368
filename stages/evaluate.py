"""evaluate: top-1, top-5 and mean-class accuracy per split, and their mean and sample standard
deviation over the splits (null for one split), for every head x stream and every fusion
(metrics.json, results.md); their summary for `dvc metrics show` (summary/: one small JSON per
head and stream, per head's best fusion, and the best model); per-class accuracy (CSV), and the
confusion matrix of one model as a PNG and as a DVC plot (CSV of actual/predicted class names).
The report: pipeline/report.py."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import EvaluateConfig, RunConfig
from pipeline.report import ReportError, evaluate


def main(
    cfg: EvaluateConfig, run: RunConfig, *, scores: Path, fused: Path, manifest: Path, out: Path
) -> None:
    try:
        evaluate(cfg=cfg, run=run, scores=scores, fused=fused, manifest=manifest, out=out)
    # FileNotFoundError: a model of the run without scores; ValueError: a file that is not a
    # score table, or scores that do not fit the manifest's classes. Each names the file.
    except (ReportError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"evaluate: {e}") from None


if __name__ == "__main__":
    from pipeline.config import section
    from stages._cli import parse

    args, params = parse(__doc__, "scores", "fused", "manifest", "out")
    main(
        section(params, "evaluate", EvaluateConfig),
        section(params, "run", RunConfig),
        scores=args.scores,
        fused=args.fused,
        manifest=args.manifest,
        out=args.out,
    )
