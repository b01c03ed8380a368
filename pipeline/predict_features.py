"""New videos' features for ``predict``, made as a run's stages made its caches.

The settings come from what the run recorded, never from params.yaml: the decode settings and
decoder of its plan.json, the flow settings of its flow cache's metadata, and each features
cache's params identity, weights and precision. The work goes through the functions the stages
call: ``pipeline.video.probe`` and ``PlannedVideo.probed`` (prepare, decode),
``pipeline.flow.video_flow`` (flow), and ``feature_model``, ``VideoInputs`` and
``video_features`` (pipeline/extract.py, features), the flow stacks passing through a flow
cache as in the stages.
A setting that cannot be recovered, or caches that do not agree with the plan, are refused
(RunSettingsError naming the file and the reason).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipeline.cache import CacheError, open_cache
from pipeline.config import (
    ConfigError,
    FarnebackConfig,
    FlowConfig,
    RaftConfig,
    StreamFeaturesConfig,
    TVL1Config,
)
from pipeline.extract import VideoInputs, feature_model, video_features
from pipeline.fingerprint import file_sha256
from pipeline.flow import RAFT_ALGORITHMS, flow_settings, video_flow
from pipeline.identity import params_identity
from pipeline.inference import resolve_precision
from pipeline.plan import Plan, PlanError, PlannedVideo, read_plan

log = logging.getLogger(__name__)


class RunSettingsError(ValueError):
    """A run folder whose recorded settings cannot be recovered or do not agree; names the
    file and the reason."""


@dataclass(frozen=True)
class RunFeatures:
    """How a run made its features: the plan (its decode settings and decoder; no videos),
    the flow settings (None when no stream reads flow), and per stream its features settings
    and the cache's attributes."""

    plan: Plan
    flow: FlowConfig | None
    flow_attrs: dict | None
    configs: dict[str, StreamFeaturesConfig]
    attrs: dict[str, dict]


def _attrs(path: Path) -> dict:
    try:
        with open_cache(path, "r") as c:
            return dict(c.attrs)
    except CacheError as e:
        raise RunSettingsError(f"{e}") from None


def flow_config(attrs: Mapping, where: Path) -> FlowConfig:
    """The FlowConfig a flow cache's ``flow`` attribute was written with (checked: its
    flow_settings give the attribute back)."""
    rec = dict(attrs.get("flow") or {})
    algo = rec.get("algorithm")
    try:
        kw: dict = {"algorithm": algo, "bound": float(rec["bound"])}
        if "tvl1" in rec:  # tvl1_fast: the preset applied again gives the same values
            kw["tvl1"] = TVL1Config(**rec["tvl1"])
        if "farneback" in rec:
            kw["farneback"] = FarnebackConfig(**rec["farneback"])
        if algo in RAFT_ALGORITHMS:
            # the weights' identity names torchvision's file or the random init; a file of the
            # user's own is not recorded by path, so it cannot be found again
            wid = str(rec["raft"]["weights"])
            weights = "none" if wid.startswith("random") else "default"
            if wid.startswith("file "):
                raise RunSettingsError(
                    f"{where}: flow computed with RAFT weights from a file ({wid}); its path "
                    "is not recorded, so its flow cannot be computed again here"
                )
            kw["raft"] = RaftConfig(weights=weights, iterations=int(rec["raft"]["iterations"]))
        cfg = FlowConfig(**kw)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, RunSettingsError):
            raise
        raise RunSettingsError(f"{where}: flow settings {rec} cannot be recovered ({e})") from None
    if flow_settings(cfg) != rec:
        raise RunSettingsError(
            f"{where}: recorded flow settings {rec} are not what this code computes for them "
            f"({flow_settings(cfg)}); re-run the flow stage"
        )
    return cfg


