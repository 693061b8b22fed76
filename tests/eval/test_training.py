import json

import torch

import vlkit
from vlkit.config import load_config
from vlkit.eval import run_eval_during_training
from vlkit.eval.training import default_tasks, eval_data_path


def test_eval_during_training_on_shapes(shapes_dir, tmp_path):
    cfg = load_config("clip-tiny-shapes", [f"data.train_path={shapes_dir}", "trainer.micro_batch_size=16",
                                           "data.num_workers=0"])  # fmt: skip
    assert eval_data_path(cfg) == str(shapes_dir / "val")
    assert default_tasks(cfg, eval_data_path(cfg)) == ("zeroshot", "retrieval")
    torch.manual_seed(0)
    model = vlkit.create_model(cfg)
    model.train()
    model.text.eval()  # e.g. a locked tower: must stay in eval mode
    rng = torch.get_rng_state()
    metrics = run_eval_during_training(model, cfg, step=20, out_dir=tmp_path)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and model.visual.training and not model.text.training
    for key in ("eval/zeroshot/acc1", "eval/zeroshot/acc5", "eval/zeroshot/mean_per_class_recall",
                "eval/retrieval/image_retrieval_recall@1", "eval/retrieval/text_retrieval_recall@10"):  # fmt: skip
        assert 0.0 <= metrics[key] <= 1.0
    saved = json.loads((tmp_path / "eval" / "step_00000020_zeroshot.json").read_text())
    assert saved["task"] == "zeroshot_classification" and saved["metrics"]["acc1"] == metrics["eval/zeroshot/acc1"]
    assert (tmp_path / "eval" / "step_00000020_retrieval.json").is_file()


def test_no_held_out_data_means_no_metrics():
    cfg = load_config("clip-tiny", ["data.kind=webdataset"])
    assert run_eval_during_training(torch.nn.Linear(1, 1), cfg, step=1) == {}
