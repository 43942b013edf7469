"""Re-score trained bundles with their pixel maps Gaussian-smoothed, beside the deviation and darkness maps smoothed
alike (an analysis for docs/results/full_skips_norm/README.md, not part of the pipeline).

    python docs/results/full_skips_norm/map_smoothing.py PREPARED BUNDLE [BUNDLE ...] > map_smoothing.md

Every map is zeroed outside the liver, smoothed with a Gaussian of sigma 0-4 pixels (MONAI's GaussianFilter; pixels
outside the liver count as 0) and zeroed outside the liver again; then pixel AUROC inside the (eroded) liver and the
image AUROC of the max of the 21 x 21 mean-filtered map, on the prepared folder's validation split.
"""

from __future__ import annotations

import sys

import torch
from monai.networks.layers import GaussianFilter

from networks.scoring import image_scores
from pipeline.data.loading import slice_loading
from pipeline.data.manifest import load_manifest
from pipeline.evaluate.baselines import darkness_map, deviation_map
from pipeline.evaluate.metrics import erode, roc_auc
from pipeline.infer.settings import load_detector

SIGMAS = (0, 1, 2, 3, 4)


def main(prepared: str, bundles: list[str]) -> None:
    entries = load_manifest(prepared)["validation"]
    load = slice_loading()
    items = [load(dict(e)) for e in entries]
    image = torch.stack([torch.as_tensor(it["image"]).float() for it in items])
    liver = torch.stack([torch.as_tensor(it["liver"]).float() for it in items])
    lesion = torch.stack([torch.as_tensor(it["lesion"]).float() for it in items]).numpy() > 0
    inside, eroded = liver.numpy() > 0, erode(liver.numpy()) > 0
    labels = lesion.reshape(len(lesion), -1).any(1)
    maps = {}
    for i, bundle in enumerate(bundles):
        detector = load_detector(bundle).eval()
        with torch.no_grad():
            maps[f"model {i}"] = torch.cat([detector.anomaly_map(image[k:k + 16]).float()
                                            for k in range(0, len(image), 16)])
    ids = [e["case_id"] for e in entries]
    maps["deviation"] = torch.as_tensor(deviation_map(image.numpy(), liver.numpy(), ids)).float().reshape(image.shape)
    maps["darkness"] = torch.as_tensor(darkness_map(image, liver)).float()

    print(f"validation: {len(entries)} slices, {int(labels.sum())} with lesion; models: {', '.join(bundles)}\n")
    print("| map | sigma (px) | pixel AUROC in liver | eroded liver | image AUROC |")
    print("|---|---|---|---|---|")
    for name, pixel_map in maps.items():
        for sigma in SIGMAS:
            m = pixel_map * liver
            m = (m if sigma == 0 else GaussianFilter(2, sigma)(m)) * liver
            a = m.numpy()
            print(f"| {name} | {sigma} | {roc_auc(a[inside], lesion[inside]):.3f} | "
                  f"{roc_auc(a[eroded], lesion[eroded]):.3f} | {roc_auc(image_scores(m, 21).numpy(), labels):.3f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
