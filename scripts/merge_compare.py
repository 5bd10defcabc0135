"""Merge the ``compare.json`` files of several ``fp8coat compare`` runs (e.g. one per seed or per GPU call) into
one table (mean ± std over seeds) and one loss plot.

    python -m scripts.merge_compare OUT_DIR a.json b.json ...   # writes OUT_DIR/compare.md, compare.json, loss.png
"""

from __future__ import annotations

import json
import os
import sys

from fp8coat.train import TrainConfig
from fp8coat.train.compare import _plot, report  # _plot: the loss plot of `fp8coat compare` (not public yet)


def _baseline(variants: list[str], recorded: list) -> str | None:
    """The baseline the merged files recorded, else the first of ``bf16-torchopt`` / ``bf16``, else the first."""
    for name in [*recorded, "bf16-torchopt", "bf16", *variants]:
        if name in variants:
            return name
    return None


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    out_dir, files = argv[0], argv[1:]
    results: dict[str, list] = {}
    labels: dict[str, str] = {}
    baselines: list = []
    seeds: set = set()
    config = None
    for path in files:
        with open(path) as f:
            data = json.load(f)
        config = config or data.get("config")
        seeds.update(data.get("seeds", []))
        labels.update(data.get("labels") or {})
        if data.get("baseline"):
            baselines.append(data["baseline"])
        for variant, runs in data["results"].items():
            results.setdefault(variant, []).extend(runs)
    labels = {v: labels.get(v, v) for v in results}
    baseline = _baseline(list(results), baselines)
    base = TrainConfig.from_dict(config or {}, where=files[0])
    os.makedirs(out_dir, exist_ok=True)
    document = report(results, labels, baseline, base, sorted(seeds))
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(document)
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump({"config": config, "variants": list(results), "seeds": sorted(seeds), "baseline": baseline,
                   "labels": labels, "results": results, "merged_from": files}, f, indent=1)
    title = document.split("\n", 1)[0].removeprefix("# fp8coat compare: ")
    _plot(results, labels, title, os.path.join(out_dir, "loss.png"))
    print(document)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
