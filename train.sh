#!/usr/bin/env bash
# The whole OAR pipeline on Fashion-MNIST, end to end: tokenize, train the raster baseline and the any-order
# model, extract an order per training image, fine-tune on those orders, sample, and measure FID, mean jump
# and held-out bits per token. Writes OUT/results.md (the table, the wall time of every step), sample grids,
# order maps and GIFs. Re-running resumes: finished checkpoints and orders are kept.
# Then the v2 steps (beyond the paper's first version): a class-conditional model with guidance, training on
# local random orders, a second round of extract + fine-tune, and inpainting, each measured the same way.
#
#   bash train.sh                # the full run (about 72 minutes on 2 CPU cores; PART=core about 31)
#   QUICK=1 bash train.sh        # the same steps with tiny sizes, a few minutes (the tests run this)
#   OUT=elsewhere bash train.sh  # another output folder
#   PART=core|v2 bash train.sh   # only the paper's pipeline, or only the v2 steps (on a finished core run)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
export PYTHONWARNINGS=ignore

if [ "${QUICK:-0}" = 1 ]; then
  OUT=${OUT:-out_quick}
  MODEL=(--n-layer 1 --n-head 2 --n-embd 32)
  STEPS=60; FT_STEPS=30; N_EXTRACT=256; N_FID=64; EVAL_N=256; FIT=(--fit-images 5000); REF=(--ref-n 256)
else
  OUT=${OUT:-out}
  MODEL=()
  STEPS=3000; FT_STEPS=1000; N_EXTRACT=5000; N_FID=1000; EVAL_N=1000; FIT=(); REF=()
fi
SEEDS=(0 1 2)
PART=${PART:-all}
mkdir -p "$OUT"
: > "$OUT/timings.md"

step() {  # step NAME COMMAND...: run it, time it, stop the pipeline at the first failure
  local name=$1 t0=$SECONDS
  shift
  echo "== $name: $*"
  "$@" || { echo "== FAILED at step '$name' (exit $?): see the message above; re-run to resume"; exit 1; }
  echo "== $name took $((SECONDS - t0)) s"
  echo "| $name | $((SECONDS - t0)) |" >> "$OUT/timings.md"
}

if [ "$PART" != v2 ]; then
if [ ! -f "$OUT/tokens.pt" ]; then step tokenize $PY oar.py tokenize --out "$OUT" "${FIT[@]}"; fi
# the raster baseline gets the any-order model's budget plus fine-tuning's: the same number of steps in all
step "train raster" $PY oar.py train --out "$OUT" --order raster --steps $((STEPS + FT_STEPS)) "${MODEL[@]}" --eval-n $EVAL_N --resume
step "train any-order" $PY oar.py train --out "$OUT" --order any --steps $STEPS "${MODEL[@]}" --eval-n $EVAL_N --resume
step extract $PY oar.py extract --out "$OUT" --n $N_EXTRACT --eval-n $EVAL_N
step finetune $PY oar.py finetune --out "$OUT" --steps $FT_STEPS --resume
step "sample (pictures)" bash -c "for run in raster:raster any:random any:oar oar:oar; do
    $PY oar.py sample --out '$OUT' --ckpt '$OUT'/\${run%%:*}.pt --order \${run##*:} --n 64 || exit 1; done"
rm -f "$OUT/results.md" "$OUT/results.json" "$OUT/summary.md"
# oar.pt:oar samples along its extractor's rule (any.pt's confidence, extraction's --lam): the default
step "eval (FID, KID)" $PY oar.py eval --out "$OUT" --n $N_FID --seeds "${SEEDS[@]}" --recon --eval-n $EVAL_N "${REF[@]}" \
  "$OUT/raster.pt:raster" "$OUT/any.pt:random" "$OUT/any.pt:oar" "$OUT/oar.pt:oar"
fi

if [ "$PART" != core ]; then
EVAL=($PY oar.py eval --out "$OUT" --n $N_FID --seeds "${SEEDS[@]}" --eval-n $EVAL_N "${REF[@]}")
step "train class-conditional" $PY oar.py train --out "$OUT" --order any --classes --ckpt "$OUT/any_cond.pt" \
  --steps $STEPS "${MODEL[@]}" --eval-n $EVAL_N --resume
step "train local" $PY oar.py train --out "$OUT" --order local --steps $STEPS "${MODEL[@]}" --eval-n $EVAL_N --resume
step "distill round 2" $PY oar.py distill --out "$OUT" --rounds 2 --n $N_EXTRACT --steps $FT_STEPS --eval-n $EVAL_N --resume
step "sample (pictures, v2)" bash -c "for cfg in 1 2; do
    $PY oar.py sample --out '$OUT' --ckpt '$OUT/any_cond.pt' --order oar --n 60 --cfg \$cfg || exit 1; done
  $PY oar.py sample --out '$OUT' --ckpt '$OUT/local.pt' --order oar --n 64 &&
  $PY oar.py sample --out '$OUT' --ckpt '$OUT/oar_r2.pt' --order oar --n 64 &&
  $PY oar.py inpaint --out '$OUT' --mask outside --n 8 && $PY oar.py inpaint --out '$OUT' --mask top --n 8"
step "inpaint (FID)" $PY oar.py inpaint --out "$OUT" --mask centre --n $N_FID --fid "${REF[@]}"
step "eval (FID, conditional, guidance 1)" "${EVAL[@]}" --cfg 1 "$OUT/any_cond.pt:random" "$OUT/any_cond.pt:oar"
step "eval (FID, conditional, guidance 2)" "${EVAL[@]}" --cfg 2 "$OUT/any_cond.pt:random" "$OUT/any_cond.pt:oar"
step "eval (FID, local, round 2)" "${EVAL[@]}" "$OUT/local.pt:random" "$OUT/local.pt:oar" "$OUT/oar_r2.pt:oar"
fi

{
  echo
  echo "FID and KID of $N_FID samples per row against the Fashion-MNIST test images (seeds ${SEEDS[*]});"
  echo "held-out bits/token under the order each model was trained on (raster, random, extracted)."
  echo
  cat "$OUT/summary.md"
  echo
  echo "| step | wall seconds |"
  echo "|---|---|"
  cat "$OUT/timings.md"
  echo
  echo "machine: $(nproc) CPU cores, $(uname -m), torch $($PY -c 'import torch; print(torch.__version__)'), $(date -u +%F)"
} >> "$OUT/results.md"
cat "$OUT/results.md"
echo "results: $OUT/results.md; pictures: $OUT/*.png $OUT/*.gif"
