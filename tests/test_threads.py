"""The CPU thread choice of the entry points (lib.common.choose_threads) and its record in a run.

choose_threads takes --threads, then OMP_NUM_THREADS, else one thread per core that other programs leave
free; busy_cores is replaced here by fixed readings, so the cases do not depend on this machine's load.
"""
import pytest
import torch

from lib import common


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# invariant: with nothing pinned, one thread per core at least half free, never fewer than one
@pytest.mark.parametrize("busy,expected", [(0.0, 4), (0.4, 4), (1.0, 3), (2.6, 1), (3.9, 1), (7.5, 1)])
def test_one_thread_per_free_core(busy, expected, monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(common.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(common, "busy_cores", lambda seconds=0.25: busy)
    count, reason = common.choose_threads()
    assert count == expected == torch.get_num_threads()
    assert ("all free" in reason) == (busy < 0.5) and "4 cores" in reason


# invariant: --threads wins over OMP_NUM_THREADS, which wins over the measurement; a bad count is a sentence
def test_requested_then_environment_then_measured(monkeypatch, restore_threads):
    monkeypatch.setattr(common, "busy_cores", lambda seconds=0.25: pytest.fail("measured although pinned"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert common.choose_threads(2) == (2, "--threads")
    torch.set_num_threads(1)
    assert common.choose_threads() == (1, "OMP_NUM_THREADS=1")
    with pytest.raises(ValueError, match="--threads 0 must be at least 1"):
        common.choose_threads(0)


# invariant: busy_cores counts other programs' CPU time, not this process's own, within [0, cores]
def test_busy_cores_leaves_out_this_process():
    busy = common.busy_cores(0.05)  # a short, coarse reading (ticks of 1/100 s): still within the range
    assert busy is None or 0.0 <= busy <= (common.os.cpu_count() or 1)
