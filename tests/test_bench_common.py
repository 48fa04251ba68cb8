import functools

import numpy as np
import pytest

from groundkit.bench.common import Measurement, format_table, measure


def test_measure_peak_memory_of_allocation_in_child():
    # np.ones of 32M float64 = 256 MB touched in the child; the measured growth must see it.
    m = measure("ones", functools.partial(np.ones, 32 << 20), repeats=2)
    assert len(m.times) == 2 and m.seconds > 0
    assert 0.22 < m.peak_gb < 0.40, m.peak_gb
    assert m.result.shape == (32 << 20,)
    small = measure("sum", np.sum, setup=functools.partial(np.ones, 32 << 20))
    assert small.result == 32 << 20
    assert small.peak_gb < 0.05  # inputs built by setup are not counted


def test_measure_reports_child_errors():
    with pytest.raises(RuntimeError, match="negative dimensions"):
        measure("bad", functools.partial(np.ones, -1))


def test_format_table_ratios():
    rows = [Measurement("base", 10.0, 4.0), Measurement("ours", 0.5, 1.0)]
    text = format_table(rows, baseline="base")
    assert "20.0x" in text and "4.0x" in text and "1.0x" in text
