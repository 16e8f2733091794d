"""Fixtures shared by the test files."""

import pytest

from catprune.families import FAMILIES, load

#: every family record with every tiny variant of it: (record, variant)
FAMILY_CASES = [(r, variant) for r in FAMILIES for variant in load(r.tiny).variants]


@pytest.fixture(params=FAMILY_CASES, ids=[f"{r.name}-{v}" for r, v in FAMILY_CASES])
def case(request):
    """(tiny family builder, its tiny transformer, inputs of a batch of 2 on a non-square 4 x 6 token grid)."""
    record, variant = request.param
    tiny = load(record.tiny)()
    model = tiny.transformer(variant)
    return tiny, model, tiny.inputs(model, batch=2, height=8, width=12)
