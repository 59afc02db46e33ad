"""The static report's reading of compiled loops (bench/static_report.py), on hand-made listings."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import static_report as sr  # noqa: E402


def loop(elements, steady, loads=("LDG.E.128",), mma=0):
    return sr.Loop(instructions=steady, steady=steady, mufu=0, steady_mufu=0, loads={o: 1 for o in loads},
                   elements=elements, mma=mma)


def test_an_unrolled_loop_keeps_its_leftover_loop_off_the_sweeps():
    main, leftover, second_sweep = loop(24, 300), loop(8, 115), loop(4, 80, loads=("LDG.E.64",))
    folded = sr.fold_unroll_remainders([main, leftover, second_sweep])
    assert folded == [main, second_sweep]
    assert main.remainder is leftover
    assert sr._per_element(main) == (300 / 24, 0.0)


def test_loops_that_are_not_unroll_leftovers_stay():
    # Different loads, a larger second loop, a fraction that is not whole, and tensor-core loops.
    cases = [
        [loop(8, 100), loop(8, 90)],
        [loop(8, 100), loop(24, 290)],
        [loop(12, 100), loop(8, 90)],
        [loop(8, 100), loop(4, 60, loads=("LDG.E.64",))],
        [loop(2, 60, mma=2), loop(1, 50, mma=2)],
    ]
    for loops in cases:
        assert sr.fold_unroll_remainders(list(loops)) == loops
    # A leftover is folded once: a third, smaller loop after it is its own.
    a, b, c = loop(24, 300), loop(8, 110), loop(4, 70)
    assert sr.fold_unroll_remainders([a, b, c]) == [a, c]


def test_sass_loops_are_found_by_their_backward_branch():
    text = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;",
        "        /*0020*/                   FMUL R5, R4, R4 ;",
        "        /*0030*/                   MUFU.EX2 R6, R5 ;",
        "        /*0040*/               @P0 BRA 0x60 ;",
        "        /*0050*/                   FADD R7, R6, R6 ;",
        "        /*0060*/               @!P1 BRA 0x10 ;",
        "        /*0070*/                   EXIT ;",
    ])
    listing = sr.parse_sass(text)
    (found,) = sr.hot_loops(listing, element_bytes=2)
    assert found.elements == 8  # one 16-byte load of 2-byte elements
    assert found.instructions == 6 and found.steady == 5  # the FADD a forward branch skips is off the steady path
    assert found.steady_mufu == 1


def test_two_row_loops_are_counted_per_vocabulary_position():
    # A distillation loop loads a student's and a teacher's value per position: two 16-byte fp32
    # loads cover 4 positions, not 8; a single-row loop beside it keeps its count.
    both, one = loop(8, 140, loads=("LDG.E.128", "LDG.E.128")), loop(4, 60)
    counted = sr.per_position([both, one], (2, 1), "kernel")
    assert [c.elements for c in counted] == [4, 4]
    assert sr._per_element(counted[0]) == (35.0, 0.0)
    assert [c.elements for c in sr.per_position([both, one], 1, "kernel")] == [8, 4]
    with pytest.raises(ValueError, match=r"^kernel: rows given for 3 hot loops, the code has 2"):
        sr.per_position([both, one], (2, 2, 1), "kernel")
