"""What every role's actor answers besides its work: where it runs, its process, and what it sees on disk."""

from __future__ import annotations

from typing import Optional


class RoleWorker:
    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        import os

        return os.getpid()

    def reuse(self, *args, **kwargs) -> bool:
        """Taken by another run with these constructor arguments (mopd_ray/warm.py): a frozen role's own
        are equal to them, so nothing changes (roles with state reset it)."""
        return True

    def read_token(self, path: str) -> tuple:
        """(this node's address, the file's text or None): the shared-storage probe (mopd_ray/storage.py)."""
        import ray

        try:
            with open(path, encoding="utf-8") as f:
                text: Optional[str] = f.read()
        except OSError:
            text = None
        return ray.util.get_node_ip_address(), text
