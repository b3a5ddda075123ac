"""The report of ``crossmae-eval``: every ``<export>/eval/<name>.json`` under a prefix as one
table and one plot, for a person comparing exports of a run.

    report.md   title (run, jobs, val set), headline metrics per export, legend, warnings
    report.csv  every numeric metric of every result, one row per export
    report.png  headline top-1 against pretraining step

The evaluation jobs that write the results, and the CLI, are pipelines/evaluate.py.
"""
from __future__ import annotations

import csv
import io
import json
import sys

from pipelines import storage

POOL_NAMES = {"avg": "avg-pool", "cls": "class token"}
JOB_NAMES = {"knn": "k-NN", "linprobe": "linear probe", "finetune": "fine-tune"}


def headline_metrics(r: dict) -> tuple[str, ...]:
    """The report's headline columns of one result; k-NN's name their protocol (pooling, k)."""
    if r["job"] == "knn":
        k = (r.get("protocol") or {}).get("headline", "avg_k20").rpartition("_k")[2]
        return f"avg_k{k}_top1", f"avg_k{k}_top5", f"cls_k{k}_top1"
    return "top1", "top5"


def describe(metric: str, r: dict) -> str:
    """A legend entry a person reads: 'k-NN top-1, k=20, avg-pool', 'linear probe top-1, class
    token, 90 epochs, LARS'."""
    job, config = r["job"], r.get("config") or {}
    prefix = "" if r["name"] == job else f"{r['name']}: "
    top = metric.rpartition("top")[2]
    if job == "knn" and "_k" in metric:
        pool, _, k = metric.rpartition("_top")[0].partition("_k")
        return f"{prefix}k-NN top-{top}, k={k}, {POOL_NAMES.get(pool, pool)}"
    if job == "linprobe":
        p = config.get("probe") or config  # results before config.probe kept these at the top
        extra = f", {p['epochs']} epochs, {p['optimizer'].upper()}" if "epochs" in p else ""
        return f"{prefix}linear probe top-{top}, {POOL_NAMES.get(p.get('pool'), p.get('pool', '?'))}{extra}"
    if job == "finetune":
        return f"{prefix}fine-tune top-{top}, {r['metrics'].get('epochs', '?')} epochs"
    return f"{prefix}{metric}"


def dataset_name(d: dict) -> str:
    """'in1k/val (50000 images, 1000 classes)' from s3://b/in1k/val/manifest.json."""
    parts = d.get("manifest", "?").rstrip("/").split("/")
    name = "/".join(parts[-3:-1]) if parts[-1] == "manifest.json" and len(parts) > 2 else parts[-1]
    return f"{name} ({d.get('num_samples')} images, {d.get('num_classes')} classes)"


def collect_results(prefix: str, prog: str = "crossmae-eval") -> list[dict]:
    """Every ``<export>/eval/<name>.json`` under the prefix (feature caches and others ignored);
    a damaged one is left out, said on stderr (the sweep that wrote it redoes it)."""
    results = []
    for url, _ in storage.list_objects(storage.join(prefix, "")):
        head, _, file = url.rpartition("/")
        if head.endswith("/eval") and file.endswith(".json"):
            try:
                r = json.loads(storage.read_bytes(url))
                ok = isinstance(r, dict) and isinstance(r.get("metrics"), dict) and isinstance(r.get("job"), str)
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
                r, ok = None, False
                print(f"{prog} report: {url}: not valid JSON ({e}): left out of the report", file=sys.stderr)
            if ok:
                results.append(dict(r, name=file[:-5], export=head[:-len("/eval")]))
            elif isinstance(r, dict) and "metrics" in r:
                print(f"{prog} report: {url}: no job or metrics mapping: left out of the report", file=sys.stderr)
    return results


