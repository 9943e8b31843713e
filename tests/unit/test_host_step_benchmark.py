"""benchmarks/host_step.py runs (CPU, a few rows): the host-time probe quoted in docs/perf-notes.md
must keep working as the engine changes."""
from __future__ import annotations

import re

from benchmarks import host_step


def test_host_step_times_a_decode_step_with_every_row_decoding(capsys):
    host_step.main(["--rows", "12", "--steps", "5", "--repeats", "1"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.match(r"repeat 0: (\d+) rows at the end, host ([\d.]+) ms/step \((\d+) of 5 planned row by row, schedule [\d.]+ ms\), "
                 r"events pickle ([\d.]+) ms", line)
    assert m and int(m.group(1)) == 12 and float(m.group(2)) > 0 and int(m.group(3)) == 0, line


def test_rows_ending_inside_the_timed_steps_keep_the_steady_path(capsys):
    host_step.main(["--rows", "12", "--steps", "8", "--repeats", "1", "--finishing", "0.5"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.match(r"repeat 0: (\d+) rows at the end, host [\d.]+ ms/step \((\d+) of 8 planned", line)
    assert m and int(m.group(1)) < 12 and int(m.group(2)) == 0, line
