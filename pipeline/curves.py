"""A train stage's training curves, written with dvclive for ``dvc plots show``: per split and
per training stage (pretraining, supervised training or a head's phases), the mean loss and
the learning rate of every epoch, from the epochs train_log.json records.

Layout (dvclive's own, in the folder given):

    plots/metrics/split<s>/<stage>/loss.tsv   columns step, loss
    plots/metrics/split<s>/<stage>/lr.tsv     columns step, lr; only where the lr changes
    plots/metrics/split<s>/<stage>/val_top1.tsv   columns step, val_top1; with out-of-fold models

``val_top1`` is the validation curve of the cross-fitting (train.oof_folds >= 2): after each
epoch, the mean over the fold models of their top-1 on the training videos each held out
(pipeline/training.py). The fold models train as the split's model does on (k-1)/k of its
videos, so it is that model's curve on videos it did not see, a little pessimistic.

A learning rate that is the same every epoch of a stage (no ``schedule``, no warm-up: the
shipped settings) has no curve: DVC draws it as a flat line labelled "0" (Vega's ticks for an
axis of zero extent), which reads as lr = 0, and it would double the plots to no purpose; its
value is in train_log.json and params.yaml.

``step`` counts a split's epochs over all of its stages in training order, so each stage's
curve starts where the one before ended. A stage has a file of its own, not one curve over the
whole run, because stages minimise different losses (RTSAE's reconstruction before its
cross-entropy, TSRNN's key-frame loss before its temporal one): on one axis the smaller would
be a flat line.

The folder is a DVC output, so it must depend on train_log.json only: no timestamps
(``log_metric``'s default), no report, no dvc.yaml of dvclive's own (ours declares the plots),
no experiment saved, no repository opened (``_live``), and no ``next_step`` (its signal file
for the VS Code extension is outside the folder and of no use here)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dvclive import Live

log = logging.getLogger(__name__)


class CurvesError(ValueError):
    """A train log without the per-epoch records the curves are drawn from; names the split."""


def curve_points(
    train_log: Mapping[str, Any],
) -> dict[str, list[tuple[int, str, float, float, float | None]]]:
    """train_log.json's content -> {split: [(step, stage, loss, lr, val_top1 or None) per
    epoch]}, step counting the split's epochs over all of its stages in the order they ran
    (0-based)."""
    splits = train_log.get("splits")
    if not isinstance(splits, Mapping) or not splits:
        raise CurvesError("train log has no splits")
    out = {}
    for split, entry in splits.items():
        epochs = entry.get("epochs")
        if not epochs:
            raise CurvesError(
                f"train log split {split} has no 'epochs' records (written by an older "
                "pipeline/training.py: re-run the train stage)"
            )
        for name in (split, *{e["stage"] for e in epochs}):
            # a path separator would make a folder level of its own in dvclive's layout
            if not name or os.sep in name or "/" in name:
                raise CurvesError(f"train log split {split}: {name!r} cannot name a curve file")
        out[split] = [
            (step, e["stage"], float(e["loss"]), float(e["lr"]), e.get("val_top1"))
            for step, e in enumerate(epochs)
        ]
    return out


def _live(out: Path) -> Live:
    """A dvclive ``Live`` writing to ``out`` that writes its files and nothing else (dvclive
    imports dvc, ~1 s: imported here, only a stage that writes curves pays for it)."""
    from dvclive import Live

    class FilesOnly(Live):
        # Live.__init__ opens the DVC and git repository around the working directory, for
        # experiments, Studio and its own dvc.yaml, none of which a pipeline stage wants; and
        # dvclive 3.49.1 raises there (scmrepo SCMError "Empty git repo", not caught) in a
        # repository without a commit yet: `git init; dvc init; dvc repro` would fail.
        def _init_dvc(self) -> None:
            self._dvc_file = "dvc.yaml"  # read only with dvcyaml set, which it is not

        # Live.sync (at end()) writes a metrics.json summary of the last epoch's values and
        # posts them to DVC Studio; here there is nothing live to post (the curves are written
        # after training) and the summary would break the plots: `dvc plots show` reads every
        # file of the folder as plot data and fails on it ("argument of type 'NoneType' is not
        # iterable"). train_log.json has those values.
        def sync(self) -> None:
            pass

    # save_dvc_exp False: an experiment is `dvc exp run`'s to save, not each train stage's;
    # dvcyaml False: our dvc.yaml declares these plots (and is no output of the stage)
    return FilesOnly(dir=str(out), report=None, save_dvc_exp=False, dvcyaml=False)


def write_curves(train_log: Mapping[str, Any], out: Path) -> list[Path]:
    """Write the training curves of train_log.json's content into the folder ``out``
    (dvclive's layout, see the module docstring; dvclive clears what it wrote there before).
    Returns the curve files written, sorted."""
    points = curve_points(train_log)
    out = Path(out)
    with _live(out) as live:
        for split, rows in points.items():
            rates: dict[str, set[float]] = {}
            for _, stage, _, lr, _ in rows:
                rates.setdefault(stage, set()).add(lr)
            for step, stage, loss, lr, val in rows:
                live.step = step
                live.log_metric(f"split{split}/{stage}/loss", loss)
                if len(rates[stage]) > 1:  # a constant lr has no curve (module docstring)
                    live.log_metric(f"split{split}/{stage}/lr", lr)
                if val is not None:
                    live.log_metric(f"split{split}/{stage}/val_top1", float(val))
    files = sorted((out / "plots" / "metrics").rglob("*.tsv"))
    log.info("training curves of %d split(s): %d files under %s", len(points), len(files), out)
    return files
