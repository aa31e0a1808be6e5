"""No unverified pickle on sweep resume: the Ray Tune files that `Tuner.restore` unpickles are HMAC-signed.

Ray Tune 2.60 resumes a sweep by unpickling files in the sweep's storage directory: `tuner.pkl` (pickle),
the newest `experiment_state-*.json` (trial states embed hex cloudpickles), `basic-variant-state-*.json` /
`search_gen_state-*.json` and `searcher-state-*.pkl` / `callback-states-*.pkl` (cloudpickle), and per trial
`error.pkl` / `params.pkl`. Whoever can write that (shared) storage could run code on the next resume.

livr signs them: `<experiment dir>/livr_trust.json` maps each such file to the HMAC-SHA256s of the versions
this driver wrote, the whole map HMAC'd too, keyed by a secret that is not in the storage: LIVR_TUNE_SECRET,
else `~/.config/livr/tune_secret` ($XDG_CONFIG_HOME honoured; 32 random bytes, created 0600 on first use).
What is signed is read from the driver's own local staging copy (what Tune wrote), never from the storage,
except `tuner.pkl`, which Tune writes straight to the storage and livr signs right after. Before `Tuner.restore`
(and `Tuner.can_restore`) every such file in the storage must carry a matching HMAC, else a one-line
ConfigError; LIVR_TUNE_TRUST_UNSIGNED=1 skips the check (a sweep you trust, e.g. written by another machine).
"""
from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import os
import secrets

from ray import tune

from livr.config import ConfigError

SIDECAR = "livr_trust.json"
TOP = ("*.pkl", "experiment_state-*.json", "basic-variant-state-*.json", "search_gen_state-*.json")
KEEP = 16  # versions remembered per file: the storage may lag the staging copy by a few saves
SIGNERS: dict = {}  # experiment path -> the live Signer (the restored one after Tuner.restore)


def secret() -> bytes:
    """The signing key: $LIVR_TUNE_SECRET, else the key file (created 0600 on first use)."""
    if os.environ.get("LIVR_TUNE_SECRET"):
        return os.environ["LIVR_TUNE_SECRET"].encode()
    home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    path = os.path.join(home, "livr", "tune_secret")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        except FileExistsError:  # another driver created it first
            pass
    with open(path) as f:
        return f.read().strip().encode()


def _fs(path: str):
    """(pyarrow filesystem, path in it) for a local path or a URI (s3://, gs://, ...)."""
    import pyarrow.fs

    if "://" in path:
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)


def _candidates(names_by_dir: dict[str, list[str]]) -> list[str]:
    """The relative paths Ray may unpickle: top-level state files, and *.pkl one directory down."""
    out = []
    for d, names in names_by_dir.items():
        pats = TOP if d == "" else ("*.pkl",)
        out += [f"{d}/{n}" if d else n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]
    return sorted(out)


def _list(exp_path: str) -> tuple[object, str, list[str]]:
    import pyarrow.fs

    fs, root = _fs(exp_path)
    names: dict[str, list[str]] = {"": []}
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        return fs, root, []
    for info in fs.get_file_info(pyarrow.fs.FileSelector(root)):
        if info.type == pyarrow.fs.FileType.File:
            names[""].append(info.base_name)
        elif info.type == pyarrow.fs.FileType.Directory:
            sub = fs.get_file_info(pyarrow.fs.FileSelector(info.path))
            names[info.base_name] = [i.base_name for i in sub if i.type == pyarrow.fs.FileType.File]
    return fs, root, _candidates(names)


