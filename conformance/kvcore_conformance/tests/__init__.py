"""The suite as pytest collects it with ``pytest --pyargs kvcore_conformance --kv-backend NAME``."""
