"""What a finished (or interrupted) `livr tune` sweep leaves behind: the results table (markdown + CSV), a
plot of accuracy against K, the best trial's config as YAML, the compute ASHA saved, and the MLflow parent
run's metrics and artifacts (the best trial's adapter among them)."""
from __future__ import annotations

import csv
import json
import math
import os
import re

from livr.config import Config, from_dict, save_config

_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})")


def _trial_id(result) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return tid
    m = _TRIAL_ID.search(os.path.basename(str(result.path)))
    return m.group(1) if m else "?"


def trial_rows(cfg: Config, dims, grid) -> list[dict]:
    """One row per trial: its searched values, best/last metric, epochs and steps used vs planned, status."""
    metric, sign = cfg.tune.metric, 1 if cfg.tune.mode == "max" else -1
    rows = []
    for i in range(len(grid)):
        r = grid[i]
        m = r.metrics or {}
        tid = _trial_id(r)
        run_dir = os.path.join(cfg.run_dir, f"trial_{tid}")
        df = r.metrics_dataframe
        values = [v for v in (df[metric].tolist() if df is not None and metric in df else []) if not math.isnan(v)]
        final = {}
        if os.path.exists(os.path.join(run_dir, "final_metrics.json")):
            with open(os.path.join(run_dir, "final_metrics.json")) as f:
                final = json.load(f)
        status = "error" if r.error else "completed" if final else "stopped early"
        epochs = int(m.get("training_iteration", 0) or 0)
        rows.append({
            "trial": tid, **{d.key: (r.config or {}).get(d.key) for d in dims},
            "best": max(values, key=lambda v: sign * v) if values else None, "last": m.get(metric),
            "epochs": epochs, "planned_epochs": int(m.get("planned_epochs", epochs) or epochs),
            "steps": int(m.get("global_step", 0) or 0), "planned_steps": int(m.get("planned_steps", 0) or 0),
            "status": status, "test_accuracy": final.get("test_accuracy"), "run_dir": run_dir,
        })
    rows.sort(key=lambda r: (r["status"] == "error", r["best"] is None, -sign * (r["best"] or 0)))
    return rows


def best_row(rows: list[dict]) -> dict | None:
    """The best trial by its best reported metric, among trials that ran to the end (they have an adapter);
    any trial with a metric if none did. `rows` are already sorted best first."""
    done = [r for r in rows if r["status"] == "completed" and r["best"] is not None]
    return (done or [r for r in rows if r["best"] is not None] or [None])[0]


def budget(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] != "error"]
    used, full = sum(r["epochs"] for r in ok), sum(max(r["planned_epochs"], r["epochs"]) for r in ok)
    steps, full_steps = sum(r["steps"] for r in ok), sum(max(r["planned_steps"], r["steps"]) for r in ok)
    return {"trials": len(rows), "completed": sum(r["status"] == "completed" for r in rows),
            "stopped_early": sum(r["status"] == "stopped early" for r in rows),
            "errors": sum(r["status"] == "error" for r in rows), "trial_epochs_used": used,
            "trial_epochs_full": full, "trial_epochs_saved": full - used, "steps_used": steps,
            "steps_full": full_steps, "steps_saved": full_steps - steps,
            "saved_fraction": (full - used) / full if full else 0.0}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e4) else f"{v:.4g}"
    return "–" if v is None else str(v)


