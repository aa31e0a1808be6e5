"""`livr report`: the paper's Table-1 layout from run directories or from an MLflow experiment, plus sweeps.

From MLflow (any tracking URI) it reads the experiment's FINISHED runs: tags `mode`/`backbone`, params
`latents.num_latents` and `optim.lr`, metrics `<split>/<task>` and `<split>_accuracy`. Rows: zero-shot
(the `eval_zero_shot.json` artifact of an SFT run), SFT, LIVR (K=…); runs sharing a label are told apart by
run name; one table per backbone. When the LIVR runs differ in K and/or lr (a sweep), it adds accuracy
against K and lr as markdown and as a PNG (`<out stem>_sweep.png`). `parser` (`livr report --parser`): the
accuracy under that answer parser (eval.json's `accuracy_by_parser`; MLflow `<split>_<parser>/<task>`, logged
beside the configured parser's) instead of the configured one.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass

from livr.training.evaluate import run_rows, split_accuracy, table1


@dataclass
class RunRecord:
    name: str
    run_id: str
    backbone: str
    mode: str
    num_latents: int
    lr: float
    accuracy: dict[str, float]  # task -> accuracy in [0, 1]
    mean: float
    stage1: bool = True  # False: a LIVR run with no bottleneck stage (the paper's "latents only")

    @property
    def label(self) -> str:
        if self.mode == "sft":
            return "SFT"
        return f"LIVR (K={self.num_latents})" if self.stage1 else f"latents only (K={self.num_latents})"


def report_runs(run_dirs: list[str], split: str = "test", parser: str | None = None) -> str:
    """The run-directory mode: Table 1 from `<run>/eval.json` files (under `parser` when given)."""
    return table1(run_rows(run_dirs, split, parser))


def report_causal(run_dirs: list[str] | None = None, experiment: str | None = None, uri: str | None = None) -> str:
    """The causal suites of several runs side by side (`livr inspect --causal` first): from `<run>/inspect/
    causal.json`, or from the `inspect/causal.json` artifact of each FINISHED run of an MLflow experiment."""
    from livr.insight.causal_report import comparison

    found = []
    if run_dirs:
        for d in run_dirs:
            path = os.path.join(d, "inspect", "causal.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: no causal analysis of this run (run `livr inspect --run {d} --causal`)")
            with open(path) as f:
                found.append((os.path.basename(os.path.normpath(d)), json.load(f)))
    else:
        from mlflow.tracking import MlflowClient

        from livr.config import Config
        from livr.tracking.tracker import tracking_uri

        client = MlflowClient(uri or tracking_uri(Config()))
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise FileNotFoundError(f"no MLflow experiment {experiment!r}")
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
        with tempfile.TemporaryDirectory() as tmp:
            for run in runs:
                if "inspect" not in {a.path for a in client.list_artifacts(run.info.run_id)}:
                    continue
                names = {a.path for a in client.list_artifacts(run.info.run_id, "inspect")}
                if "inspect/causal.json" not in names:  # inspected without --causal
                    continue
                path = client.download_artifacts(run.info.run_id, "inspect/causal.json", tmp)
                with open(path) as f:
                    found.append((run.info.run_name, json.load(f)))
    if not found:
        raise FileNotFoundError("no causal analyses found (run `livr inspect --run RUN --causal` first)")
    return comparison(found)


def load_records(experiment: str, uri: str, split: str = "test", parser: str | None = None) -> tuple[list[RunRecord], object, list]:
    """(records of the experiment's FINISHED runs that carry `<split>` metrics, MLflow client, raw runs); with
    `parser`, a run whose eval.parser is another reads `<split>_<parser>/<task>` and `<split>_<parser>_accuracy`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise FileNotFoundError(f"no MLflow experiment {experiment!r} at {uri}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"], max_results=5000)
    records = []
    for run in runs:
        m, p, t = run.data.metrics, run.data.params, run.data.tags
        name = split if parser in (None, p.get("eval.parser", "blink")) else f"{split}_{parser}"
        acc = {k[len(name) + 1 :]: v for k, v in m.items() if k.startswith(f"{name}/")}
        if not acc:
            continue  # a parent / tuning driver / unevaluated run (or one without metrics under `parser`)
        mean = m.get(f"{name}_accuracy", sum(acc.values()) / len(acc))
        k = int(p.get("latents.num_latents", t.get("num_latents", "0")))
        records.append(RunRecord(run.info.run_name or run.info.run_id[:8], run.info.run_id,
                                 t.get("backbone", p.get("model.backbone", "?")), t.get("mode", p.get("train.mode", "?")),
                                 k, float(p.get("optim.lr", "nan")), acc, mean,
                                 float(p.get("train.stage1_epochs", 1)) > 0 or int(p.get("train.stage1_steps", 0)) > 0))
    return records, client, runs


def _zero_shot(client, records: list[RunRecord], split: str, parser: str | None = None) -> dict[str, float] | None:
    """Zero-shot accuracy recorded by an SFT run (artifact eval_zero_shot.json), if any."""
    for r in records:
        if r.mode != "sft":
            continue
        try:
            if not any(a.path == "eval_zero_shot.json" for a in client.list_artifacts(r.run_id)):
                continue
            with tempfile.TemporaryDirectory() as d:
                path = client.download_artifacts(r.run_id, "eval_zero_shot.json", d)
                with open(path) as f:
                    return split_accuracy(json.load(f)["results"][split], parser, "eval_zero_shot.json")
        except Exception as e:  # noqa: BLE001 - an unreadable artifact store only loses the zero-shot row
            print(f"livr report: zero-shot artifact of run {r.name} unreadable: {e}")
    return None


