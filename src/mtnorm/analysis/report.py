"""``mtnorm analyze``: a self-contained report folder for one or more trained runs.

Composes the pure analyses (capacity, relations, specialization, gates, pruning) on each run's
checkpoint and writes ``report.json`` (every number), one PNG per figure (matplotlib, Agg; built
from the same numbers the JSON holds) and ``index.html`` showing them with captions (no
JavaScript, no network). Several runs add the stability of the task relations across them.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtnorm.analysis.affinity import affinity_agreement
from mtnorm.analysis.capacity import capacity_per_layer, capacity_split
from mtnorm.analysis.gates import all_gates, diagnose, gate_histogram
from mtnorm.analysis.pruning import pruning_matrix
from mtnorm.analysis.relations import cooccurrence, linkage, relation_stability, task_similarity
from mtnorm.analysis.specialization import specialization_per_layer

NEEDS_TASK_NORMS = ("capacity", "task relations", "specialization", "gate distributions", "pruning")


class AnalysisError(ValueError):
    """The runs cannot be analyzed as asked; the message says which analyses need what."""


def _checkpoint(run: Path) -> Path:
    for name in ("last.pt", "best.pt"):
        if (run / name).is_file():
            return run / name
    if run.is_file():
        return run
    raise AnalysisError(f"{run}: no last.pt or best.pt; give a run folder written by mtnorm train/run/bench")


def load_run(run: str | Path) -> tuple[Any, dict[str, Any]]:
    """A :class:`~mtnorm.train.Trainer` rebuilt from a run's checkpoint (model weights loaded)."""
    from mtnorm.train import Trainer, config_from_dict
    from mtnorm.train import checkpoint as ckpt

    path = _checkpoint(Path(run))
    state = ckpt.load(path)
    trainer = Trainer(config_from_dict(state["config"]), log=None)
    trainer.model.load_state_dict(state["model"])
    trainer.model.eval()
    return trainer, state


