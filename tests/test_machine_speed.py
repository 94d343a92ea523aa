"""The benchmarks' probe of this machine's speed (bench/common.py) leaves the process that calls it as it was."""

from __future__ import annotations

import os

import psutil

from bench.common import machine_speed


def test_the_probe_restores_the_callers_cores_and_ends_its_echo() -> None:
    cores = os.sched_getaffinity(0)
    children = psutil.Process().children()
    speed = machine_speed(round_trips=200)
    assert os.sched_getaffinity(0) == cores  # the benchmark's clients then run wherever the scheduler puts them
    assert psutil.Process().children() == children
    assert min(speed.round_trip_us, speed.round_trip_cpu_us, speed.python_loop_ms, speed.memory_step_ns) > 0