def results_table(cfg: Config, dims, rows: list[dict]) -> str:
    m = cfg.tune.metric
    head = ["trial", *(d.key for d in dims), f"best {m}", f"last {m}", "epochs", "steps", "status"]
    with_test = any(r["test_accuracy"] is not None for r in rows)
    head += ["test_accuracy"] if with_test else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["trial"], *(_fmt(r[d.key]) for d in dims), _fmt(r["best"]), _fmt(r["last"]),
                 f"{r['epochs']}/{r['planned_epochs']}", f"{r['steps']}/{r['planned_steps']}", r["status"]]
        cells += [_fmt(r["test_accuracy"])] if with_test else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: str, dims, rows: list[dict]) -> None:
    cols = ["trial", *(d.key for d in dims), "best", "last", "epochs", "planned_epochs", "steps", "planned_steps",
            "status", "test_accuracy", "run_dir"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def plot(cfg: Config, dims, rows: list[dict], out_dir: str) -> str | None:
    """Best metric against K (or the first numeric searched key), coloured by lr when lr is searched."""
    numeric = [d.key for d in dims if len(d.keys) == 1 and all(isinstance(r[d.key], (int, float)) for r in rows)]
    if not numeric or not rows:
        return None
    x_key = "latents.num_latents" if "latents.num_latents" in numeric else numeric[0]
    pts = [r for r in rows if r["best"] is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(6, 4))
    colour = "optim.lr" if "optim.lr" in numeric and x_key != "optim.lr" else None
    kw = {}
    if colour:
        lrs = [r[colour] for r in pts]
        kw = {"c": lrs, "cmap": "viridis", "norm": LogNorm(min(lrs), max(lrs)) if min(lrs) < max(lrs) else None}
    for status, marker in (("completed", "o"), ("stopped early", "x"), ("error", "s")):
        sel = [i for i, r in enumerate(pts) if r["status"] == status]
        if not sel:
            continue
        extra = {k: ([v[i] for i in sel] if k == "c" else v) for k, v in kw.items()}
        sc = ax.scatter([pts[i][x_key] for i in sel], [pts[i]["best"] for i in sel], marker=marker, s=60,
                        label=status, **extra)
    if colour:
        fig.colorbar(sc, ax=ax, label=colour)
    xs = sorted({r[x_key] for r in pts})
    sign = 1 if cfg.tune.mode == "max" else -1
    ax.plot(xs, [max((r["best"] for r in pts if r[x_key] == x), key=lambda v: sign * v) for x in xs], "k--", lw=1,
            label=f"best per {x_key.split('.')[-1]}")
    if x_key == "latents.num_latents" and all(x > 0 for x in xs):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("K (latents.num_latents)" if x_key == "latents.num_latents" else x_key)
    ax.set_ylabel(f"best {cfg.tune.metric}")
    ax.set_title(f"sweep {cfg.name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = "accuracy_vs_K.png" if x_key == "latents.num_latents" else f"accuracy_vs_{x_key.split('.')[-1]}.png"
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def best_config(cfg: Config, best: dict, base: dict, path: str) -> Config:
    """The base config with the best trial's values: `livr train --config <path>` trains it."""
    from livr.cluster.search_space import apply_params

    params = {k: v for k, v in best.items() if k in cfg.tune.search_space}
    d = apply_params(base, params)
    d["name"], d["tracking"]["run_name"] = f"{cfg.name}-best", ""
    out = from_dict(d)
    save_config(out, path)
    return out


def _close_running_children(cfg: Config, rows: list[dict]) -> None:
    from mlflow.tracking import MlflowClient

    from livr.tracking.tracker import tracking_uri

    client = MlflowClient(tracking_uri(cfg))
    for r in rows:
        id_file = os.path.join(r["run_dir"], "mlflow_run_id")
        if os.path.exists(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
            if client.get_run(run_id).info.status == "RUNNING":
                client.set_terminated(run_id, status="KILLED")


def summarise(cfg: Config, dims, grid, expected: int, parent, wall: float) -> dict:
    """Print and write everything about the sweep; log it to the MLflow parent run."""
    from livr.config import to_dict

    rows = trial_rows(cfg, dims, grid)
    # a trial that finished or was stopped by ASHA is TERMINATED; anything else means the driver was stopped
    interrupted = len(rows) < expected or grid.num_terminated + grid.num_errors < len(grid)
    b = budget(rows)
    sweep_dir = cfg.run_dir
    md, csv_path = os.path.join(sweep_dir, "results.md"), os.path.join(sweep_dir, "results.csv")
    table = results_table(cfg, dims, rows)
    with open(md, "w") as f:
        f.write(f"# sweep {cfg.name}\n\n{table}\n")
    write_csv(csv_path, dims, rows)
    png = plot(cfg, dims, rows, sweep_dir)
    print(f"\n[livr tune] sweep '{cfg.name}': {b['trials']} of {expected} trials — {b['completed']} completed, "
          f"{b['stopped_early']} stopped early, {b['errors']} errors — {wall:.0f} s\n{table}\n", flush=True)
    summary = {"interrupted": interrupted, "rows": rows, "budget": b, "results_md": md, "results_csv": csv_path,
               "plot": png, "sweep_dir": sweep_dir, "parent_run_id": parent.run_id, "wall_s": wall,
               "best": None, "best_config": None}
    if interrupted:
        if parent.active:
            _close_running_children(cfg, rows)
            parent.end("KILLED")
        print(f"[livr tune] the sweep was interrupted: run the same command again to resume it ({sweep_dir})")
        return summary
    if cfg.tune.scheduler == "asha":
        print(f"[livr tune] ASHA stopped {b['stopped_early']} of {b['trials']} trials early: {b['trial_epochs_used']} of "
              f"{b['trial_epochs_full']} trial-epochs used, {b['trial_epochs_saved']} saved "
              f"({100 * b['saved_fraction']:.0f}%); optimizer steps {b['steps_used']} of {b['steps_full']}")
    best = best_row(rows)
    if best is not None:
        bc_path = os.path.join(sweep_dir, "best_config.yaml")
        best_config(cfg, best, to_dict(cfg), bc_path)
        values = ", ".join(f"{d.key}={_fmt(best[d.key])}" for d in dims)
        print(f"[livr tune] best: trial {best['trial']} ({values}) {cfg.tune.metric}={_fmt(best['best'])} "
              f"[{best['status']}], run dir {best['run_dir']}")
        print(f"[livr tune] best config: {bc_path}   ->   livr train --config {bc_path}")
        summary.update(best=best, best_config=bc_path)
    print(f"[livr tune] results: {md}, {csv_path}" + (f"; plot: {png}" if png else ""))
    if parent.active:
        _log_parent(parent, cfg, b, best, [md, csv_path, png, summary["best_config"]])
        from livr.tracking.tracker import tracking_uri

        print(f"[livr tune] MLflow: parent run {parent.run_id}, {b['trials']} child runs (experiment "
              f"'{cfg.tracking.experiment}', {tracking_uri(cfg)})")
    return summary


def _log_parent(parent, cfg: Config, b: dict, best: dict | None, files: list) -> None:
    metrics = {k: v for k, v in b.items() if isinstance(v, (int, float))}
    if best is not None and best["best"] is not None and not math.isnan(best["best"]):
        metrics[f"best_{cfg.tune.metric}"] = best["best"]
        parent.client.set_tag(parent.run_id, "livr.best_trial", best["trial"])
        for name in ("adapter", "tokenizer"):
            path = os.path.join(best["run_dir"], name)
            if os.path.isdir(path):
                parent.client.log_artifacts(parent.run_id, path, artifact_path=f"best_trial/{name}")
        for name in ("config.yaml", "latents.safetensors", "vocab.json", "eval.json"):
            path = os.path.join(best["run_dir"], name)
            if os.path.exists(path):
                parent.client.log_artifact(parent.run_id, path, artifact_path="best_trial")
    parent.log_metrics(metrics, 0)
    for path in files:
        if path and os.path.exists(path):
            parent.client.log_artifact(parent.run_id, path)
    parent.end("FINISHED")
