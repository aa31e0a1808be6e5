#!/usr/bin/env bash
# Test set-up, best effort: install SLURM (Debian's slurm-wlm, which brings munge) so that tests/cluster/test_slurm.py can run
# launch/slurm.sbatch under a real scheduler. Never fails the test run: without root or apt-get (or with
# LIVR_SLURM_INSTALL=0) it says so and tests/cluster/test_slurm.py skips with its reason.
set -uo pipefail
if command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ]; then
  exit 0
fi
if [ "${LIVR_SLURM_INSTALL:-1}" = "0" ]; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[livr] test set-up: SLURM is not installed and cannot be here (needs apt-get as root): tests/cluster/test_slurm.py skips" >&2
  exit 0
fi
echo "[livr] test set-up: installing slurm-wlm (apt-get) for tests/cluster/test_slurm.py"
install() { DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1; }
if ! install && ! { timeout 300 apt-get update -q >/dev/null 2>&1 && install; }; then
  echo "[livr] test set-up: apt-get could not install slurm-wlm: tests/cluster/test_slurm.py skips" >&2
fi
exit 0
