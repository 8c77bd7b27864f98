"""Starting ranks: the mpiexec command line, or running in-process when an MPI launcher already started us.

No MPI import here: the launching process must not become an MPI process itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from hpcai.errors import UserError


def mpi_environment() -> bool:
    """True when this process is one of several ranks started by mpiexec/mpirun or srun."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        if key in os.environ:
            return True
    # Under srun each task of a step sees SLURM_STEP_ID; the batch script itself is not such a task.
    return "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def launcher_world_size() -> int | None:
    """The rank count the launcher that started us announced (None outside an MPI launch)."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return None


def launcher_rank() -> str | None:
    """This process's rank as the launcher announced it (None outside an MPI launch or batch script)."""
    for key in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if key in os.environ:
            return os.environ[key]
    return None


def find_mpiexec() -> str:
    """$HPCAI_MPIEXEC, else the mpiexec installed beside this Python (the `mpich` wheel), else PATH's.

    The launcher must belong to the MPI library that mpi4py loads: with a system MPI, install mpi4py
    against it and leave the `mpich` wheel out, and PATH's mpiexec is used.
    """
    explicit = os.environ.get("HPCAI_MPIEXEC")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "mpiexec"
    if beside.exists():
        return str(beside)
    for name in ("mpiexec", "mpirun"):
        found = shutil.which(name)
        if found:
            return found
    raise UserError(
        "no mpiexec found: `pip install mpich` (or load your site's MPI module), or set HPCAI_MPIEXEC"
    )


def is_open_mpi(mpiexec: str) -> bool:
    try:
        out = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Open MPI" in out or "OpenRTE" in out


def mpiexec_command(n: int, args: list[str], mpiexec: str | None = None) -> list[str]:
    """``mpiexec -n N python ARGS...`` for this Python; Open MPI gets --oversubscribe (laptops, CI)."""
    mpiexec = mpiexec or find_mpiexec()
    cmd = [mpiexec, "-n", str(n)]
    if is_open_mpi(mpiexec):
        cmd.append("--oversubscribe")
    return cmd + [sys.executable, *args]


def launch_env(n: int) -> dict[str, str]:
    """The ranks' environment: one thread per rank's share of the cores unless the user chose."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("HPCAI_TTY", "1" if sys.stderr.isatty() else "0")
    if cma_allowed():
        # MPICH's single-copy path for large messages between ranks of a node (process_vm_readv): its
        # default copies twice through shared memory. Measured here, 2 ranks: ring all-reduce of 16 MiB
        # 7.5 -> 4.3 ms, 64 MiB 26 -> 17 ms. Other MPIs ignore the variable.
        env.setdefault("MPIR_CVAR_CH4_CMA_ENABLE", "1")
    # glibc hands freed blocks from 128 KiB up to its dynamic limit back to the kernel, so each micro-batch's
    # activations and weight gradients come back as fresh pages to fault in and zero. Kept in the heap: 16x
    # fewer page faults; backward of a 1024-wide MLP at batch 64 7-23% faster, `hpcai bench ddp` 7-10% more
    # samples/s here. The price: freed memory stays with the process. Other C libraries ignore both.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 30))
    if "OMPI_ALLOW_RUN_AS_ROOT" not in env and hasattr(os, "geteuid") and os.geteuid() == 0:
        # Open MPI refuses root without these (containers, CI); MPICH ignores them.
        env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    return env


def module_env(n: int) -> dict[str, str]:
    """launch_env for ranks started as ``python -m hpcai...`` (the benches): this checkout importable."""
    env = launch_env(n)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def cma_allowed() -> bool:
    """Whether one process may read a sibling's memory (Linux cross-memory attach): the syscall is not
    filtered (seccomp in some containers) and Yama's ptrace_scope is 0 (or Yama is absent); at scope 1,
    the Ubuntu default, only an ancestor may, and ranks are siblings."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        if Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip() != "0":
            return False
    except FileNotFoundError:
        pass
    except OSError:
        return False
    import ctypes

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        src, dst = ctypes.create_string_buffer(b"hpcai", 8), ctypes.create_string_buffer(8)
        local = IoVec(ctypes.cast(dst, ctypes.c_void_p), 8)
        remote = IoVec(ctypes.cast(src, ctypes.c_void_p), 8)
        n = libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    except (OSError, AttributeError):
        return False
    return n == 8 and dst.value == b"hpcai"


RANK_MEMORY_BYTES = 256 << 20  # what one rank needs before training: Python, torch, mpi4py, h5py (244 MiB)