def table_rows(records: list[RunRecord], zero_shot: dict | None = None) -> list[tuple[str, dict[str, float]]]:
    """Zero-shot, SFT, then LIVR by K and lr; a label shared by several runs gets the run name."""
    order = sorted(records, key=lambda r: (r.mode != "sft", r.num_latents, r.lr if not math.isnan(r.lr) else 0, r.name))
    counts = defaultdict(int)
    for r in order:
        counts[r.label] += 1
    rows = [("zero-shot", zero_shot)] if zero_shot else []
    rows += [(r.label if counts[r.label] == 1 else f"{r.label} · {r.name}", r.accuracy) for r in order]
    return rows


def _sweep_runs(records: list[RunRecord]) -> list[RunRecord]:
    return [r for r in records if r.mode != "sft" and r.stage1]


def sweep_markdown(records: list[RunRecord]) -> str | None:
    """Accuracy against K and lr for the LIVR runs, when they differ in either; None otherwise."""
    livr = _sweep_runs(records)
    ks, lrs = sorted({r.num_latents for r in livr}), sorted({r.lr for r in livr})
    if len(ks) < 2 and len(lrs) < 2:
        return None
    lines = ["### Sweep (LIVR, mean accuracy %)", "", "| run | K | lr | accuracy |", "|---|---|---|---|"]
    for r in sorted(livr, key=lambda r: (r.num_latents, r.lr, r.name)):
        lines.append(f"| {r.name} | {r.num_latents} | {r.lr:g} | {100 * r.mean:.2f} |")
    if len(ks) > 1 and len(lrs) > 1:
        lines += ["", "| K \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for k in ks:
            cells = []
            for lr in lrs:
                vals = [r.mean for r in livr if r.num_latents == k and r.lr == lr]
                cells.append(f"{100 * sum(vals) / len(vals):.2f}" if vals else "–")
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
    sft = [r.mean for r in records if r.mode == "sft"]
    if sft:
        lines += ["", f"SFT reference: {100 * sum(sft) / len(sft):.2f}"]
    return "\n".join(lines)


def sweep_plot(records: list[RunRecord], path: str) -> None:
    """accuracy vs K (a line per lr) and/or accuracy vs lr (log axis, a line per K); SFT dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    livr = _sweep_runs(records)
    ks, lrs = sorted({r.num_latents for r in livr}), sorted({r.lr for r in livr})
    panels = [p for p, vary in (("K", len(ks) > 1), ("lr", len(lrs) > 1)) if vary]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    sft = [r.mean for r in records if r.mode == "sft"]
    for ax, axis in zip(axes[0], panels):
        groups, xs = (lrs, "num_latents") if axis == "K" else (ks, "lr")
        for g in groups:
            pts = defaultdict(list)
            for r in livr:
                if (r.lr if axis == "K" else r.num_latents) == g:
                    pts[getattr(r, xs)].append(100 * r.mean)
            x = sorted(pts)
            ax.plot(x, [sum(pts[v]) / len(pts[v]) for v in x], "o-", label=f"lr={g:g}" if axis == "K" else f"K={g}")
        if sft:
            ax.axhline(100 * sum(sft) / len(sft), ls="--", c="gray", label="SFT")
        if axis == "lr":
            ax.set_xscale("log")
        ax.set_xlabel("K (latent tokens)" if axis == "K" else "learning rate")
        ax.set_ylabel("mean accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_experiment(experiment: str, uri: str | None = None, split: str = "test", out: str | None = None,
                      parser: str | None = None) -> str:
    """Markdown report of an MLflow experiment; with `out`, also `<stem>.md` and `<stem>_sweep.png`."""
    from livr.config import Config
    from livr.tracking.tracker import tracking_uri

    uri = uri or tracking_uri(Config())
    records, client, _ = load_records(experiment, uri, split, parser)
    if not records:
        raise FileNotFoundError(f"experiment {experiment!r} at {uri} has no FINISHED run with {split}/<task> metrics")
    by_backbone = defaultdict(list)
    for r in records:
        by_backbone[r.backbone].append(r)
    parts = [f"## {experiment} ({split} split, accuracy %{f', parser {parser}' if parser else ''})"]
    for backbone, recs in by_backbone.items():
        if len(by_backbone) > 1:
            parts.append(f"### {backbone}")
        parts.append(table1(table_rows(recs, _zero_shot(client, recs, split, parser))))
    stem = os.path.splitext(out)[0] if out else None
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for backbone, recs in by_backbone.items():
        sweep = sweep_markdown(recs)
        if sweep is None:
            continue
        suffix = "" if len(by_backbone) == 1 else "_" + "".join(c if c.isalnum() else "-" for c in backbone)
        parts.append(sweep if len(by_backbone) == 1 else sweep.replace("### Sweep", f"### Sweep {backbone}", 1))
        if stem:
            png = f"{stem}_sweep{suffix}.png"
            sweep_plot(recs, png)
            parts.append(f"![sweep]({os.path.basename(png)})")
    text = "\n\n".join(parts)
    if out:
        with open(stem + ".md" if not out.endswith(".md") else out, "w") as f:
            f.write(text + "\n")
    return text
