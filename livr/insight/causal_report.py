"""`livr inspect --run RUN --causal`: the causal suite on a run (livr/insight/causal.py measures), each figure with a
bootstrap 95% confidence interval over examples (or pairs), to `RUN/inspect/causal.json`, `causal.md`, two plots
and the run's MLflow record (metrics `causal/...`, artifacts `inspect/`). docs/insight.md explains how to read it.
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch

from livr.insight import causal

MASKS = {"causal": False, "stage1": True}  # the run's normal inference mask, and the Stage-1 bottleneck
BOOTSTRAP = 1000


def ci(values, seed: int = 0, n: int = BOOTSTRAP) -> dict:
    """{"mean", "lo", "hi", "n"}: the mean and its percentile bootstrap 95% interval (None values dropped)."""
    v = np.asarray([float(x) for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    means = np.random.default_rng(seed).choice(v, size=(n, len(v)), replace=True).mean(1)
    return {"mean": float(v.mean()), "lo": float(np.percentile(means, 2.5)), "hi": float(np.percentile(means, 97.5)),
            "n": len(v)}


# ----------------------------------------------------------------------------- the analyses
def interventions(lm, rows, seeds: int) -> dict:
    """{mask: {intervention: {"acc": ci, "delta_logp": ci}}}; `random` pooled over `seeds` seeds."""
    out = {}
    for mask, bottleneck in MASKS.items():
        base = causal.score(lm, rows, "none", bottleneck)
        res = {"none": {"acc": ci([r["correct"] for r in base]), "delta_logp": ci([0.0] * len(base))}}
        for name in causal.INTERVENTIONS[1:] if lm.latent_ids else ():
            runs = [causal.score(lm, rows, name, bottleneck, seed=s) for s in range(seeds if name == "random" else 1)]
            acc = [r["correct"] for got in runs for r in got]
            delta = [r["logp"] - b["logp"] for got in runs for r, b in zip(got, base)]
            res[name] = {"acc": ci(acc), "delta_logp": ci(delta)}
        out[mask] = res
    return out


def patching(lm, rows, seeds: int, layers: list[int] | None) -> dict:
    """{mask: {"latent"|"image": {"flip_rate", "no_effect", "effect", "to_donor_prediction", "changed": ci,
    "chance", "pairs"}}} over `seeds` random donor pairings. `effect` = flip_rate - no_effect per pair: how much
    more often B answers A's answer because of the patch (0 = the patched states carry nothing)."""
    pairs = [p for s in range(seeds) for p in causal.donor_pairs(rows, seed=s)]
    out = {}
    for mask, bottleneck in MASKS.items():
        out[mask] = {}
        for what in (["latent"] if lm.latent_ids else []) + ["image"]:
            got = causal.patch_flips(lm, rows, pairs, what=what, bottleneck=bottleneck, layers=layers)
            out[mask][what] = {"flip_rate": ci([g["flip"] for g in got]), "no_effect": ci([g["before"] for g in got]),
                               "effect": ci([float(g["flip"]) - float(g["before"]) for g in got]),
                               "to_donor_prediction": ci([g["to_donor"] for g in got]),
                               "changed": ci([g["changed"] for g in got]),
                               "chance": float(np.mean([g["chance"] for g in got])) if got else None,
                               "pairs": len(got)}
    return out


def _others(rows, seed: int) -> list[int | None]:
    """For each row, another row of the same task (seeded), or None."""
    g = np.random.default_rng(seed)
    same = [[j for j, r in enumerate(rows) if j != i and r.get("sub_task") == row.get("sub_task")]
            for i, row in enumerate(rows)]
    return [int(g.choice(s)) if s else None for s in same]


