"""Tiny on-disk fixtures shared by the evaluation tests (made once per session)."""

import pytest
import torch


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """The synthetic shapes dataset as shards: 40 val images, 25 classes, captions, classes.json with templates."""
    from vlkit.data.shapes import write_shapes_dataset

    out = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(out, train=1, val=40, size=32, progress=False, workers=1)
    return out


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """The same dataset as an ImageFolder (PNG files per class folder), 30 val images."""
    from vlkit.data.shapes import write_shapes_dataset

    out = tmp_path_factory.mktemp("shapes-cls")
    write_shapes_dataset(out, train=1, val=30, size=32, classification=True, progress=False, workers=1)
    return out


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    """A randomly initialised clip-tiny, saved with vlkit.save_model."""
    import vlkit

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "clip-tiny"
    vlkit.save_model(vlkit.create_model("clip-tiny"), path)
    return path


@pytest.fixture(scope="session")
def vit_dir(tmp_path_factory):
    """A randomly initialised vit-tiny classifier with the shapes dataset's 25 classes (random head)."""
    import vlkit

    torch.manual_seed(0)
    model = vlkit.create_model("vit-tiny", num_classes=25)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a zero head would tie every class
    path = tmp_path_factory.mktemp("models") / "vit-tiny"
    vlkit.save_model(model, path)
    return path
