"""Benchmark harness: every result is reported as a ratio against its group's anchor, measured
in the same run. ``CLARITY_BENCH_SUMMARY=path.md`` also writes the table as Markdown."""
import os
import platform
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest
import torch

RESULTS: List[Dict] = []
SAVED: List[Dict] = []


def record_saved_bytes(group: str, name: str, bytes_per_image: float, anchor: bool = False) -> None:
    """Register a device-independent measurement: bytes saved for backward per image."""
    SAVED.append(dict(group=group, name=name, value=bytes_per_image, anchor=anchor))
    _write_summary()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def measure(benchmark):
    """``measure(fn, group=..., name=..., anchor=False, flops=None)``: time ``fn`` (synchronised on
    CUDA), record its median and peak memory, and register it for the ratio table."""

    def run(fn: Callable[[], None], *, group: str, name: str, anchor: bool = False,
            flops: Optional[float] = None, rounds: Optional[int] = None) -> float:
        cuda = torch.cuda.is_available()

        def step():
            fn()
            if cuda:
                torch.cuda.synchronize()

        fn()  # compile / autotune outside the timed region
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        benchmark.group = group
        benchmark.name = name
        benchmark.pedantic(step, rounds=rounds or (20 if cuda else 10), iterations=1, warmup_rounds=2 if cuda else 1)
        median = benchmark.stats.stats.median
        peak = torch.cuda.max_memory_allocated() if cuda else None
        benchmark.extra_info.update(median_s=median, peak_bytes=peak, anchor=anchor, device=device_name())
        if flops:
            benchmark.extra_info["tflops"] = flops / median / 1e12
        RESULTS.append(dict(group=group, name=name, median=median, anchor=anchor, flops=flops, peak=peak))
        _write_summary()  # row by row: a run stopped later keeps what it measured
        return median

    return run


def _table() -> List[str]:
    lines = [f"device: {device_name()}, torch {torch.__version__}", "",
             "| group | implementation | median ms | TFLOP/s | peak MiB | speed-up vs anchor |",
             "|---|---|---|---|---|---|"]
    for group in dict.fromkeys(r["group"] for r in RESULTS):
        rows = [r for r in RESULTS if r["group"] == group]
        anchor = next((r for r in rows if r["anchor"]), None)
        for r in rows:
            tflops = f"{r['flops'] / r['median'] / 1e12:.1f}" if r["flops"] else "-"
            peak = f"{r['peak'] / 2**20:.0f}" if r["peak"] is not None else "-"
            ratio = f"{anchor['median'] / r['median']:.2f}x" if anchor else "-"
            tag = " (anchor)" if r["anchor"] else ""
            lines.append(f"| {group} | {r['name']}{tag} | {r['median'] * 1e3:.3f} | {tflops} | {peak} | {ratio} |")
    if SAVED:
        lines += ["", "| group | implementation | saved for backward, MB per image | ratio to anchor |",
                  "|---|---|---|---|"]
        for r in SAVED:
            anchor = next((a for a in SAVED if a["group"] == r["group"] and a["anchor"]), None)
            ratio = f"{r['value'] / anchor['value']:.2f}" if anchor else "-"
            tag = " (anchor)" if r["anchor"] else ""
            lines.append(f"| {r['group']} | {r['name']}{tag} | {r['value'] / 1e6:.1f} | {ratio} |")
    return lines


def _write_summary() -> None:
    path = os.environ.get("CLARITY_BENCH_SUMMARY")
    if path:
        Path(path).write_text("\n".join(_table()) + "\n")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS and not SAVED:
        return
    terminalreporter.write_sep("=", "clarity_fast benchmarks: ratios against the anchor of each group")
    for line in _table():
        terminalreporter.write_line(line)
