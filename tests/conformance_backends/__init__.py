"""Backends that exist to test the conformance suite itself.

``refbits`` is a small, correct backend written the way a third party would write
one: against the documented contract only.  ``broken`` holds deliberately broken
variants of the numpy backend, one defect each, that the suite must catch.
"""
