"""``vlkit demo``: the main job on the embedded default, start to finish.

Writes the synthetic shapes dataset, trains ``clip-tiny-shapes`` (CPU by default, the GPU when present), evaluates
zero-shot classification and retrieval on the held-out split, and writes ``report.md``, ``metrics.json`` and plots.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the main job: synthetic data, train a small CLIP, evaluate, write a report with plots",
        description="Write the synthetic shapes dataset, train clip-tiny-shapes on it (a few minutes on a laptop "
        "CPU), evaluate zero-shot classification and retrieval on held-out images, and write OUT/report.md, "
        "OUT/metrics.json and PNG plots.",
    )
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's trainer.max_steps)")
    p.add_argument("--train-samples", type=int, default=20000, help="synthetic training images (default: 20000)")
    p.add_argument("--val-samples", type=int, default=1000, help="held-out images (default: 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="extra config overrides for clip-tiny-shapes")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlkit.config import load_config

    out = Path(args.out)
    for name, value in (("--steps", args.steps), ("--train-samples", args.train_samples),
                        ("--val-samples", args.val_samples)):  # fmt: skip
        if value is not None and value <= 0:
            print(f"vlkit demo: error: {name} must be positive, got {value}", file=sys.stderr)
            return 2
    cfg = load_config(
        "clip-tiny-shapes",
        [
            f"trainer.output_dir={out / 'run'}",
            f"data.train_path={out / 'data'}",
            f"data.dataset_size={args.train_samples}",
            f"trainer.seed={args.seed}",
            f"trainer.accelerator={args.device}",
            "trainer.checkpoint.every_n_steps=0",
            "trainer.checkpoint.keep_last=1",
            "trainer.overwrite=true",  # a second demo into the same --out replaces the first (see run_demo)
            *([f"trainer.max_steps={args.steps}"] if args.steps is not None else []),
            *args.overrides,
        ],
    )
    report = run_demo(cfg, out, val_samples=args.val_samples)
    print(f"\nzero-shot top-1 {report['zeroshot']['acc1']:.3f} on {report['zeroshot']['num_samples']} held-out images")
    print(f"model: {report['model_path']} (seed {report['seed']}, vlkit {report['versions']['vlkit']}, "
          f"torch {report['versions']['torch']})")  # fmt: skip
    print(f"report: {out / 'report.md'}")
    print("next:\n" + "\n".join(f"  {line}" for line in next_commands(report)))
    return 0


def run_demo(cfg: Any, out: Path, val_samples: int = 1000) -> dict:
    from vlkit.data.shapes import write_shapes_dataset
    from vlkit.eval import evaluate_retrieval, evaluate_zeroshot
    from vlkit.parallel import cleanup
    from vlkit.tasks.clip import CLIPTask
    from vlkit.train.trainer import Trainer

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    data = Path(cfg.data.train_path)
    if not (data / "classes.json").is_file():
        print(f"writing the synthetic shapes dataset to {data}")
        write_shapes_dataset(
            data, train=cfg.data.dataset_size, val=val_samples, size=cfg.model.vision.img_h, seed=cfg.trainer.seed
        )
    t_data = time.perf_counter()
    trainer = Trainer(cfg, CLIPTask)
    for place, aside in trainer.run_lock.moved:
        if place == out / "run":  # the previous demo's run, moved aside by trainer.overwrite: replaced like its report
            shutil.rmtree(aside, ignore_errors=True)
    history = trainer.fit()
    t_train = time.perf_counter()
    model = trainer._inner_model().eval()
    zs = evaluate_zeroshot(model, data / "val", predictions_topk=3, keep_images=16, batch_size=256, num_workers=0)
    rt = evaluate_retrieval(model, data / "val", batch_size=256, num_workers=0)
    cleanup()
    t_eval = time.perf_counter()
    timings = {"data_s": t_data - t0, "train_s": t_train - t_data, "eval_s": t_eval - t_train, "total_s": t_eval - t0}
    report = {
        "model": cfg.name,
        "steps": cfg.trainer.max_steps,
        "batch_size": cfg.trainer.micro_batch_size,
        "device": str(trainer.device),
        "num_classes": len(zs.details["classes"]),
        "zeroshot": {**zs.metrics, "num_samples": zs.num_samples},
        "retrieval": {**rt.metrics, "num_samples": rt.num_samples},
        "timings": timings,
        "model_path": str(Path(cfg.trainer.output_dir) / "model"),
        "data_path": str(data),
        "seed": cfg.trainer.seed,
        "versions": _versions(),
        "train_history": [{k: v for k, v in h.items() if isinstance(v, (int, float))} for h in history],
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    plots = write_plots(out, history, zs, model.config.vision.mean, model.config.vision.std)
    write_report(out, report, plots)
    return report


def write_plots(out: Path, history: list[dict], zs: Any, mean, std) -> dict[str, str]:
    """loss.png (training loss), confusion.png (zero-shot confusion matrix), predictions.png (images + top-3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plots = {}
    steps = [h["step"] for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["loss"] for h in history if "loss" in h])
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    plots["loss"] = "loss.png"

    details = zs.details
    classes = details["classes"]
    cm = np.asarray(details["confusion_matrix"], dtype=float)  # rows: true class
    cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(8, 7))
    im = ax.imshow(cm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("zero-shot confusion (row-normalised)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)
    plots["confusion"] = "confusion.png"

    images = details.get("images")
    preds = details.get("predictions")
    if images is not None and preds is not None and len(images) and len(preds["label"]):
        mean_t, std_t = (np.asarray(x).reshape(3, 1, 1) for x in (mean, std))
        n = min(16, len(images), len(preds["label"]))
        cols = 4
        rows = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 3.3))
        for i, ax in enumerate(np.atleast_1d(axes).ravel()):
            ax.axis("off")
            if i >= n:
                continue
            img = images[i].float().numpy() * std_t + mean_t
            ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1), interpolation="nearest")
            label = int(preds["label"][i])
            top = [int(j) for j in preds["topk_indices"][i]]
            probs = [float(q) for q in preds["topk_probs"][i]]
            lines = [f"{classes[j]} {q:.2f}" for j, q in zip(top, probs)]
            color = "green" if top[0] == label else "red"
            ax.set_title(f"true: {classes[label]}\n" + "\n".join(lines), fontsize=7, color=color, loc="left")
        fig.tight_layout()
        fig.savefig(out / "predictions.png", dpi=120)
        plt.close(fig)
        plots["predictions"] = "predictions.png"
    return plots


