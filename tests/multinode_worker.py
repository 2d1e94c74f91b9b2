"""One rank of the simulated two-node run of `tests/test_multinode.py`, started by `torchrun`.

It trains `test_loop.LinearTask` (a fixed global batch of 8 rows, rank r's share rows r::world) in
4 micro-batches per epoch, one per update, so every update sees the same 2 global rows whatever
the world size; each update sleeps `--delay` seconds so that a node can be killed mid-run.
Usage: `torchrun ... tests/multinode_worker.py OUT --epochs N --delay S [--resume]`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from test_loop import LinearTask, toy_cfg

from training import distributed
from training.loop import train

MICRO = 4  # micro-batches (= updates) per epoch
SAVE_EVERY = 3  # checkpoint interval in updates, besides every epoch end


class SlowLinearTask(LinearTask):
    """`LinearTask` with `delay` seconds of sleep in every micro-batch."""

    micro, delay = MICRO, 0.0

    def train_step(self, model, batch, num_updates):
        time.sleep(self.delay)
        return super().train_step(model, batch, num_updates)


def run_config(out: Path, epochs: int):
    """The run config of every run of the test, the 1-process reference included."""
    cfg = toy_cfg(out, max_epoch=epochs, update_freq=1)
    cfg.checkpoint.save_interval_updates = SAVE_EVERY
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    cfg = run_config(args.out, args.epochs)
    task = SlowLinearTask(cfg)
    task.delay = args.delay
    train(cfg, task, resume=args.resume)
    distributed.teardown()


if __name__ == "__main__":
    main()
