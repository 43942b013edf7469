"""Trivial baselines of a prepared phantom cohort's split, without a model (session 8 pilots of the demo cohort).

Usage: python docs/results/demo_budget/cohort_baselines.py PREPARED_DIR SPLIT MM_PER_PIXEL
"""

import json
import sys

import numpy as np

from pipeline.evaluate.baselines import baseline_report

prepared, split, mm_per_pixel = sys.argv[1], sys.argv[2], float(sys.argv[3])
entries = json.loads(open(f"{prepared}/manifest.json").read())[split]
images = np.stack([np.load(f"{prepared}/{e['image']}")[0] for e in entries])
labels = np.stack([np.load(f"{prepared}/{e['label']}")[0] for e in entries])
report = baseline_report(images, labels >= 1, labels == 2, case_ids=[e["case_id"] for e in entries],
                         mm_per_pixel=mm_per_pixel, labels=np.array([e["has_lesion"] for e in entries]))
print(f"{split}: {report['n_slices']} slices, {report['n_lesion_slices']} with lesion")
print("  image AUROC:", {k: round(v, 3) for k, v in report["image_auroc"].items()})
print("  pixel AUROC:", {k: round(v, 3) for k, v in report["pixel_auroc"].items() if not k.endswith("_all")})
