"""Evaluation sets built by bts.compare."""

from __future__ import annotations

import numpy as np

from bts.compare import switch_rows


def test_switch_rows_join_one_domain_to_the_next_at_the_middle():
    held = {d: np.arange(6 * 8).reshape(6, 8) + 1000 * k for k, d in enumerate("abc")}
    rows = switch_rows(held, 7)
    assert rows.shape == (7, 8)
    for i, row in enumerate(rows):
        first, second = i % 3, (i + 1) % 3
        assert (row[:4] // 1000 == first).all() and (row[4:] // 1000 == second).all()
        k = i // 3  # distinct held-out rows: row k of the first domain, row k + 1 of the second
        assert np.array_equal(row[:4], held["abc"[first]][k, :4])
        assert np.array_equal(row[4:], held["abc"[second]][k + 1, 4:])
    assert len({r.tobytes() for r in rows}) == len(rows)
