"""launch/slurm.sbatch for real (issue 30 #6): a private one-node SLURM cluster (slurmctld + slurmd from Debian's
slurm-wlm, auth/none, its own ports and directories, started and stopped here) runs the sbatch script with a tiny
two-stage run: the job starts Ray, `livr train` trains and finishes on it, one MLflow run ends FINISHED, and Ray
stops with the job. Skipped, saying why, where SLURM is not installed (launch/test.sh installs it where apt-get
works) or cannot start."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow  # real clusters / servers / whole runs: not in the fast tier

BINS = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "scancel")
SEARCH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])

CONF = """ClusterName=livrtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/none
CredType=cred/none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=livr Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: str) -> str:
    try:
        lines = Path(path).read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "(empty log)"
    except OSError:
        return "(no log)"


def _ours(d: str, also: str = "") -> list[int]:
    """Processes whose command line names our private directory (Ray's, under RAY_TMPDIR), and `also` if given."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if d.encode() in cmd and also.encode() in cmd:
                pids.append(int(p.name))
    return pids


@pytest.fixture
def slurm():
    missing = [b for b in BINS if not shutil.which(b, path=SEARCH)]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} not found): launch/test.sh installs slurm-wlm where "
                    "apt-get works")
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root to start job steps: this test runs a private one-node cluster as root")
    d = tempfile.mkdtemp(prefix="livr-slurm-", dir="/tmp")  # short: Ray's unix sockets live under it
    host = socket.gethostname()
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(d, sub))
    conf = os.path.join(d, "slurm.conf")
    Path(conf).write_text(CONF.format(host=host, d=d, ctld_port=_free_port(), d_port=_free_port(),
                                      cpus=os.cpu_count() or 1))
    env = {**os.environ, "SLURM_CONF": conf, "PATH": SEARCH}
    daemons = []
    try:
        for cmd in (["slurmctld", "-D", "-i", "-f", conf], ["slurmd", "-D", "-f", conf, "-N", host]):
            daemons.append(subprocess.Popen([shutil.which(cmd[0], path=SEARCH), *cmd[1:]], env=env,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        start, state = time.monotonic(), ""
        while state not in ("idle", "mixed", "allocated"):
            dead = [p for p in daemons if p.poll() is not None]
            if dead or time.monotonic() - start > 60:
                pytest.skip(f"SLURM could not start here: slurmctld: {_log_tail(d + '/slurmctld.log')}; slurmd: "
                            f"{_log_tail(d + '/slurmd.log')}")
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, check=False)
            state = out.stdout.strip().rstrip("*")
            time.sleep(0.5)
        yield env, d
    finally:
        subprocess.run(["scancel", "--partition=livr"], env=env, capture_output=True, check=False)
        for p in daemons:
            p.terminate()
        for p in daemons:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in _ours(d):  # anything of the job's Ray left behind (never another user's Ray: `ray stop` would be)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(d, ignore_errors=True)


def test_sbatch_starts_ray_trains_two_stages_and_logs_one_run(slurm, backbone_cache, data_cache, tmp_path):
    env, d = slurm
    venv_bin = os.path.dirname(sys.executable)
    env = {**env, "PATH": venv_bin + os.pathsep + env["PATH"], "RAY_TMPDIR": d, "LIVR_RAY_PORT": str(_free_port()),
           "RAY_AUTH_MODE": "disabled", "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "LIVR_QUIET": "1"}
    over = tiny_overrides(backbone_cache, data_cache, tmp_path, name="slurm", **{
        "distributed.num_workers": 1, "train.stage1_steps": 2, "train.stage2_steps": 2, "eval.splits": "[val]",
        "data.num_workers": 0})
    out = subprocess.run(["sbatch", "--nodes=1", f"--output={d}/job-%j.out", "launch/slurm.sbatch",
                          "configs/demo.yaml", *over], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, f"{out.stdout}{out.stderr}"
    assert "Submitted batch job" in out.stdout
    # until the job ends (what `sbatch --wait` does, but every 0.5 s: its own polls back off to 10 s apart)
    job_id, start, state = out.stdout.split()[-1], time.monotonic(), ""
    while state in ("", "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.monotonic() - start < 500, f"job {job_id} still {state} after 500 s"
        time.sleep(0.5)
        show = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True,
                              check=False).stdout
        state = next((f.split("=", 1)[1] for f in show.split() if f.startswith("JobState=")), "")
    logs = [p.read_text(errors="replace") for p in Path(d).glob("job-*.out")]
    job = logs[0] if logs else ""
    assert state == "COMPLETED" and "ExitCode=0:0" in show.split(), f"{show}\n{job[-4000:]}"  # sbatch --wait's 0
    assert "Ray runtime started" in job, job[-4000:]  # the job's own `ray start --head`
    final = tmp_path / "runs" / "slurm" / "final_metrics.json"
    assert final.exists(), job[-4000:]
    assert json.loads(final.read_text())["global_step"] == 4
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("livr-demo").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    deadline = time.monotonic() + 2  # (its `ray start` steps end with the job: given 2 s)
    while _ours(d, "raylet") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _ours(d, "raylet"), "Ray outlived its job"
