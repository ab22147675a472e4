"""A one-node Slurm cluster in a temp dir, for the tests: munged, slurmctld and slurmd from Debian's slurm-wlm.

Everything it writes (key, sockets, state, logs, slurm.conf) stays under its directory, and it listens on free
ports of 127.0.0.1, so it touches neither the machine's /etc/slurm nor a Slurm that may already run there.
Commands reach it through SLURM_CONF.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmUnavailable(Exception):
    """The daemons could not be started here; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running, and not a zombie (in a container nobody may reap a daemon that exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


class SlurmCluster:
    """One node (this machine, 2 CPUs) in one partition; `start()` then `stop()`."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.log = root / "log"
        self.node = socket.gethostname().split(".")[0]
        self.bin = root / "bin"

    def client_env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` with this cluster's Slurm commands: SLURM_CONF set, and the srun wrapper first on PATH."""
        return {**env, "SLURM_CONF": str(self.conf), "PATH": f"{self.bin}{os.pathsep}{env['PATH']}"}

    def _pid(self, daemon: str) -> int | None:
        path = self.root / f"{daemon}.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _write_conf(self) -> None:
        r = self.root
        # No accounting storage (there is no slurmdbd) and no cgroups (none to delegate in a container):
        # processes are tracked by their parents, CPUs are not bound, which keeps stage thread counts as a local run.
        # config_overrides: the node has the memory we say, so the stages' mem_mb requests fit on small machines.
        self.conf.write_text(f"""\
ClusterName=ptunetest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={self.log}/slurmctld.log
SlurmdLogFile={self.log}/slurmd.log
SlurmctldDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MinJobAge=600
SlurmdParameters=config_overrides
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=2 RealMemory=64000 State=UNKNOWN
PartitionName=main Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _write_srun_wrapper(self) -> None:
        # snakemake-executor-plugin-slurm-jobstep 0.6.1 drops every SLURM_* variable but the job's identity before
        # its `srun`, SLURM_CONF included; a cluster whose slurm.conf is not in /etc/slurm then fails with "Could
        # not establish a configuration source". The wrapper puts it back; srun itself is the real one.
        self.bin.mkdir(exist_ok=True)
        srun = self.bin / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec {shutil.which("srun")} "$@"\n')
        srun.chmod(0o755)

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env=self.client_env(dict(os.environ)), capture_output=True, text=True, timeout=60
        )

    def start(self, wait_s: float = 60) -> None:
        needed = (*DAEMONS, "sbatch", "srun", "squeue", "sinfo")
        missing = [d for d in needed if not shutil.which(d, path=f"{os.environ['PATH']}:/usr/sbin:/sbin")]
        if missing:
            raise SlurmUnavailable(
                f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; "
                ".ci/run does it when the Slurm test runs)"
            )
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged wants the socket's directories searchable by everyone
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(128))
        key.chmod(0o600)
        self._write_conf()
        self._write_srun_wrapper()
        steps = [
            # --force: munged refuses to run as root without it.
            [
                "munged",
                "--force",
                f"--socket={self.root}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={self.root}/munged.pid",
                f"--seed-file={self.root}/munge.seed",
                f"--log-file={self.log}/munged.log",
            ],
            ["slurmctld", "-c", "-f", str(self.conf)],  # -c: a clean state, no jobs from an earlier run
            ["slurmd", "-f", str(self.conf)],
        ]
        for cmd in steps:
            cmd[0] = shutil.which(cmd[0], path=f"{os.environ['PATH']}:/usr/sbin:/sbin")
            proc = self._run(*cmd)
            if proc.returncode != 0:
                self.stop()
                raise SlurmUnavailable(
                    f"{Path(cmd[0]).name} did not start (exit {proc.returncode}): "
                    f"{proc.stderr.strip()[-800:]}{self._log_tails()}"
                )
        deadline = time.monotonic() + wait_s
        state = ""
        while time.monotonic() < deadline:
            proc = self._run("sinfo", "--noheader", "--format=%T")
            state = proc.stdout.strip() or proc.stderr.strip()
            if proc.returncode == 0 and state == "idle":
                return
            time.sleep(1)
        self.stop()
        raise SlurmUnavailable(f"the node is not idle after {wait_s:.0f} s (sinfo: {state!r}){self._log_tails()}")

    def _log_tails(self) -> str:
        tails = []
        for path in sorted(self.log.glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-8:]
            tails.append(f"\n--- {path.name}\n" + "\n".join(lines))
        return "".join(tails)

    def stop(self) -> None:
        """Stop the daemons this cluster started (by the pids they wrote), slurmd first."""
        for daemon in reversed(DAEMONS):
            pid = self._pid(daemon)
            if pid is None:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    def controller_log(self) -> str:
        path = self.log / "slurmctld.log"
        return path.read_text(errors="replace") if path.exists() else ""
