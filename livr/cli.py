"""`livr` command line: train, tune, eval, export, report, verify, inspect, demo, plan, config show, backbone make /
make-tiny, data make-synthetic."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _config(args):
    # the layers that own task names, packing and declared families register those config checks: imported first
    import livr.backbones.declared
    import livr.data.packing  # noqa: F401
    from livr.config import load_config

    return load_config(args.config, args.overrides)


def _launch_config(args):
    """The config of a launch (train, tune): its data paths checked too, before anything loads or is written."""
    from livr.config import check_data_paths

    return check_data_paths(_config(args))


def cmd_train(args) -> int:
    cfg = _launch_config(args)
    if cfg.distributed.num_workers > 0:
        try:
            from livr.cluster.ray_train import run_distributed
        except ImportError:
            print("livr: distributed.num_workers > 0 needs livr.cluster.ray_train (not built yet)", file=sys.stderr)
            return 2
        result = run_distributed(cfg)
    else:
        from livr.training.train import train_worker

        result = train_worker(cfg)
    print(json.dumps(result, indent=1))
    print(f"run directory: {cfg.run_dir}")
    print(mlflow_pointer(cfg))
    return 0


def mlflow_pointer(cfg) -> str:
    """Where the run's MLflow record is (tracking URI, experiment, run id) and how to browse it."""
    from livr.tracking.tracker import tracking_uri

    id_file = os.path.join(cfg.run_dir, "mlflow_run_id")
    if not cfg.tracking.enabled or not os.path.isfile(id_file):
        return "MLflow: no run recorded (tracking.enabled=false)"
    with open(id_file) as f:
        run_id = f.read().strip()
    uri = tracking_uri(cfg)
    browse = (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {uri}"
              if uri.startswith("sqlite") else uri)
    return f"MLflow run: {run_id} (experiment {cfg.tracking.experiment!r}, tracking URI {uri}); browse: {browse}"


def cmd_tune(args) -> int:
    from livr.cluster.tune import main_tune

    return main_tune(_launch_config(args))


def cmd_export(args) -> int:
    from livr.tools.export import export_run

    info = export_run(args.run, args.out, adapter_only=args.adapter_only)
    what = "adapter layout" if info["layout"] == "adapter" else \
        f"merged {info['family']} checkpoint, {info['num_latents']} latents in its chat template"
    print(f"exported {args.run} -> {args.out} ({what})")
    if info.get("processor_note"):
        print(f"note: {info['processor_note']}")
    return 0


def cmd_eval(args) -> int:
    from livr.training.runs import evaluate_run

    results = evaluate_run(args.run, split=args.split, bottleneck=args.bottleneck, overrides=args.overrides)
    from livr.data.tasks import PAPER_TASKS
    from livr.training.evaluate import table1

    tasks = [t for t in PAPER_TASKS if t in results["n"]] + sorted(set(results["n"]) - set(PAPER_TASKS))
    label = results["label"] + (" bottlenecked" if args.bottleneck else "")
    print(table1([(label, results["accuracy"])], tasks))
    how = ("under the Stage-1 bottleneck mask (--bottleneck: prompt and answer do not see the image)"
           if args.bottleneck else "under the causal mask")
    print(f"{args.run}: {args.split} split evaluated {how}; wrote {results['path']}")
    print(f"scored with eval.parser={results['parser']}" if results["accuracy"] is not None else
          f"answers hidden: no accuracy; BLINK submission file (EvalAI): {results['submission']}")
    return 0


def cmd_report(args) -> int:
    from livr.insight.report import report_experiment, report_runs

    if bool(args.runs) == bool(args.experiment):
        print("livr report: give run directories or --experiment NAME (not both)", file=sys.stderr)
        return 2
    if args.causal:
        from livr.insight.report import report_causal

        text = report_causal(args.runs, args.experiment, args.tracking_uri)
    elif args.experiment:
        print(report_experiment(args.experiment, args.tracking_uri, args.split, args.out, args.parser))
        return 0
    else:
        text = report_runs(args.runs, args.split, args.parser)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def cmd_verify(args) -> int:
    from livr.insight.verify import run_verify

    return run_verify(_config(args))


