"""Merge the ``compare.json`` files of several ``fp8coat compare`` runs (e.g. one per seed or per GPU call) into
one table (mean ± std over seeds) and one loss plot.

    python scripts/merge_compare.py OUT_DIR a.json b.json ...   # writes OUT_DIR/compare.md, compare.json, loss.png
"""

from __future__ import annotations

import json
import os
import sys

from fp8coat.train.compare import _plot, _table


def main(argv: "list[str]") -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    out_dir, files = argv[0], argv[1:]
    results: dict[str, list] = {}
    seeds: set = set()
    config = None
    for path in files:
        with open(path) as f:
            data = json.load(f)
        config = config or data.get("config")
        seeds.update(data.get("seeds", []))
        for variant, runs in data["results"].items():
            results.setdefault(variant, []).extend(runs)
    os.makedirs(out_dir, exist_ok=True)
    table = _table(results, sorted(seeds))
    with open(os.path.join(out_dir, "compare.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "compare.json"), "w") as f:
        json.dump({"config": config, "seeds": sorted(seeds), "results": results, "merged_from": files}, f, indent=1)
    _plot(results, os.path.join(out_dir, "loss.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
