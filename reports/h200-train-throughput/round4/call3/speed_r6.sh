#!/bin/bash
# Issue 32: kernel profile of the large model's training step (tokenising the mixture on a fresh machine
# takes part of the time), then the small model's throughput.
python3 -m pip install -q --no-index --no-deps --target /tmp/site .carry/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{ nvidia-smi; python3 -c 'import torch;print(torch.__version__)'; } > $OUT/gpu.txt 2>&1
date -u > $OUT/times.txt
timeout 330 python3 benchmarks/train_profile.py --model large --batch 64 --data-root .carry --top 25 \
  > $OUT/profile_large.txt 2>&1; echo "profile rc $?" >> $OUT/times.txt; date -u >> $OUT/times.txt
tail -45 $OUT/profile_large.txt
timeout 150 python3 benchmarks/train_throughput.py --models small --batches 64 --loss-kernels torch \
  --steps 16 --log-every 4 --data-root .carry --out $OUT/bench_train_small.json > $OUT/small.txt 2>&1
echo "small rc $?" >> $OUT/times.txt; date -u >> $OUT/times.txt; tail -8 $OUT/small.txt
