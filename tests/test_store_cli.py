"""``kvcore stores``: the table, the JSON records, and ``--check URL``."""

from __future__ import annotations

import json

from kvcore._cli import main
from tests.redis_fixtures import redis_server  # noqa: F401


def test_stores_lists_built_in_and_redis_stores_with_availability(capsys):
    assert main(["stores"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split()[:5] == ["name", "available", "schemes", "distribution", "version"]
    cells = {r.split()[0]: r.split() for r in rows}
    assert cells["file"][1:4] == ["yes", "file://", "kvcore"]
    assert cells["redis"][1:4] == ["yes", "redis://,rediss://", "kvcore-redis"]
    assert cells["redis-cluster"][2] == "redis+cluster://,rediss+cluster://"


def test_stores_json_is_machine_readable(capsys):
    assert main(["stores", "--json", "--no-probe"]) == 0
    records = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert records["file"]["available"] is True and records["file"]["probed"] is False
    assert records["redis"]["schemes"] == ["redis", "rediss"]


def test_check_round_trips_a_value_and_reports_failures_without_secrets(capsys, tmp_path,
                                                                        redis_server):  # noqa: F811
    good = [f"file://{tmp_path}/s", redis_server.url]
    assert main(["stores", "--check", good[0], "--check", good[1]]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok (") == 2
    bad = "redis://:hunter2@127.0.0.1:1/0?connect_timeout=0.2"
    assert main(["stores", "--json", "--check", bad]) == 1
    (result,) = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and "Connection refused" in result["error"]
    assert "hunter2" not in json.dumps(result)


def test_check_of_an_unknown_scheme_fails_with_the_reason(capsys):
    assert main(["stores", "--check", "s3://bucket/x"]) == 1
    assert "no store opens s3:// URLs" in capsys.readouterr().out
