"""fuse: late fusion of each head's per-stream scores (sum, product, weighted, SVM, learned), per
split, on the test videos every stream has. Writes fused score tables `<head>-<method>/scores.csv`,
svm_c.json and learned.json. The logic: pipeline/fusing.py (fuse_score_dir)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import FusionConfig, RunConfig
from pipeline.fusing import fuse_score_dir


def main(cfg: FusionConfig, run: RunConfig, *, scores: Path, out: Path) -> None:
    try:
        fuse_score_dir(cfg=cfg, run=run, scores=scores, out=out)
    # FileNotFoundError: a model of the run without scores (names the path); ValueError: a
    # file that is not a score table, or scores a fusion cannot take (names the stream)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"fuse: {e}") from None


if __name__ == "__main__":
    from pipeline.config import section
    from stages._cli import parse

    args, params = parse(__doc__, "scores", "out")
    main(
        section(params, "fusion", FusionConfig),
        section(params, "run", RunConfig),
        scores=args.scores,
        out=args.out,
    )
