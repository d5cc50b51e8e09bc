"""pydantic records: validation names the field, records are frozen and serialisable."""

from __future__ import annotations

from datetime import datetime, timezone

import pydantic
import pytest

from kvcore import (AllocationRequest, CacheConfig, CacheGcStats, CacheHandleStats,
                    CacheManagerStats, Device, DType, blocks_in_budget, bytes_per_token)

SHAPE = dict(num_layers=4, num_kv_heads=8, head_dim=128)


def test_cache_handle_stats_validates_ranges_naming_the_field():
    ok = CacheHandleStats(memory_bytes=10, blocks_allocated=1, tokens_stored=3, utilization=0.5)
    assert ok.last_access.tzinfo is not None
    with pytest.raises(pydantic.ValidationError, match="tokens_stored"):
        CacheHandleStats(memory_bytes=10, blocks_allocated=1, tokens_stored=-1, utilization=0.5)
    with pytest.raises(pydantic.ValidationError, match="utilization"):
        CacheHandleStats(memory_bytes=10, blocks_allocated=1, tokens_stored=1, utilization=1.5)


def test_records_are_frozen_and_reject_unknown_fields():
    s = CacheHandleStats(memory_bytes=1, blocks_allocated=1, tokens_stored=1, utilization=1)
    with pytest.raises(pydantic.ValidationError):
        s.tokens_stored = 5  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError, match="extra_field"):
        CacheHandleStats(memory_bytes=1, blocks_allocated=1, tokens_stored=1, utilization=1,
                         extra_field=2)


def test_stats_round_trip_through_json():
    s = CacheHandleStats(memory_bytes=1, blocks_allocated=1, tokens_stored=1, utilization=1,
                         last_access=datetime(2026, 1, 1, tzinfo=timezone.utc))
    assert CacheHandleStats.model_validate_json(s.model_dump_json()) == s
    g = CacheGcStats(blocks_freed=2, bytes_freed=64, duration_s=0.1)
    assert CacheGcStats.model_validate_json(g.model_dump_json()) == g


def test_manager_stats_refuse_blocks_that_do_not_add_up():
    with pytest.raises(pydantic.ValidationError, match="differs from total_blocks"):
        CacheManagerStats(total_blocks=10, free_blocks=5, cached_blocks=1, used_blocks=1,
                          block_size=16, memory_bytes=0, used_memory_bytes=0, active_caches=0)


def test_cache_config_parses_device_and_dtype_and_serialises_them_as_strings():
    cfg = CacheConfig(**SHAPE, num_blocks=8, dtype="bf16", device="cuda:1")
    assert cfg.device == Device("cuda", 1) and cfg.dtype is DType.bfloat16
    data = cfg.model_dump(mode="json")
    assert data["device"] == "cuda:1" and data["dtype"] == "bfloat16"
    assert CacheConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize("field, value", [("num_layers", 0), ("head_dim", -1), ("block_size", 0),
                                          ("num_blocks", 0), ("device", "TPU!"), ("dtype", "int16"),
                                          ("dtype", "uint8"),
                                          ("swap_blocks", -1), ("pressure_high", 1.5)])
def test_cache_config_errors_name_the_field(field, value):
    fields = dict(SHAPE, num_blocks=8)
    fields[field] = value
    with pytest.raises(pydantic.ValidationError, match=field):
        CacheConfig(**fields)


def test_pressure_thresholds_must_be_ordered():
    with pytest.raises(pydantic.ValidationError, match="pressure_medium <= pressure_high"):
        CacheConfig(**SHAPE, num_blocks=8, pressure_medium=0.9, pressure_high=0.8)


def test_sizing_helpers_agree_with_the_arithmetic():
    cfg = CacheConfig(**SHAPE, num_blocks=100, dtype="float16", block_size=16)
    assert cfg.bytes_per_token == 2 * 4 * 8 * 128 * 2 == bytes_per_token(4, 8, 128, "float16")
    assert cfg.bytes_per_block == cfg.bytes_per_token * 16
    assert cfg.total_bytes == cfg.bytes_per_block * 100
    assert cfg.max_tokens == 1600
    assert blocks_in_budget(cfg.bytes_per_block * 3 + 1, cfg.bytes_per_block) == 3


def test_config_from_memory_budget_fills_the_budget_with_whole_blocks():
    per_block = bytes_per_token(4, 8, 128, "float16") * 16
    cfg = CacheConfig.from_memory_budget(per_block * 10 + per_block // 2, **SHAPE)
    assert cfg.num_blocks == 10
    with pytest.raises(ValueError, match="smaller than one block"):
        CacheConfig.from_memory_budget(per_block - 1, **SHAPE)


def test_allocation_request_derives_num_tokens_from_the_prompt():
    assert AllocationRequest(request_id="a", prompt_token_ids=[1, 2, 3]).num_tokens == 3
    assert AllocationRequest(request_id="a").num_tokens == 0
    with pytest.raises(pydantic.ValidationError, match="differs from len"):
        AllocationRequest(request_id="a", num_tokens=2, prompt_token_ids=[1, 2, 3])
    with pytest.raises(pydantic.ValidationError, match="request_id"):
        AllocationRequest(request_id="")
    with pytest.raises(pydantic.ValidationError, match="num_tokens"):
        AllocationRequest(request_id="a", num_tokens=-3)
