#!/bin/bash
# Family accuracy parts side by side on one GPU (research.compare), run from the repo root on the device.
# .kit/scripts/COMMIT (written by the caller) names the commit. Each part trains in its own copy of the prepared workdir.
# env: PARTS="name:TR1,TR2 name2:TR3,TR4:da=0"  W (workdir base)  LIM (seconds per part)  DATASET EPOCHS ITERS
#      EXTRA (more compare options, e.g. "--time-limit 480", then "--time-limit 480 --continue" in the next call)
# Since 2026-12-03 (after the shapes runs) it packs what it wrote into $OUT/parts.tgz: the device tool
# returns at most eight files per call.
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
W=${W:-/tmp/fam_demo}; LIM=${LIM:-540}
S="--dataset ${DATASET:-demo} --epochs ${EPOCHS:-10} --iterations ${ITERS:-50} --baseline-compile --final-only ${EXTRA:-}"
{ date -u; cat .kit/scripts/COMMIT; nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"; echo "PARTS=$PARTS"; echo "S=$S LIM=$LIM"
  echo "nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-default}"; } > $OUT/env_$$.txt 2>&1
t0=$(date +%s)
python3 -m nnunetv2_mobilevim.research.compare $S --workdir $W --prepare-only > $OUT/prep_$$.txt 2>&1 || { tail -30 $OUT/prep_$$.txt; exit 1; }
echo "prepare $(( $(date +%s) - t0 )) s"
n=$(echo $PARTS | wc -w); shared=""; [ "$n" -gt 1 ] && shared=--shared-gpu
for p in $PARTS; do
  name=${p%%:*}; trs=${p#*:}; trs=${trs//,/ }
  [ -d $W.$name ] || cp -r $W $W.$name
  ( s=$(date +%s); timeout $LIM python3 -m nnunetv2_mobilevim.research.compare $S $shared --workdir $W.$name \
      --trainers $trs --out $OUT/$name.json > $OUT/$name.txt 2>&1; echo "part $name rc=$? wall $(( $(date +%s) - s )) s" ) &
done
wait
for p in $PARTS; do grep "^\[compare\].*\(Dice\|out of time\)" $OUT/${p%%:*}.txt; done
echo "total $(( $(date +%s) - t0 )) s"
(cd $OUT && tar czf parts.tgz --remove-files $(ls | grep -v '^parts.tgz$'))
