"""Test-wide settings, and what this machine's run covers.

Tests use tiny models, where thread start-up costs more than it saves; one intra-op thread
also keeps the suite's speed stable on a shared 2-core machine (CI runs there).

The header names the CPU's kernel level and which C++ kernels build and run here; the
summary repeats what was not run and why. With ``RETROLM_REQUIRE_KERNELS=1`` (CI) a kernel
that fails to build stops the run: only "this CPU lacks the instructions" may skip.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def _kernel_status() -> list[tuple[str, str | None]]:
    """(kernel, None if it runs here else why not), building each on first use."""
    from retrolm.nn import decode_linear
    from retrolm.nn.fused import decode as fused_decode
    from retrolm.nn.fused import train as fused_train
    from retrolm.nn.fused import window as fused_window
    from retrolm.nn.fused.extension import KernelBuildError

    rows: list[tuple[str, str | None]] = []
    for name, ext, module in (
        ("fused training kernels", fused_train._EXT, fused_train),
        ("fused decoding blocks", fused_decode._EXT, fused_decode),
    ):
        try:
            built = module.extension() is not None
        except KernelBuildError as exc:
            raise pytest.UsageError(str(exc)) from exc
        rows.append((name, None if built else f"could not be built ({ext.error})"))
    try:
        rows.append(("fused window attention", fused_window.unavailable_reason()))
    except KernelBuildError as exc:
        raise pytest.UsageError(str(exc)) from exc
    bf16 = None if decode_linear.PACKED_BF16 else "this CPU lacks oneDNN bf16 (AVX-512 BF16/AMX)"
    rows.append(("oneDNN packed bf16 decoding", bf16))
    return rows


_STATUS: list[tuple[str, str | None]] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    _STATUS[:] = _kernel_status()  # (builds the kernels once, before collection)


def pytest_report_header(config: pytest.Config) -> list[str]:
    from retrolm.nn.fused.extension import FLAGS, kernels_required

    lines = [
        f"retrolm: ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, kernels "
        f"built with {' '.join(FLAGS)}, RETROLM_REQUIRE_KERNELS={int(kernels_required())}"
    ]
    lines += [f"  {name}: {'runs' if why is None else 'NOT RUN: ' + why}" for name, why in _STATUS]
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    missing = [(name, why) for name, why in _STATUS if why is not None]
    if not missing:
        terminalreporter.write_line(f"kernels: all {len(_STATUS)} run on this machine")
        return
    terminalreporter.section("kernels not run on this machine (their ATen paths were tested)")
    for name, why in missing:
        terminalreporter.write_line(f"{name}: {why}")
