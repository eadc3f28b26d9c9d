#!/usr/bin/env bash
# The paper's comparison on Fashion-MNIST, end to end: tokenize, train the raster baseline and the any-order
# model, extract an order per training image, fine-tune on those orders (the paper's way; ours, with a position
# head; and on random orders only, the any-order baseline at the same budget), draw pictures, and measure FID,
# KID, precision, recall, mean jump, order diversity, held-out bits per token and sampling speed for each
# position rule. Writes OUT/results.md (the table and the wall time of every step),
# OUT/summary.md, sample grids, order maps and GIFs. Re-running resumes: finished checkpoints and orders are kept.
#
#   bash train.sh                # the comparison (about 26 minutes on 2 CPU cores) -> out/results.md
#   PART=all bash train.sh       # then the other position rules (the extractor's; the paper's after fine-tuning
#                                # with a share MIX of random orders) and the v2 steps: classes with guidance,
#                                # local orders, a second round, inpainting
#   PART=v2 bash train.sh        # only the v2 steps, on a finished comparison in OUT
#   QUICK=1 bash train.sh        # every step (PART=all) at tiny sizes, in about 4 minutes: the tests run this
#   OUT=elsewhere bash train.sh  # another output folder
#
# Sizes, from the environment: STEPS (any-order training steps), FT_STEPS (fine-tuning steps; the raster model
# trains STEPS + FT_STEPS, the same budget), N_EXTRACT (training images whose order is extracted), N_FID (samples
# per row and seed), REF_N (real test images behind FID and KID; 0 = all 10,000), SEEDS (sampling seeds), MIX (the
# share of random orders in the mixed fine-tuning), MODEL
# (the model's train flags, e.g. MODEL="--n-layer 6 --n-head 6 --n-embd 192"; default 4 x 128, 0.89M parameters).
# A budget of docs/orders.md, section 5: STEPS=9000 FT_STEPS=3000 N_FID=1000 REF_N=0 SEEDS=0 OUT=out_long bash train.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
export PYTHONWARNINGS=ignore

if [ "${QUICK:-0}" = 1 ]; then
  OUT=${OUT:-out_quick}; PART=${PART:-all}
  : "${MODEL:=--n-layer 1 --n-head 2 --n-embd 32}"; FIT=(--fit-images 5000)
  : "${STEPS:=60}" "${FT_STEPS:=30}" "${N_EXTRACT:=256}" "${N_FID:=16}" "${REF_N:=64}" "${SEEDS:=0 1}" "${EVAL_N:=256}" "${MIX:=0.25}"
else
  OUT=${OUT:-out}; PART=${PART:-core}
  : "${MODEL:=}"; FIT=()
  : "${STEPS:=2000}" "${FT_STEPS:=700}" "${N_EXTRACT:=5000}" "${N_FID:=300}" "${REF_N:=2000}" "${SEEDS:=0 1 2}" "${EVAL_N:=1000}" "${MIX:=0.25}"
