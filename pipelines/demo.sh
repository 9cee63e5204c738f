#!/usr/bin/env bash
# The README demo (`make demo`): the whole pipeline offline, on the bundled REAL 10x
# V1_Human_Heart subsample plus two GENERATED slices. Re-running skips finished steps.
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
HEART=spavis/data/demo/human_heart_v1_subsample
mkdir -p "$OUT"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. Gene resolution (approved / previous / alias / ambiguous / mouse-style)"
spavis genes resolve GAPDH GAPD HER2 COX1 ENSG00000198804.2 Gapdh

step "2. Shards from the real heart slice (--min-genes 1: a 100-gene subsample, 2-14 vocabulary genes per spot;"
echo "   the paper's 100-gene QC would drop every spot)"
spavis build-shards "$HEART" --out "$OUT/heart" --min-genes 1
spavis validate "$OUT/heart"
spavis info "$OUT/heart"

step "3. Two GENERATED slices (labelled source=generated) + the real slice in one corpus"
spavis simulate "$OUT/generated" --n-slices 2 --seed 0
spavis build-shards "$OUT/generated" "$HEART" --out "$OUT/corpus" --min-genes 1 --workers 2 --obs-columns domain
spavis validate "$OUT/corpus"
python - "$OUT/corpus" <<'PY'
import sys, datasets, spavis
datasets.disable_progress_bars()
ds = datasets.load_dataset(sys.argv[1], split="train")
expected = spavis.open_corpus(sys.argv[1]).n_spots  # manifest.json: the corpus on disk now
if ds.num_rows != expected:
    sys.exit(f"error: datasets.load_dataset gave {ds.num_rows} spots, the corpus has {expected} (stale cache?)")
print(f"datasets.load_dataset -> {ds.num_rows} spots (= manifest.json); columns: {', '.join(ds.column_names)}")
row = next(iter(datasets.load_dataset(sys.argv[1], split="train", streaming=True)))
print(f"streaming first spot: {row['spot_id']} with {row['n_genes']} genes, neighbours {row['neighbors'][:4]}...")
PY

step "4. Tiny STAMP pretraining on CPU: stage 1 (IGR), then stage 2 (IGR + CGR on spatial groups)"
[ -f "$OUT/run-gene/model/model.safetensors" ] || stamp pretrain --stage gene --data "$OUT/corpus" \
    --out "$OUT/run-gene" --config tiny --max-steps 8 --batch-size 32 --warmup-steps 2 --lr 1e-3 --save-every 4
[ -f "$OUT/run-spatial/model/model.safetensors" ] || stamp pretrain --stage spatial --data "$OUT/corpus" \
    --init "$OUT/run-gene" --out "$OUT/run-spatial" --config tiny --max-steps 4 --warmup-steps 1 --lr 1e-3 --save-every 2
tail -n 1 "$OUT/run-spatial/metrics.jsonl"

step "5. Publish to a local folder, load it with from_pretrained, embed every spot"
stamp publish "$OUT/run-spatial" --local-dir "$OUT/published" --overwrite
python - "$OUT/published" <<'PY'
import sys
from stamp import GeneTokenizer, StampGeneEncoder
model = StampGeneEncoder.from_pretrained(sys.argv[1])
tok = GeneTokenizer.from_pretrained(sys.argv[1])
print(f"from_pretrained: {sum(p.numel() for p in model.parameters()):,} parameters, "
      f"{tok.n_genes:,} genes, max_length {tok.max_length}")
PY
stamp embed --model "$OUT/published" --data "$OUT/corpus" --out "$OUT/embeddings.parquet" --zarr
python - "$OUT" <<'PY'
import sys, anndata, pyarrow.parquet as pq
t = pq.read_table(f"{sys.argv[1]}/embeddings.parquet")
a = anndata.read_zarr(f"{sys.argv[1]}/corpus/zarr/human_heart_v1_subsample.zarr")
print(f"embeddings.parquet: {t.num_rows} spots x {len(t['embedding'][0])} dims; "
      f"zarr obsm['X_stamp'] {a.obsm['X_stamp'].shape}")
