#!/usr/bin/env bash
# `make demo`: the whole pipeline on the CPU, no GPU and no download, in about 5 minutes on 2 cores:
# phantom -> shards -> 2-rank DeepSpeed training -> evaluation -> a synthesized NIfTI -> HTML report.
# Everything goes under runs/demo/ (removed first, so the demo always starts from nothing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DEMO=runs/demo
export WANDB_MODE="${WANDB_MODE:-offline}"
started=$(date +%s)
stage() { printf '\n== %s (%ds)\n' "$1" $(($(date +%s) - started)); }

rm -rf "$DEMO"
mkdir -p "$DEMO"

stage "1/6 phantom: 16 BraTS-style subjects, 96 x 96 x 48 voxels"
$PY -m data_prep phantom --layout brats --subjects 16 --out "$DEMO/phantom" --seed 0 --shape 96 96 48

stage "2/6 shards: subject-level split 70/10/20, 96 x 96 slices"
$PY -m data_prep shard --format brats --src "$DEMO/phantom" --out "$DEMO/shards" --size 96 \
    --split 0.7 0.1 0.2 --seed 0 --workers 2

stage "3/6 training: 2 DeepSpeed ranks on the CPU, ZeRO 2 (configs/demo.yaml)"
.venv/bin/deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29517}" launch/train.py \
    --config configs/demo.yaml --logging.progress_bar false --logging.log_every_steps 10

stage "4/6 evaluation on the test split (T1 + T1ce + T2 -> FLAIR), with the copy-an-input baseline"
$PY -m medgan evaluate --checkpoint "$DEMO/checkpoints" --data_path "$DEMO/shards" --split test \
    --target_modality flair --out "$DEMO/eval"
$PY -m medgan export --checkpoint "$DEMO/checkpoints" --out "$DEMO/generator.safetensors"

stage "5/6 synthesis: FLAIR for a test subject, on the grid of its own T2"
# the first test subject with a tumour, so the synthesized FLAIR can show (or miss) the lesion
subject=$($PY - "$DEMO" <<'PY'
import json
import os
import sys

import nibabel as nib

demo = sys.argv[1]
subjects = json.load(open(f"{demo}/shards/manifest.json"))["splits"]["test"]["subjects"]


def has_tumour(subject):
    path = f"{demo}/phantom/{subject}/{subject}_seg.nii.gz"
    return os.path.exists(path) and nib.load(path).get_fdata().any()


print(next((s for s in subjects if has_tumour(s)), subjects[0]))
PY
)
source_dir="$DEMO/phantom/$subject"
$PY -m medgan synthesize --checkpoint "$DEMO/generator.safetensors" --target flair \
    --input "t1=$source_dir/${subject}_t1.nii.gz" --input "t1ce=$source_dir/${subject}_t1ce.nii.gz" \
    --input "t2=$source_dir/${subject}_t2.nii.gz" --reference t2 \
    --out "$DEMO/synthesized/${subject}_flair.nii.gz"

stage "6/6 report"
$PY -m medgan report --eval "$DEMO/eval" --out "$DEMO/report.html"

elapsed=$(($(date +%s) - started))
$PY - "$DEMO" "$subject" "$elapsed" <<'PY'
import json
import sys

demo, subject, elapsed = sys.argv[1], sys.argv[2], int(sys.argv[3])
summary = json.load(open(f"{demo}/eval/summary.json"))
print(f"\nMedGAN-SSM demo finished in {elapsed // 60} min {elapsed % 60} s")
print(f"  shards        {demo}/shards (manifest.json, report.json)")
print(f"  checkpoints   {demo}/checkpoints (generator/, discriminator/, best, config.yaml)")
print(f"  exported      {demo}/generator.safetensors")
print(f"  metrics       {demo}/eval (summary.json, per_volume.csv, per_slice.csv)")
print(f"  synthesized   {demo}/synthesized/{subject}_flair.nii.gz (real: {demo}/phantom/{subject}/{subject}_flair.nii.gz)")
print(f"  report        {demo}/report.html")
for task, result in summary["tasks"].items():
    print(f"\n{task}: per-volume brain metrics over {result['subjects']} test subjects (mean +- std)")
    for method, regions in result["methods"].items():
        values = regions["brain"]["per_volume"]
        cells = "  ".join(f"{m.upper()} {values[m]['mean']:.4g} +- {values[m]['std']:.2g}" for m in ("psnr", "ssim", "mae"))
        print(f"  {method:18s} {cells}")
    tumour = {m: r["tumour"]["per_volume"]["psnr"]["mean"] for m, r in result["methods"].items() if "tumour" in r}
    if tumour:
        print("  tumour-region PSNR: " + ", ".join(f"{m} {v:.2f} dB" for m, v in tumour.items()))

# Does the synthesized FLAIR show the lesion's hyperintensity? Tumour-to-white-matter mean intensity ratio
# (scale-free), white matter taken as healthy brain voxels in the top quarter of T1 (the brightest tissue).
from pathlib import Path

import nibabel as nib
import numpy as np

from data_prep.volumes import load_volume

folder = Path(f"{demo}/phantom/{subject}")
seg_file = folder / f"{subject}_seg.nii.gz"
lesion = load_volume(seg_file, is_label=True).data > 0 if seg_file.is_file() else np.zeros(0, bool)
if lesion.any():
    real, t1 = (load_volume(folder / f"{subject}_{name}.nii.gz").data for name in ("flair", "t1"))
    synthesized = np.asarray(nib.load(f"{demo}/synthesized/{subject}_flair.nii.gz").dataobj, dtype=np.float32)
    healthy = (t1 > 0) & ~lesion
    white = healthy & (t1 > np.percentile(t1[healthy], 75))
    pairs = (("real", real), ("synthesized", synthesized))
    ratio = {name: float(v[lesion].mean() / v[white].mean()) for name, v in pairs}
    print(
        f"\n{subject}: tumour-to-white-matter FLAIR ratio {ratio['synthesized']:.2f} synthesized, "
        f"{ratio['real']:.2f} real ({ratio['synthesized'] / ratio['real']:.0%} of the real one)"
    )
PY
