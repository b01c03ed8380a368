"""Loopback stand-ins for download.pytorch.org, shared by the weights tests (test_backbones.py,
test_flow.py, test_stage_weights.py).

A test points one torchvision weights enum's URL at 127.0.0.1, so no test ever reaches the
internet: on a machine with network the real URLs would download tens of MB, and on one without
they would test nothing but its DNS.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
from torchvision.models import WeightsEnum


def file_name(enum: WeightsEnum) -> str:
    """The name torchvision gives ``enum``'s file in the hub cache (the last part of its URL)."""
    return Path(urlparse(enum.url).path).name


def empty_hub(monkeypatch: pytest.MonkeyPatch, torch_home: Path) -> Path:
    """Make ``torch_home`` (empty) the TORCH_HOME of this test -> the hub's checkpoints folder,
    where torchvision's files go (not created)."""
    import torch

    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    # torch.hub.set_dir(), made anywhere earlier in the session, would take precedence over
    # TORCH_HOME; None is torch's own "not set". monkeypatch restores the value after the test.
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return torch_home / "hub" / "checkpoints"


def point_at(monkeypatch: pytest.MonkeyPatch, enum: WeightsEnum, url: str) -> None:
    """Make ``enum``'s URL ``url`` for this test, and keep loopback requests off any proxy that
    the environment names (urllib reads no_proxy at each request)."""
    monkeypatch.setattr(enum.value, "url", url)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass  # the test output is not the place for an access log


@contextmanager
def serving(folder: Path) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving the files of ``folder`` -> its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def refusing() -> Iterator[str]:
    """A base URL on 127.0.0.1 whose port refuses connections (bound, never listening): a
    download fails at once, as on a machine without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


@contextmanager
def silent() -> Iterator[str]:
    """A base URL on 127.0.0.1 that accepts connections (the kernel does, from the backlog) and
    never answers: a download that stalls."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
