"""Memory available to new allocations, and the check that refuses outputs too big for it
(private). Outputs are written page by page: one that does not fit ends in the OOM killer, not
in an error, so sizes are checked before anything is allocated."""

from __future__ import annotations

from .errors import ConfigError

#: outputs at least this big are checked (reading the memory figures costs ~25 µs)
ROOM_CHECK_BYTES = 16 << 20


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation, or None if unknown: Linux's MemAvailable,
    or less when the process's cgroup (a container, say) has a memory limit closer."""
    room = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    room = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    try:  # cgroup v2: memory.max is "max" (no limit) or bytes
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                free = int(limit) - int(f.read().strip())
            room = free if room is None else min(room, free)
    except (OSError, ValueError):
        pass
    return room


def refuse_if_no_room(need: int, hint: str, what: str = "the recorded rows") -> None:
    """ConfigError naming ``what`` and ``hint`` if ``need`` bytes exceed the memory available."""
    if need < ROOM_CHECK_BYTES:
        return
    room = available_memory()
    if room is not None and need > room:
        raise ConfigError(f"{what} need {need / 2**30:.1f} GiB of memory and "
                          f"{room / 2**30:.1f} GiB are available: {hint}")
