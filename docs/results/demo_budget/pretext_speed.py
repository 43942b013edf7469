"""How fast does the pretext task learn? (session 12 pilots of the demo, issue "train to convergence", item 7)

A plain loop over the bundle's own training data loader, network and loss (no EMA, no schedule: a constant Adam
learning rate), printing the synthetic-anomaly health metric (``validate#health``) of the live network every
``--every`` iterations and a last ``RESULT tag [[iteration, seconds, health], ...]`` line.
``--loss paper``: the bundle's ``DetectorLoss`` (restoration MSE + SSIM, segmentation L1 + focal);
``--loss dicece``: MONAI's ``DiceCELoss`` for the segmentation instead (restoration term unchanged).

Usage (repository root):
    python docs/results/demo_budget/pretext_speed.py --data PREPARED --lr 2e-4 --loss paper --tag paper_2e-4
"""

import argparse
import json
import time

import torch
from monai.bundle import ConfigParser
from monai.losses import DiceCELoss

CONFIGS = "bundles/liver_ct_anomaly_detection/configs"

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--data", required=True, help="a prepared folder (python -m pipeline prepare)")
parser.add_argument("--lr", type=float, default=2e-4)
parser.add_argument("--loss", choices=("paper", "dicece"), default="paper")
parser.add_argument("--iters", type=int, default=480)
parser.add_argument("--every", type=int, default=120)
parser.add_argument("--lesion-like", type=float, default=1.0, help="lesion_like_fraction of the synthesis")
parser.add_argument("--prob", type=float, default=0.5, help="anomaly_prob of the synthesis")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--variant", default="full-skips")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--tag", default="")
parser.add_argument("--anomaly-source", default="../shared/data/braintumor/images")
args = parser.parse_args()

torch.manual_seed(args.seed)
config = ConfigParser()
config.read_config([f"{CONFIGS}/train.yaml", f"{CONFIGS}/variants/{args.variant}.yaml"])
config.update({"bundle_root": "/tmp/pretext_speed", "dataset_dir": args.data, "anomaly_source": args.anomaly_source,
               "lesion_like_fraction": args.lesion_like, "anomaly_prob": args.prob, "batch_size": args.batch,
               "seed": args.seed})
loader, net = config.get_parsed_content("train#dataloader"), config.get_parsed_content("network")
health, detector_loss = config.get_parsed_content("validate#health"), config.get_parsed_content("train#loss")
optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

iteration, start, rows = 0, time.time(), []
while iteration < args.iters:
    for batch in loader:
        image, clean, mask = batch["image"], batch["clean"], batch["anomaly_mask"]
        net.train()
        optimizer.zero_grad(set_to_none=True)
        restored, logits = net(image)
        if args.loss == "paper":
            loss = detector_loss(restored, logits, clean, mask)["loss"]
        else:
            loss = dice_ce(logits, (mask > 0.5).float())
            if restored is not None:
                loss = loss + detector_loss(restored, logits, clean, mask)["restoration"]
        loss.backward()
        optimizer.step()
        iteration += 1
        if iteration % args.every == 0:
            value = health(net)
            rows.append((iteration, round(time.time() - start, 1), round(value, 4)))
            print(args.tag, iteration, rows[-1][1], f"health {value:.3f}", flush=True)
        if iteration >= args.iters:
            break
print("RESULT", args.tag, json.dumps(rows))
