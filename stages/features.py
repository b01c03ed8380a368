"""features: a 2D CNN per stream (rgb frames or stacked flow), globally average-pooled, written as
(T, D) float16 per video into a Zarr cache. Resumable like flow."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.backbones import (
    build_backbone,
    extract_batched,
    flow_input,
    inference_context,
    resolve_device,
    resolve_precision,
    rgb_input,
)
from pipeline.cache import open_cache
from pipeline.config import StreamFeaturesConfig, section
from pipeline.plan import read_plan
from pipeline.runner import Counts, Failure, finish, progress, resolve_workers
from pipeline.video import read_frames

log = logging.getLogger("features")


class _Inputs(torch.utils.data.Dataset):
    """Decodes one video's network input per item, in DataLoader workers (overlaps the CNN).

    rgb items are (video_id, path, points, short_side); flow items read the flow cache, opened
    once per worker process.
    """

    def __init__(
        self, stream: str, items: list[tuple], source: Path, crop: int, mean: tuple, std: tuple
    ) -> None:
        self.stream, self.items, self.source = stream, items, source
        self.crop, self.mean, self.std = crop, mean, std
        self._flow = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str | None]:
        vid = self.items[i][0]
        try:
            if self.stream == "rgb":
                _, path, points, short_side = self.items[i]
                frames = read_frames(Path(path), np.asarray(points), short_side=short_side)
                return vid, rgb_input(frames, crop=self.crop, mean=self.mean, std=self.std), None
            if self._flow is None:
                self._flow = open_cache(self.source / "cache", "r")
            return (
                vid,
                flow_input(self._flow.read(vid), crop=self.crop, mean=self.mean, std=self.std),
                None,
            )
        except Exception as e:  # recorded as this video's failure, the others go on
            return vid, None, f"{type(e).__name__}: {e}"


def main(cfg: StreamFeaturesConfig, *, stream: str, source: Path, out: Path) -> Counts:
    torch.set_num_threads(resolve_workers(cfg.threads))
    if stream == "rgb":
        plan = read_plan(source / "plan.json")
        ids, in_ch, upstream = sorted(plan.videos), 3, {"sampling": plan.identity()}
        paths = {k: v.path for k, v in plan.videos.items()}
        sources = {k: v.source for k, v in plan.videos.items()}
    elif stream == "flow":
        with open_cache(source / "cache", "r") as flow:
            ids, attrs = flow.keys(), flow.attrs
            sources = {k: flow.meta(k)["source"] for k in ids}
        pairs = attrs["sampling"]["flow_pairs"]
        in_ch, upstream = 2 * pairs, {"sampling": attrs["sampling"], "flow": attrs["flow"]}
        paths = {k: str(source / "cache" / k) for k in ids}
    else:
        raise SystemExit(f"features: unknown stream '{stream}' (rgb or flow)")
    bb = build_backbone(cfg.backbone, weights=cfg.weights, in_channels=in_ch)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    # channels_last lets oneDNN (CPU) and cuDNN (GPU) pick their fast NHWC convolution kernels
    model = bb.model.to(device, memory_format=torch.channels_last)
    attrs = {
        "kind": "features",
        "stream": stream,
        "backbone": cfg.backbone,
        "weights": bb.weights_id,
        "crop": cfg.crop,
        "pooling": "global average",
        "dtype": "float16",
        "layout": "(T, D)",
        "dim": bb.dim,
        "precision": precision,
        "device": device.type,
        "torch": torch.__version__,
        **upstream,
    }
    failures = []
    with open_cache(out / "cache", "a", attrs=attrs) as cache:
        done = cache.up_to_date(sources)
        written = 0
        todo = [v for v in ids if v not in done]
        if stream == "rgb":
            items = [
                (v, plan.videos[v].path, plan.videos[v].points, plan.settings.short_side)
                for v in todo
            ]
        else:
            items = [(v,) for v in todo]
        data = _Inputs(stream, items, source, cfg.crop, bb.mean, bb.std)
        workers = 1 if len(todo) > 1 else 0
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=None,
            num_workers=workers,
            multiprocessing_context="spawn" if workers else None,
            pin_memory=device.type == "cuda",
        )

        def decoded() -> Iterator[tuple[str, torch.Tensor]]:
            for vid, x, err in progress(
                loader, desc=f"features ({stream}, {cfg.backbone})", total=len(todo)
            ):
                if err:
                    failures.append(Failure(vid, paths[vid], "features", err))
                else:
                    x = x.to(device, non_blocking=True)
                    yield vid, x.contiguous(memory_format=torch.channels_last)

        with torch.inference_mode(), inference_context(device, precision):
            for vid, feats in extract_batched(model, decoded(), batch_size=cfg.batch_size):
                feats = feats.float().cpu().numpy().astype(np.float16)
                cache.write(vid, feats, {"source": sources[vid]})
                written += 1
    return finish(
        f"features ({stream})", out / "failures.csv", failures, done=written, skipped=len(done)
    )


if __name__ == "__main__":
    from stages._cli import parse

    args, params = parse(
        __doc__, "input", "out", extra={"stream": {"required": True, "choices": ["rgb", "flow"]}}
    )
    cfg = section(params, f"features.{args.stream}", StreamFeaturesConfig)
    main(cfg, stream=args.stream, source=args.input, out=args.out)
