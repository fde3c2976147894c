"""fire-defense benchmark: FIRE and the other runtime defenses on backdoored-model records.

Installed under the import name ``fire_bench`` (the repository folder is ``benchmarks/``).
It composes ``fire_defense`` (the method) and ``fire_adapters`` (records, datasets, models);
nothing imports from it. ``benchmarks/latency/`` holds the pytest-benchmark latency files.
"""
