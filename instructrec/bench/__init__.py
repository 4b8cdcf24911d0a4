"""Benchmarks of the ranker and of the /rerank service: ``instructrec bench ranker|service``.

* :mod:`instructrec.bench.ranker_bench` times one request (a real Games history, real Games titles as
  candidates) through every scoring variant of the same model in one run, with analytic
  FLOPs and the CPU's measured matmul peak.
* :mod:`instructrec.bench.service_bench` starts the service (or talks to one already running on
  loopback) and replays real Games requests with a bounded async load generator.
* :mod:`instructrec.bench.report` writes ``results.json``, ``results.md`` and PNG plots.

See ``instructrec/bench/README.md``.
"""
