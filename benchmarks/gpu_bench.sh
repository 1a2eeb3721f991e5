#!/usr/bin/env bash
# One prepared script for the lent GPU machine: `fm bench` on the cifar10-sized and the stability-sized
# DiT (bf16, autotuned, with --compare diffusers), then the DiT-S/2 comparison in fp32 and bf16.
# Results land in $OUT (JSON per run + logs). Run from the repository root with PYTHONPATH set.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/fm-gpu-bench}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
# cifar10 preset (DESIGN.md): DiT 768/12/12, patch 2, CIFAR-10 pixels 3x32x32, 10 classes, CFG.
CIFAR="--preset quickstart --set name=cifar10 --set data.source=cifar10 --set model.hidden_size=768 --set model.depth=12 --set model.heads=12 --set model.patch_size=2"
# stability preset shape (DESIGN.md): DiT 768/12/12, patch 2, SD-VAE latents 8x8x4 (cross-attention not built yet: unconditional).
STAB="--preset quickstart --set name=stability --set data.source=captions --set model.hidden_size=768 --set model.depth=12 --set model.heads=12 --set model.patch_size=2 --set model.image_size=8 --set model.in_channels=4 --set model.num_classes=0"
timeout 120 python3 benchmarks/profile_dit.py --device cuda --batch 256 --steps 20 --repeats 2 >"$OUT/profile_dit.json" 2>"$OUT/profile_dit.log"; echo "profile rc=$?"; cat "$OUT/profile_dit.log"
timeout 150 python3 -m fmcli.cli bench $CIFAR --precision bf16 --max-batch 1024 --steps 10 --warmup 3 --compare diffusers --json >"$OUT/cifar10.json" 2>"$OUT/cifar10.log"; echo "cifar10 rc=$?"; tail -12 "$OUT/cifar10.log"
timeout 100 python3 -m fmcli.cli bench $STAB --precision bf16 --max-batch 2048 --steps 10 --warmup 3 --compare diffusers --json >"$OUT/stability.json" 2>"$OUT/stability.log"; echo "stability rc=$?"; tail -12 "$OUT/stability.log"
timeout 150 python3 benchmarks/compare_diffusers.py --device cuda --batch 256 --steps 20 --warmup 5 --repeats 3 >"$OUT/compare_dit_s2.json" 2>"$OUT/compare_dit_s2.log"; echo "compare rc=$?"; tail -15 "$OUT/compare_dit_s2.log"
