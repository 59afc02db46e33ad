"""kernels/target.py: launch options per vendor (warps of 32 vs wavefronts of 64, maxnreg only for
NVIDIA), as the launchers and the compile gate use them."""

import pytest

pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402

from fastalign.kernels import target  # noqa: E402


@pytest.fixture
def forced():
    def force(t):
        target.forced = t

    yield force
    target.forced = None


def test_programs_keep_their_thread_count_on_either_vendor(forced):
    forced(GPUTarget("cuda", 90, 32))
    assert target.warps(512) == 16 and not target.is_amd()
    assert target.nvidia_options(maxnreg=128) == {"maxnreg": 128}
    forced(GPUTarget("hip", "gfx942", 64))
    assert target.warps(512) == 8 and target.is_amd()
    # AMD's compiler refuses maxnreg: it is never passed there.
    assert target.nvidia_options(maxnreg=128) == {}
    assert "gfx942" in target.describe()


def test_without_a_driver_no_vendor_option_is_passed(forced):
    forced(None)
    if target.current() is None:  # no GPU here: the interpreter's case
        assert target.nvidia_options(maxnreg=128) == {}
        assert target.warps(512) == 16
        assert "no GPU driver" in target.describe()
