"""C++ extensions of ``nn/fused/csrc``, each built on first use and kept per machine.

``torch.utils.cpp_extension.load`` compiles a source (a C++ compiler and ninja, which the
``fused`` extra installs; ~30 s) into ``RETROLM_CACHE`` or ``~/.cache/retrolm``, one folder
per source hash, torch version and CPU, so a changed source never meets an old build, nor a
CPU a build for another. If the build fails, the reason is logged once and callers take
their ATen path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

__all__ = [
    "KernelBuildError",
    "LazyExtension",
    "STALE_LOCK_S",
    "clear_stale_lock",
    "cpu_tag",
    "kernels_required",
]

CSRC = Path(__file__).with_name("csrc")
BUILT = ".retrolm-built"  # written into a build folder once its module loaded
STALE_LOCK_S = 600  # a build takes ~30 s: a lock this old was left by a killed build
# -fopenmp is needed although the sources hold only simd pragmas: at::parallel_for is inline
# OpenMP in ATen's headers and runs serially without it (-fopenmp-simd made cross_entropy
# 2.7 -> 4.8 ms); the extension then shares torch's libgomp.so.1, not a second runtime
FLAGS = ["-O3", f"-march={os.environ.get('RETROLM_KERNEL_MARCH', 'native')}", "-fopenmp"]


class KernelBuildError(RuntimeError):
    """A C++ extension could not be built while ``RETROLM_REQUIRE_KERNELS=1``."""


def kernels_required() -> bool:
    """Whether a failed build is an error (``RETROLM_REQUIRE_KERNELS=1``) or a fallback."""
    return os.environ.get("RETROLM_REQUIRE_KERNELS", "0") not in ("", "0")


class LazyExtension:
    """One extension: ``get()`` builds it on the first call, then returns the module, or
    None (once a build failed, with one warning naming ``what`` and ``env``, the variable
    that turns its users off: ``enabled`` starts as ``env != "0"``)."""

    def __init__(self, name: str, source: str, what: str, env: str) -> None:
        self.name, self.source, self.what, self.env = name, CSRC / source, what, env
        self.enabled = os.environ.get(env, "1") != "0"  # whether its users may call it
        self._module: ModuleType | None = None
        self._failed = False
        self.error: str | None = None  # why the build failed, once it did
        self._lock = threading.Lock()

    def set_enabled(self, on: bool) -> bool:
        """Let its users call it (or not) in this process; returns the previous setting."""
        before, self.enabled = self.enabled, bool(on)
        return before

    def get(self) -> ModuleType | None:
        if self._module is not None or self._failed:
            return self._module
        with self._lock:
            if self._module is None and not self._failed:
                try:
                    from torch.utils.cpp_extension import load

                    build = self.build_directory()
                    self._module = _load_built(self.name, build)
                    if self._module is None:
                        _ninja_on_path()
                        log.info("loading the %s (built once per machine, ~30 s)", self.what)
                        with build_lock(build):
                            self._module = load(
                                name=self.name,
                                sources=[str(self.source)],
                                extra_cflags=FLAGS,
                                extra_ldflags=["-fopenmp"],
                                build_directory=str(build),
                                verbose=False,
                            )
                            (build / BUILT).write_text(f"{self.name}\n")
                except Exception as exc:  # no compiler, no ninja, a build error: ATen path
                    if kernels_required():
                        raise KernelBuildError(
                            f"the {self.what} ({self.source.name}) could not be built: "
                            f"{type(exc).__name__}: {exc}; RETROLM_REQUIRE_KERNELS=1 makes "
                            "this an error (unset it to take the ATen path)"
                        ) from exc
                    self._failed = True
                    first = str(exc).splitlines()[0] if str(exc) else ""
                    self.error = f"{type(exc).__name__}: {first}"
                    log.warning(
                        "%s unavailable (%s); the ATen path runs instead. Install a C++ "
                        "compiler and ninja to build them, or set %s=0 to silence this.",
                        self.what,
                        self.error,
                        self.env,
                    )
        return self._module

    def build_directory(self) -> Path:
        """``<cache>/<source stem>-torch<version>-<sha1[:12]>-<cpu sha1[:8]>``, created; the
        sha1 covers the source, the headers of ``csrc`` it may include and the flags. The
        CPU part (``cpu_tag``) keeps a cache shared between machines (a home directory on a
        network drive, a container image) from loading a ``-march=native`` build on a CPU
        without its instructions, which would kill the process."""
        text = self.source.read_bytes() + b"".join(h.read_bytes() for h in _headers())
        digest = hashlib.sha1(text + " ".join(FLAGS).encode()).hexdigest()
        root = Path(os.environ.get("RETROLM_CACHE", Path.home() / ".cache" / "retrolm"))
        tag = f"{self.source.stem}-torch{torch.__version__.split('+')[0]}-{digest[:12]}"
        path = root / f"{tag}-{cpu_tag()}"
        path.mkdir(parents=True, exist_ok=True)
        return path


def _load_built(name: str, build: Path) -> ModuleType | None:
    """The module a finished build left in ``build``, imported without torch's builder, or
    None. The folder's name already pins the source, headers, flags, torch and CPU, so a
    build marked finished is the one ``load`` would give; going through ``load`` again
    from another copy of the sources (a worktree, a mutant's copy) would rebuild, since its
    ninja file names the sources by path. A marker is written only after ``load`` returned,
    so a build killed midway (a partial ``.so``) is never imported."""
    marker, library = build / BUILT, build / f"{name}.so"
    if not (marker.is_file() and library.is_file()):
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _headers() -> list[Path]:
    return sorted(CSRC.glob("*.h"))


def cpu_tag() -> str:
    """8 hex digits naming what ``-march=native`` compiles for: the CPU model and its
    instruction-set flags (``/proc/cpuinfo`` on Linux; elsewhere the platform's names)."""
    text = ""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        keep = ("model name", "flags", "Features", "CPU implementer", "CPU part")
        text = "\n".join(sorted({ln.strip() for ln in info.splitlines() if ln.startswith(keep)}))
    except OSError:
        pass
    if not text:
        text = f"{platform.machine()} {platform.processor()}"
    return hashlib.sha1(text.encode()).hexdigest()[:8]


@contextmanager
def build_lock(build: Path) -> Iterator[None]:
    """One retrolm process at a time inside torch's builder for ``build``: an exclusive
    ``flock`` on ``build/.retrolm-build.lock``, which the kernel releases when its holder dies.
    While it is held no other retrolm process is building here, so a torch ``lock`` file
    found then was left by a killed build (torch would wait for it without end): it is removed
    at once. Without ``fcntl`` (not POSIX): only a lock older than ``STALE_LOCK_S`` is."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover (POSIX everywhere retrolm is tested)
        clear_stale_lock(build)
        yield
        return
    with open(build / ".retrolm-build.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits while another process builds
        try:
            clear_stale_lock(build, max_age_s=0.0)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clear_stale_lock(build: Path, max_age_s: float = STALE_LOCK_S) -> bool:
    """torch's builder holds a ``lock`` file while it builds and waits, without end, while
    one exists: a build killed midway would hang every later process. Removes a lock older
    than ``max_age_s``; returns whether it did."""
    lock = build / "lock"
    try:
        if time.time() - lock.stat().st_mtime >= max_age_s:
            lock.unlink()
            log.warning("removed a stale build lock %s (a killed build left it)", lock)
            return True
    except FileNotFoundError:
        pass
    return False


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the ``ninja`` wheel (the ``fused`` extra)
    puts it next to the interpreter, which is not on PATH when a venv is not activated."""
    if shutil.which("ninja") is None:
        try:
            import ninja  # type: ignore[import-not-found]
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
