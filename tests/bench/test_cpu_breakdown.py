"""bench.cpu_breakdown: the CPU kernels alone against the whole mt.lif step, per thread count."""

from __future__ import annotations

import pytest
import torch

from bench import cpu_breakdown
from mpd_triton.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(torch.float32), reason="no C compiler: no CPU kernels")


def test_breakdown_times_every_row_and_restores_the_thread_count():
    before, launcher = torch.get_num_threads(), cpu_kernels.lif_backward
    rows = cpu_breakdown.breakdown(4, 4 * 512, 1, warmup_ms=1, rep_ms=5)
    assert torch.get_num_threads() == before
    assert tuple(rows) == cpu_breakdown.ROWS
    for name in cpu_breakdown.ROWS:
        if " - " not in name:
            assert rows[name]["ms"] > 0 and rows[name]["bytes"] > 0, name
    # the backward pass contains its kernel call: what is left is positive and smaller than the pass
    assert 0 < rows["bwd pass - its kernel"]["ms"] < rows["bwd pass"]["ms"]
    assert cpu_kernels.lif_backward is launcher  # the timing wrapper is gone
    assert rows["fwd kernel, in the step"]["bytes"] == rows["fwd kernel"]["bytes"]
    # the kernels' bytes are the passes' minimal bytes: forward = read x, write s and u (+ the statistics)
    assert rows["fwd kernel, no stats"]["bytes"] == 3 * 4 * 4 * 512
    assert rows["copy"]["bytes"] == 2 * 4 * 4 * 512
    assert rows["step - kernels"]["ms"] == pytest.approx(
        rows["step"]["ms"] - rows["fwd kernel"]["ms"] - rows["bwd kernel"]["ms"])


def test_table_has_a_column_group_per_thread_count():
    fake = {"ms": 2.0, "bytes": 8_000_000}
    results = {n: {row: dict(fake, bytes=0 if " - " in row else fake["bytes"]) for row in cpu_breakdown.ROWS}
               for n in (1, 2)}
    results[2]["fwd kernel"] = {"ms": 4.0, "bytes": 8_000_000}
    table = cpu_breakdown.format_table(results)
    lines = table.splitlines()
    assert lines[0].count("share of copy") == 2 and len(lines) == 2 + len(cpu_breakdown.ROWS)
    assert "| fwd kernel | 2.000 | 4.0 | 100% | 4.000 | 2.0 | 50% |" in lines  # 8 MB in 2 ms = 4 GB/s
    assert "| step - kernels | 2.000 |  |  | 2.000 |  |  |" in lines


def test_cli_writes_the_table_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "breakdown.md"
    assert cpu_breakdown.main(["--T", "4", "--size", "2^11", "--threads", "1", "--rep-ms", "5", "--out", str(out)]) == 0
    text = out.read_text()
    assert "python -m bench.cpu_breakdown --T 4" in text and "| bwd kernel |" in text
    assert "| bwd kernel, in the step |" in text
    for argv, message in ((["--size", "100"], "multiple of --T"), (["--size", "2^x"], "--size takes"),
                          (["--threads", "0"], "positive integers")):
        with pytest.raises(SystemExit):
            cpu_breakdown.main(argv)
        assert message in capsys.readouterr().err