def _scores(trainer: Any) -> Any:
    """``evaluate(model) -> {task: score}``: each task's first metric, higher is better."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        original = trainer.model
        trainer.model = model
        try:
            results = trainer.evaluate()
        finally:
            trainer.model = original
        out = {}
        for task, values in results.items():
            metric, value = next(iter(values.items()))
            out[task] = -value if metric in trainer.lower_is_better else value
        return out

    return evaluate


def analyze_run(
    run: str | Path, prune_k: int | None = None, pruning: bool = True, measured: bool = True
) -> dict[str, Any]:
    """Every number of one run (``pruning=False`` skips the T+1 evaluations of the experiment,
    ``measured=False`` the lookahead affinity and the representation embedding)."""
    from mtnorm.norm import TaskNorm, importance

    trainer, state = load_run(run)
    tasks = list(trainer.tasks)
    model = trainer.model
    config = state["config"]
    out: dict[str, Any] = {
        "run": str(run),
        "method": config["method"],
        "seed": config["seed"],
        "alpha": _alpha(config),
        "tasks": tasks,
    }
    conflict = gradient_conflict(run)
    if conflict is not None:
        out["conflict"] = conflict
    if measured:
        out.update(measured_relations(trainer, state["config"]))
    if not any(isinstance(m, TaskNorm) for m in model.modules()):
        out["skipped"] = (
            f"method {out['method']!r} has no task-specific norm layers, so {', '.join(NEEDS_TASK_NORMS)} "
            "are not defined (convert with norm='sigma' or 'bn'; an architecture of mtnorm.arch takes "
            "method_kwargs: {norm: sigma}); affinity, the embedding and gradient conflict "
            "(train with conflict_every > 0) still run"
        )
        return out
    layers = {name: imp.double() for name, imp in importance(model).items()}
    sigma = any(hasattr(m, "gamma") for m in model.modules() if isinstance(m, TaskNorm))
    out["importance"] = "sigmoid gates" if sigma else "|gamma| (TSBN: unbounded, weaker than gates)"
    full = torch.cat(list(layers.values()), dim=1)
    out["capacity"] = capacity_split(full, tasks)
    out["capacity_per_layer"] = capacity_per_layer(layers, tasks)
    out["similarity"] = task_similarity(full).tolist()
    out["linkage"] = linkage(task_similarity(full)).tolist()
    out["specialization"] = specialization_per_layer(layers, tasks)
    if sigma:
        gates = all_gates(layers)
        out["gate_histogram"] = gate_histogram(gates)
        out["gate_histogram_per_layer"] = {n: gate_histogram(g) for n, g in layers.items()}
    else:
        gates = torch.empty(0)
    out["diagnostics"] = diagnose(gates, {t: c["total"] for t, c in out["capacity"].items()})
    if "affinity" in out and len(tasks) >= 3:
        out["affinity"]["agreement"] = affinity_agreement(
            torch.tensor(out["affinity"]["matrix"]), torch.tensor(out["similarity"])
        )
    if pruning:
        out["pruning"] = pruning_matrix(model, layers, _scores(trainer), tasks, prune_k)
    return out


AFFINITY_BATCHES = 4
"""Training batches the lookahead affinity averages over (T + 1 forward and T backward each)."""

EMBEDDED_INPUTS = 100
"""Test inputs whose task representations are embedded in 2-D."""


def measured_relations(trainer: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The relations measured by running the model rather than read from its gates: TAG's
    lookahead affinity on a few training batches (SGD step of the run's learning rate on the shared
    parameters), the Average Task Interference, and the 2-D embedding of each task's head input
    (t-SNE where scikit-learn is installed, else PCA). Defined for any multi-task model with
    shared parameters; STL has none, so neither is measured there."""
    from mtnorm.analysis.affinity import average_task_interference, lookahead_affinity, task_interference
    from mtnorm.analysis.representation import representation_embedding
    from mtnorm.norm import shared_parameters
    from mtnorm.train.loop import take, train_batches

    model, tasks = trainer.model, list(trainer.tasks)
    if not shared_parameters(model):
        return {}
    size = min(config["data"]["batch_size"], len(trainer.train_split))
    batches = [
        take(trainer.train_split, index, trainer.device)
        for b, index in train_batches(trainer.train_split, size, config["seed"], epoch=0)
        if b < AFFINITY_BATCHES
    ]
    lr = config["optim"]["lr"]
    z = lookahead_affinity(model, batches, trainer.losses, lr)
    out: dict[str, Any] = {
        "affinity": {
            "matrix": z.tolist(),
            "lr": lr,
            "batches": len(batches),
            "ati": average_task_interference(z),
            "per_task": task_interference(z, tasks),
        }
    }
    try:
        import sklearn  # noqa: F401

        method = "tsne"
    except ImportError:
        method = "pca"
    n = min(EMBEDDED_INPUTS, len(trainer.test_split))
    x, _ = take(trainer.test_split, torch.arange(n), trainer.device)
    coords = representation_embedding(model, x, method=method)
    out["embedding"] = {"method": method, "points": {t: c.tolist() for t, c in coords.items()}}
    return out


def _alpha(config: dict[str, Any]) -> float:
    """The learning-rate multiplier α the run's task norms trained with."""
    from mtnorm.models.methods import default_norm_lr_mult

    alpha = config.get("optim", {}).get("norm_lr_mult")
    return alpha if alpha is not None else default_norm_lr_mult(config["method"], config.get("method_kwargs"))


def run_label(data: dict[str, Any]) -> str:
    """``method (α=...) seed N`` for a figure legend; α only for runs with task-specific norms."""
    alpha = f" (α={data['alpha']:g})" if "capacity" in data else ""
    return f"{data['method']}{alpha} seed {data['seed']}"


def gradient_conflict(run: str | Path) -> dict[str, Any] | None:
    """Summary of a run's ``conflict.jsonl`` (``conflict_every`` > 0 in its config), pooled over
    the recorded steps per task pair; None when the run recorded none."""
    from mtnorm.analysis.conflict import conflict_summary

    path = Path(run) / "conflict.jsonl"
    if not path.is_file():
        return None
    pooled: dict[str, list[float]] = {}
    steps = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        steps.append(record["step"])
        for pair, values in record["cosines"].items():
            pooled.setdefault(pair, []).extend(values)
    every = [v for values in pooled.values() for v in values]
    return {"steps": steps, "all": conflict_summary(every),
            "pairs": {pair: conflict_summary(v) for pair, v in pooled.items()}}