def cmd_inspect(args) -> int:
    if args.causal:
        from livr.insight.causal_report import causal_inspect, markdown

        layers = None
        if args.patch_layers:
            lo, _, hi = args.patch_layers.partition(":")
            layers = list(range(int(lo), int(hi or lo) + (0 if hi else 1)))
        result = causal_inspect(args.run, split=args.split, limit=args.limit, seeds=args.seeds, layers=layers,
                                log_mlflow=not args.no_mlflow, overrides=args.overrides)
        print(markdown(result) + f"files: {os.path.join(result['run'], 'inspect')}/ (causal.json, causal.md, "
              + ", ".join(result["plots"]) + ")")
        return 0
    from livr.insight.inspect import inspect_run, summary

    result = inspect_run(args.run, split=args.split, limit=args.limit, heatmaps=args.heatmaps,
                         bottleneck_attention=args.bottleneck_attention, log_mlflow=not args.no_mlflow,
                         overrides=args.overrides)
    print(summary(result))
    return 0


def cmd_config_show(args) -> int:
    from livr.config import dump_config

    print(dump_config(_config(args)), end="")
    return 0


def cmd_make_tiny(args) -> int:
    from livr.backbones import make_preset

    try:
        print(make_preset(args.name, args.dir, seed=args.seed, num_layers=getattr(args, "num_layers", 0), progress=True))
    except ValueError as e:  # an unknown preset name or depth
        print(f"livr: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_make_synthetic(args) -> int:
    from livr.data.synthetic import make_synthetic

    sizes = {"train": args.train, "val": args.val, "test": args.test}
    paths = make_synthetic(args.out, args.tasks, sizes, seed=args.seed, image_size=args.image_size,
                           parquet=args.parquet, progress=True)
    for task, path in paths.items():
        print(f"{task}: {path}")
    return 0


def cmd_data_build(args) -> int:
    """`livr data build TASK --source DIR --out DIR` (or `--list`): a paper training set from its public source."""
    from livr.data import build as data_build

    if args.list:
        print(data_build.describe(), end="")
        return 0
    if not args.task or not args.source or not args.out:
        print("livr: error: data build needs TASK, --source and --out (or --list)", file=sys.stderr)
        return 2
    result = data_build.build(args.task, args.source, args.out, train=args.train, val=args.val, test=args.test,
                              seed=args.seed, exclude=args.exclude or (), clip=args.clip, workers=args.workers,
                              progress=not os.environ.get("LIVR_QUIET"))
    if result.get("reused"):
        print(f"{args.task}: up to date (same request): {result['path']}")
    for split, c in result["counts"].items():
        extra = ", ".join(f"{k}: {v}" for k, v in sorted(c.items()) if k not in ("rows", "requested", "units"))
        print(f"{args.task}/{split}: {c['rows']} of {c['requested']} rows from {c['units']} source units"
              + (f" ({extra})" if extra else ""))
    print(f"{args.task}: {result['path']}")
    return 0


def cmd_demo(args) -> int:
    from livr.tools.demo import run_demo

    return run_demo(args.config, args.overrides)


def _image_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size must be WIDTHxHEIGHT (e.g. 1024x768), got {text!r}") from None
    return w, h


def cmd_plan(args) -> int:
    from livr.tools.plan import format_plan, plan

    if args.image_size and not args.images:
        print("livr plan: --image-size needs --images N", file=sys.stderr)
        return 2
    result = plan(_config(args), seq_len=args.seq_len, images=args.images or 0, image_size=args.image_size,
                  sample=args.sample)
    print(json.dumps(result, indent=1, default=str) if args.json else format_plan(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="livr", description="Latent Implicit Visual Reasoning: training, evaluation, tooling.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp, required=True):
        sp.add_argument("--config", required=required, help="YAML config (see configs/)")
        sp.add_argument("overrides", nargs="*", help="key=value overrides, e.g. latents.num_latents=8")

    sp = sub.add_parser("train", help="train one run (one process, or Ray Train when distributed.num_workers > 0)")
    with_config(sp)
    sp.set_defaults(fn=cmd_train)
    sp = sub.add_parser("tune", help="hyperparameter search with Ray Tune (tune.search_space; ASHA; resumable)")
    with_config(sp)
    sp.set_defaults(fn=cmd_tune)
    sp = sub.add_parser("eval", help="evaluate a saved run directory")
    sp.add_argument("--run", required=True)
    sp.add_argument("--split", default="test", choices=["train", "val", "test"])
    sp.add_argument("--bottleneck", action="store_true", help="evaluate under the Stage-1 mask")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the run's config (e.g. data.source=DIR)")
    sp.set_defaults(fn=cmd_eval)
    sp = sub.add_parser("export", help="a saved run as a standalone Hugging Face checkpoint (LoRA merged, latents "
                                       "in the embedding and the chat template) for stock transformers")
    sp.add_argument("--run", required=True)
    sp.add_argument("--out", required=True, help="output directory (replaced atomically)")
    sp.add_argument("--adapter-only", action="store_true", help="copy the adapter layout instead of merging")
    sp.set_defaults(fn=cmd_export)
    sp = sub.add_parser("report", help="the paper's Table-1 layout from run directories or an MLflow experiment")
    sp.add_argument("runs", nargs="*", help="run directories (or use --experiment)")
    sp.add_argument("--experiment", help="MLflow experiment: its FINISHED runs, plus K / lr sweep plots")
    sp.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///$PWD/mlflow.db)")
    sp.add_argument("--split", default="test")
    sp.add_argument("--out", help="also write the markdown here (--experiment: <stem>.md + <stem>_sweep.png)")
    sp.add_argument("--causal", action="store_true", help="compare the runs' causal analyses (livr inspect --causal)")
    sp.add_argument("--parser", choices=("blink", "match", "lenient"),
                    help="accuracy under this answer parser (default: each run's eval.parser)")
    sp.set_defaults(fn=cmd_report)
    sp = sub.add_parser("verify", help="prove the Stage-1 bottleneck empirically on the configured backbone")
    with_config(sp, required=False)
    sp.set_defaults(fn=cmd_verify)
    sp = sub.add_parser("inspect", help="attention masses, latent heatmaps, accuracy without latents / bottlenecked")
    sp.add_argument("--run", required=True)
    sp.add_argument("--split", default="val", choices=["train", "val", "test"])
    sp.add_argument("--limit", type=int, default=64, help="rows of the split to use (0 = all)")
    sp.add_argument("--heatmaps", type=int, default=4, help="examples drawn as latent heatmaps")
    sp.add_argument("--bottleneck-attention", action="store_true", help="attention masses under the Stage-1 mask")
    sp.add_argument("--no-mlflow", action="store_true", help="write <run>/inspect/ only")
    sp.add_argument("--causal", action="store_true", help="the causal suite: latent interventions, activation "
                    "patching, sensitivity / collapse, probes, with bootstrap 95%% CIs (docs/insight.md)")
    sp.add_argument("--seeds", type=int, default=3, help="--causal: seeds of the random-row intervention and of "
                    "the donor pairings for patching")
    sp.add_argument("--patch-layers", default="", help="--causal: decoder layers patched, e.g. 0:11 (end exclusive) "
                    "or 5 (default: all)")
    sp.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")
    sp.set_defaults(fn=cmd_inspect)
    sp = sub.add_parser("demo", help="the CPU demo: tiny backbone, synthetic tasks, SFT vs LIVR, table")
    with_config(sp, required=False)
    sp.set_defaults(fn=cmd_demo, config="configs/demo.yaml")
    sp = sub.add_parser("plan", help="per-GPU memory and host RAM of a run (backbone config + data, no weights)")
    with_config(sp, required=False)
    sp.add_argument("--seq-len", type=int, default=None,
                    help="tokens per example (text + image tokens + latents + answer); default: from the data")
    sp.add_argument("--images", type=int, default=0, help="plan for N images per example instead of the data")
    sp.add_argument("--image-size", type=_image_size, default=None, help="WxH of those images (default 1024x768)")
    sp.add_argument("--sample", type=int, default=16, help="train rows read per task to measure the sequence")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")
    sp.set_defaults(fn=cmd_plan)

    cfg = sub.add_parser("config", help="configuration tools").add_subparsers(dest="sub", required=True)
    sp = cfg.add_parser("show", help="print the resolved config")
    with_config(sp, required=False)
    sp.set_defaults(fn=cmd_config_show)

    bb = sub.add_parser("backbone", help="backbone tools").add_subparsers(dest="sub", required=True)
    sp = bb.add_parser("make", help="materialise an offline preset (tiny, or real size with random weights) into DIR")
    sp.add_argument("name", help="tiny-qwen2.5-vl | tiny-qwen3-vl | tiny-llava-onevision | tiny-gemma3 | "
                                 "size-qwen2.5-vl-3b | size-qwen3-vl-4b | size-llava-onevision-7b | size-gemma-3-4b | "
                                 "size-qwen3.5-4b | ... (livr.backbones.PRESETS)")
    sp.add_argument("dir")
    sp.add_argument("--num-layers", type=int, default=0,
                    help="keep the first N decoder layers and vision blocks (0 = the preset's own depth)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_make_tiny)
    sp = bb.add_parser("make-tiny", help="materialise a tiny offline preset into DIR (= make)")
    sp.add_argument("name", help="tiny-qwen2.5-vl | tiny-qwen3-vl | tiny-llava-onevision (or any preset of make)")
    sp.add_argument("dir")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_make_tiny)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="sub", required=True)
    sp = data.add_parser("make-synthetic", help="generate BLINK-schema synthetic tasks (datasets save_to_disk)")
    sp.add_argument("--out", required=True)
    sp.add_argument("--tasks", nargs="+", default=["Counting"])
    sp.add_argument("--train", type=int, default=200)
    sp.add_argument("--val", type=int, default=50)
    sp.add_argument("--test", type=int, default=50)
    sp.add_argument("--seed", type=int, default=42)
    sp.add_argument("--image-size", type=int, default=112)
    sp.add_argument("--parquet", action="store_true", help="also export <task>/<split>.parquet")
    sp.set_defaults(fn=cmd_make_synthetic)
    sp = data.add_parser("build", help="build a paper training set (BLINK schema) from its public source")
    sp.add_argument("task", nargs="?", help="Counting | Jigsaw | Object_Localization | ... (see --list)")
    sp.add_argument("--list", action="store_true", help="name each task, its source, layout and where to get it")
    sp.add_argument("--source", help="local copy of the source, in the layout its authors distribute")
    sp.add_argument("--out", help="output root: writes OUT/<task>/{train,val,test}.parquet")
    sp.add_argument("--train", type=int, default=None, help="train rows (default 1000)")
    sp.add_argument("--val", type=int, default=None, help="val rows (default 250)")
    sp.add_argument("--test", type=int, default=None, help="test rows (default: the paper's own test size)")
    sp.add_argument("--seed", type=int, default=42)
    sp.add_argument("--exclude", nargs="+", action="extend", metavar="DIR",
                    help="drop rows whose images are (near-)duplicates of any image under DIR (e.g. BLINK)")
    sp.add_argument("--clip", metavar="MODEL_DIR", default=None,
                    help="also retrieve --exclude duplicates by CLIP image embeddings (a local CLIP checkpoint)")
    sp.add_argument("--workers", type=int, default=1, help="threads preparing and drawing rows")
    sp.set_defaults(fn=cmd_data_build)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from livr.utils.atomic import WriteError
    from livr.utils.console import setup

    setup()  # known third-party noise filtered; plain output when not on a terminal
    from livr.config import ConfigError
    from livr.data.tasks import DataError
    from livr.training.checkpoint import CheckpointError
    from livr.training.lifecycle import RunStopped
    from livr.training.nonfinite import NonFiniteError

    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError, NonFiniteError, WriteError, FileNotFoundError) as e:
        print(f"livr: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # a signal: the checkpoint is written and the resume command printed
        return e.exit_code
    except KeyboardInterrupt:
        print("livr: interrupted", file=sys.stderr)
        return 130
    finally:  # a process group this process made is destroyed before it exits (livr.training.distributed)
        if "livr.training.distributed" in sys.modules:
            sys.modules["livr.training.distributed"].teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
