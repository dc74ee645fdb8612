"""The progress watchdog ends a rank stuck in a collective whose process group has no usable timeout (a
group made later with torch's 30-minute default, like ZeRO's), naming the rank that does not answer."""
import os
import socket
import subprocess
import time

from cli_runner import BIN, REPO

from trime_dist.core.constants import EXIT_RANK_LOST

STUCK = """\
import datetime, os, time, torch, torch.distributed as dist
from trime_dist.core.distributed import init_distributed
from trime_dist.core.watchdog import ProgressWatchdog
env = init_distributed()
group = dist.new_group(list(range(env.world_size)), timeout=datetime.timedelta(minutes=30))
if env.rank == 1:
    time.sleep(60)  # hung (alive, connections open, no watchdog of its own): never joins the all-reduce
watchdog = ProgressWatchdog(3, env, "probe", "the probe's all-reduce").start()
dist.all_reduce(torch.ones(4), group=group)
print("all-reduce returned", flush=True)
"""


def test_watchdog_names_the_rank_that_never_joins(tmp_path):
    from trime_dist.core.launch_env import free_port

    script = tmp_path / "stuck.py"
    script.write_text(STUCK)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    start = time.monotonic()
    # the DeepSpeed launcher ends the other rank once one fails, and exits with the failing rank's status
    proc = subprocess.run([f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(script)],
                          check=False, capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == EXIT_RANK_LOST, proc.stderr[-3000:]
    assert elapsed < 45, proc.stderr[-3000:]  # 3 s limit + 5 s check-in (+ start-up), not rank 1's 60 s sleep
    lines = [line for line in proc.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, proc.stderr[-3000:]
    host = socket.gethostname()  # both ranks ran here: each published it in the store at start
    assert lines[0].startswith(f"trime probe: error: rank 0 on {host}: no progress for ")
    assert f"during the probe's all-reduce (limit 3 s); rank 1 ({host}) of 2 died or stopped answering" in lines[0]
    assert "all-reduce returned" not in proc.stdout
