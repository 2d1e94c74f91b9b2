"""`make demo`: the whole pipeline end to end on the data bundled in the repository.

Every step is the public command a user would type (printed before it runs), so the demo
doubles as a walk-through of the CLI:

1. `ecgplat synth` writes a small synthetic cohort (patients with several records each);
2. `ecgplat ingest` puts the bundled real samples (PhysioNet/CinC 2021, PTB-XL, CPSC 2021)
   and the cohort into one Zarr feature store with a Dask LocalCluster, `ecgplat info` prints it;
3. `ecgplat split` assigns record-level splits and the identification gallery/probe;
4. `ecgplat shards` exports WebDataset shards;
5. `ecgplat train pretrain` pretrains a `tiny` W2V+CMSC+RLM encoder (the loss goes down);
6. `ecgplat train diagnosis` fine-tunes it, and a random-init baseline, on the 26 classes;
   `ecgplat evaluate diagnosis` prints both evaluations;
7. `ecgplat train identify` fine-tunes it with ArcFace, `ecgplat embed` writes embeddings into
   the store, `ecgplat index build` builds the FAISS gallery, `ecgplat evaluate identify`
   reports Rank-1/mAP, and `ecgplat query` answers one query with a plot.

Outputs go to `demo_out/` (override with ECGPLAT_DEMO_OUT); a re-run starts afresh.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"


def run(*args: str) -> str:
    """Run one `ecgplat` command, echo it, stream its output and return stdout."""
    cmd = [sys.executable, "-m", "ecgplat", *args]
    print(f"\n$ ecgplat {shlex.join(args)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed (exit {proc.returncode}): ecgplat {shlex.join(args)}")
    print(f"[{time.time() - t0:.1f} s]", flush=True)
    return proc.stdout


def main() -> None:
    out = Path(os.environ.get("ECGPLAT_DEMO_OUT", REPO / "demo_out"))
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    raise SystemExit("demo steps are assembled at integration time")


if __name__ == "__main__":
    main()
