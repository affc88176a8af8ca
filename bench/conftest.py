"""Benchmark session helpers: print each group's medians as ratios to fastrace's."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    write = terminalreporter.write_line
    write("")
    write("medians and ratios (other / fastrace; > 1 means fastrace is faster)")
    for group, benches in groups.items():
        base = [b for b in benches if b.extra_info.get("baseline")]
        write(f"[{group}]")
        for b in sorted(benches, key=lambda b: b.stats.median):
            ratio = ""
            if base and b is not base[0]:
                ratio = f"  ratio {b.stats.median / base[0].stats.median:7.2f}x"
            extra = {k: v for k, v in b.extra_info.items() if k != "baseline"}
            write(f"  {b.name:<48s} median {_duration(b.stats.median)}{ratio}  {extra or ''}")


def _duration(seconds: float) -> str:
    """A median in ms, or in µs below 1 ms (one-system calls take tens of µs)."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:10.2f} µs"
    return f"{seconds * 1e3:10.3f} ms"
