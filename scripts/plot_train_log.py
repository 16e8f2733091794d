#!/usr/bin/env python3
"""Plot a training log (``train_log.csv`` of scripts/train_scenes.py or train_shapes.py): loss and learning rate.

    python scripts/plot_train_log.py docs/scenes_training/train_log.csv docs/scenes_training/loss_curve.png
"""

from __future__ import annotations

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: plot_train_log.py TRAIN_LOG.csv OUT.png")
    with open(argv[0], newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=110)
    ax.plot(steps, [float(r["loss"]) for r in rows], color="tab:blue", label="loss (mean over the log interval)")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("flow-matching MSE")
    lr = ax.twinx()
    lr.plot(steps, [float(r["lr"]) for r in rows], color="tab:orange", alpha=0.6, label="learning rate")
    lr.set_ylabel("learning rate")
    fig.legend(loc="center right", bbox_to_anchor=(0.88, 0.6))
    fig.tight_layout()
    fig.savefig(argv[1])


if __name__ == "__main__":
    main(sys.argv[1:])
