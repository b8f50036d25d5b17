"""Benchmark presets (YAML), installed as ``specdec.configs``; read them with :mod:`specdec.presets`."""
