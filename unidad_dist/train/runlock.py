"""One live writer per run folder: ``<run>/run.lock`` (host, pid, job id, start time), heartbeat by mtime.

Rank 0 takes the lock before anything is written and every rank learns the outcome (a collective), so a
refused start fails on all ranks at once. A lock left by a dead writer is taken over with a log line:
same host and its pid is gone, or the same scheduler job id (a requeued SLURM job), or no heartbeat for
``run.lock_stale_s`` seconds (another host). The lock is removed when the run ends, also on an error.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

import torch

from unidad_dist.errors import UserError

LOCK = "run.lock"
LAUNCH_ID_ENV = "UNIDAD_LAUNCH_ID"  # set by a launcher whose restarted ranks must take over their own lock (Ray)
JOB_VARS = (LAUNCH_ID_ENV, "SLURM_JOB_ID", "RAY_JOB_ID", "JOB_ID", "PBS_JOBID", "LSB_JOBID")


def job_id() -> Optional[str]:
    for v in JOB_VARS:
        if os.environ.get(v):
            return f"{v}={os.environ[v]}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_reason(info: dict, mtime: float, stale_s: float) -> Optional[str]:
    host = socket.gethostname()
    if info.get("host") == host and not _alive(int(info.get("pid", -1))):
        return f"its process {info.get('pid')} on {host} is gone"
    if info.get("job") and info.get("job") == job_id():
        return f"it belongs to this job ({info['job']}), restarted"
    age = time.time() - mtime
    if age > stale_s:
        return f"no heartbeat for {age:.0f} s (> run.lock_stale_s = {stale_s:.0f})"
    return None


class RunLock:
    def __init__(self, run_dir: Path, stale_s: float):
        self.path = Path(run_dir) / LOCK
        self.stale_s = stale_s
        self.held = False

    def _try(self) -> tuple[bool, str]:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "job": job_id(), "started": time.time()}
        for _ in range(2):
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    st = self.path.stat()
                except FileNotFoundError:
                    continue  # released meanwhile: try again
                except OSError as e:
                    return False, f"cannot read {self.path} ({e}); check the run folder's permissions"
                try:
                    info = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError):
                    info = {}  # unreadable: a writer died while creating it
                mtime = st.st_mtime if info else 0.0
                why = _stale_reason(info, mtime, self.stale_s)
                if why is None:
                    return False, _in_use(self.path, info, mtime) + f"; wait for it to finish, or if that process is "\
                                                                    f"dead remove {self.path}"
                if self._remove_stale(st):
                    print(f"taking over {self.path}: {why}")
                continue
            except OSError as e:
                return False, (f"cannot write in the run folder {self.path.parent} ({e.strerror}); make it writable "
                               "or give a writable one with run.dir=")
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return True, ""
        return False, f"could not take {self.path}; remove it if no run is writing to {self.path.parent}"

    def _remove_stale(self, seen: os.stat_result) -> bool:
        """Remove the lock file judged stale — only if it is still the file that was judged (two writers that
        both judged it stale must not remove each other's new lock). It is renamed away atomically, then
        checked; a fresh lock moved by mistake is put back (``link`` never replaces an existing file)."""
        away = self.path.with_name(f"{LOCK}.stale-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(self.path, away)
        except FileNotFoundError:
            return False
        st = away.stat()
        if (st.st_ino, st.st_dev, st.st_mtime_ns) == (seen.st_ino, seen.st_dev, seen.st_mtime_ns):
            away.unlink()
            return True
        try:
            os.link(away, self.path)  # another writer's fresh lock: put it back
        except FileExistsError:
            pass
        away.unlink()
        return False

    def acquire(self, rt) -> None:
        """Rank 0 takes the lock; every rank raises the same error when it is refused."""
        ok, msg = self._try() if rt.is_main else (True, "")
        if rt.distributed:
            flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=rt.device)
            torch.distributed.all_reduce(flag)
            ok = ok and int(flag.item()) == 0
        if not ok:
            raise UserError(msg or "run folder is in use by another writer (see rank 0's message)")

    def heartbeat(self) -> None:
        if self.held:
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def live_writer(run_dir: Path, stale_s: float) -> Optional[str]:
    """Why a new writer would be refused now (a live process holds ``<run>/run.lock``), or None. A launcher asks
    before it submits a job, so a busy run folder is refused at once rather than when the job starts."""
    path = Path(run_dir) / LOCK
    try:
        st = path.stat()
        info = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: a writer died while creating it; the job's own start takes it over
    if _stale_reason(info, st.st_mtime, stale_s) is not None:
        return None
    return _in_use(path, info, st.st_mtime) + "; wait for it to finish, or give another run.dir="


def _in_use(path: Path, info: dict, mtime: float) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", mtime)))
    return (f"run folder {path.parent} is in use by host {info.get('host')} pid {info.get('pid')} job "
            f"{info.get('job') or '-'} (since {since})")
