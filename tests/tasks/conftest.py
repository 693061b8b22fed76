"""What the NeVA task tests share: the shapes-vqa data and the pretrained parts a real stage 2 starts from."""

import pytest
import torch

from vlkit.data.shapes_vqa import write_shapes_vqa
from vlkit.interop.native import save_model
from vlkit.models import create_model


@pytest.fixture(scope="module", autouse=True)
def few_eval_questions():
    """Every NeVA fit ends with the held-out VQA evaluation; three questions show it runs (the CLI tests cover the
    rest)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("vlkit.tasks.neva.EVAL_MAX_QUESTIONS", 3)
        yield


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Per test module: the shapes-vqa data (32 train, 4 val images) and pretrained parts, a clip-tiny and a
    llama-tiny."""
    out = tmp_path_factory.mktemp("neva-parts")
    write_shapes_vqa(out / "data", train=32, val=4, progress=False)
    torch.manual_seed(1)
    save_model(create_model("clip-tiny"), out / "clip")
    save_model(create_model("llama-tiny"), out / "llama")
    return out