fi
for v in STEPS FT_STEPS N_EXTRACT N_FID REF_N EVAL_N; do  # a typo ends here, in one line, before any work
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "error: $v=${!v} is not a whole number" >&2; exit 2; }
done
[[ $MIX =~ ^(0(\.[0-9]+)?|1(\.0*)?|\.[0-9]+)$ ]] || { echo "error: MIX=$MIX is not a share between 0 and 1" >&2; exit 2; }
[[ $SEEDS =~ ^[0-9]+( +[0-9]+)*$ ]] || { echo "error: SEEDS=\"$SEEDS\" is not a list of whole numbers" >&2; exit 2; }
read -r -a SEEDS <<< "$SEEDS"
read -r -a MODEL <<< "$MODEL"
REF=(--ref-n "$REF_N")
mkdir -p "$OUT"
# one pipeline per folder: a second one started by mistake stops here; the lock ends with the process, however it ends
exec 9>>"$OUT/train.sh.lock"
flock -n 9 || { echo "error: another train.sh is running in $OUT (process $(cat "$OUT/train.sh.lock")): wait for it, or use another OUT" >&2; exit 2; }
echo $$ > "$OUT/train.sh.lock"
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
step "train any-order" $PY oar.py train --out "$OUT" --order random --steps $STEPS "${MODEL[@]}" --eval-n $EVAL_N --resume
step extract $PY oar.py extract --out "$OUT" --count $N_EXTRACT --eval-n $EVAL_N
# three fine-tunings of any.pt, FT_STEPS each, on the same extracted orders: the paper's (no position head); ours,
# with a position head (the finetune defaults: oar.pt, sampled by its head, one model); and random orders only, so
# that the any-order baseline gets the fine-tuned models' budget, STEPS + FT_STEPS, from the same start and schedule
step "finetune (the paper's)" $PY oar.py finetune --out "$OUT" --steps $FT_STEPS --pos-head none --ckpt "$OUT/oar_paper.pt" --resume
step "finetune (position head)" $PY oar.py finetune --out "$OUT" --steps $FT_STEPS --resume
step "finetune (random orders)" $PY oar.py finetune --out "$OUT" --steps $FT_STEPS --pos-head none --mix 1 --ckpt "$OUT/any_ft.pt" --resume
step "sample (pictures)" bash -c "for run in raster:raster:auto any_ft:random:auto oar:oar:head oar_paper:oar:self; do
    IFS=: read -r ckpt order positions <<< \$run
    $PY oar.py sample --out '$OUT' --ckpt '$OUT'/\$ckpt.pt --order \$order --positions \$positions --n 64 || exit 1; done"
rm -f "$OUT/results.md" "$OUT/results.json" "$OUT/summary.md"
# CKPT:oar:POSITIONS: who picks the positions. self: the model's own confidence (the paper's rule); head: the
# model's position head (ours, one model). (The tokenizer's reconstructions, the floor, are left out: add --recon.)
step "eval (FID, KID, precision, recall)" $PY oar.py eval --out "$OUT" --n $N_FID --seeds "${SEEDS[@]}" --eval-n $EVAL_N "${REF[@]}" \
  "$OUT/raster.pt:raster" "$OUT/any_ft.pt:random" "$OUT/oar_paper.pt:oar:self" "$OUT/oar.pt:oar:head"
fi

if [ "$PART" != core ]; then
EVAL=($PY oar.py eval --out "$OUT" --n $N_FID --seeds "${SEEDS[@]}" --eval-n $EVAL_N "${REF[@]}")
# the other position rules, ours: the paper's fine-tuning with a share MIX of random orders (does it rescue the
# paper's own rule?), and the extractor's rule (any.pt's confidence with extraction's --lam picks, the fine-tuned
# model draws the tokens: two models)
step "finetune (mix $MIX)" $PY oar.py finetune --out "$OUT" --steps $FT_STEPS --pos-head none --mix $MIX --ckpt "$OUT/oar_mix.pt" --resume
step "eval (FID, the other position rules)" "${EVAL[@]}" "$OUT/oar_mix.pt:oar:self" "$OUT/oar_paper.pt:oar:extractor"
step "train class-conditional" $PY oar.py train --out "$OUT" --order random --classes --ckpt "$OUT/any_cond.pt" \
  --steps $STEPS "${MODEL[@]}" --eval-n $EVAL_N --resume
step "train local" $PY oar.py train --out "$OUT" --order local --steps $STEPS "${MODEL[@]}" --eval-n $EVAL_N --resume
step "distill round 2" $PY oar.py distill --out "$OUT" --rounds 2 --count $N_EXTRACT --steps $FT_STEPS --eval-n $EVAL_N --resume
step "sample (pictures, v2)" bash -c "for cfg in 1 2; do
    $PY oar.py sample --out '$OUT' --ckpt '$OUT/any_cond.pt' --order oar --n 60 --cfg \$cfg || exit 1; done
  $PY oar.py sample --out '$OUT' --ckpt '$OUT/oar_paper.pt' --order oar --positions extractor --n 64 &&
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
  echo "FID and KID of $N_FID samples per row and seed (seeds ${SEEDS[*]}) against the Inception features of"
  echo "$([ "$REF_N" = 0 ] && echo all || echo the first $REF_N) Fashion-MNIST test images; any-order $STEPS steps, fine-tuning $FT_STEPS, raster $((STEPS + FT_STEPS));"
  echo "held-out bits/token under the order each model was trained on (raster, random, extracted)."
  echo
  cat "$OUT/summary.md"
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
