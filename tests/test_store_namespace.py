"""Store namespaces: every layout field, the model and the deployment separate blocks;
pool sizes and policies do not; keys carry nothing in clear but the deployment name."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

import kvcore
from kvcore.errors import StoreKeyError
from kvcore.stores import (LAYOUT_FIELDS, NON_LAYOUT_FIELDS, ArraySpec, StoreNamespace,
                           block_layout, layout_document, layout_fingerprint)

BASE = dict(num_layers=2, num_kv_heads=4, head_dim=8, dtype="float16", block_size=16,
            num_blocks=64)


def cfg(**changes) -> kvcore.CacheConfig:
    return kvcore.CacheConfig(**{**BASE, **changes})


def test_every_cache_config_field_is_classified():
    # A field added to CacheConfig must be listed as layout (it changes what a block's
    # bytes mean) or as not layout; this fails until someone decides which.
    fields = set(kvcore.CacheConfig.model_fields)
    unclassified = fields - set(LAYOUT_FIELDS) - set(NON_LAYOUT_FIELDS)
    assert not unclassified, f"classify in kvcore/stores/_namespace.py: {sorted(unclassified)}"
    assert not set(LAYOUT_FIELDS) & set(NON_LAYOUT_FIELDS)


@pytest.mark.parametrize("field, value", [
    ("num_layers", 3), ("num_kv_heads", 2), ("head_dim", 16), ("dtype", "float32"),
    ("dtype", "bfloat16"), ("block_size", 32),
])
def test_each_layout_field_changes_the_fingerprint(field, value):
    assert layout_fingerprint(cfg(**{field: value})) != layout_fingerprint(cfg())


@pytest.mark.parametrize("field, value", [
    ("num_blocks", 999), ("device", "cpu"), ("enable_prefix_caching", False),
    ("swap_blocks", 8), ("pressure_medium", 0.5), ("hash_seed", 7),
])
def test_pool_sizes_and_policies_do_not(field, value):
    assert layout_fingerprint(cfg(**{field: value})) == layout_fingerprint(cfg())


def test_model_and_namespace_separate_deployments():
    prints = {layout_fingerprint(cfg()),
              layout_fingerprint(cfg(), model_id="llama-3-8b"),
              layout_fingerprint(cfg(), model_id="llama-3-8b@lora-1"),
              layout_fingerprint(cfg(), namespace="tenant-a"),
              layout_fingerprint(cfg(), model_id="llama-3-8b", namespace="tenant-a")}
    assert len(prints) == 5


def test_the_fingerprint_is_the_documented_digest_and_stays_put():
    layout = {"num_layers": 2, "num_kv_heads": 4, "head_dim": 8, "dtype": "float16",
              "block_size": 16}
    assert layout_document(cfg()) == layout
    text = json.dumps({"format": "kvc1", "layout": layout, "model": None,
                       "namespace": "default"}, sort_keys=True, separators=(",", ":"))
    expected = hashlib.blake2b(text.encode(), digest_size=16, person=b"kvcore.ns.v1").digest()
    assert layout_fingerprint(cfg()) == expected == StoreNamespace.from_config(cfg()).fingerprint
    # Pinned: a silent change would orphan every stored block of every deployment.
    assert expected.hex() == "3bd09a950f6a45fafeb654b49610c6c2"


def test_an_optional_layout_field_left_at_none_is_left_out():
    class WithCodec:
        def __init__(self, codec):
            for k, v in BASE.items():
                setattr(self, k, v)
            self.kv_codec = codec

    import kvcore.stores._namespace as ns
    fields = ns.LAYOUT_FIELDS
    try:
        ns.LAYOUT_FIELDS = fields + ("kv_codec",)
        assert layout_fingerprint(WithCodec(None)) == layout_fingerprint(cfg())
        assert layout_fingerprint(WithCodec("fp8")) != layout_fingerprint(cfg())
    finally:
        ns.LAYOUT_FIELDS = fields


def test_keys_are_prefix_plus_hex_digest_and_nothing_else():
    ns = StoreNamespace.from_config(cfg(), model_id="secret-model-name", namespace="prod-eu")
    digest = bytes(range(16))
    key = ns.key(digest)
    assert key == f"kvc1.prod-eu.{ns.fingerprint.hex()}.{digest.hex()}"
    assert "secret" not in key and key.startswith(ns.prefix)
    assert ns.keys([digest, bytes(16)]) == [key, ns.prefix + "00" * 16]


@pytest.mark.parametrize("name", ["", "a.b", "a b", "x" * 65, "é", None, 7])
def test_bad_namespace_names_are_refused(name):
    with pytest.raises(StoreKeyError, match="namespace must be"):
        StoreNamespace.from_config(cfg(), namespace=name)


def test_bad_digests_and_fingerprints_are_refused():
    ns = StoreNamespace.from_config(cfg())
    for bad in (b"short", bytes(65), "00" * 16, None):
        with pytest.raises(StoreKeyError, match="digest"):
            ns.key(bad)
    with pytest.raises(StoreKeyError, match="fingerprint must be 16 bytes"):
        StoreNamespace(b"x")
    with pytest.raises(StoreKeyError, match="model_id"):
        StoreNamespace.from_config(cfg(), model_id=3)
    with pytest.raises(StoreKeyError, match="has no num_layers"):
        layout_fingerprint(object())


@pytest.mark.parametrize("dtype, host, label", [("float16", np.float16, "float16"),
                                                ("float32", np.float32, "float32"),
                                                ("bfloat16", np.uint16, "bfloat16")])
def test_block_layout_is_one_kv_array_per_layer(dtype, host, label):
    specs = block_layout(cfg(dtype=dtype, num_layers=3))
    assert specs == [ArraySpec((2, 16, 4, 8), np.dtype(host), label)] * 3
