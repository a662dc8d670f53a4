#!/bin/bash
# Session 4, call B: Klein Qwen3-4B / 8B served vs diffusers' path, front-ends and --balance-batches.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/proto:$PWD/encoder_server:$PWD/client:$PWD PYTHONUNBUFFERED=1
COMMON="--precisions bf16 --served-seconds 8 --client-startup-s 6 --reps 3 --served-runs 3 --threads-per-process 4 --batches 32"
date -u
timeout 190 python3 -m bench.encoder_throughput --encoder qwen3-4b --sections reference,frontends $COMMON --frontends-list 4:32 0:32 --out $OUT/k4 > $OUT/k4.log 2>&1
date -u
timeout 130 python3 -m bench.encoder_throughput --encoder qwen3-4b --sections frontends $COMMON --balance-batches --frontends-list 0:32 4:32 --out $OUT/k4bal > $OUT/k4bal.log 2>&1
date -u
timeout 200 python3 -m bench.encoder_throughput --encoder qwen3-8b --sections reference,frontends $COMMON --frontends-list 4:32 0:32 --out $OUT/k8 > $OUT/k8.log 2>&1
date -u
grep -h "frontends=\|^\[.*reference " $OUT/*.log | cut -c1-260
cd $OUT && tar czf all.tgz --remove-files k4 k4bal k8 *.log