# --------------------------------------------------------------------------- figures


def _task_matrix(plt: Any, matrix: Any, tasks: Sequence[str], cmap: str, fmt: str, label: str) -> tuple:
    """A ``[T, T]`` heat map with a colour scale symmetric about 0 and the values written in the
    cells (up to 12 tasks); returns ``(fig, ax)``."""
    import numpy as np

    t = len(tasks)
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * t + 2), max(3, 0.6 * t + 1.5)))
    bound = max(1e-12, float(np.abs(matrix).max()))
    im = ax.imshow(matrix, cmap=cmap, vmin=-bound, vmax=bound)
    ax.set_xticks(range(t), tasks, rotation=90)
    ax.set_yticks(range(t), tasks)
    if t <= 12:
        for i in range(t):
            for j in range(t):
                color = "w" if abs(matrix[i, j]) > bound / 2 else "k"
                ax.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(im, ax=ax, label=label)
    return fig, ax


def task_colors(n: int) -> list[tuple[float, ...]]:
    """``n`` RGB colours, distinct up to 20 tasks (matplotlib's default cycle repeats after 10;
    tab20 after 20, where a scatter of that many tasks is unreadable anyway)."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if n <= 10 else "tab20"].colors
    return [palette[k % len(palette)] for k in range(n)]


def _plots(data: dict[str, Any], folder: Path, prefix: str) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.cluster.hierarchy import dendrogram

    tasks = data["tasks"]
    figures: list[tuple[str, str]] = []
    if "conflict" in data:
        c = data["conflict"]["all"]
        edges = np.array(c["edges"])
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(edges[:-1], c["counts"], width=np.diff(edges), align="edge", color="tab:red")
        ax.set_xlabel("cosine of task gradients per shared conv filter")
        ax.set_ylabel("filters x pairs x steps")
        ax.set_title(f"{data['method']}: mean {c['mean']:.2f}, {c['negative']:.0%} conflicting", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / f"{prefix}conflict.png", dpi=110)
        plt.close(fig)
        figures.append((f"{prefix}conflict.png", "Gradient conflict (Fig. 2 left): cosine similarity between "
                        "task gradients of each shared convolution filter, over the recorded steps."))
    def save(fig: Any, name: str, caption: str) -> None:
        fig.tight_layout()
        fig.savefig(folder / f"{prefix}{name}.png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        figures.append((f"{prefix}{name}.png", caption))

    if "affinity" in data:
        a = data["affinity"]
        fig, ax = _task_matrix(plt, np.array(a["matrix"]), tasks, "RdBu", "{:.1e}", "Z (blue: helps)")
        ax.set_xlabel("task whose loss is measured")
        ax.set_ylabel("task stepped")
        ax.set_title(f"ATI {a['ati']:.2e}", fontsize=9)
        save(fig, "affinity", f"Lookahead affinity (TAG): Z[i→j] = 1 − L_j after an SGD step (lr "
             f"{a['lr']:g}) on task i alone / L_j before, over {a['batches']} training batches; "
             "blue = a step for the row's task lowers the column's loss.")
    if "embedding" in data:
        e = data["embedding"]
        many = len(e["points"]) > 6
        fig, ax = plt.subplots(figsize=(6.2 if many else 4.8, 4))
        colors = task_colors(len(e["points"]))
        for color, (t, pts) in zip(colors, e["points"].items()):
            pts = np.array(pts)
            ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.6, label=t, color=color)
        if many:  # outside the axes, where it hides no points
            ax.legend(fontsize=7, markerscale=2, loc="upper left", bbox_to_anchor=(1.01, 1))
        else:
            ax.legend(fontsize=7, markerscale=2)
        ax.set_xticks([])
        ax.set_yticks([])
        save(fig, "embedding", f"Task representations (Fig. 2 middle): each task's head input for the "
             f"same test images, embedded jointly by {e['method'].upper()}; with hard sharing the "
             "tasks coincide, task-specific norms separate them.")
    if "capacity" not in data:
        return figures

    cap = data["capacity"]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(tasks) + 2), 3.2))
    x = np.arange(len(tasks))
    ax.bar(x - 0.2, [cap[t]["shared"] for t in tasks], 0.4, label="shared")
    ax.bar(x + 0.2, [cap[t]["independent"] for t in tasks], 0.4, label="independent")
    ax.bar(x, [cap[t]["total"] for t in tasks], 0.8, fill=False, edgecolor="k", label="total C_t")
    ax.set_xticks(x, tasks, rotation=45 if len(tasks) > 4 else 0)
    ax.set_ylabel("capacity")
    ax.set_ylim(0, 1.25 * max(max(c["total"] for c in cap.values()), 1e-9))
    ax.legend(fontsize=8, ncol=3, loc="upper center")
    save(fig, "capacity", "Capacity split (Eq. 4-5): each task's mean gate C_t, split into the part "
         "shared with the other tasks' filter usage and the independent part.")

    sim = np.array(data["similarity"])
    t = len(tasks)
    # both panels grow with T so that task names and cell values stay legible (CelebA has 40)
    size = (max(9.0, 1.1 * t + 5), max(3.6, 0.45 * t + 2.5))
    fig, axes = plt.subplots(1, 2, figsize=size, gridspec_kw={"width_ratios": [1, 1.2]})
    if t > 1:
        rotation = 90 if t > 4 else 0
        dendrogram(np.array(data["linkage"]), labels=tasks, ax=axes[0], color_threshold=0,
                   leaf_rotation=rotation, leaf_font_size=8)
    axes[0].set_title("hierarchy (distance 1 - cos)")
    im = axes[1].imshow(sim, vmin=0, vmax=1, cmap="viridis")
    axes[1].set_xticks(range(t), tasks, rotation=90)
    axes[1].set_yticks(range(t), tasks)
    if t <= 16:
        for i in range(t):
            for j in range(t):
                color = "k" if sim[i, j] > 0.6 else "w"  # readable on viridis' yellow and purple
                axes[1].text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=8 if t <= 8 else 6,
                             color=color)
    fig.colorbar(im, ax=axes[1])
    axes[1].set_title("cosine similarity of importance")
    save(fig, "relations", "Task relations (§5.2): cosine similarity of the tasks' importance vectors "
         "and the hierarchy it induces.")

    spec = data["specialization"]
    names = list(spec)
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(names) + 2), 3.2))
    ax.bar(range(len(names)), [100 * spec[n]["any"] for n in names], color="tab:purple")
    ax.set_xticks(range(len(names)), [str(i) for i in range(len(names))])
    ax.set_xlabel("normalization layer (input to output)")
    ax.set_ylabel("% specialized filters")
    caption = (
        "Filter specialization per layer (§5.3, Fig. 4 left): filters whose normalized importance "
        "for one task exceeds τ = 0.5."
    )
    if len(tasks) == 2:
        caption += " With two tasks every filter whose two gates differ at all passes τ = 0.5."
    save(fig, "specialization", caption)

    if "gate_histogram" in data:
        h = data["gate_histogram"]
        edges = np.array(h["edges"])
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color="tab:green")
        ax.set_xlabel("gate σ(γ)")
        ax.set_ylabel("filters x tasks")
        save(fig, "gates", "Gate distribution over all layers and tasks (Fig. 5): gates start at 0.5; "
             "a spread over [0, 1] means tasks chose filters, a pile at 0/1 a hard partition.")

        per_layer = data["gate_histogram_per_layer"]
        counts = np.array([per_layer[n]["counts"] for n in per_layer], dtype=float)
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
        fig, ax = plt.subplots(figsize=(5.5, max(2.5, 0.22 * len(per_layer) + 1.2)))
        im = ax.imshow(share, aspect="auto", cmap="magma", extent=(0, 1, len(per_layer) - 0.5, -0.5))
        ax.set_xlabel("gate σ(γ)")
        ax.set_ylabel("normalization layer (input to output)")
        fig.colorbar(im, ax=ax, label="share of the layer's gates")
        save(fig, "gates_per_layer", "Gate distribution per layer (Fig. 5): each row is one layer's gates "
             "over all tasks, as shares of the layer.")

    if "pruning" in data:
        d = np.array(data["pruning"]["drop"])
        fig, ax = _task_matrix(plt, d, tasks, "RdBu_r", "{:.1f}", "relative drop %")
        ax.set_xlabel("task evaluated")
        ax.set_ylabel("task whose filters were pruned")
        save(fig, "pruning", f"Pruning (§5.3, Fig. 4 right): relative drop of each task after closing "
             f"the top-{data['pruning']['k']} filters specialized for the row's task.")
    return figures


def _comparison_plots(results: Sequence[dict[str, Any]], folder: Path) -> list[tuple[str, str]]:
    """Figures that put several runs side by side: gradient conflict (HPS vs TSBN vs TSσBN, Fig. 2
    left) and gate distributions (per α, Fig. 5 left). Each needs at least two runs with the data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figures = []

    def overlay(key: str, runs: list[dict[str, Any]], xlabel: str, name: str, caption: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.4))
        for data in runs:
            h = data[key] if key == "gate_histogram" else data[key]["all"]
            counts, edges = np.array(h["counts"], dtype=float), np.array(h["edges"])
            density = counts / max(counts.sum(), 1.0) / np.diff(edges)
            label = run_label(data)
            if key == "conflict":
                label += f": mean {h['mean']:.2f}, std {h['std']:.2f}"
            ax.stairs(density, edges, label=label, linewidth=1.6)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=110)
        plt.close(fig)
        figures.append((f"{name}.png", caption))

    with_conflict = [d for d in results if "conflict" in d]
    if len(with_conflict) >= 2:
        overlay("conflict", with_conflict, "cosine of task gradients per shared conv filter",
                "compare_conflict", "Gradient conflict side by side (Fig. 2 left): the distribution of "
                "per-filter cosines between task gradients on the shared weights; hard sharing spreads "
                "over [-1, 1], task-specific norms should concentrate near 0.")
    with_gates = [d for d in results if "gate_histogram" in d]
    if len(with_gates) >= 2:
        overlay("gate_histogram", with_gates, "gate σ(γ)", "compare_gates", "Gate distributions side "
                "by side (Fig. 5 left): a larger α moves the gates further from 0.5, towards a 0/1 "
                "partition.")
    return figures


