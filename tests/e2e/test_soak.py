"""Issue 12 item 10: the soak's core, very short (one kill, one hand edit, a few racing admin writes).

The full soak is bench/soak.py; this runs the same code for about 20 s of traffic and asserts
its invariants: no lost admin update or hand edit, no process left, no failure a kill does
not explain, the killed worker back, and a clean exit. The in-place edit writes the new text
right after truncating (`edit_pause=0`, as `cat >` does): the bench's 30 ms empty moment hits
the zero-byte bug of issue 15 (case 4) now and then (docs/benchmarks.md), which would make this
test fail at random until that is fixed; the bench keeps showing it.
"""

from __future__ import annotations

import pytest

from bench.soak import SoakOptions, run

pytestmark = pytest.mark.e2e


def test_short_soak_keeps_every_invariant(tiny_model, tiny_model_b):
    opts = SoakOptions(minutes=0.3, streams=2, plain=1, writers=4, kills=1, edits=1, restart=False,
                       max_requests=2000, edit_pause=0.0)
    figures = run(opts, tiny_model, tiny_model_b)

    assert figures["violations"] == [], "\n".join(figures["violations"])
    # The soak really ran its faults and traffic (an idle soak would hold every invariant trivially).
    assert len(figures["kills"]) == 1 and figures["kills"][0]["new_pid"] not in (None, figures["kills"][0]["pid"])
    assert [e["kind"] for e in figures["edits"]] == ["in-place"] and figures["hand_edits_lost"] == []
    assert figures["admin_writes"]["acked"] >= 4 and figures["admin_writes"]["lost"] == 0
    assert figures["requests"]["ok"] >= 10
    assert figures["requests"]["failed_unattributed"] == 0
    assert figures["leftovers"] == [] and figures["exit_code"] == 0
