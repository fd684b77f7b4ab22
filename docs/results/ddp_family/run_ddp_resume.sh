#!/bin/bash
# Issue 17 item 6 on a machine with two GPUs: a family trainer other than MobileViM under `-num_gpus 2` on the
# brain set, killed once epoch 1 has started, continued with --c, then predicted. Run from the repository root
# on the GPU machine (mamba and nnU-Net kits installed); writes its logs into $OUT.
# env: TRAINER (default nnUNetTrainerUMambaBot)  EPOCHS (3)  ITERS (20)  W (work folder, /tmp/ddp)
# Written 2026-12-03 (session 10) and not run yet: no two-GPU machine was lent that session.
set -u
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
TR=${TRAINER:-nnUNetTrainerUMambaBot}; W=${W:-/tmp/ddp}; mkdir -p $W/ext
{ date -u; cat .kit/scripts/COMMIT 2>/dev/null; nvidia-smi --query-gpu=name --format=csv,noheader; echo "TRAINER=$TR"; } > $OUT/env.txt
python3 -m nnunetv2_mobilevim.research.compare --dataset demo --workdir $W --prepare-only > $OUT/prep.txt 2>&1 \
  || { tail -20 $OUT/prep.txt; exit 1; }
eval "$(python3 -c "
from nnunetv2_mobilevim.nnunet.run import folder_variables
for k, v in folder_variables('$W').items(): print(f'export {k}={v}')")"
export nnUNet_extTrainer=$nnUNet_extTrainer:$W/ext
# the trainer, shortened as a user would: EPOCHS x ITERS, found by nnU-Net under its own name + _ddp
cat > $W/ext/ddp_short.py <<PY
from nnunetv2_mobilevim.nnunet import taming_trainers, umamba_trainers

_base = getattr(umamba_trainers, "$TR", None) or getattr(taming_trainers, "$TR")


class ${TR}_ddp(_base):
    def __init__(self, plans, configuration, fold, dataset_json, device):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = ${EPOCHS:-3}, ${ITERS:-20}, 4
PY
ID=990; cmd="nnUNetv2_train $ID 3d_fullres 0 -tr ${TR}_ddp -num_gpus 2"
setsid $cmd > $OUT/run1_stopped.txt 2>&1 & pid=$!
for i in $(seq 1 400); do grep -qE "Epoch 1 ?$" $OUT/run1_stopped.txt && break; sleep 1; done
kill -9 -- -$pid; wait $pid 2>/dev/null; echo "stopped after $i s (epoch 1 started)"
$cmd --c > $OUT/run2_continued.txt 2>&1; echo "continued: rc=$?"
fold=$nnUNet_results/Dataset990_MobileViMDemo/${TR}_ddp__nnUNetPlans__3d_fullres/fold_0
python3 -c "import torch; c = torch.load('$fold/checkpoint_final.pth', map_location='cpu', weights_only=False); \
print('checkpoint_final: current_epoch', c['current_epoch'], 'train_losses', [round(x, 4) for x in c['logging']['train_losses']])"
grep -h "Epoch \|world size\|backend\|CUDA-graph\|Mean Validation Dice\|Training done" $OUT/run*.txt
nnUNetv2_predict -i $nnUNet_raw/Dataset990_MobileViMDemo/imagesTs -o $W/pred -d $ID -c 3d_fullres -tr ${TR}_ddp -f 0 \
  > $OUT/predict.txt 2>&1; echo "predict: rc=$? $(ls $W/pred/*.nii.gz 2>/dev/null | wc -l) files"
