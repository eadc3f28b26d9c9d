#!/usr/bin/env bash
# The paper's comparison on Fashion-MNIST, end to end: tokenize; train the raster baseline and the any-order
# model; extract an order per training image; fine-tune on those orders (the paper's way; ours, with a
# position head; and on random orders only, the any-order baseline at the same budget); draw pictures; and
# measure FID, KID, precision, recall, mean jump, order diversity, held-out bits per token and sampling speed
# of each position rule. Writes OUT/results.md (the table, then the wall time of every step) and pictures.
# Re-running resumes: finished checkpoints and orders are kept.
#
#   bash train.sh              # the comparison (about 26 minutes on 2 CPU cores) -> out/results.md
#   PART=all bash train.sh     # then ours and v2's: fine-tuning with a quarter of random orders (the
#                              # paper's rule on it), classes with guidance, inpainting
#   GPU=1 bash train.sh        # one GPU: 14 x 14 codes, a 15M model, both next-position encodings (relative,
#                              # the paper's, and absolute), 3 seeds of 1000 samples -> out_gpu/results.md
#   QUICK=1 bash train.sh      # every step (PART=all) at tiny sizes, in a few minutes: the tests run this
#   QUICK=1 GPU=1 bash train.sh  # the GPU tier's steps at tiny sizes, on a CPU: the tests run this too
#   OUT=elsewhere bash train.sh
#
# Sizes, from the environment: STEPS (any-order training steps), FT_STEPS (fine-tuning steps; raster trains
# STEPS + FT_STEPS, the same budget), N_EXTRACT (training images whose order is extracted), N_FID (samples per
# row and seed), REF_N (real test images behind FID and KID; 0: all 10,000), SEEDS, MODEL (train's model flags).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
export PYTHONWARNINGS=ignore

ENCODINGS=(relative); BATCH=(); XBATCH=(); TOKENIZE=()  # the GPU tier adds the absolute encoding (_abs)
Q=$([ "${QUICK:-0}" = 1 ] && echo _quick || true)  # the default OUT's suffix
if [ "${QUICK:-0}" = 1 ]; then
  PART=${PART:-all}; FIT=(--fit-images 5000); EVAL=(--eval-n 256)
  : "${MODEL:=--n-layer 1 --n-head 2 --n-embd 32}" "${STEPS:=60}" "${FT_STEPS:=30}"
  : "${N_EXTRACT:=256}" "${N_FID:=16}" "${REF_N:=64}" "${SEEDS:=0 1}"
else
  FIT=(); EVAL=()
fi
if [ "${GPU:-0}" = 1 ]; then  # 14 x 14 codes (2 x 2 patches); 8 blocks x 8 heads x 384 channels: 14.75M
  OUT=${OUT:-out_gpu$Q}; PART=gpu; ENCODINGS=(relative absolute); TOKENIZE=(--patch 2)
  BATCH=(--batch-size $([ "${QUICK:-0}" = 1 ] && echo 16 || echo 256)); XBATCH=(--batch-size 1024)
  [ "${QUICK:-0}" = 1 ] && { N_EXTRACT=48; N_FID=8; REF_N=32; SEEDS=0; EVAL=(--eval-n 64); }
  : "${MODEL:=--n-layer 8 --n-head 8 --n-embd 384 --dropout 0.1 --lr 1e-3}" "${STEPS:=1500}" "${FT_STEPS:=300}"
  : "${N_EXTRACT:=6000}" "${N_FID:=1000}" "${REF_N:=2000}" "${SEEDS:=0 1 2}"
fi
OUT=${OUT:-out$Q}; PART=${PART:-core}
: "${MODEL:=}" "${STEPS:=2000}" "${FT_STEPS:=700}" "${N_EXTRACT:=5000}" "${N_FID:=300}" "${REF_N:=2000}"
: "${SEEDS:=0 1 2}"
for v in STEPS FT_STEPS N_EXTRACT N_FID REF_N; do  # a typo stops here, not as a silent 0 in $((...))
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "error: $v=${!v} is not a whole number" >&2; exit 2; }
done
read -r -a SEEDS <<< "$SEEDS"
read -r -a MODEL <<< "$MODEL"
mkdir -p "$OUT"
: > "$OUT/timings.md"
rm -f "$OUT/results.md"

step() {  # step NAME COMMAND...: run it, time it, stop at the first failure
  local name=$1 t0=$SECONDS
  shift
  echo "== $name: $*"
  "$@" || { echo "== FAILED at step '$name' (exit $?): see the message above; re-run to resume"; exit 1; }
  echo "| $name | $((SECONDS - t0)) |" >> "$OUT/timings.md"
}
FT=($PY oar.py finetune --out "$OUT" --steps "$FT_STEPS" "${BATCH[@]}" "${EVAL[@]}" --resume)
EVALUATE=($PY oar.py eval --out "$OUT" --n "$N_FID" --seeds "${SEEDS[@]}" --ref-n "$REF_N" "${EVAL[@]}")

