"""The shared-memory buffer DeepSpeed's CPU all-reduce creates for each rank and never unlinks (64 MB in
/dev/shm per rank and run): its name, and its removal when a stage ends.

DeepSpeed (ops/csrc/cpu/comm/shm.cpp) creates it in deepspeed.init_distributed when all ranks are on one
machine (LOCAL_SIZE == world size), named after the user id, MASTER_ADDR, MASTER_PORT and the rank.
"""
from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
BUFFER_PREFIX = "deepspeed_allreduce_buffer"
ALL_BUFFERS_GLOB = os.path.join(SHM_DIR, f"{BUFFER_PREFIX}_*")  # every run's and user's (tests clean these)


def own_buffer_path(environ: dict | None = None) -> str | None:
    """/dev/shm path of this rank's buffer, from the variables DeepSpeed read (export_env set them);
    None when the process is no rank of a group (no RANK)."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ:
        return None
    name = f"{BUFFER_PREFIX}_{os.getuid()}_{environ.get('MASTER_ADDR', '')}_{environ.get('MASTER_PORT', '')}_" \
           f"{environ['RANK']}"
    return os.path.join(SHM_DIR, name)


def remove_own_buffer() -> bool:
    """Unlink this rank's buffer (the other ranks keep their mappings, only the name goes); True if it
    existed. Run at the end of a stage, after the last collective: a peer still inside
    deepspeed.init_distributed would wait for the name forever, but by then every rank has opened it."""
    path = own_buffer_path()
    if path is None or not os.path.exists(path):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    log.debug("removed DeepSpeed's all-reduce buffer %s", path)
    return True