PY
step "6. Paired H&E patches from the real heart slice (build-shards --with-images)"
echo "   only the 600 px lowres H&E is bundled (the release's hires image is a black placeholder), so every"
echo "   112 µm patch is upsampled from a few pixels and flagged; a HEST/Space Ranger full-res image avoids that"
spavis build-shards "$HEART" --out "$OUT/heart-images" --min-genes 1 --with-images --quiet
spavis validate "$OUT/heart-images"
python - "$OUT/heart-images" <<'PY'
import sys, datasets
datasets.disable_progress_bars()
ds = datasets.load_dataset(sys.argv[1], "paired", split="train")
r = ds[0]
print(f"datasets.load_dataset(..., 'paired') -> {ds.num_rows} spots: patch {r['patch'].size} {r['patch'].mode}, "
      f"region {r['region'].size}, region_cell {r['region_cell']}, {r['um_per_px']:.2f} µm/px source, "
      f"upsampled {sum(ds['upsampled'])}/{ds.num_rows}, padded {sum(ds['padded'])}")
PY

step "7. Stage 3 on CPU: align the stage-2 gene encoder with a tiny ViT (random init) on the paired heart patches"
echo "   (the real model uses --vision uni: UNI's ViT-L/16, gated weights from hf-hub:MahmoodLab/UNI)"
[ -f "$OUT/run-align/model/model.safetensors" ] || stamp pretrain --stage align --init "$OUT/run-spatial" \
    --vision tiny --data "$OUT/heart-images" --out "$OUT/run-align" --max-steps 4 --batch-size 16 --grad-accum 1 \
    --warmup-steps 1 --lr 1e-3 --save-every 2 --no-progress
tail -n 1 "$OUT/run-align/metrics.jsonl"
stamp publish "$OUT/run-align" --local-dir "$OUT/published-align" --overwrite
python - "$OUT/published-align" <<'PY'
import sys, numpy as np, torch
from stamp import StampModel
model = StampModel.from_pretrained(sys.argv[1]).eval()
pixels = model.image_transform(np.full((300, 300, 3), 200, np.uint8))[None]
with torch.no_grad():
    emb = model.encode_image(pixels)
print(f"StampModel.from_pretrained: {sum(p.numel() for p in model.parameters()):,} parameters; "
      f"encode_image -> {tuple(emb.shape)}, norm {float(emb.norm()):.3f}")
PY
stamp embed --model "$OUT/published-align" --data "$OUT/heart-images" --modality fused --out "$OUT/fused.parquet" \
    --no-progress
python - "$OUT/fused.parquet" <<'PY'
import sys, pyarrow.parquet as pq
t = pq.read_table(sys.argv[1])
print(f"fused (gene + image) embeddings: {t.num_rows} spots x {len(t['embedding'][0])} dims")
PY

step "8. How good is it? The stage-2 model beside the same-run baselines (stamp evaluate, Table 1 layout)"
echo "   Leiden clusters of each slide's spot features vs the generated slices' true domains (the real heart"
echo "   slice has no labels: its spots are clustered, never scored); random-init and PCA run on the same folds"
echo "   (a 12-step tiny model barely moves from its random start: expect it beside random-init; PCA leads on these"
echo "   easy generated domains. A real run: stamp evaluate ... --model runs/spatial --model uni --model stamp-v1)"
stamp evaluate cluster --model "$OUT/run-spatial" --data "$OUT/corpus" --label domain --out "$OUT/eval" \
    --no-figures --no-progress --threads 2

step "9. A GENERATED whole slide through embed-slides with the demo's aligned model"
python - "$OUT/slides" <<'PY'
import sys
from stamp.slides.synthetic import write_synthetic_slide
truth = write_synthetic_slide(f"{sys.argv[1]}/generated-slide.svs", 3072, 2048,
                              [(1100, 1000, 800, 650), (2400, 1100, 450, 600)], pen=(200, 1800, 2900, 1900, 12))
print(f"wrote {truth.path} (GENERATED: tissue blobs, a pen stroke; {truth.width} x {truth.height} px at "
      f"{truth.um_per_px} µm/px)")
PY
echo "   (a 1.5 x 1 mm slide: CLAM's default minimum tissue piece of 6.6 mm² would drop it, hence --min-tissue-area)"
stamp embed-slides "$OUT/slides/generated-slide.svs" --model "$OUT/published-align" --out "$OUT/slide-features" \
    --min-tissue-area 0.05 --min-hole-area 0.01 --workers 0 --device cpu --no-progress
python - "$OUT/slide-features" <<'PY'
import json, sys, h5py
from pathlib import Path
out = Path(sys.argv[1])
entry = json.loads((out / "manifest.json").read_text())["slides"][0]
with h5py.File(out / entry["bag"], "r") as f:
    print(f"feature bag {out / entry['bag']}: {f['features'].shape[0]} tissue tiles x {f['features'].shape[1]} dims")
print(f"QC thumbnail (tissue mask and tiles over the slide): {out / entry['qc']}")
PY

step "Demo finished: outputs in $OUT/"