def _stability(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Relation stability (§5.2) within each group of runs of one method and α on the same tasks
    (seeds of one configuration); groups need at least 2 runs and 3 tasks."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for d in results:
        if "similarity" in d and len(d["tasks"]) >= 3:
            key = f"{d['method']} (α={d['alpha']:g}) on {', '.join(d['tasks'])}"
            groups.setdefault(key, []).append(d)
    out = {}
    for key, runs in groups.items():
        if len(runs) < 2:
            continue
        sims = [torch.tensor(d["similarity"]) for d in runs]
        k = max(1, min(3, len(runs[0]["tasks"]) - 1))
        out[key] = {
            "method": runs[0]["method"],
            "alpha": runs[0]["alpha"],
            "tasks": runs[0]["tasks"],
            "seeds": [d["seed"] for d in runs],
            "spearman_mean": relation_stability(sims),
            "clusters": k,
            "cooccurrence": cooccurrence(sims, k).tolist(),
            "similarity_mean": torch.stack(sims).mean(0).tolist(),
        }
    return out


def _stability_plots(
    stability: dict[str, dict[str, Any]], results: Sequence[dict[str, Any]], folder: Path
) -> list[tuple[str, str]]:
    """Per group: the cluster co-occurrence matrix across its runs (§5.2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figures = []
    for i, st in enumerate(stability.values()):
        tasks, co = st["tasks"], np.array(st["cooccurrence"])
        fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(tasks) + 2), max(3.2, 0.45 * len(tasks) + 1.5)))
        im = ax.imshow(co, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(tasks)), tasks, rotation=90)
        ax.set_yticks(range(len(tasks)), tasks)
        fig.colorbar(im, ax=ax, label="fraction of runs")
        ax.set_title(f"{st['method']}: Spearman {st['spearman_mean']:.2f} over {len(st['seeds'])} runs",
                     fontsize=9)
        fig.tight_layout()
        name = f"stability{i}.png"
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        figures.append((name, f"Cluster co-occurrence (§5.2): how often two tasks fall into the same of "
                        f"{st['clusters']} clusters of the task hierarchy across the runs."))
    return figures


def _html(title: str, sections: list[tuple[str, list[str], list[tuple[str, str]]]]) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
        "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #ddd}"
        "figcaption{font-size:.9em;color:#555}li{margin:.2em 0}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for heading, lines, figures in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if lines:
            parts.append("<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>")
        for src, caption in figures:
            parts.append(
                f"<figure><img src='{html.escape(src)}' alt='{html.escape(caption)}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    parts.append("<p>Every number is in report.json.</p></body></html>")
    return "\n".join(parts)


def _summary_lines(data: dict[str, Any]) -> list[str]:
    conflict = []
    if "conflict" in data:
        c = data["conflict"]["all"]
        conflict = [
            f"gradient conflict over {len(data['conflict']['steps'])} recorded steps: mean cosine "
            f"{c['mean']:.3f} (std {c['std']:.3f}), {c['negative']:.1%} of filter gradients conflicting"
        ]
    if "affinity" in data:
        a = data["affinity"]
        line = f"lookahead affinity (lr {a['lr']:g}, {a['batches']} batches): ATI {a['ati']:.3e}"
        if "agreement" in a:
            line += f"; Spearman agreement with the gate similarity {a['agreement']:.3f}"
        conflict.append(line)
    if "skipped" in data:
        return [data["skipped"], *conflict]
    head = f"method {data['method']}, tasks {', '.join(data['tasks'])}; importance: {data['importance']}"
    lines = [*conflict, head]
    for t, c in data["capacity"].items():
        lines.append(
            f"capacity of {t}: C = {c['total']:.3f} "
            f"(shared {c['shared']:.3f}, independent {c['independent']:.3f})"
        )
    if "pruning" in data:
        p = data["pruning"]
        lines.append(
            f"pruning top-{p['k']}: mean drop on the diagonal {p['diagonal_mean']:.2f}%, "
            f"off the diagonal {p['off_diagonal_mean']:.2f}%"
        )
    lines += [f"warning: {w}" for w in data["diagnostics"]]
    return lines


def write_report(runs: Sequence[str | Path], out: str | Path, prune_k: int | None = None,
                 pruning: bool = True, measured: bool = True) -> Path:
    """Analyze ``runs`` and write the report folder ``out``; returns the path of its index.html."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = [analyze_run(r, prune_k, pruning, measured) for r in runs]
    sections = []
    for i, data in enumerate(results):
        figures = _plots(data, out, f"run{i}_")
        sections.append((f"Run {i}: {data['run']}", _summary_lines(data), figures))
    report: dict[str, Any] = {"runs": results}
    stability = _stability(results)
    if stability:
        report["stability"] = stability
        lines = [
            f"relation stability of {label}: mean pairwise Spearman correlation {st['spearman_mean']:.3f} "
            f"over {len(st['seeds'])} runs (seeds {', '.join(map(str, st['seeds']))}; paper: 0.8 over 7 "
            "CelebA runs)"
            for label, st in stability.items()
        ]
        sections.insert(0, ("Across runs", lines, _stability_plots(stability, results, out)))
    compared = _comparison_plots(results, out)
    if compared:
        sections.insert(0, ("Runs compared", [run_label(d) + f": {d['run']}" for d in results], compared))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    index = out / "index.html"
    index.write_text(_html("mtnorm analysis report", sections))
    return index
