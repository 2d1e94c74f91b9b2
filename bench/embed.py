"""Embedding throughput: `ecgplat embed` against a bare forward over the same segments, in fp32
and bf16, measured against the machine's own GEMM rate.

For each precision, in one run and on the same store:
  (a) bare forward: the store's segments read into memory first, then `unit_embedding` of the
      encoder under that precision's autocast in batches: segments/s, the floor;
  (b) `retrieval.embed.embed_store` (what `ecgplat embed` runs: store reads, forward, record
      means, the feature-set write) over the same segments: segments/s and its ratio to (a);
plus the GEMM rate of a plain torch.mm in each dtype, the encoder's analytic FLOPs per segment
and the resulting utilisation (segments/s x FLOPs / GEMM rate), and the CPU flags.

Without `--store` a synthetic cohort is ingested through the real pipeline into a temporary
store; the encoder is a freshly initialised one of `--preset` (speed does not depend on the
weights) unless `--checkpoint` is given. Output: JSON on stdout (and in `--out FILE`).

    python bench/embed.py [--preset paper] [--records 64] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# the repository root first: bench/retrieval.py would otherwise shadow the retrieval package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, workdir, write_report  # noqa: E402

TARGET_EMBED_OVER_BARE = 1.25


def synthetic_store(root: Path, records: int) -> Path:
    from ingestion.pipeline import ingest
    from ingestion.synth import write_cohort

    write_cohort(root / "cohort", records, 1, seconds=10, seed=0)
    store = root / "store"
    ingest("cinc2021", root / "cohort", store, workers=0, progress=False)
    return store


def fresh_checkpoint(path: Path, preset: str) -> Path:
    import torch

    from training.models.checkpoint_file import save_checkpoint
    from training.models.encoder import ECGEncoder
    from training.models.encoder_config import get_config

    torch.manual_seed(0)
    cfg = get_config(preset)
    state = {f"encoder.{k}": v for k, v in ECGEncoder(cfg).state_dict().items()}
    return save_checkpoint(path, kind="pretrain", encoder_config=cfg, model=state)


def bare_forward(encoder, store, batch_size: int, precision: str, device) -> float:
    """Segments/s of the forward alone over every stored segment (read beforehand)."""
    import numpy as np
    import torch

    from training.models.identifier import unit_embedding
    from training.precision import autocast

    x = torch.from_numpy(np.ascontiguousarray(store.read_segments(np.arange(store.n_segments))))
    mask = torch.from_numpy(np.asarray(store.lead_masks)[store.segment_record_index])
    with torch.inference_mode(), autocast(precision, device):
        unit_embedding(encoder, x[:batch_size].to(device), mask[:batch_size].to(device))  # warm
        t = time.perf_counter()
        for b in range(0, len(x), batch_size):
            rows = slice(b, b + batch_size)
            e = unit_embedding(encoder, x[rows].to(device), mask[rows].to(device))
            e.float().cpu()
    return len(x) / (time.perf_counter() - t)


def measure(store_path: Path, checkpoint: Path, precisions: list[str], batch_size, device) -> dict:
    import torch

    from bench.hardware import gemm_tflops
    from ecgplat.store import open_store
    from retrieval.embed import embed_store
    from training.models.checkpoint_file import load_encoder
    from training.models.flops import encoder_forward_flops, inference_batch_size

    store = open_store(store_path)
    encoder = load_encoder(checkpoint).to(device)
    batch_size = batch_size or inference_batch_size(encoder.cfg)
    flops = encoder_forward_flops(encoder.cfg)
    out = {
        "segments": int(store.n_segments),
        "batch_size": batch_size,
        "gflop_per_segment": flops / 1e9,
        "threads": torch.get_num_threads(),
    }
    for p in precisions:
        peak = gemm_tflops(p, str(device)) * 1e12
        bare = bare_forward(encoder, store, batch_size, p, device)
        t = time.perf_counter()
        embed_store(
            store_path,
            checkpoint,
            f"bench-{p}",
            overwrite=True,
            batch_size=batch_size,
            device=str(device),
            precision=p,
        )
        embed = store.n_segments / (time.perf_counter() - t)
        out[p] = {
            "gemm_tflops": peak / 1e12,
            "bare_segments_per_s": bare,
            "embed_segments_per_s": embed,
            "bare_over_embed": bare / embed,
            "bare_utilisation": bare * flops / peak,
            "embed_utilisation": embed * flops / peak,
        }
    if {"fp32", "bf16"} <= set(precisions):
        out["bf16_over_fp32"] = {
            k: out["bf16"][k] / out["fp32"][k]
            for k in ("gemm_tflops", "bare_segments_per_s", "embed_segments_per_s")
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="paper", help="encoder preset when no --checkpoint")
    p.add_argument("--checkpoint", default=None, help="checkpoint to embed with")
    p.add_argument("--store", default=None, help="feature store (default: synthetic)")
    p.add_argument("--records", type=int, default=64, help="synthetic 10 s records (2 segments)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch-size", type=int, default=None, help="default: sized to the model")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    args = p.parse_args(argv)

    from training.distributed import pick_device

    device = pick_device(args.device)
    with workdir(None, "ecgplat-bench-embed-") as tmp:
        store = args.store or synthetic_store(tmp, args.records)
        ckpt = args.checkpoint or fresh_checkpoint(tmp / "encoder.pt", args.preset)
        report = measure(
            Path(store), Path(ckpt), args.precisions.split(","), args.batch_size, device
        )
    report.update(
        preset=None if args.checkpoint else args.preset,
        device=str(device),
        target_bare_over_embed=1 / TARGET_EMBED_OVER_BARE,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        **machine(),
    )
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
