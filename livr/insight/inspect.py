"""`livr inspect`: what a trained run's latents do (the paper's analysis, Section 5).

For a run directory, on its validation rows:
- attention mass from the answer rows (the positions whose logits predict answer tokens: the delimiter
  `<livr_latent_end>` and the answer tokens) to the latents, the image tokens, the text (text before the
  image + prompt) and the answer itself, per layer (eager attention, heads averaged; the four sum to 1);
- latent -> image attention heatmaps over the input image (one panel per latent, layers and heads averaged);
- accuracy with the latents removed from the prompt (the delimiter kept) and under the Stage-1 bottleneck
  mask at test time, next to the plain accuracy.
Everything goes to `<run>/inspect/` and to the run's MLflow record (metrics `inspect/*`, artifacts `inspect/`).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os

import torch

from livr.data.sequence import collate, images_of
from livr.insight.verify import answer_rows
from livr.method.groups import ANSWER, IMAGE, LATENT, PROMPT, TEXT

MASS_GROUPS = {"latent": (LATENT,), "image": (IMAGE,), "text": (TEXT, PROMPT), "answer": (ANSWER,)}


def without_latents(builder):
    """A copy of the run's SequenceBuilder whose prompts carry no latent tokens, only the delimiter."""
    b = copy.copy(builder)
    b.latent_ids = builder.latent_ids[-1:]
    b.latent_text = "".join(builder.tokenizer.convert_ids_to_tokens(b.latent_ids))
    return b


def image_grids(lm, item: dict) -> list[tuple[torch.Tensor, int, int]]:
    """Per image: (sequence positions of its grid tokens, rows, cols), row-major over the image (the family's
    `image_grids`: Qwen's merged-patch grid; LLaVA-OneVision's base view)."""
    pos = (item["groups"] == IMAGE).nonzero().flatten()
    return lm.family.image_grids(lm.model.get_base_model().config.vision_config, pos, item)


def attention_analysis(lm, rows: list[dict], *, bottleneck: bool = False, heatmap_rows: int = 4):
    """(per-layer mean mass [layers, len(MASS_GROUPS)], heatmap records) over `rows`."""
    lm.model.eval()
    total, n, heat = None, 0, []
    for i, row in enumerate(rows):
        item = lm.builder.encode(row)
        batch = collate([item], lm.tokenizer.pad_token_id)
        out = lm.model(**lm.model_inputs(batch, bottleneck), output_attentions=True, logits_to_keep=1, use_cache=False)
        att = torch.stack([a[0].float().mean(0) for a in out.attentions]).cpu()  # [layers, L, L], heads averaged
        groups = item["groups"]
        ans = answer_rows(batch)[0]
        per = torch.stack([att[:, ans][:, :, torch.isin(groups, torch.tensor(g))].sum(-1).mean(-1)
                           for g in MASS_GROUPS.values()], -1)  # [layers, groups]
        total = per if total is None else total + per
        n += 1
        lat = (groups == LATENT).nonzero().flatten()
        if len(lat) and i < heatmap_rows:
            maps = []
            for positions, gh, gw in image_grids(lm, item):
                m = att[:, lat][:, :, positions].mean(0)  # [K, gh*gw], layers averaged
                maps.append(m.reshape(len(lat), gh, gw))
            heat.append({"row": row, "maps": maps})
    if total is None:
        raise ValueError("inspect: no rows to analyse")
    return total / n, heat


