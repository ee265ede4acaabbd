"""Where a run writes, as every node sees it.

Learner ranks write the checkpoints and the final student from their own nodes, and a later launch's
driver reads them back, so these folders must be one location that every node mounts (NFS, a
parallel filesystem, a FUSE-mounted bucket). The probe: the driver writes a token into each folder and
every learner rank must read it back; a node that cannot is named with the fix.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    pass


def _in_job_working_dir(path: Path) -> bool:
    """The unpacked ``ray job submit --working-dir`` folder: removed with the job, on the driver's node only."""
    return "runtime_resources" in Path.cwd().parts and Path.cwd() in path.parents


def check_writable_locations(cfg, run_dir: str) -> None:
    """Refuse, before any engine starts, a relative checkpoint folder inside a Ray job's working directory."""
    ck = cfg.run.checkpoint_dir
    if not os.path.isabs(os.path.expanduser(ck)) and _in_job_working_dir(Path(ck).resolve()):
        raise StorageError(
            f"run.checkpoint_dir={ck} is relative: in a Ray job it resolves inside the job's working directory "
            f"({Path.cwd()}), which Ray deletes when the job ends and other nodes do not see; give an absolute path "
            "on storage every node mounts, e.g. run.checkpoint_dir=/shared/checkpoints/<name>")
    if _in_job_working_dir(Path(run_dir).resolve()):
        log.warning("the run directory %s is inside the Ray job's working directory, which Ray deletes when the job "
                    "ends: set hydra.run.dir (or run.output_dir) to shared storage to keep the final student and logs",
                    run_dir)


def probe_shared_storage(folders: list, learners, timeout_s: float) -> None:
    """Every learner rank reads a token the driver wrote into each folder, else StorageError naming the
    folder, the node and the fix."""
    tokens, made = {}, []
    try:
        for folder in folders:
            if not Path(folder).exists():
                made.append(Path(folder))
            Path(folder).mkdir(parents=True, exist_ok=True)
            path = Path(folder) / f".mopd_storage_probe-{uuid.uuid4().hex[:12]}"
            token = uuid.uuid4().hex
            path.write_text(token, encoding="utf-8")
            tokens[str(path)] = token
        for path, token in tokens.items():
            seen = learners.gather(learners.call_all("read_token", path), "shared-storage probe", timeout_s)
            bad = sorted({ip for ip, text in seen if text != token})
            if bad:
                raise StorageError(
                    f"{Path(path).parent} is not the same folder on every node: learner rank(s) on {', '.join(bad)} "
                    f"cannot read the file the driver wrote there. Checkpoints and the final student are written by "
                    f"the learners and read back by the driver: put run.checkpoint_dir and the run directory "
                    f"(hydra.run.dir) on a filesystem every node mounts at the same path (NFS, Lustre, a mounted bucket)")
    finally:
        for path in tokens:
            Path(path).unlink(missing_ok=True)
        for folder in made:  # a run's checkpoint folder appears with its first checkpoint
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