def write_report(prefix: str, out_dir: str, prog: str) -> list[str] | None:
    """report.md (headline metrics), report.csv (all metrics) and report.png (headline top-1
    against pretraining step) in out_dir; one row per export, sorted by step. None: no results.
    Results of one name computed under different protocols or val sets are said on stderr and
    in the markdown (a sweep recomputes them; array tasks and old results can still differ);
    ``prog`` names the command in those stderr lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = collect_results(prefix, prog)
    if not results:
        return None
    rows: dict[str, dict] = {}
    labels: dict[str, tuple] = {}  # column -> (result name, position, legend entry)
    variants: dict[str, set] = {}  # result name -> distinct (protocol, val data)
    for r in sorted(results, key=lambda r: (r.get("step") is None, r.get("step") or 0, r["export"])):
        row = rows.setdefault(r["export"], dict(export=r["export"], tag=r.get("tag"), step=r.get("step"),
                                                epoch=r.get("epoch")))
        row.update({f"{r['name']}/{k}": v for k, v in r["metrics"].items() if isinstance(v, (int, float))})
        for i, m in enumerate(headline_metrics(r)):
            labels.setdefault(f"{r['name']}/{m}", (r["name"], i, describe(m, r)))
        val = (r.get("dataset") or {}).get("val") or {}
        variants.setdefault(r["name"], set()).add((json.dumps(r.get("protocol"), sort_keys=True), val.get("sha256")))
    ordered = list(rows.values())
    metric_cols = list(dict.fromkeys(k for row in ordered for k in row if "/" in k))  # first-seen order
    headline = sorted((c for c in labels if c in metric_cols), key=lambda c: labels[c][:2])  # by name, as the job lists
    labels = {c: text for c, (_, _, text) in labels.items()}
    mixed = [f"{name}: {len(v)} protocols or val sets (re-run the sweep to recompute them)"
             for name, v in sorted(variants.items()) if len(v) > 1]
    for line in mixed:
        print(f"{prog} report: warning: {line}", file=sys.stderr)

    run = storage.join(prefix, "").rstrip("/").rpartition("/")[2] or prefix
    jobs = ", ".join(dict.fromkeys(JOB_NAMES.get(r["job"], r["job"]) for r in results))
    vals = {dataset_name((r.get("dataset") or {}).get("val") or {}) for r in results}
    data = vals.pop() if len(vals) == 1 else f"{len(vals)} val sets"
    title = f"{run}: {jobs} on {data}"

    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["export", "tag", "step", "epoch", *metric_cols], lineterminator="\n")
    writer.writeheader()
    writer.writerows(ordered)
    base = storage.join(prefix, "")
    md = [f"# {title}", "", "| export | step | " + " | ".join(headline) + " |", "|---|---:|" + "---:|" * len(headline)]
    for row in ordered:
        cells = [f"{row[c]:.2f}" if isinstance(row.get(c), (int, float)) else "" for c in headline]
        name = row["export"].removeprefix(base) or row["export"]
        md.append(f"| {name} | {row['step']} | " + " | ".join(cells) + " |")
    md += ["", *(f"- `{c}`: {labels[c]} (%)" for c in headline), *(f"- warning: {line}" for line in mixed)]

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for col in (c for c in headline if c.endswith("top1")):  # top-5 would crowd the plot (it is in the table)
        pts = [(row["step"], row[col]) for row in ordered if row["step"] is not None and col in row]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=labels[col])
    no_step = sum(row["step"] is None for row in ordered)
    ax.set_title(f"{title}\n{len(ordered)} exports" + (f" ({no_step} without a step, not plotted)" if no_step else ""),
                 fontsize=10)
    ax.set(xlabel="pretraining step (optimizer steps)", ylabel="top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    out = [storage.join(out_dir, f"report.{ext}") for ext in ("md", "csv", "png")]
    for url, data in zip(out, ("\n".join(md) + "\n", buf.getvalue(), png.getvalue())):
        storage.write_bytes(url, data.encode() if isinstance(data, str) else data)
    return out
