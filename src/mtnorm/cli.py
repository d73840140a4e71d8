"""The ``mtnorm`` command: ``run``, ``train``, ``eval``, ``bench``, ``table``, ``analyze``, ``profile``,
``methods``.

Every user error (bad config key, missing data, unknown method or balancer) ends in a one-line
``mtnorm: error: ...`` on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """A problem with the command line itself."""


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    """``"3"`` means seeds 0, 1, 2; ``"0,5,7"`` those seeds."""
    try:
        if "," in text:
            return [int(s) for s in _csv(text)]
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes a count or a comma list of seeds, got {text!r}"
        ) from None
    if count < 1:
        raise argparse.ArgumentTypeError("--seeds must be at least 1")
    return list(range(count))


def _alphas(text: str) -> list[float]:
    try:
        return [float(a) for a in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--alphas takes comma-separated numbers, got {text!r}") from None


def _scales(text: str) -> list[float]:
    try:
        scales = [float(a) for a in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--loss-scales takes comma-separated numbers, got {text!r}"
        ) from None
    if not scales or any(s < 0 for s in scales):
        raise argparse.ArgumentTypeError(f"--loss-scales takes non-negative numbers, got {text!r}")
    return scales


def _counts(text: str) -> list[int]:
    try:
        counts = [int(a) for a in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tasks takes comma-separated integers, got {text!r}") from None
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(f"--tasks takes positive integers, got {text!r}")
    return counts


def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    from mtnorm.train.config import parse_overrides

    return parse_overrides(pairs)


RESUME_HELP = (
    "continue the interrupted grid in DIR (the folder the first invocation printed): finished runs "
    "are read back, an unfinished one continues from its last.pt; give the same arguments as before"
)


def _grid_folder(args: argparse.Namespace, default_parent: str) -> Path:
    """A new timestamped folder, or with ``--resume DIR`` the grid folder to continue."""
    from mtnorm.train.runs import fresh_folder

    if args.resume is None:
        return fresh_folder(args.out or default_parent)
    folder = Path(args.resume)
    if not folder.is_dir():
        raise CLIError(f"--resume: no grid folder at {folder}; give the folder an earlier run/bench printed")
    return folder


NO_REPORT_HELP = (
    "skip the analysis report of the multi-task runs (the table and summary.json are still written; "
    "`mtnorm analyze` makes the report later)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtnorm", description="Multi-task learning with task-specific normalization."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="train and compare methods on an embedded benchmark (default: MultiFashion)"
    )
    run.add_argument("--benchmark", choices=["multifashion", "scenes"], default="multifashion")
    run.add_argument("--methods", type=_csv, default=None, help="comma list (default: stl,hps,tsbn,tssbn)")
    run.add_argument("--balancer", default="ew", help="any name of mtnorm.balance (default: ew)")
    run.add_argument("--epochs", type=int, default=None)
    run.add_argument("--seeds", type=_seeds, default=[0], help="a count (3 = seeds 0,1,2) or a list")
    run.add_argument("--n-train", type=int, default=None, help="training-set size")
    run.add_argument("--n-test", type=int, default=None, help="test-set size")
    run.add_argument("--alphas", type=_alphas, default=None, help="α sweep for task-norm methods")
    run.add_argument("--device", default=None)
    run.add_argument(
        "--out", default=None, help="parent of this invocation's new timestamped folder (runs/<benchmark>)"
    )
    run.add_argument("--resume", default=None, metavar="DIR", help=RESUME_HELP)
    run.add_argument("--no-report", action="store_true", help=NO_REPORT_HELP)

    train = sub.add_parser("train", help="train one run from a YAML config")
    train.add_argument("config")
    train.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    train.add_argument(
        "--overwrite", action="store_true", help="replace the run already in <out> (its files are deleted)"
    )
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    ev = sub.add_parser("eval", help="evaluate a checkpoint on its benchmark's test split")
    ev.add_argument("checkpoint")
    ev.add_argument("--device", default=None)

    bench = sub.add_parser("bench", help="a grid of methods x seeds from a config, as mean ± std")
    bench.add_argument("config")
    bench.add_argument("--methods", type=_csv, default=None, help="comma list (default: the config's method)")
    bench.add_argument("--seeds", type=_seeds, default=[0, 1, 2])
    bench.add_argument("--alphas", type=_alphas, default=None, help="α sweep for task-norm methods")
    bench.add_argument("--baseline", default="stl")
    bench.add_argument(
        "--loss-scales",
        type=_scales,
        default=None,
        help="also rerun the grid with each task's loss scaled by each factor (e.g. 0.5,1.5,2.0) "
        "and report the spread of relative performance (paper §7.2)",
    )
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument(
        "--out", default=None, help="parent of this invocation's new timestamped folder (<out>-bench)"
    )
    bench.add_argument("--resume", default=None, metavar="DIR", help=RESUME_HELP)
    bench.add_argument("--no-report", action="store_true", help=NO_REPORT_HELP)

    table = sub.add_parser(
        "table", help="the summary table of finished runs gathered from one or more grid folders"
    )
    table.add_argument("folders", nargs="+", help="grid folders (each holds <run>/record.json)")
    table.add_argument("--baseline", default="stl", help="the row Δm%% is relative to (default stl)")
    table.add_argument("--methods", type=_csv, default=None, help="rows to show, in this order (default all)")
    table.add_argument(
        "--metrics", type=_csv, default=None, help="task/metric columns to show (default every metric)"
    )
    table.add_argument(
        "--delta-metrics",
        type=_csv,
        default=None,
        help="task/metric names Δm%% counts (default every metric; 'shown' = the --metrics columns)",
    )
    table.add_argument(
        "--epoch", type=int, default=None, help="the runs' evaluations of this epoch, not their last"
    )
    table.add_argument(
        "--per-seed",
        action="store_true",
        help="also Δm%% of every run, the rows' rank seed by seed, and Kendall's W of the ranks",
    )
    table.add_argument(
        "--baseline-seeds", type=_seeds, default=None, help="only these seeds of the baseline (sensitivity)"
    )

    analyze = sub.add_parser("analyze", help="report on trained runs: capacity, relations, specialization")
    analyze.add_argument("runs", nargs="+", help="run folders (or checkpoints) of trained models")
    analyze.add_argument("--out", default=None, help="report folder (default: <first run>/analysis)")
    analyze.add_argument("--prune-k", type=int, default=None, help="filters pruned per task (default 2.5%%)")
    analyze.add_argument("--no-pruning", action="store_true", help="skip the pruning experiment")
    analyze.add_argument(
        "--no-affinity", action="store_true", help="skip the lookahead affinity and representation embedding"
    )

    prof = sub.add_parser(
        "profile", help="encoder #P and #F against the number of tasks, per method (paper Fig. 2 right)"
    )
    prof.add_argument("--benchmark", choices=["multifashion", "scenes"], default="multifashion")
    prof.add_argument(
        "--methods", type=_csv, default=None, help="comma list (default: stl,cross_stitch,mtan,tssbn)"
    )
    prof.add_argument("--tasks", type=_counts, default=[1, 2, 5, 10, 40], help="task counts (1,2,5,10,40)")
    prof.add_argument("--out", default=None, help="the PNG (default: profile-<benchmark>.png)")

    sub.add_parser("methods", help="list the registered methods and balancers")
    return parser


def _variants(methods: Sequence[str], alphas: Sequence[float] | None) -> list:
    from mtnorm.models import available_methods
    from mtnorm.models.methods import UnknownMethodError
    from mtnorm.train.experiment import Variant

    known = available_methods()
    for m in methods:
        if m not in known:
            raise UnknownMethodError(f"unknown method {m!r}; choose one of {sorted(known)}")
    swept = {"tsbn", "tssbn", "dwbn", "adain"}
    out = []
    for m in methods:
        if alphas and m in swept:
            out.extend(Variant(m, a) for a in alphas)
        else:
            out.append(Variant(m))
    return out


def _report(result: Any, base: dict[str, Any], baseline: str, started: float, analysis: bool = True) -> None:
    from mtnorm.train.experiment import summarize, write_summary
    from mtnorm.train.report import markdown_table

    table, data = summarize(result, baseline)
    folder = write_summary(result, table, data, base)
    print()
    print(table)
    for label, entry in data.items():
        if "capacity" in entry:
            from mtnorm.analysis.capacity import capacity_table

            print(f"\nCapacity split of {label} (seed {entry['seeds'][0]}; C_t = mean gate, paper §5.1):")
            print(
                markdown_table(
                    ["Task", "C_t", "shared", "independent", "indep. share"],
                    capacity_table(entry["capacity"]),
                )
            )
    runs = [r for group in result.runs.values() for r in group]
    if analysis and any(r["method"] == "tssbn" for r in runs):
        # what the gates say (paper §5), with every multi-task run beside the TSσBN ones so that
        # gradient conflict and gate distributions compare side by side (STL shares nothing)
        from mtnorm.analysis.report import write_report

        index = write_report([r["out"] for r in runs if r["method"] != "stl"], Path(folder) / "analysis")
        print(f"\nanalysis of the multi-task runs: {index}")
    elapsed = time.perf_counter() - started
    print(f"\nwall time {elapsed:.0f}s; results in {folder}/summary.md and summary.json")


def cmd_run(args: argparse.Namespace) -> int:
    from mtnorm.train.experiment import DEFAULT_METHODS, PRESETS, run_grid, variant_config

    started = time.perf_counter()
    base = {**PRESETS[args.benchmark]}
    base = yaml.safe_load(yaml.safe_dump(base))  # deep copy
    base["balancer"] = args.balancer
    if args.epochs is not None:
        base["epochs"] = args.epochs
    if args.n_train is not None:
        base["data"]["n_train"] = args.n_train
    if args.n_test is not None:
        base["data"]["n_test"] = args.n_test
    if args.device is not None:
        base["device"] = args.device
    variants = _variants(args.methods or DEFAULT_METHODS, args.alphas)
    for variant in variants:  # every run's config is checked before the first one trains
        for seed in args.seeds:
            variant_config(base, variant, seed, Path("."))
    out = _grid_folder(args, f"runs/{args.benchmark}")
    print(
        f"mtnorm run: {args.benchmark}, methods {[v.label for v in variants]}, seeds {args.seeds}, "
        f"{base['epochs']} epochs, balancer {args.balancer}; results go to {out}"
    )
    result = run_grid(base, variants, args.seeds, out, resume=args.resume is not None)
    _report(result, base, "stl", started, analysis=not args.no_report)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mtnorm.train import Trainer, load_config

    cfg = load_config(args.config, _overrides(args.overrides))
    result = Trainer(cfg).fit(resume=args.resume, overwrite=args.overwrite)
    if result.status == "interrupted":
        return 128 + int(result.signal or signal.SIGINT)  # 130 for SIGINT, 143 for SIGTERM
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 0
    for task, values in result.metrics.items():
        print(f"{task}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
    print(f"{result.parameters} parameters, {result.seconds:.0f}s; checkpoints in {result.out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from mtnorm.train import Trainer, config_from_dict
    from mtnorm.train import checkpoint as ckpt

    state = ckpt.load(args.checkpoint)
    values = state["config"]
    if args.device:
        values["device"] = args.device
    trainer = Trainer(config_from_dict(values), log=None)
    trainer.model.load_state_dict(state["model"])
    results = trainer.evaluate()
    for task, vals in results.items():
        print(f"{task}: " + ", ".join(f"{k}={v:.4f}" for k, v in vals.items()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from mtnorm.train import load_config, to_dict
    from mtnorm.train.config import validate_names
    from mtnorm.train.experiment import run_grid, variant_config

    started = time.perf_counter()
    cfg = load_config(args.config, _overrides(args.overrides))
    base = to_dict(cfg)
    methods = args.methods or [cfg.method]
    validate_names(methods, baseline=args.baseline)
    variants = _variants(methods, args.alphas)
    for variant in variants:
        for seed in args.seeds:
            variant_config(base, variant, seed, Path("."))
    out = _grid_folder(args, f"{cfg.out}-bench")
    print(f"mtnorm bench: results go to {out}")
    result = run_grid(base, variants, args.seeds, out, resume=args.resume is not None)
    _report(result, base, args.baseline, started, analysis=not args.no_report)
    if args.loss_scales:
        _robustness(base, variants, args, out, result, started)
    return 0


def _robustness(
    base: dict[str, Any], variants: list, args: argparse.Namespace, out: Path, result: Any, started: float
) -> None:
    from mtnorm.train.robustness import (
        relative_performance,
        robustness_table,
        run_robustness,
        write_robustness,
    )

    rob = run_robustness(base, variants, args.seeds, args.loss_scales, out, unperturbed=result)
    data = relative_performance(rob, args.baseline)
    own = robustness_table(data, "vs_own")
    has_base = args.baseline in result.runs
    vs_base = robustness_table(data, f"vs_{args.baseline}") if has_base else None
    path = write_robustness(out, own, vs_base, data, args.loss_scales, args.baseline, rob.seconds)
    print(
        f"\nLoss-scale robustness (each task's loss x{args.loss_scales}, one at a time): "
        "Δm% of each perturbed run vs the same method's unperturbed run (same seed)"
    )
    print(own)
    if vs_base is not None:
        print(f"\nThe same perturbed runs, Δm% vs unperturbed {args.baseline}:")
        print(vs_base)
    print(f"\nwall time {time.perf_counter() - started:.0f}s; results in {path}")


def cmd_analyze(args: argparse.Namespace) -> int:
    from mtnorm.analysis.report import write_report

    out = Path(args.out or Path(args.runs[0]) / "analysis")
    index = write_report(
        args.runs, out, args.prune_k, pruning=not args.no_pruning, measured=not args.no_affinity
    )
    print(f"report: {index}")
    return 0


PROFILE_METHODS = ("stl", "cross_stitch", "mtan", "tssbn")


def cmd_profile(args: argparse.Namespace) -> int:
    import json

    import torch

    from mtnorm.profile import encoder_growth, plot_encoder_growth
    from mtnorm.train import config_from_dict
    from mtnorm.train.benchmarks import get_benchmark
    from mtnorm.train.config import validate_names
    from mtnorm.train.experiment import PRESETS

    methods = args.methods or list(PROFILE_METHODS)
    validate_names(methods)
    bench = get_benchmark(config_from_dict(PRESETS[args.benchmark]))
    example = torch.rand(2, *bench.input_shape, generator=torch.Generator().manual_seed(0))
    growth = encoder_growth(methods, bench.backbone, example, args.tasks)
    out = Path(args.out or f"profile-{args.benchmark}.png")
    plot_encoder_growth(growth, out, f"{args.benchmark} preset backbone")
    out.with_suffix(".json").write_text(json.dumps(growth, indent=1) + "\n")
    from mtnorm.train.report import markdown_table

    header = ["Method", *(f"T={t} #P" for t in args.tasks), *(f"T={t} MFLOPs" for t in args.tasks)]
    rows = [
        [m, *(f"{r['params']:,}" for r in rows), *(f"{r['flops'] / 1e6:.1f}" for r in rows)]
        for m, rows in growth.items()
    ]
    print(markdown_table(header, rows))
    print(f"plot: {out}; numbers: {out.with_suffix('.json')}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from mtnorm.train.experiment import load_records, summarize

    result = load_records(args.folders, order=args.methods or ())
    if args.methods:
        missing = [m for m in args.methods if m not in result.runs]
        if missing:
            raise CLIError(f"--methods: no finished runs of {missing}; the folders hold {list(result.runs)}")
        result.runs = {m: result.runs[m] for m in args.methods}
    base = args.baseline
    if args.baseline_seeds is not None:
        if base not in result.runs:
            raise CLIError(f"--baseline-seeds: no {base!r} runs; the folders hold {list(result.runs)}")
        kept = [r for r in result.runs[base] if r["seed"] in args.baseline_seeds]
        if not kept:
            have = [r["seed"] for r in result.runs[base]]
            raise CLIError(f"--baseline-seeds: {base} has seeds {have}, none of {args.baseline_seeds}")
        result.runs[base] = kept
    if args.epoch is not None:
        from mtnorm.train.experiment import at_epoch

        try:
            result = at_epoch(result, args.epoch)
        except ValueError as e:
            raise CLIError(f"--epoch: {e}") from None
    seed_sets = {tuple(r["seed"] for r in runs) for runs in result.runs.values()}
    counted = args.delta_metrics
    if counted == ["shown"]:
        if not args.metrics:
            raise CLIError("--delta-metrics shown: give the columns with --metrics")
        counted = args.metrics
    try:
        table, _ = summarize(
            result, base, columns=args.metrics, seeds_column=len(seed_sets) > 1, delta_over=counted
        )
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(table)
    if counted is not None:
        print(f"\nΔm% counts only {', '.join(counted)}")
    if args.per_seed:
        from mtnorm.train.experiment import per_seed_delta_m, seed_agreement

        print(f"\nΔm% vs the mean of {base} per seed, and each row's rank among the rows of that seed:\n")
        seed_table, values = per_seed_delta_m(result, base, counted)
        print(seed_table)
        try:
            print("\n" + seed_agreement(values))
        except ValueError as e:
            raise CLIError(f"--per-seed: {e}") from None
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from mtnorm import balance
    from mtnorm.models import available_methods

    for name, text in available_methods().items():
        print(f"{name:8s} {text}")
    print("balancers: " + ", ".join(balance.available()))
    return 0


COMMANDS = {
    "run": cmd_run,
    "train": cmd_train,
    "eval": cmd_eval,
    "bench": cmd_bench,
    "analyze": cmd_analyze,
    "profile": cmd_profile,
    "table": cmd_table,
    "methods": cmd_methods,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mtnorm`` console script and ``python -m mtnorm``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from mtnorm.analysis.report import AnalysisError
    from mtnorm.data.fashion import FashionMNISTError
    from mtnorm.models.methods import UnknownMethodError
    from mtnorm.train import ConfigError, DataUnavailableError, TrainingError
    from mtnorm.train.checkpoint import CheckpointError

    expected = (
        AnalysisError,
        CLIError,
        CheckpointError,
        ConfigError,
        DataUnavailableError,
        TrainingError,
        UnknownMethodError,
        FashionMNISTError,
        FileNotFoundError,
        KeyError,
    )
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("mtnorm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except expected as e:
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        first, _, details = message.strip().partition("\n")
        print(f"mtnorm: error: {first}", file=sys.stderr)
        if details:  # e.g. the expected folder layout of a dataset
            print(details, file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
