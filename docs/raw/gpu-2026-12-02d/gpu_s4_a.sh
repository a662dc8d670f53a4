#!/bin/bash
# Session 4, call A: Mistral fp8/bf16 through front-end processes, warmed clients.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/proto:$PWD/encoder_server:$PWD/client:$PWD PYTHONUNBUFFERED=1
nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
COMMON="--sections frontends --served-seconds 8 --client-startup-s 6 --reps 3 --served-runs 3 --threads-per-process 4"
date -u
timeout 340 python3 -m bench.encoder_throughput $COMMON --serve-compiled --precisions fp8 --frontends-list 4:8,32,64 0:32 2:32 --out $OUT/fp8fe > $OUT/fp8fe.log 2>&1
date -u
timeout 170 python3 -m bench.encoder_throughput $COMMON --serve-compiled --precisions bf16 --frontends-list 4:32 0:32 --out $OUT/bf16fe > $OUT/bf16fe.log 2>&1
date -u
grep -h "frontends=" $OUT/*.log | cut -c1-260
cd $OUT && tar czf all.tgz --remove-files fp8fe bf16fe *.log