def draw_heatmap(records: list[dict], path: str, title: str = "") -> None:
    """One figure: per example and image, the image then one panel per latent with its attention over it
    (layers and heads averaged, one colour scale per figure; panel title = the latent's mass on the drawn tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [(rec["row"], j, img, m) for rec in records for j, (img, m) in enumerate(zip(images_of(rec["row"]), rec["maps"]))]
    k = panels[0][3].shape[0]
    cols = min(k + 1, 9)
    per_image = -(-(k + 1) // cols)
    vmax = max(float(m.max()) for *_, m in panels) or 1.0
    fig, axes = plt.subplots(per_image * len(panels), cols, figsize=(1.6 * cols, 1.75 * per_image * len(panels)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for j, (row, n, img, m) in enumerate(panels):
        arr = np.asarray(img.convert("RGB"))
        h, w = arr.shape[:2]
        for p in range(k + 1):
            ax = axes[j * per_image + p // cols, p % cols]
            ax.imshow(arr, alpha=1.0 if p == 0 else 0.55, extent=(0, w, h, 0))
            if p == 0:
                ax.set_title(f"{row['idx']} · image {n + 1}", fontsize=7)
                continue
            ax.imshow(m[p - 1].numpy(), extent=(0, w, h, 0), cmap="inferno", alpha=0.6, vmin=0, vmax=vmax,
                      interpolation="nearest")
            ax.set_title(f"latent {p - 1}: {float(m[p - 1].sum()):.2f}", fontsize=7)
    fig.suptitle(title or "latent -> image attention", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _accuracy(lm, cfg, rows, **kw) -> dict:
    from livr.training.evaluate import evaluate_rows

    return evaluate_rows(lm, rows, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                         parser=cfg.eval.parser, **kw)


def inspect_run(run_dir: str, *, split: str = "val", limit: int = 64, heatmaps: int = 4,
                bottleneck_attention: bool = False, log_mlflow: bool = True, overrides: list[str] | None = None) -> dict:
    """Run the analysis on `run_dir`, write `<run>/inspect/`, log to the run's MLflow record; the metrics."""
    from livr.data.splits import load_splits
    from livr.training.runs import load_run

    cfg, lm = load_run(run_dir, overrides, needs_data=True)
    rows = load_splits(cfg, only=[split])[split][: limit or None]
    from livr.data.tasks import DataError
    from livr.training.evaluate import hidden_answers

    if hidden_answers(rows, split):
        raise DataError(f"livr inspect: split {split!r} has hidden answers (BLINK test): accuracy and ablations need "
                        "public answers; use --split val")
    out_dir = os.path.join(run_dir, "inspect")
    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # heatmaps of an earlier inspect of this run
        if stale.startswith("latent_heatmap") and stale.endswith(".png"):
            os.remove(os.path.join(out_dir, stale))
    full = _accuracy(lm, cfg, rows)
    bottleneck = _accuracy(lm, cfg, rows, bottleneck=True)
    no_lat = _accuracy(dataclasses.replace(lm, builder=without_latents(lm.builder)), cfg, rows) if lm.latent_ids else full
    lm.set_attn_implementation("eager")  # attention probabilities
    per_layer, heat = attention_analysis(lm, rows, bottleneck=bottleneck_attention, heatmap_rows=heatmaps)
    names = list(MASS_GROUPS)
    with open(os.path.join(out_dir, "attention_per_layer.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", *[f"answer_to_{g}" for g in names], "total"])
        for layer, vals in enumerate(per_layer.tolist()):
            w.writerow([layer, *[f"{v:.6f}" for v in vals], f"{sum(vals):.6f}"])
    files = []
    name = os.path.basename(os.path.normpath(run_dir))
    caption = "latent -> image attention (layers, heads averaged; panel title: the latent's mass on the drawn tokens)"
    for i, rec in enumerate(heat):
        files.append(f"latent_heatmap_{i}.png")
        draw_heatmap([rec], os.path.join(out_dir, files[-1]), f"{name} · {rec['row']['sub_task']} · {caption}")
    if len(heat) > 1:
        files.append("latent_heatmaps.png")
        draw_heatmap(heat, os.path.join(out_dir, files[-1]), f"{name} · {caption}")
    mean = per_layer.mean(0).tolist()
    metrics = {**{f"answer_to_{g}_mass": v for g, v in zip(names, mean)},
               "acc": full["mean"], "acc_no_latents": no_lat["mean"], "acc_bottleneck": bottleneck["mean"]}
    result = {"run": os.path.abspath(run_dir), "split": split, "n": len(rows), "mode": cfg.train.mode,
              "num_latents": cfg.latents.num_latents, "attention_mask": "bottleneck" if bottleneck_attention else "causal",
              **metrics, "per_layer": {f"answer_to_{g}": per_layer[:, j].tolist() for j, g in enumerate(names)},
              "per_task": {"acc": full["accuracy"], "acc_no_latents": no_lat["accuracy"],
                           "acc_bottleneck": bottleneck["accuracy"]}, "heatmaps": files}
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    if log_mlflow:
        result["mlflow_run_id"] = log_to_mlflow(cfg, run_dir, metrics, per_layer, names)
    return result


def log_to_mlflow(cfg, run_dir: str, metrics: dict, per_layer: torch.Tensor, names: list[str]) -> str | None:
    """Metrics `inspect/<name>` (per layer: `inspect/layer/<name>` with step = layer) and `inspect/` artifacts."""
    from livr.tracking.tracker import recorded_run_id, tracking_uri

    run_id = recorded_run_id(cfg, run_dir, "inspect")
    if run_id is None:
        return None
    import time

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, ts = MlflowClient(tracking_uri(cfg)), int(time.time() * 1000)
    items = [Metric(f"inspect/{k}", float(v), ts, 0) for k, v in metrics.items()]
    items += [Metric(f"inspect/layer/answer_to_{g}_mass", float(per_layer[layer, j]), ts, layer)
              for j, g in enumerate(names) for layer in range(per_layer.shape[0])]
    client.log_batch(run_id, metrics=items)
    client.log_artifacts(run_id, os.path.join(run_dir, "inspect"), artifact_path="inspect")
    return run_id


def summary(result: dict) -> str:
    masses = ", ".join(f"{g} {result[f'answer_to_{g}_mass']:.3f}" for g in MASS_GROUPS)
    lines = [
        (f"livr inspect: {result['run']} ({result['split']}, {result['n']} rows, {result['mode']}, "
         f"K={result['num_latents']}, {result['attention_mask']} mask for attention)"),
        f"answer-row attention mass (mean over layers): {masses}",
        (f"accuracy: {100 * result['acc']:.2f} | latents removed {100 * result['acc_no_latents']:.2f} | "
         f"bottleneck mask {100 * result['acc_bottleneck']:.2f}"),
        (f"files: {os.path.join(result['run'], 'inspect')}/ (metrics.json, attention_per_layer.csv, "
         f"{len(result['heatmaps'])} heatmap PNG(s))"),
    ]
    return "\n".join(lines)
