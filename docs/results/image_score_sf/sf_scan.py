"""Image AUROC against the slice score's mean-filter size sf, for trained bundles and the trivial map baselines.

The slice score is the max of the sf x sf mean-filtered anomaly map inside the liver (networks.scoring.image_scores,
DRAEM's score); the baselines' maps are scored the same way, as the evaluation reports do. Each bundle's
models/model.pt is run once (float32, CPU) over the split's slices; the maps are then scored at every sf.

Usage (repository root):
    python docs/results/image_score_sf/sf_scan.py PREPARED_DIR SPLIT NAME=BUNDLE_DIR [NAME=BUNDLE_DIR ...]
"""

import json
import sys

import numpy as np
import torch

from networks.scoring import image_scores
from pipeline.evaluate.baselines import baseline_maps
from pipeline.evaluate.metrics import roc_auc
from pipeline.infer.settings import load_detector

SFS = (5, 9, 13, 17, 21, 31)

prepared, split = sys.argv[1], sys.argv[2]
manifest = json.loads(open(f"{prepared}/manifest.json").read())
entries = manifest[split]
images = np.stack([np.load(f"{prepared}/{e['image']}")[0] for e in entries]).astype(np.float32)
labels = np.stack([np.load(f"{prepared}/{e['label']}")[0] for e in entries])
liver = (labels >= 1).astype(np.float64)
has_lesion = np.array([e["has_lesion"] for e in entries], dtype=int)
mm = manifest["settings"]["field_mm"] / manifest["settings"]["size"]
maps = baseline_maps(images, liver, [e["case_id"] for e in entries], mm)
for argument in sys.argv[3:]:
    name, bundle = argument.split("=", 1)
    detector = load_detector(bundle)
    with torch.no_grad():
        parts = [detector(torch.from_numpy(images[i:i + 16, None])).float().numpy()[:, 0]
                 for i in range(0, len(images), 16)]
    maps[name] = np.concatenate(parts).astype(np.float64) * liver

print(f"{prepared} {split}: {len(entries)} slices, {has_lesion.sum()} with lesion, {mm:.3f} mm per pixel")
print("image AUROC of max(sf x sf mean filter of the liver-only map)")
print(f"{'score':<24}" + "".join(f"{'sf=' + str(s):>8}" for s in SFS))
for name, values in maps.items():
    row = [roc_auc(image_scores(values, sf, liver), has_lesion) for sf in SFS]
    print(f"{name:<24}" + "".join(f"{v:>8.3f}" for v in row))
