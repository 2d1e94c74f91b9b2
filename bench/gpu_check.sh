#!/usr/bin/env bash
# GPU check, ready to run on a CUDA machine (falls back to the CPU without one; shrink it then):
#   1. pretrains the paper preset for a few updates in bf16 (SDPA attention on CUDA) and prints
#      segments/s, TFLOP/s, utilisation of the measured bf16 GEMM rate and MFU of the datasheet;
#   2. embeds GPU_CHECK_SEGMENTS synthetic segments (bare forward and `ecgplat embed`, bf16);
#   3. searches them against themselves: a faiss-gpu flat index if faiss has GPU support, else a
#      torch matmul top-k on the device.
# Sized to fit 5 minutes on one H100/H200. Smoke test on a CPU:
#   GPU_CHECK_PRESET=tiny GPU_CHECK_PAIRS=2 GPU_CHECK_UPDATES=2 GPU_CHECK_SEGMENTS=64 bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PRESET=${GPU_CHECK_PRESET:-paper}
PAIRS=${GPU_CHECK_PAIRS:-32}
UPDATES=${GPU_CHECK_UPDATES:-5}
SEGMENTS=${GPU_CHECK_SEGMENTS:-10000}
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t ecgplat-gpu-check-XXXX)}
mkdir -p "$OUT"
echo "gpu_check: preset=$PRESET pairs=$PAIRS updates=$UPDATES segments=$SEGMENTS out=$OUT"
$PY -c "import torch; print('cuda:', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

echo "== 1. pretraining, bf16 =="
timeout 150 $PY bench/pretrain.py --presets "$PRESET" --precisions bf16 --pairs "$PAIRS" \
  --steps "$UPDATES" --loader-batches 4 --out "$OUT/pretrain.json" >/dev/null
$PY - "$OUT/pretrain.json" <<'PYEOF'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    if "error" in r:
        print("pretrain error:", r["error"]); continue
    print(f"{r['preset']} {r['precision']} {r['device']}: {r['steps_segments_per_s']:.1f} segments/s, "
          f"{r['step_tflops']:.3g} TFLOP/s, {100 * r['utilisation']:.1f}% of the bf16 GEMM rate "
          f"({r['gemm_tflops']:.3g} TFLOP/s), MFU {r.get('mfu')}")
PYEOF

echo "== 2. embedding $SEGMENTS segments, bf16 =="
$PY -c "
import sys; from pathlib import Path
from ingestion.synth import prepare_synthetic
n = (int(sys.argv[1]) + 1) // 2  # 10 s records = 2 segments
prepare_synthetic(Path(sys.argv[2]), n, 1, seconds=10, valid=0.0, shard_splits=())
" "$SEGMENTS" "$OUT/data"
timeout 120 $PY bench/embed.py --preset "$PRESET" --store "$OUT/data/store" --precisions bf16 \
  --out "$OUT/embed.json" >/dev/null
$PY - "$OUT/embed.json" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1])); b = r["bf16"]
print(f"{r['segments']} segments on {r['device']}, batch {r['batch_size']}: bare forward "
      f"{b['bare_segments_per_s']:.0f}/s, ecgplat embed {b['embed_segments_per_s']:.0f}/s "
      f"(bare/embed {b['bare_over_embed']:.2f}), utilisation {100 * b['bare_utilisation']:.1f}%")
PYEOF

echo "== 3. search =="
$PY - "$OUT/data/store" <<'PYEOF'
import sys, time
import numpy as np, torch
from retrieval.features import load_features
emb = load_features(sys.argv[1], "bench-bf16", "segment").embeddings
try:
    import faiss
    gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
except ImportError:
    gpu = False
t = time.perf_counter()
if gpu:
    res = faiss.StandardGpuResources()
    index = faiss.GpuIndexFlatIP(res, emb.shape[1]); index.add(emb)
    _, idx = index.search(emb, 10); how = "faiss-gpu flat"
else:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.from_numpy(emb).to(dev)
    idx = torch.cat([(x[i:i + 4096] @ x.T).topk(10, dim=1).indices for i in range(0, len(x), 4096)])
    idx = idx.cpu().numpy(); how = f"torch matmul top-k ({dev})"
dt = time.perf_counter() - t
self_first = float(np.mean(idx[:, 0] == np.arange(len(emb))))
print(f"{how}: {len(emb)} x {len(emb)} in {dt:.2f} s ({len(emb) / dt:.0f} queries/s); "
      f"self at rank 1 for {100 * self_first:.1f}%")
PYEOF
echo "gpu_check: done ($OUT)"
