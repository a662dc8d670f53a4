#!/bin/bash
# Session 4, call C: planner vs the diffusers recipe under the equal-total rule.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/proto:$PWD/encoder_server:$PWD/client:$PWD PYTHONUNBUFFERED=1
date -u
timeout 570 python3 -m bench.lowvram --steps 5 --repeats 3 --budget-s 470 --configs resident:0:0,plan:8:0,leaf:8:0,leaf:8:0:es,leaf:8:0:lcmu,leaf:8:0:es+lcmu,plan:4:0,leaf:4:0:es --out $OUT/lowvram.json > $OUT/lowvram.log 2>&1
date -u
tail -30 $OUT/lowvram.log | cut -c1-300
cd $OUT && tar czf all.tgz --remove-files lowvram.json lowvram.log