def _mac(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def _manifest_mac(key: bytes, files: dict) -> str:
    return _mac(key, json.dumps(files, sort_keys=True).encode())


def _read_manifest(fs, root: str, key: bytes) -> dict | None:
    """The signed map {relative path: [hmac, ...]}, or None if absent or not signed with `key`."""
    try:
        with fs.open_input_stream(f"{root}/{SIDECAR}") as f:
            doc = json.loads(f.readall())
        files = doc["files"]
        return files if hmac.compare_digest(doc["mac"], _manifest_mac(key, files)) else None
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
        return None


def _refuse(path: str) -> ConfigError:
    return ConfigError(f"tune: {path} is not signed by this machine's livr key; it may have been modified — refusing "
                       "to unpickle it (delete the sweep dir to start again, or LIVR_TUNE_TRUST_UNSIGNED=1 if you trust it)")


def verify(exp_path: str) -> None:
    """Refuse (ConfigError) if any file Ray would unpickle from `exp_path` lacks a matching HMAC."""
    fs, root, rels = _list(exp_path)
    if not rels:
        return
    if os.environ.get("LIVR_TUNE_TRUST_UNSIGNED") == "1":  # the user vouches for them: sign them as they are
        print(f"[livr tune] LIVR_TUNE_TRUST_UNSIGNED=1: trusting and signing the Tune state in {exp_path}", flush=True)
        signer = Signer(exp_path)
        for rel in rels:
            signer.sign_storage(rel)
        return
    key = secret()
    files = _read_manifest(fs, root, key) or {}
    for rel in rels:
        with fs.open_input_stream(f"{root}/{rel}") as f:
            mac = _mac(key, f.readall())
        if not any(hmac.compare_digest(mac, m) for m in files.get(rel, [])):
            raise _refuse(f"{exp_path.rstrip('/')}/{rel}")


class Signer(tune.Callback):
    """Driver-side Tune callback that keeps `<exp>/livr_trust.json` current. Tune calls `get_state()` of its
    callbacks each time it saves the experiment state (after the state files are written to the driver's
    staging directory, before they are uploaded): the staging copies are signed there. `sign_storage(name)`
    signs a file Tune writes straight to the storage (tuner.pkl); `sign()` after fit() returns."""

    def __init__(self, exp_path: str):
        self.__setstate__({"exp_path": exp_path})

    def __getstate__(self):  # Tune pickles its callbacks into tuner.pkl: never the key
        return {"exp_path": self.exp_path}

    def __setstate__(self, state):  # also on Tuner.restore, which unpickles the callbacks from tuner.pkl
        self.exp_path, self.key, self.staging = state["exp_path"], secret(), None
        fs, root = _fs(self.exp_path)
        self.files = _read_manifest(fs, root, self.key) or {}  # resumed: keep the versions signed before
        SIGNERS[self.exp_path] = self

    def on_step_begin(self, iteration, trials, **info):
        if self.staging is None and trials:
            self.staging = trials[0].storage.experiment_driver_staging_path

    def get_state(self) -> None:  # stateless (no callback-states-*.pkl for Tune to write): signs, returns None
        self.sign()

    def _merge(self) -> None:
        """Take in what another instance signed (Tune may copy its callbacks)."""
        fs, root = _fs(self.exp_path)
        for rel, macs in (_read_manifest(fs, root, self.key) or {}).items():
            seen = self.files.get(rel, [])
            self.files[rel] = (seen + [m for m in macs if m not in seen])[-KEEP:]

    def _add(self, rel: str, data: bytes) -> bool:
        mac, seen = _mac(self.key, data), self.files.setdefault(rel, [])
        if mac in seen:
            return False
        self.files[rel] = (seen + [mac])[-KEEP:]
        return True

    def sign_storage(self, rel: str) -> None:
        fs, root = _fs(self.exp_path)
        with fs.open_input_stream(f"{root}/{rel}") as f:
            self._add(rel, f.readall())
        self._write()

    def sign(self) -> None:
        self.staging = self.staging or _find_staging(self.exp_path)  # (a restored finished sweep runs no step)
        if self.staging is None or not os.path.isdir(self.staging):
            return
        self._merge()
        changed = False
        for rel in _local_candidates(self.staging):
            with open(os.path.join(self.staging, rel), "rb") as f:
                changed |= self._add(rel, f.read())
        if changed:
            self._write()

    def _write(self) -> None:
        """To the storage, and to the staging copy: Tune uploads the staging directory over the storage (a
        resumed sweep's staging holds the sidecar it downloaded, which must not overwrite the newer one)."""
        doc = json.dumps({"files": self.files, "mac": _manifest_mac(self.key, self.files)}, indent=1)
        if self.staging and os.path.isdir(self.staging):
            _write_local(os.path.join(self.staging, SIDECAR), doc)
        if "://" not in self.exp_path:
            return _write_local(os.path.join(os.path.abspath(self.exp_path), SIDECAR), doc)
        fs, root = _fs(self.exp_path)
        with fs.open_output_stream(f"{root}/{SIDECAR}") as f:
            f.write(doc.encode())


def _write_local(path: str, doc: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(doc)
    os.replace(path + ".tmp", path)


def _local_candidates(root: str) -> list[str]:
    names = {"": [n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n))]}
    for d in os.listdir(root):
        if os.path.isdir(os.path.join(root, d)):
            names[d] = [n for n in os.listdir(os.path.join(root, d)) if os.path.isfile(os.path.join(root, d, n))]
    return _candidates(names)


def _find_staging(exp_path: str) -> str | None:
    """The driver's staging copy of the experiment in this Ray session (the newest, if several)."""
    import glob

    from ray.train.constants import _get_ray_train_session_dir

    name = os.path.basename(exp_path.rstrip("/"))
    found = glob.glob(os.path.join(glob.escape(_get_ray_train_session_dir()), "*", glob.escape(name), "driver_artifacts"))
    return max(found, key=os.path.getmtime) if found else None
