"""The shared-storage probe: every learner node must read what the driver wrote where checkpoints go."""

import re

import pytest

from mopd_ray.cluster import ActorGroup, Bundle
from mopd_ray.storage import StorageError, check_writable_locations, probe_shared_storage
from mopd_ray.workers.base import RoleWorker

from .conftest import compose_cfg

pytestmark = pytest.mark.slow


class _ElsewhereMounted(RoleWorker):
    """A node that mounts the run's storage at another path (what a node without the shared mount sees:
    one machine cannot show two filesystems, so this rank's view is moved by a prefix)."""

    def read_token(self, path: str) -> tuple:
        return super().read_token(path.replace("/shared/", "/elsewhere/"))


@pytest.mark.parametrize("worker, ok", [(RoleWorker, True), (_ElsewhereMounted, False)])
def test_probe_passes_on_one_filesystem_and_names_the_node_that_cannot_read(local_ray, tmp_path, worker, ok):
    folders = [tmp_path / "shared" / "ck" / "run1", tmp_path / "shared" / "out"]
    group = ActorGroup("learner", worker, 2, Bundle(0.1), call_timeout_s=60)
    try:
        if ok:
            probe_shared_storage(folders, group, 60)
        else:
            with pytest.raises(StorageError) as e:
                probe_shared_storage(folders, group, 60)
            msg = str(e.value)
            assert str(folders[0]) in msg and "a filesystem every node mounts" in msg
            assert re.search(r"learner rank\(s\) on \d+\.\d+\.\d+\.\d+ cannot read", msg), msg
    finally:
        group.shutdown()
    assert not list((tmp_path / "shared").rglob(".mopd_storage_probe-*"))  # the tokens are removed


def test_a_relative_checkpoint_folder_inside_a_ray_jobs_working_dir_is_refused(tmp_path, monkeypatch):
    job_dir = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    job_dir.mkdir(parents=True)
    monkeypatch.chdir(job_dir)
    with pytest.raises(StorageError, match=r"run.checkpoint_dir=checkpoints/mopd_local is relative: in a Ray job"):
        check_writable_locations(compose_cfg(), str(job_dir / "outputs"))
    check_writable_locations(compose_cfg(f"run.checkpoint_dir={tmp_path}/shared"), str(tmp_path / "out"))