def _cosine_pairs(x: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of x [N, D]."""
    x = torch.nn.functional.normalize(x, dim=-1)
    sim = x @ x.T
    n = x.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1))) if n > 1 else float("nan")


def probe(features: np.ndarray, labels: list, tasks: list, seed: int = 0) -> list[bool | None]:
    """Held-out correctness per example of a logistic-regression probe (standardised features, L2), by stratified
    k-fold cross-validation within each task (k = min(5, the rarest class's count)); None where a task has no
    two classes with two examples each."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out: list[bool | None] = [None] * len(labels)
    for task in dict.fromkeys(tasks):
        idx = [i for i, t in enumerate(tasks) if t == task]
        y = np.asarray([str(labels[i]) for i in idx])
        values, counts = np.unique(y, return_counts=True)
        keep = [i for i, lab in zip(idx, y) if counts[values == lab][0] >= 2]
        y = np.asarray([str(labels[i]) for i in keep])
        if len(np.unique(y)) < 2:
            continue
        k = int(min(5, np.unique(y, return_counts=True)[1].min()))
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        pred = cross_val_predict(model, features[keep], y, cv=StratifiedKFold(k, shuffle=True, random_state=seed))
        for i, p, t in zip(keep, pred, y):
            out[i] = bool(p == t)
    return out


def majority_rate(labels: list, tasks: list) -> float:
    """The accuracy of always answering each task's most frequent label: a probe's chance level."""
    hit = 0
    for task in dict.fromkeys(tasks):
        y = [str(lab) for lab, t in zip(labels, tasks) if t == task]
        hit += max(y.count(v) for v in set(y))
    return hit / len(labels)


def representations(lm, rows, seed: int = 0) -> dict:
    """Per mask and per layer (0 = input embeddings): input -> latent sensitivity (normalised distance of the
    latent states when only the images change), collapse (mean pairwise cosine similarity of latent states across
    examples, per latent), and probe accuracy from latent states (mean over the K latents) to the answer; the
    same for the last prompt token as the reference."""
    others = _others(rows, seed)
    labels, tasks = [str(r["answer"]) for r in rows], [r.get("sub_task", "") for r in rows]
    out = {"probe_chance": majority_rate(labels, tasks)}
    kinds = (["latent"] if lm.latent_ids else []) + ["prompt"]
    for mask, bottleneck in MASKS.items():
        st = [causal.states(lm, r, bottleneck) for r in rows]
        n_layers = st[0]["prompt"].shape[0]
        res = {}
        for kind in kinds:
            dist = [[None] * len(rows) for _ in range(n_layers)]
            for i, (row, j) in enumerate(zip(rows, others)):
                if j is None:
                    continue
                swapped = causal.states(lm, causal.swap_images(row, rows[j]), bottleneck)[kind]
                for layer in range(n_layers):
                    a, b = st[i][kind][layer], swapped[layer]
                    dist[layer][i] = float((a - b).norm() / a.norm().clamp(min=1e-12))
            stack = torch.stack([s[kind] for s in st])  # [N, layers+1, (K,) H]
            if kind == "latent":
                collapse = [float(np.mean([_cosine_pairs(stack[:, layer, k]) for k in range(stack.shape[2])]))
                            for layer in range(n_layers)]
                feats = stack.mean(2)
            else:
                collapse = [_cosine_pairs(stack[:, layer]) for layer in range(n_layers)]
                feats = stack
            res[kind] = {"sensitivity": [ci(d) for d in dist], "collapse": collapse,
                         "probe": [ci(probe(feats[:, layer].numpy(), labels, tasks, seed)) for layer in range(n_layers)]}
        out[mask] = res
    return out


# ----------------------------------------------------------------------------- the suite
def run_causal(lm, rows, *, seeds: int = 3, layers: list[int] | None = None) -> dict:
    if not rows:
        raise ValueError("livr inspect --causal: no rows to analyse")
    t0, out = time.perf_counter(), {}
    phases = (("interventions", lambda: interventions(lm, rows, seeds)),
              ("patching", lambda: patching(lm, rows, seeds, layers)),
              ("representations", lambda: representations(lm, rows)))
    for i, (name, run) in enumerate(phases):
        _progress(f"{i + 1}/{len(phases)} {name} on {len(rows)} rows ({time.perf_counter() - t0:.0f} s so far)")
        out[name] = run()
    _progress(f"done in {time.perf_counter() - t0:.0f} s")
    return out


def _progress(text: str) -> None:
    """One line per phase of the suite on stderr (it runs minutes on a CPU); silent under LIVR_QUIET=1."""
    if os.environ.get("LIVR_QUIET") != "1":
        print(f"[livr inspect --causal] {text}", file=sys.stderr, flush=True)


def _fmt(c: dict | None, pct: bool = True, signed: bool = True) -> str:
    """"mean [lo, hi]": percent with one decimal, or (pct False) three decimals, signed unless `signed` False."""
    if not c or c.get("mean") is None:
        return "n/a"
    if pct:
        return f"{100 * c['mean']:.1f} [{100 * c['lo']:.1f}, {100 * c['hi']:.1f}]"
    f = "+.3f" if signed else ".3f"
    return f"{c['mean']:{f}} [{c['lo']:{f}}, {c['hi']:{f}}]"


def markdown(result: dict) -> str:
    """The tables of causal.md: interventions, patching, and the last layer's representation figures."""
    title = (f"# Causal analysis: {result['run']} ({result['split']}, {result['n']} rows, {result['mode']}, "
             f"K={result['num_latents']})")
    lines = [title, "", "Means with bootstrap 95% intervals over examples (pairs for patching).", "",
             "| intervention | acc % (causal mask) | Δ log p (causal) | acc % (Stage-1 mask) | Δ log p (Stage-1) |",
             "|---|---|---|---|---|"]
    iv = result["interventions"]
    for name in iv["causal"]:
        c, s = iv["causal"][name], iv["stage1"][name]
        lines.append(f"| {name} | {_fmt(c['acc'])} | {_fmt(c['delta_logp'], False)} | {_fmt(s['acc'])} | "
                     f"{_fmt(s['delta_logp'], False)} |")
    lines += ["", ("| patched states | mask | B answers A's answer % | unpatched % | effect (points) "
                   "| B's answer moved % | pairs |"), "|---|---|---|---|---|---|---|"]
    for mask, res in result["patching"].items():
        for what, p in res.items():
            lines.append(f"| {what} | {mask} | {_fmt(p['flip_rate'])} | {_fmt(p['no_effect'])} | {_fmt(p['effect'])} | "
                         f"{_fmt(p['changed'])} | {p['pairs']} |")
    rep = result["representations"]
    lines += ["", f"Last layer (probe chance = majority rate {100 * rep['probe_chance']:.1f} %):", "",
              "| states | mask | image sensitivity | collapse (cos) | probe acc % |", "|---|---|---|---|---|"]
    for mask in MASKS:
        for kind, r in rep[mask].items():
            lines.append(f"| {kind} | {mask} | {_fmt(r['sensitivity'][-1], False, signed=False)} | "
                         f"{r['collapse'][-1]:.3f} | {_fmt(r['probe'][-1])} |")
    return "\n".join(lines) + "\n"


def plots(result: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = ["causal_interventions.png", "causal_layers.png"]
    iv = result["interventions"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), squeeze=False)
    for ax, mask in zip(axes[0], MASKS):
        names = list(iv[mask])
        m = [100 * iv[mask][n]["acc"]["mean"] for n in names]
        err = [[m_ - 100 * iv[mask][n]["acc"]["lo"] for m_, n in zip(m, names)],
               [100 * iv[mask][n]["acc"]["hi"] - m_ for m_, n in zip(m, names)]]
        ax.bar(names, m, yerr=err, capsize=3, color="#4c72b0")
        ax.set_title(f"accuracy under interventions ({mask} mask)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, files[0]), dpi=110)
    plt.close(fig)
    rep = result["representations"]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2), squeeze=False)
    for mask, style in zip(MASKS, ("-", "--")):
        for kind, r in rep[mask].items():
            x = range(len(r["collapse"]))
            axes[0, 0].plot(x, [c["mean"] for c in r["sensitivity"]], style, label=f"{kind}, {mask}")
            axes[0, 1].plot(x, r["collapse"], style, label=f"{kind}, {mask}")
            axes[0, 2].plot(x, [100 * (c["mean"] or 0) for c in r["probe"]], style, label=f"{kind}, {mask}")
    axes[0, 2].axhline(100 * rep["probe_chance"], color="grey", lw=0.8, label="chance")
    for ax, title in zip(axes[0], ("image sensitivity (normalised distance)", "collapse (mean pairwise cos)",
                                   "probe accuracy %")):
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("layer (0 = input embeddings)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, files[1]), dpi=110)
    plt.close(fig)
    return files


def flat_metrics(result: dict) -> dict:
    """The headline figures as MLflow metrics `causal/...`."""
    m = {}
    for mask, res in result["interventions"].items():
        for name, r in res.items():
            m[f"causal/{mask}/{name}/acc"] = r["acc"]["mean"]
            m[f"causal/{mask}/{name}/delta_logp"] = r["delta_logp"]["mean"]
    for mask, res in result["patching"].items():
        for what, p in res.items():
            m[f"causal/{mask}/patch_{what}/flip_rate"] = p["flip_rate"]["mean"]
            m[f"causal/{mask}/patch_{what}/effect"] = p["effect"]["mean"]
    for mask in MASKS:
        for kind, r in result["representations"][mask].items():
            m[f"causal/{mask}/{kind}/sensitivity_last"] = r["sensitivity"][-1]["mean"]
            m[f"causal/{mask}/{kind}/collapse_last"] = r["collapse"][-1]
            m[f"causal/{mask}/{kind}/probe_last"] = r["probe"][-1]["mean"]
    return {k: v for k, v in m.items() if v is not None and np.isfinite(v)}


def causal_inspect(run_dir: str, *, split: str = "val", limit: int = 64, seeds: int = 3, layers=None,
                   log_mlflow: bool = True, overrides: list[str] | None = None) -> dict:
    """Load the run, run the suite on `split` (first `limit` rows), write RUN/inspect/causal.{json,md} + plots,
    log to the run's MLflow record; the result."""
    from livr.data.splits import load_splits
    from livr.data.tasks import DataError
    from livr.training.evaluate import hidden_answers
    from livr.training.runs import load_run

    cfg, lm = load_run(run_dir, overrides, needs_data=True)
    rows = load_splits(cfg, only=[split])[split][: limit or None]
    if hidden_answers(rows, split):
        raise DataError(f"livr inspect --causal: split {split!r} has hidden answers (BLINK test); use --split val")
    rows = [dict(r) for r in rows]
    result = {"run": os.path.abspath(run_dir), "split": split, "n": len(rows), "mode": cfg.train.mode,
              "num_latents": cfg.latents.num_latents, "seeds": seeds, "bootstrap": BOOTSTRAP,
              "patch_layers": layers, **run_causal(lm, rows, seeds=seeds, layers=layers)}
    out_dir = os.path.join(run_dir, "inspect")
    os.makedirs(out_dir, exist_ok=True)
    result["plots"] = plots(result, out_dir)
    with open(os.path.join(out_dir, "causal.md"), "w") as f:
        f.write(markdown(result))
    tmp = os.path.join(out_dir, "causal.json.tmp")
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, os.path.join(out_dir, "causal.json"))
    if log_mlflow:
        result["mlflow_run_id"] = log_causal(cfg, run_dir, flat_metrics(result))
    return result


def log_causal(cfg, run_dir: str, metrics: dict) -> str | None:
    from livr.tracking.tracker import recorded_run_id, tracking_uri

    run_id = recorded_run_id(cfg, run_dir, "inspect --causal")
    if run_id is None:
        return None

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, ts = MlflowClient(tracking_uri(cfg)), int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
    client.log_artifacts(run_id, os.path.join(run_dir, "inspect"), artifact_path="inspect")
    return run_id


# ----------------------------------------------------------------------------- across runs (`livr report --causal`)
def _pts(c: dict | None) -> str:
    return "n/a" if not c or c.get("mean") is None else f"{100 * c['mean']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]"


def comparison(results: list[tuple[str, dict]]) -> str:
    """One row per run (name, its causal.json): the headline causal figures side by side, CIs in brackets.
    Accuracy changes are in points against the run's own unmodified accuracy (causal mask); patching effects are
    flip rate minus the unpatched rate (Stage-1 / causal mask); the last layer's representation figures."""
    head = ("| run | mode | K | acc % | remove Δ | markers only Δ | mean Δ | random Δ | patch latents Δ (Stage-1) "
            "| patch latents Δ (causal) | patch image Δ (causal) | latent sensitivity | latent collapse "
            "| probe latents % | probe prompt % |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results:
        iv, pt, rep = r["interventions"]["causal"], r["patching"], r["representations"]["causal"]
        base = iv["none"]["acc"]["mean"]

        def drop(k, iv=iv, base=base):
            return "n/a" if k not in iv else f"{100 * (iv[k]['acc']['mean'] - base):+.1f}"

        lat = rep.get("latent")
        lines.append(" | ".join([
            f"| {name}", r["mode"], str(r["num_latents"]), _fmt(iv["none"]["acc"]), drop("remove"), drop("markers_only"),
            drop("mean"), drop("random"), _pts(pt["stage1"].get("latent", {}).get("effect")),
            _pts(pt["causal"].get("latent", {}).get("effect")), _pts(pt["causal"]["image"]["effect"]),
            _fmt(lat["sensitivity"][-1], False, signed=False) if lat else "n/a",
            f"{lat['collapse'][-1]:.3f}" if lat else "n/a", _fmt(lat["probe"][-1]) if lat else "n/a",
            _fmt(rep["prompt"]["probe"][-1])]) + " |")
    return "\n".join(lines)
