"""Helpers shared by the benchmark scripts: run a function in a fresh process and measure its wall
time and peak memory, then print a table of ratios against a baseline measured in the same run.

Memory method: the child process first builds its inputs (``setup``), then, before every timed
call, resets the kernel's peak-RSS counter (``VmHWM``) to the current RSS by writing ``5`` to
``/proc/self/clear_refs`` (Linux >= 4.0) and records the RSS. After the call, ``VmHWM - RSS before``
is the peak resident memory the call itself added: imports, inputs and earlier repeats are not
counted, and short-lived temporaries are (the kernel tracks the peak, no sampling). Where
``clear_refs`` is not writable, a background thread samples ``VmRSS`` every millisecond instead
(may miss very short peaks; reported as ``rss_method="sampled"``). On CUDA the figure is
``torch.cuda.max_memory_allocated()`` minus the allocation before the call.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["Measurement", "measure", "format_table", "print_table", "rss_bytes"]

_GB = float(1 << 30)


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def rss_bytes() -> int:
    """Current resident set size of this process (bytes)."""
    return _status_kb("VmRSS") * 1024


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler:
    """Fallback peak-RSS tracker: polls VmRSS from a thread."""

    def __init__(self, interval: float = 1e-3) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> _Sampler:
        self.peak = rss_bytes()
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


@dataclass
class Measurement:
    """One implementation's figures: ``seconds`` is the fastest repeat, ``peak_gb`` the largest
    peak memory growth over the repeats (host RSS, or CUDA allocations when ``device`` is CUDA).
    ``cpu_times`` is the process CPU time (all threads) of each repeat: on a machine shared with other
    jobs it varies less than the wall time, which includes the time other processes held the cores."""

    name: str
    seconds: float
    peak_gb: float
    times: list[float] = field(default_factory=list)
    device: str = "cpu"
    rss_method: str = "clear_refs"
    result: Any = None
    cpu_times: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("result")
        return d


def _child(
    conn: Any,
    target: Callable,
    setup: Callable | None,
    setup_args: tuple,
    repeats: int,
    device: str,
    threads: int | None,
) -> None:
    try:
        cuda = device.startswith("cuda")
        if threads or cuda:
            if threads:
                torch.set_num_threads(threads)
        inputs = setup(*setup_args) if setup is not None else ()
        if not isinstance(inputs, tuple):
            inputs = (inputs,)
        times, peaks, cpu, result, method = [], [], [], None, "clear_refs"
        for _ in range(repeats):
            result = None
            c0 = time.process_time()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                result = target(*inputs)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                peaks.append(torch.cuda.max_memory_allocated() - base)
                continue
            if _reset_peak():
                base = rss_bytes()
                t0 = time.perf_counter()
                result = target(*inputs)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                peaks.append(_status_kb("VmHWM") * 1024 - base)
            else:
                method = "sampled"
                with _Sampler() as s:
                    base = s.peak
                    t0 = time.perf_counter()
                    result = target(*inputs)
                    times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                peaks.append(s.peak - base)
        conn.send(("ok", times, peaks, method, result, cpu))
    except BaseException:  # report any failure to the parent instead of dying silently
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def measure(
    name: str,
    target: Callable,
    setup: Callable | None = None,
    setup_args: Sequence[Any] = (),
    repeats: int = 1,
    device: str = "cpu",
    threads: int | None = None,
    timeout: float | None = None,
) -> Measurement:
    """Run ``target(*setup(*setup_args))`` ``repeats`` times in a fresh ``spawn`` process.

    ``target`` and ``setup`` must be importable module-level functions (they are pickled by name);
    building the inputs in the child keeps large arrays out of the pipe and out of the measurement.
    ``target``'s last return value comes back as ``Measurement.result`` (keep it small).
    ``threads`` sets ``torch.set_num_threads`` in the child. Raises RuntimeError with the child's
    traceback if it fails, or on timeout.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(child, target, setup, tuple(setup_args), repeats, device, threads))
    p.start()
    child.close()
    msg = None
    try:
        if not parent.poll(timeout):
            raise RuntimeError(f"benchmark {name!r} did not finish within {timeout} s")
        msg = parent.recv()
    except EOFError:
        p.join()
        raise RuntimeError(f"benchmark {name!r}: child process died (exit code {p.exitcode}; out of memory?)") from None
    finally:
        p.join(timeout=60 if msg is not None else 0)
        if p.is_alive():
            p.kill()
            p.join()
        parent.close()
    if msg[0] == "error":
        raise RuntimeError(f"benchmark {name!r} failed in its child process:\n{msg[1]}")
    _, times, peaks, method, result, cpu = msg
    return Measurement(
        name,
        min(times),
        max(peaks) / _GB,
        times,
        device,
        "cuda_allocated" if device.startswith("cuda") else method,
        result,
        cpu,
    )


def format_table(rows: Sequence[Measurement], baseline: str | None = None) -> str:
    """Text table of time and peak memory, with ``baseline / row`` ratios (higher = better) when
    ``baseline`` names one of the rows."""
    base = next((r for r in rows if r.name == baseline), None) if baseline else None
    head = f"{'implementation':<28} {'time (s)':>10} {'peak mem (GB)':>14}"
    if base is not None:
        head += f" {'speed-up':>10} {'mem ratio':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{r.name:<28} {r.seconds:>10.3f} {r.peak_gb:>14.3f}"
        if base is not None:
            sp = base.seconds / r.seconds if r.seconds > 0 else float("inf")
            mr = base.peak_gb / r.peak_gb if r.peak_gb > 0 else float("inf")
            line += f" {sp:>9.1f}x {mr:>9.1f}x"
        lines.append(line)
    return "\n".join(lines)


def print_table(rows: Sequence[Measurement], baseline: str | None = None, title: str | None = None) -> None:
    if title:
        print(title)
    print(format_table(rows, baseline), flush=True)
