"""PNG plots of a latency report (runtime.latency JSON): time-to-first-token vs prompt length,
decode tokens/s by backend and variant, and measured vs ideal latency ratios."""

from __future__ import annotations

from pathlib import Path

PREFILL_PNG, DECODE_PNG, IDEAL_PNG = "prefill_latency.png", "decode_throughput.png", "ideal_vs_measured.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    return plt


def _variants(results: list[dict]) -> list[str]:
    """dense first, then the others in the order they were measured."""
    names = list(dict.fromkeys(r["variant"] for r in results))
    return sorted(names, key=lambda n: (n != "dense", names.index(n)))


def _label(r: dict) -> str:
    return f"{r['model_label']} {r['variant']}" if r.get("model_label") else r["variant"]


def plot_prefill(results: list[dict], path: Path) -> Path | None:
    rows = [r for r in results if r["phase"] == "prefill"]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple, list] = {}
    for r in rows:
        series.setdefault((r["backend"], _label(r), r["batch"]), []).append(r)
    for (backend, label, batch), points in series.items():
        points.sort(key=lambda r: r["tokens"])
        style = "-" if points[0]["variant"] == "dense" else "--"
        ax.plot([p["tokens"] for p in points], [p["measured_ms"] for p in points], style, marker="o",
                label=f"{backend} {label}" + (f" b{batch}" if batch != 1 else ""))
    ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="time to first token (ms, median)",
           title="Prefill latency vs prompt length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, plt)


def plot_decode(results: list[dict], path: Path) -> Path | None:
    """Grouped bars: one panel per batch size, backends on x, one bar per variant."""
    rows = [r for r in results if r["phase"] == "decode"]
    if not rows:
        return None
    plt = _pyplot()
    batches = sorted({r["batch"] for r in rows})
    labels = list(dict.fromkeys(_label(r) for r in sorted(rows, key=lambda r: _variants(rows).index(r["variant"]))))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(max(6, 3.5 * len(batches) + 0.5 * len(labels)), 4.5),
                             squeeze=False)
    width = 0.8 / len(labels)
    for ax, batch in zip(axes[0], batches):
        for j, label in enumerate(labels):
            values = []
            for backend in backends:
                match = [r for r in rows if r["batch"] == batch and r["backend"] == backend and _label(r) == label]
                values.append(match[0]["tokens_per_s"] if match else 0.0)
            ax.bar([i + j * width for i in range(len(backends))], values, width, label=label)
        ax.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(backends))], backends)
        ax.set(title=f"decode, batch {batch}", ylabel="tokens/s (higher is better)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return _save(fig, path, plt)


def plot_ideal(comparisons: list[dict], path: Path) -> Path | None:
    """Measured latency ratio against the ideal one; the band is ±10 % of ideal."""
    rows = [c for c in comparisons if c["ideal_ratio"]]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    low = min(min(c["ideal_ratio"], c["latency_ratio"]) for c in rows) * 0.9
    high = max(1.05, max(max(c["ideal_ratio"], c["latency_ratio"]) for c in rows) * 1.05)
    line = [low, high]
    ax.plot(line, line, "k-", lw=1, label="measured = ideal")
    ax.fill_between(line, [v * 0.9 for v in line], [v * 1.1 for v in line], color="grey", alpha=0.2, label="±10 %")
    ax.axhline(1.0, color="red", lw=0.8, ls=":", label="dense latency")
    groups: dict[tuple, list] = {}
    for c in rows:
        groups.setdefault((c["backend"], c["phase"], c.get("model_label") or ""), []).append(c)
    for (backend, phase, model), points in groups.items():
        ax.scatter([p["ideal_ratio"] for p in points], [p["latency_ratio"] for p in points],
                   marker={"decode": "o", "prefill": "s"}.get(phase, "*"), s=70 if phase not in ("decode", "prefill")
                   else 30, label=f"{model} {backend} {phase}".strip())
    ax.set(xlim=line, ylim=line, xlabel="ideal ratio (bytes: decode, FLOPs: prefill)",
           ylabel="measured latency ratio (variant / dense)", title="Sliced vs dense: measured against ideal")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, plt)


def plot_decode_by_slice(results: list[dict], path: Path) -> Path | None:
    """Decode tokens/s against the slice fraction (0 = dense): one panel per model shape, one line per
    backend and batch size. Needs results tagged with `slice` (the benchmark suite's)."""
    rows = [r for r in results if r["phase"] == "decode" and r.get("slice") is not None]
    if not rows:
        return None
    plt = _pyplot()
    shapes = list(dict.fromkeys(r.get("model_label") or "" for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        series: dict[tuple, list] = {}
        for r in rows:
            if (r.get("model_label") or "") == shape:
                series.setdefault((r["backend"], r["batch"]), []).append(r)
        for (backend, batch), points in series.items():
            points.sort(key=lambda r: r["slice"])
            ax.plot([p["slice"] for p in points], [p["tokens_per_s"] for p in points], marker="o",
                    label=f"{backend} batch {batch}")
        ax.set(xlabel="slice fraction (0 = dense)", ylabel="decode tokens/s", yscale="log",
               title=f"{shape} decode throughput by slicing level".strip())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path, plt)


def plot_all(data: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    made = [plot_prefill(data["results"], out_dir / PREFILL_PNG), plot_decode(data["results"], out_dir / DECODE_PNG),
            plot_ideal(data["comparisons"], out_dir / IDEAL_PNG)]
    return [p for p in made if p is not None]


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # explicit: atomic writes use temp names without .png
    plt.close(fig)
    return Path(path)