def _versions() -> dict[str, Any]:
    import platform

    import torch

    from vlkit import __version__

    return {"vlkit": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}  # fmt: skip


def next_commands(report: dict) -> list[str]:
    """What to run on the demo's model next: evaluate it, classify your own images with your own labels, export."""
    model, data = report["model_path"], report["data_path"]
    return [
        f"vlkit eval zeroshot --model {model} --data {data}/val",
        f'vlkit predict --model {model} --labels "red circle,blue square,green triangle" IMAGE.png',
        f"vlkit convert --to hf {model} --out {Path(model).parent.parent / 'export-hf'}",
    ]


def write_report(out: Path, report: dict, plots: dict[str, str]) -> None:
    zs, rt, t = report["zeroshot"], report["retrieval"], report["timings"]
    classes, captions = report.get("num_classes"), rt["num_samples"]
    lines = [
        "# vlkit demo",
        "",
        f"`{report['model']}` trained for {report['steps']} steps (batch {report['batch_size']}) on the synthetic "
        f"shapes dataset, on `{report['device']}`, then evaluated on {zs['num_samples']} held-out images.",
        "",
        "| metric | value | chance |",
        "| --- | --- | --- |",
    ]
    for key, name, k in (("acc1", "zero-shot top-1", 1), ("acc5", "zero-shot top-5", 5),
                         ("mean_per_class_recall", "zero-shot mean per-class recall", 1)):  # fmt: skip
        if key in zs:
            chance = f"{min(k / classes, 1):.3f}" if classes else "-"
            lines.append(f"| {name} | {zs[key]:.3f} | {chance} |")
    for key, k in (("image_retrieval_recall@1", 1), ("image_retrieval_recall@5", 5), ("text_retrieval_recall@1", 1),
                   ("text_retrieval_recall@5", 5)):  # fmt: skip
        if key in rt:
            lines.append(f"| {key.replace('_', ' ')} | {rt[key]:.3f} | {k / captions:.3f} |")
    lines += [
        "",
        "Retrieval asks for the one caption written for an image among all held-out captions; many captions differ "
        "only in a detail (size, position, background), so its recall stays far below zero-shot accuracy.",
        "",
        f"Time: data {t['data_s']:.0f} s, training {t['train_s']:.0f} s, evaluation {t['eval_s']:.0f} s, "
        f"total {t['total_s']:.0f} s.",
        "",
    ]
    if "model_path" in report:
        v = report["versions"]
        lines += [
            f"The trained model is `{report['model_path']}` (a vlkit model directory). Next:",
            "",
            "```bash",
            *next_commands(report),
            "```",
            "",
            f"Seed {report['seed']}; vlkit {v['vlkit']}, torch {v['torch']}, Python {v['python']}, "
            f"{v['threads']} CPU threads. The same seed gives the same data and initial weights, but the metrics "
            "move by about a point between machines: float sums are ordered differently with another thread count "
            "or another CPU's kernels (AVX2 / AVX-512), and 200 steps amplify the difference.",
            "",
        ]
    titles = {"loss": "Training loss", "confusion": "Zero-shot confusion matrix",
              "predictions": "Held-out images with their top-3 zero-shot predictions"}  # fmt: skip
    for key, file in plots.items():
        lines += [f"## {titles[key]}", "", f"![{titles[key]}]({file})", ""]
    (out / "report.md").write_text("\n".join(lines))
