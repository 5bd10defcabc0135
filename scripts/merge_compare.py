"""Merge the ``compare.json`` files of several ``fp8coat compare`` runs (e.g. one per seed or per GPU call) into
one table (mean ± std over seeds) and one loss plot.

    python -m scripts.merge_compare OUT_DIR a.json b.json ...   # writes OUT_DIR/compare.md, compare.json, loss.png
"""

from __future__ import annotations

import json
import os
import sys

from fp8coat.train.compare import merge_records, write_reports


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__)
        return 2
    out_dir, files = argv[0], argv[1:]
    records = []
    for path in files:
        with open(path) as f:
            records.append(json.load(f))
    record = {**merge_records(records), "merged_from": files}
    os.makedirs(out_dir, exist_ok=True)
    print(write_reports(out_dir, record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