def check_placeable(n: int) -> None:
    """Refuse a rank count the launcher cannot place here: mpiexec outside a Slurm allocation puts every rank
    on this machine, and each rank needs its share of memory (one line and exit 2, not an OOM storm).

    Inside an allocation (``SLURM_JOB_NUM_NODES``) the bound is per node times the nodes.
    """
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return  # not Linux: nothing to measure against
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1)
    per_node = max(1, available // RANK_MEMORY_BYTES)
    if n > per_node * nodes:
        where = f"{nodes} nodes" if nodes > 1 else "this machine"
        raise UserError(
            f"-n {n}: {where} can hold at most {per_node * nodes} ranks ({available / 2**30:.1f} GiB "
            f"available per node, ~{RANK_MEMORY_BYTES >> 20} MiB per rank); use a Slurm allocation "
            "(hpcai submit) for more"
        )


def write_launch_file(spec) -> tuple[Path, str]:
    """The resolved spec for this launch's ranks, in a file of the run directory that only this launch
    writes (a name unique to it, created exclusively), and its SHA-256 for the ranks to check."""
    import hashlib
    import json

    from hpcai.fsio import create_exclusive, no_space, temp_name

    text = json.dumps({"source": spec.source, "spec_toml": spec.to_toml()}, ensure_ascii=False)
    data = text.encode("utf-8")
    path = temp_name(spec.run_dir / "launch.json")
    try:
        fd = create_exclusive(path, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as e:
        path.unlink(missing_ok=True)
        if e.errno == 28:
            raise no_space(path) from None
        raise
    return path, hashlib.sha256(data).hexdigest()


def read_launch_file(path: str, digest: str):
    """The spec a launcher sent (:func:`write_launch_file`), checked against its digest."""
    import hashlib
    import json

    from hpcai.spec import spec_from_toml

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the launch file: {e.strerror}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise UserError(f"{path}: the launch file changed after the launcher wrote it")
    sent = json.loads(data.decode("utf-8"))
    return spec_from_toml(sent["spec_toml"], sent["source"])


FATAL_DIR_ENV = "HPCAI_FATAL_DIR"  # where a rank leaves its last words before MPI_Abort (hpcai.comm.abort)


class _StderrRelay:
    """Copy mpiexec's stderr to ours as it comes, remembering the ``hpcai:`` lines that came through.

    Bytes are passed on unchanged and at once (progress bars redraw in place); only complete lines are
    remembered, and at most ``keep`` of them.
    """

    def __init__(self, stream: IO[bytes], keep: int = 10_000):
        self.stream, self.keep = stream, keep
        self.seen: set[str] = set()
        self._thread = threading.Thread(target=self._pump, name="hpcai-stderr-relay", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        out = getattr(sys.stderr, "buffer", None)
        partial = b""
        while chunk := os.read(self.stream.fileno(), 65536):
            try:
                if out is not None:
                    out.write(chunk)
                    out.flush()
                else:
                    sys.stderr.write(chunk.decode(errors="replace"))
                    sys.stderr.flush()
            except (OSError, ValueError):
                pass
            # Progress bars redraw after a carriage return: split there too, so ``partial`` stays short.
            *lines, partial = re.split(rb"[\r\n]", partial + chunk)
            partial = partial[-65536:]
            for line in lines:
                if line.startswith(b"hpcai") and len(self.seen) < self.keep:
                    self.seen.add(line.decode(errors="replace"))
        self.stream.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _say_unseen(fatal_dir: str, relay: _StderrRelay) -> None:
    """Print the ranks' last words that mpiexec lost when the job was aborted (see hpcai.comm.abort)."""
    for name in sorted(os.listdir(fatal_dir)):
        if not name.startswith("rank-"):
            continue
        try:
            text = Path(fatal_dir, name).read_text()
        except OSError:
            continue
        # A message is forwarded whole or cut at its end: its first line (``hpcai...``) tells which.
        if text and text.splitlines()[0] not in relay.seen:
            sys.stderr.write(text)
    sys.stderr.flush()


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _dies_with_us() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies, however it dies
    (``kill -9`` included: no handler of ours runs then). mpiexec (MPICH's hydra) killed so takes its
    ranks down with it; without this they ran on, detached, holding the run directory's files and the
    allocation's cores. Linux only (prctl PR_SET_PDEATHSIG); None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def arm() -> None:  # in the child, between fork and exec: nothing but two system calls
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # we died before the line above took effect: nobody will signal it
            os._exit(1)

    return arm


def run_ranks(n: int, args: list[str]) -> int:
    """Run ``python ARGS`` on ``n`` ranks under mpiexec and return its exit status.

    SIGUSR1/SIGUSR2/SIGTERM sent to this process are passed on to mpiexec, which hands them to every rank
    (a Slurm batch script may signal either process); Ctrl-C reaches all of them through the terminal.
    The ranks' stderr passes through this process, so that a message a rank wrote just before MPI_Abort,
    which mpiexec may drop while killing the job, is printed all the same. Should this process die (even
    by ``kill -9``), the kernel kills mpiexec and mpiexec its ranks: nothing runs on detached.
    """
    import signal

    fatal_dir = tempfile.mkdtemp(prefix="hpcai-fatal-")
    env = launch_env(n)
    env[FATAL_DIR_ENV] = fatal_dir
    try:
        proc = subprocess.Popen(
            mpiexec_command(n, args), env=env, stderr=subprocess.PIPE, preexec_fn=_dies_with_us()
        )
        relay = _StderrRelay(proc.stderr)
        forwarded = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
        previous = {sig: signal.signal(sig, lambda s, _f: proc.send_signal(s)) for sig in forwarded}
        try:
            while True:
                try:
                    rc = proc.wait()
                    break
                except KeyboardInterrupt:  # mpiexec got the same Ctrl-C and is shutting the ranks down
                    continue
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        relay.join(timeout=5)  # a rank orphaned by a killed mpiexec may hold the pipe: do not wait on it
        _say_unseen(fatal_dir, relay)
        return 128 - rc if rc < 0 else rc  # killed by signal N: the shell's 128+N
    finally:
        shutil.rmtree(fatal_dir, ignore_errors=True)