def features_config(
    attrs: Mapping, where: Path, *, batch_size: int | None = None
) -> StreamFeaturesConfig:
    """The StreamFeaturesConfig a features cache was written with: its ``params`` identity
    (checked: params_identity gives it back), ``compile`` and ``batch_size`` (not recorded:
    the dataclass default unless given; it changes the features by float rounding only)."""
    params = attrs.get("params")
    if not isinstance(params, dict):
        raise RunSettingsError(f"{where}: no 'params' in its metadata; re-run the features stage")
    known = {f.name for f in fields(StreamFeaturesConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items() if k in known}
    kw["compile"] = bool(attrs.get("compile", False))
    if batch_size is not None:
        kw["batch_size"] = batch_size
    try:
        cfg = StreamFeaturesConfig(**kw)
    except (ConfigError, TypeError) as e:
        raise RunSettingsError(f"{where}: features settings {params} are not valid ({e})") from None
    if params_identity(cfg) != params:
        raise RunSettingsError(
            f"{where}: recorded features settings {params} cannot be recovered "
            f"(they give {params_identity(cfg)})"
        )
    return cfg


def read_run_features(
    run: Path, streams: Sequence[str], *, batch_sizes: Mapping[str, int] | None = None
) -> RunFeatures:
    """The settings ``run`` (a repro's data/ folder) made the features of ``streams`` with:
    decode/plan.json, flow/cache and features/<stream>/cache. RunSettingsError names the file
    that is missing, unreadable, or disagrees with the plan."""
    try:
        plan = read_plan(run / "decode" / "plan.json")
    except PlanError as e:
        raise RunSettingsError(str(e)) from None
    plan = Plan(plan.settings, {}, decoder=plan.decoder)
    configs, attrs = {}, {}
    for s in streams:
        where = run / "features" / s / "cache"
        attrs[s] = _attrs(where)
        if attrs[s].get("sampling") != plan.identity():
            raise RunSettingsError(
                f"{where}: made from frames sampled as {attrs[s].get('sampling')}, but "
                f"{run / 'decode' / 'plan.json'} samples {plan.identity()}: the run's outputs "
                "are from different repros"
            )
        configs[s] = features_config(attrs[s], where, batch_size=(batch_sizes or {}).get(s))
    flow = flow_attrs = None
    if "flow" in streams:
        where = run / "flow" / "cache"
        flow_attrs = _attrs(where)
        flow = flow_config(flow_attrs, where)
        if flow_attrs.get("flow") != attrs["flow"].get("flow"):
            raise RunSettingsError(
                f"{run / 'features' / 'flow' / 'cache'}: made from other flow settings than "
                f"{where} holds"
            )
    return RunFeatures(plan, flow, flow_attrs, configs, attrs)


def plan_video(video_id: str, path: Path, plan: Plan) -> PlannedVideo:
    """A new video's plan entry under the run's decode settings, as prepare (probe: every
    frame decoded and counted, its size, sha256) and decode (the sampled points) make it;
    VideoDecodeError naming the file when it does not decode."""
    from pipeline.video import probe

    info = probe(path)
    return PlannedVideo.probed(
        video_id,
        str(path),
        plan.settings,
        frames=info.frames,
        source=file_sha256(path),
        width=info.width,
        height=info.height,
    )


def _flow_cache(rf: RunFeatures, plan: Plan, folder: Path, failed: dict[str, str]) -> Path:
    """The flow of every video of ``plan`` into a flow cache at ``folder`` (the flow stage's
    per-video function and metadata); a video whose flow fails goes to ``failed``."""
    assert rf.flow is not None and rf.flow_attrs is not None
    with open_cache(folder, "w", attrs=rf.flow_attrs) as cache:
        for vid, v in plan.videos.items():
            try:  # the flow stage's _flow
                stacks = video_flow(
                    Path(v.path),
                    v.samples(plan.settings),
                    rf.flow,
                    decoding=v.decoding(plan.settings),
                )
            except Exception as e:  # this video fails, the others go on
                failed[vid] = f"flow: {type(e).__name__}: {e}"
                continue
            cache.write(vid, stacks, {"source": v.source})
    return folder


def extract_stream(
    rf: RunFeatures,
    stream: str,
    plan: Plan,
    *,
    device: torch.device,
    flow_cache: Path | None,
    failed: dict[str, str],
) -> dict[str, np.ndarray]:
    """Every video of ``plan`` (rgb) or of ``flow_cache`` (flow) -> {id: its features entry},
    float16, as the features stage writes it (extract_features); failures go to ``failed``."""
    cfg, attrs = rf.configs[stream], rf.attrs[stream]
    in_ch = 3 if stream == "rgb" else 2 * plan.settings.flow_pairs
    fm = feature_model(cfg, stream=stream, in_channels=in_ch, device=device)
    if fm.backbone.weights_id != attrs.get("weights"):
        raise RunSettingsError(
            f"features/{stream}/cache: made with weights {attrs.get('weights')!r}; here "
            f"{cfg.weights!r} gives {fm.backbone.weights_id!r}"
        )
    try:
        precision = resolve_precision(str(attrs.get("precision", cfg.precision)), device)
    except ValueError as e:
        raise RunSettingsError(f"features/{stream}/cache: {e}") from None
    ids = [v for v in sorted(plan.videos) if v not in failed]  # flow: those in flow_cache
    data = VideoInputs(
        cfg,
        stream=stream,
        ids=ids,
        plan=plan if stream == "rgb" else None,
        flow_cache=flow_cache if stream == "flow" else None,
        mean=fm.backbone.mean,
        std=fm.backbone.std,
    )

    def decoded() -> Iterator[tuple[str, Tensor, int]]:
        for i in range(len(data)):
            vid, x, n, err = data[i]
            if err:
                failed[vid] = f"features ({stream}): {err}"
                continue
            yield vid, x, n

    return dict(video_features(fm, decoded(), cfg=cfg, device=device, precision=precision))


def new_video_features(
    rf: RunFeatures,
    videos: Mapping[str, Path],
    *,
    device: torch.device,
    workdir: Path,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str]]:
    """{id: video path} -> ({stream: {id: features entry}} for the videos that went through,
    {id: the reason} for those that did not). ``workdir``: an empty folder for the flow cache."""
    failed: dict[str, str] = {}
    planned = {}
    for vid, path in videos.items():
        try:
            planned[vid] = plan_video(vid, Path(path), rf.plan)
        except Exception as e:  # VideoDecodeError names the file; others: say what it was
            failed[vid] = str(e) if str(path) in str(e) else f"{path}: {type(e).__name__}: {e}"
    plan = Plan(rf.plan.settings, planned, decoder=rf.plan.decoder)
    flow_cache = None
    if rf.flow is not None and planned:
        flow_cache = _flow_cache(rf, plan, workdir / "flow_cache", failed)
    feats = {
        s: extract_stream(rf, s, plan, device=device, flow_cache=flow_cache, failed=failed)
        for s in rf.configs
    }
    return feats, failed
