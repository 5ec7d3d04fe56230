"""Print an evaluation report (report.json) as a Markdown table: each method's metrics with 95%
bootstrap intervals, and its paired loss change against the base.

Usage: python bench/report_table.py data/evaluate/<key>/report.json [--metrics loss,accuracy]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--metrics", default="")
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    intervals, paired = report["intervals"], report["paired_vs_base"]
    names = args.metrics.split(",") if args.metrics else list(next(iter(intervals.values())))
    print(f"task `{report['task']}`, layer `{report.get('layer', '?')}`, {report['samples']} test samples, "
          f"config {json.dumps(report['config'])}\n")
    print("| method | " + " | ".join(names) + " | loss - base [95% CI] | fraction better |")
    print("|---|" + "---|" * (len(names) + 2))
    for method, values in intervals.items():
        cells = [f"{values[n]['mean']:.4f} [{values[n]['ci_low']:.4f}, {values[n]['ci_high']:.4f}]" for n in names]
        diff = paired.get(method, {}).get("loss")
        change = f"{diff['mean']:+.4f} [{diff['ci_low']:+.4f}, {diff['ci_high']:+.4f}]" if diff else "—"
        better = f"{diff['fraction_better']:.2f}" if diff else "—"
        print(f"| {method} | " + " | ".join(cells) + f" | {change} | {better} |")
    curve = report["ensemble_curve"]
    print("\nOCD ensemble size K vs " + ", ".join(names) + ":\n")
    for i, k in enumerate(curve["sizes"]):
        print(f"- K={k}: " + ", ".join(f"{n} {curve['metrics'][n][i]:.4f}" for n in names))
    scale = report["scale"]
    print(f"\nscale model: median relative error of rho {scale['median_relative_error']:.3f}; "
          f"evaluation took {report.get('seconds')} s")


if __name__ == "__main__":
    main()
