#!/bin/bash
# The small-data experiment of docs/benchmarks.md: detection on coco128 (96 train / 32 val real COCO images)
# with a ViT-Tiny-sized backbone from scratch: two-phase (E epochs of convolutional attention, convert, E epochs
# of self-attention), the same ViT from random initialisation (2E epochs) and a ResNet-18 (2E epochs); 24 steps
# of batch 4 per epoch, AP on the 32 val images after every epoch, a warm-up of W steps in every run (each phase
# has its own warm-up and cosine schedule). One thread, to leave a core to others.
#   bash bench/vit_two_phase.sh [OUT=runs/vit_two_phase] [E=6] [W=50]  &&  python bench/ap_per_epoch.py OUT
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
OUT=${1:-runs/vit_two_phase}
E=${2:-6}
W=${3:-50}
train() { python tools/train.py "$@" train.warmup_steps="$W" --device cpu; }
start=$(date +%s)
train configs/vit_two_phase_phase1.yaml train.epochs="$E" --output-dir "$OUT/phase1"
python tools/convert.py --to-attention "$OUT/phase1/last.pth" --out "$OUT/phase1/attention.pth"
train configs/vit_two_phase_phase2.yaml train.init_from="$OUT/phase1/attention.pth" train.epochs="$E" \
    --output-dir "$OUT/phase2"
two_phase=$(date +%s)
train configs/vit_two_phase_phase2.yaml train.init_from=null train.epochs=$((2 * E)) --output-dir "$OUT/vit_random"
vit=$(date +%s)
train configs/vit_two_phase_phase2.yaml train.init_from=null train.epochs=$((2 * E)) model.backbone.name=resnet18 \
    model.backbone.norm=bn model.backbone.trainable_stages=5 --output-dir "$OUT/resnet18"
end=$(date +%s)
echo "wall seconds: two-phase $((two_phase - start)), random-init ViT $((vit - two_phase)), ResNet-18 $((end - vit))" \
    | tee "$OUT/wall_seconds.txt"
