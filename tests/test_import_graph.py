"""The core's modules import each other without a cycle, at run time and counting the
imports made only for type checking: each part can be read (and tested) on its own."""

from __future__ import annotations

import grimp
import pytest


def _cycles(graph: grimp.ImportGraph) -> list[tuple[str, str]]:
    """Every direct import a -> b such that b also reaches a."""
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            if importer != imported and graph.chain_exists(importer=imported,
                                                           imported=importer):
                found.append((importer, imported))
    return found


@pytest.mark.parametrize("type_checking", [False, True], ids=["runtime", "with-type-checking"])
def test_the_core_import_graph_has_no_cycle(type_checking: bool) -> None:
    graph = grimp.build_graph("kvcore", include_external_packages=False, cache_dir=None,
                              exclude_type_checking_imports=not type_checking)
    assert len(graph.modules) > 20  # the graph was really built
    assert _cycles(graph) == []


def test_the_manager_parts_do_not_import_the_manager() -> None:
    graph = grimp.build_graph("kvcore", include_external_packages=False, cache_dir=None)
    for part in ("kvcore._block_pool", "kvcore._prefix_index", "kvcore._sequence_table",
                 "kvcore._kv_store", "kvcore._swap", "kvcore._coordinator",
                 "kvcore._paged_handle", "kvcore._backend"):
        assert not graph.chain_exists(importer=part, imported="kvcore._manager"), part
