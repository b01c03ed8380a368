"""pipeline/models.py: self-describing model checkpoints and the one loader, which refuses (naming
the file and the reason) anything that is not such a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.heads import build_head
from pipeline.models import FORMAT, ModelFileError, checkpoint, load_model, save_model

KW = {"in_dim": 6, "num_classes": 3, "hidden": 5, "layers": 1, "dropout": 0.0}
CLASSES = ["a", "b", "c"]
FEATURES = [{"stream": "rgb", "params": {"backbone": "resnet18"}, "backbone": "resnet18"}]


def _ckpt(model: torch.nn.Module, **over: object) -> dict:
    base = dict(
        head="lstm",
        stream="rgb",
        split="1",
        params={"hidden": 5, "epochs": 2},
        kwargs=KW,
        classes=CLASSES,
        features=FEATURES,
        steps=4,
        state_dict=model.state_dict(),
    )
    return checkpoint(**{**base, **over})


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_head("lstm", **KW).eval()


def test_a_checkpoint_rebuilds_the_model_and_says_what_it_is(tmp_path: Path) -> None:
    model = _model()
    save_model(tmp_path / "m.pt", _ckpt(model))
    loaded, info = load_model(tmp_path / "m.pt")
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert not loaded.training
    assert (info.head, info.stream, info.split, info.steps) == ("lstm", "rgb", "1", 4)
    assert info.classes == tuple(CLASSES) and info.kwargs == KW and info.streams == ["rgb"]
    assert info.features == tuple(FEATURES) and info.params == {"hidden": 5, "epochs": 2}


def test_a_bare_state_dict_is_refused_naming_the_file(tmp_path: Path) -> None:
    torch.save(_model().state_dict(), tmp_path / "model_split1.pt")
    with pytest.raises(ModelFileError, match=r"model_split1.pt: a bare state_dict .* re-run"):
        load_model(tmp_path / "model_split1.pt")


def test_another_format_is_refused(tmp_path: Path) -> None:
    save_model(tmp_path / "m.pt", {**_ckpt(_model()), "format": "vidfeat-model/0"})
    with pytest.raises(
        ModelFileError, match=rf"m.pt: checkpoint format 'vidfeat-model/0'.*{FORMAT}"
    ):
        load_model(tmp_path / "m.pt")


def test_a_checkpoint_without_a_key_is_refused_naming_it(tmp_path: Path) -> None:
    ck = _ckpt(_model())
    del ck["classes"]
    save_model(tmp_path / "m.pt", ck)
    with pytest.raises(ModelFileError, match=r"m.pt: checkpoint lacks \['classes'\]"):
        load_model(tmp_path / "m.pt")


def test_class_names_that_do_not_fit_num_classes_are_refused(tmp_path: Path) -> None:
    save_model(tmp_path / "m.pt", _ckpt(_model(), classes=["a", "b"]))
    with pytest.raises(ModelFileError, match=r"m.pt: num_classes 3 but 2 class names"):
        load_model(tmp_path / "m.pt")


def test_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    save_model(tmp_path / "m.pt", _ckpt(_model(), kwargs={**KW, "hidden": 7}))
    with pytest.raises(ModelFileError, match=r"m.pt: cannot rebuild head 'lstm' .*size mismatch"):
        load_model(tmp_path / "m.pt")


def test_an_unknown_head_argument_is_refused(tmp_path: Path) -> None:
    save_model(tmp_path / "m.pt", _ckpt(_model(), kwargs={**KW, "nope": 1}))
    with pytest.raises(ModelFileError, match=r"m.pt: cannot rebuild head 'lstm' .*nope"):
        load_model(tmp_path / "m.pt")


def test_a_file_that_is_not_torchs_or_is_missing_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_text("not a model")
    with pytest.raises(ModelFileError, match=r"m.pt: not a model file torch can read safely"):
        load_model(tmp_path / "m.pt")
    with pytest.raises(ModelFileError, match=r"gone.pt: no such model file"):
        load_model(tmp_path / "gone.pt")
