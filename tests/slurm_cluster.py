"""A private one-node slurm cluster on this machine, for testing ``launch/slurm/*.sbatch`` for real.

It follows ``slurm-local.md``'s measured recipe (munge, slurmctld, slurmd, ``AuthInfo=cred_expire=10`` so a
requeued job restarts after 10 s instead of 120 s), with two changes so it never touches a real slurm on the
machine: its ``slurm.conf``, state, spool, logs and pid files live in one folder of its own, and its two
daemons listen on free ports. Clients reach it through ``SLURM_CONF`` (see :meth:`LocalSlurmCluster.env`).
Daemons run in the foreground as our children, so :meth:`stop` ends exactly the processes it started, by pid.

Needs root and the Debian packages ``slurmd slurmctld slurm-client munge``. By hand::

    python tests/slurm_cluster.py start /tmp/slurm    # prints the SLURM_CONF to export
    python tests/slurm_cluster.py stop /tmp/slurm
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SLURM_COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "scancel")
MUNGE_KEY = Path("/etc/munge/munge.key")
PID_FILE = "daemons.pid"


class SlurmClusterError(RuntimeError):
    """The cluster could not be started; the message says what failed and where its log is."""


def unavailable_reason() -> str | None:
    """Why a local cluster cannot be started here, or None when it can."""
    missing = [name for name in SLURM_COMMANDS if shutil.which(name) is None]
    if missing:
        return (
            f"slurm is not installed (missing {', '.join(missing)}; "
            "apt-get install slurmd slurmctld slurm-client munge)"
        )
    if shutil.which("pgrep") is None:
        return "pgrep is not installed (train.sbatch uses it to find the ranks; apt-get install procps)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _munge_answers() -> bool:
    """True when a munged is already serving the default socket (then we use it and leave it alone)."""
    if shutil.which("munge") is None:
        return False
    token = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    if token.returncode != 0:
        return False
    check = subprocess.run(["unmunge"], input=token.stdout, capture_output=True, timeout=10)
    return check.returncode == 0


class LocalSlurmCluster:
    """One node (this host, all its cores) in one partition ``debug``; everything under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.conf = self.root / "slurm.conf"
        self.node = socket.gethostname().split(".")[0]
        self.cpus = len(os.sched_getaffinity(0))
        self.processes: dict[str, subprocess.Popen] = {}

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for slurm clients (sbatch, squeue, ...) that talk to this cluster; a job submitted
        with it sees ``extra`` too (sbatch exports the submitter's environment)."""
        return {**os.environ, **extra, "SLURM_CONF": str(self.conf)}

    def _write_conf(self) -> None:
        for folder in ("state", "spool", "log"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"""ClusterName=medgantest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job is held back for cred_expire seconds: 120 by default, 10 here
AuthInfo=cred_expire=10
MpiDefault=none
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/log/slurmctld.log
SlurmdLogFile={self.root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
# look at pending jobs every second, not every 60 s: a requeued job starts as soon as it may
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# a cancelled job's processes get SIGKILL this long after SIGTERM (30 s by default): quick teardown
KillWait=10
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start_munge(self) -> None:
        if _munge_answers():
            return
        for folder in ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge"):
            Path(folder).mkdir(parents=True, exist_ok=True)
        if not MUNGE_KEY.exists():
            MUNGE_KEY.write_bytes(os.urandom(1024))
        for folder in ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge"):
            shutil.chown(folder, "munge", "munge")
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
        # --force: munged refuses root-owned parents of its key and socket otherwise
        self._spawn("munged", ["munged", "--foreground", "--force"])
        self._wait(_munge_answers, 20, "munged", Path("/var/log/munge/munged.log"))

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.root / "log" / f"{name}.out").open("w")
        self.processes[name] = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
        )
        with (self.root / PID_FILE).open("a") as pids:
            pids.write(f"{self.processes[name].pid} {name}\n")

    def _wait(self, ready, timeout: float, name: str, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            for daemon, process in self.processes.items():
                if process.poll() is not None:
                    raise SlurmClusterError(f"{daemon} exited {process.returncode}; see {self.root / 'log'}")
            time.sleep(0.5)
        raise SlurmClusterError(f"{name} not ready after {timeout:.0f} s; see {log}")

    def node_state(self) -> str:
        result = self.run("sinfo", "--noheader", "--nodes", self.node, "--format", "%T", check=False)
        return result.stdout.strip() if result.returncode == 0 else ""

    def start(self, timeout: float = 60) -> None:
        """Start munged (unless one answers), slurmctld and slurmd; return once the node is idle."""
        reason = unavailable_reason()
        if reason:
            raise SlurmClusterError(reason)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / PID_FILE).unlink(missing_ok=True)
        self._write_conf()
        try:
            self._start_munge()
            # -D: stay in the foreground (our child, stopped by pid); -i/-c: ignore and clear old state
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-c", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", self.node, "-f", str(self.conf)])
            self._wait(lambda: self.node_state() == "idle", timeout, "the slurm node", self.root / "log")
        except BaseException:
            self.stop()
            raise

    def run(
        self, *command: str, check: bool = True, env: dict[str, str] | None = None, **kwargs
    ) -> subprocess.CompletedProcess:
        """A slurm client command against this cluster (``env``: :meth:`env`'s); its output as text."""
        result = subprocess.run(command, capture_output=True, text=True, env=env or self.env(), **kwargs)
        if check and result.returncode != 0:
            error = result.stderr.strip()
            raise SlurmClusterError(f"{' '.join(command)} exited {result.returncode}: {error}")
        return result

    def job_fields(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s KEY=VALUE fields (JobState, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def cancel_jobs_and_wait(self, timeout: float = 60) -> None:
        """Cancel every job and wait until none runs: slurmstepd and the jobs outlive slurmd otherwise."""
        self.run("scancel", "--partition", "debug", check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.run("squeue", "--noheader", check=False).stdout.strip():
                return
            time.sleep(1)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM each daemon this object started (slurmd first), SIGKILL after ``timeout`` s."""
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        (self.root / PID_FILE).unlink(missing_ok=True)


def _stop_recorded(root: Path) -> None:
    """``stop`` from another process: the pids ``start`` wrote, newest first."""
    pid_file = root / PID_FILE
    if not pid_file.exists():
        print(f"{pid_file}: no daemons recorded", file=sys.stderr)
        return
    for line in reversed(pid_file.read_text().split("\n")):
        if line:
            pid, name = line.split()
            try:
                os.kill(int(pid), signal.SIGTERM)
                print(f"stopped {name} ({pid})")
            except ProcessLookupError:
                pass
    pid_file.unlink()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python tests/slurm_cluster.py {start,stop} DIR", file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve()
    if argv[0] == "stop":
        _stop_recorded(root)
        return 0
    cluster = LocalSlurmCluster(root)
    try:
        cluster.start()
    except SlurmClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    # the daemons outlive this command (own sessions); `stop DIR` ends them by the recorded pids
    cluster.processes.clear()
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
