"""phibroker's benchmark suite: `make bench` (`python -m benchmarks`).

Every figure is measured in one run, against one private `redis-server`, beside the yardsticks it is
judged by (a bare redis-py streams round trip, RQ, Celery when installed), because this machine drifts
and only ratios taken side by side hold. Modules, one job each:

- `harness`: the private Redis, subprocess helpers, RSS, and the statistics every figure is printed with.
- `bare`: the bare redis-py streams round trip (batched, unbatched, chain hop), producer and consumer.
- `workloads`: phibroker workloads on real `phibroker coordinator` / `phibroker worker` processes.
- `compare`: the same no-op work through RQ and Celery.
- `validation`: loading and checking generated 100,000-task JSON and 10,000-task YAML workflows.
- `report`: the figures table, the targets table (ratio, MET/MISSED) and the JSON document.
"""
