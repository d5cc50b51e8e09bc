"""``kvcore bench -w memory``: KV bytes per token and tokens per GiB of three real
layouts and every codec, against transformers' DynamicCache (measured on tiny models)."""

from __future__ import annotations

import json

import pytest

from kvcore.bench import main
from kvcore.bench._memory import LAYOUTS, _blocks_held, measure_transformers


def test_transformers_formulas_match_its_cache_measured_on_tiny_models():
    rows = measure_transformers(new_tokens=12)
    assert {r["model"] for r in rows} == {"llama", "mistral", "deepseek_v2"}
    for r in rows:
        assert r["measured_bytes"] == r["formula_bytes"] > 0, r


def test_a_sliding_window_holds_its_window_plus_one_block():
    full, sliding, mla = LAYOUTS
    assert _blocks_held(sliding, 32768) == 4096 // 16 + 1
    assert _blocks_held(full, 1000) == _blocks_held(mla, 1000) == 63


def test_memory_workload_reports_every_layout_and_codec(capsys):
    assert main(["--quick", "--json", "-w", "memory", "-b", "numpy"]) == 0
    doc = json.loads(capsys.readouterr().out)
    [result] = doc["results"]
    figs = result["figures"]
    assert result["details"]["tokens"] == 32768
    assert all(m["measured_bytes"] == m["formula_bytes"]
               for m in result["details"]["transformers_measured"])
    # float16 full attention: exactly transformers' bytes (32 layers x 2 x 8 x 128 x 2 B).
    full = figs["full/float16 bytes_per_token"]
    assert full["value"] == full["baseline"] == 131072 and full["ratio"] == 1
    assert figs["full/float16 tokens_per_GiB"]["value"] == 8192
    for codec in ("float8_e4m3", "float8_e5m2", "int8"):
        # one byte per element plus a float32 scale per head, K and V
        assert figs[f"full/{codec} bytes_per_token"]["value"] == 32 * 2 * 8 * (128 + 4)
        assert figs[f"mla/{codec} bytes_per_token"]["ratio"] == pytest.approx((576 + 4) / 1152)
    sliding = figs["sliding/float16 bytes_per_token"]  # 257 blocks of 16 vs 4096 tokens
    assert sliding["ratio"] == pytest.approx(257 * 16 / 4096)
    assert sliding["value"] < full["value"] / 7
    assert "matched DynamicCache measured on tiny models" in sliding["baseline_label"]