[ -f "$OUT/tokens.pt" ] || step tokenize $PY oar.py tokenize --out "$OUT" "${FIT[@]}" "${TOKENIZE[@]}"
# the raster baseline gets the any-order model's budget plus fine-tuning's: the same number of steps
step "train raster" $PY oar.py train --out "$OUT" --order raster --steps $((STEPS + FT_STEPS)) "${MODEL[@]}" \
  "${BATCH[@]}" "${EVAL[@]}" --resume
RUNS=("$OUT/raster.pt:raster")
for next_pos in "${ENCODINGS[@]}"; do
  s=$([ "$next_pos" = relative ] || echo _abs)  # file suffix: none for the paper's encoding
  step "train any-order$s" $PY oar.py train --out "$OUT" --order any --steps "$STEPS" --next-pos "$next_pos" \
    "${MODEL[@]}" "${BATCH[@]}" "${EVAL[@]}" --ckpt "$OUT/any$s.pt" --resume
  step "extract$s" $PY oar.py extract --out "$OUT" --count "$N_EXTRACT" "${EVAL[@]}" "${XBATCH[@]}" \
    --ckpt "$OUT/any$s.pt" --orders "$OUT/orders$s.pt"
  # three fine-tunings of any.pt on the same orders: the paper's (no position head); ours, with a position
  # head (oar.pt); and random orders only, the any-order baseline at the same budget
  FILES=(--init "$OUT/any$s.pt" --orders "$OUT/orders$s.pt")
  step "finetune (the paper's)$s" "${FT[@]}" "${FILES[@]}" --pos-head none --ckpt "$OUT/oar_paper$s.pt"
  step "finetune (position head)$s" "${FT[@]}" "${FILES[@]}" --ckpt "$OUT/oar$s.pt"
  step "finetune (random orders)$s" "${FT[@]}" "${FILES[@]}" --pos-head none --mix 1 --ckpt "$OUT/any_ft$s.pt"
  # CKPT:oar:self, the paper's rule: the model's own confidence picks; CKPT:oar:head, ours: its position head
  RUNS+=("$OUT/any_ft$s.pt:random" "$OUT/oar_paper$s.pt:oar:self" "$OUT/oar$s.pt:oar:head")
done
step "sample (pictures)" bash -c "set -e; for run in raster:raster any_ft:random oar:oar oar_paper:oar; do
    $PY oar.py sample --out '$OUT' --ckpt '$OUT'/\${run%:*}.pt --order \${run#*:} --n 64; done"
step "eval" "${EVALUATE[@]}" $([ "$PART" = gpu ] && echo --recon --batch-size 1000) "${RUNS[@]}"

if [ "$PART" = all ]; then
  step "finetune (mix 0.25)" "${FT[@]}" --pos-head none --mix 0.25 --ckpt "$OUT/oar_mix.pt"
  step "train class-conditional" $PY oar.py train --out "$OUT" --order any --classes --ckpt "$OUT/any_cond.pt" \
    --steps "$STEPS" "${MODEL[@]}" "${EVAL[@]}" --resume
  step "sample and inpaint (pictures, v2)" bash -c "set -e
    $PY oar.py sample --out '$OUT' --ckpt '$OUT/any_cond.pt' --order oar --n 60 --cfg 2
    for mask in centre outside; do $PY oar.py inpaint --out '$OUT' --mask \$mask; done"
  step "eval (mix; classes, guidance 1 and 2)" bash -c "set -e
    ${EVALUATE[*]} '$OUT/oar_mix.pt:oar:self'
    for cfg in 1 2; do ${EVALUATE[*]} --cfg \$cfg '$OUT/any_cond.pt:random' '$OUT/any_cond.pt:oar'; done"
fi

{
  echo
  echo "$N_FID samples per row and seed (seeds ${SEEDS[*]}); FID and KID against the Inception features of"
  echo "$([ "$REF_N" = 0 ] && echo all || echo the first "$REF_N") Fashion-MNIST test images; any-order $STEPS steps,"
  echo "fine-tuning $FT_STEPS, raster $((STEPS + FT_STEPS)); held-out bits/token under each model's own orders."
  echo
  echo "| step | wall seconds |"
  echo "|---|---|"
  cat "$OUT/timings.md"
  echo "| all of the above | $SECONDS |"
  echo
  echo "machine: $(nproc) CPU cores, $(uname -m), torch $($PY -c 'import torch; print(torch.__version__)'), $(date -u +%F)"
} >> "$OUT/results.md"
cat "$OUT/results.md"
echo "results: $OUT/results.md; pictures: $OUT/*.png $OUT/*.gif"
