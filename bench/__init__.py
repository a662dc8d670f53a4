"""Benchmarks, run from the repository root as modules: `python -m bench.encoder_throughput --help`.

They import the packages as installed (`pip install -e '.[server,client,dev]'`) or from the source tree
(`PYTHONPATH=proto:encoder_server:client`), and embed servers through `flux2_encoder_server.testing`.
One-off scripts whose results are recorded in docs/benchmarks.md live in `archive/`, dated.
"""
