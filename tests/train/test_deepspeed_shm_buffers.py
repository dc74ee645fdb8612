"""DeepSpeed's CPU all-reduce creates a 64 MB /dev/shm buffer per rank and never unlinks it: the stages
remove their own at shutdown (trime_dist.core.shm_buffers), under the real DeepSpeed launcher."""
import glob
import json
import os
import subprocess

from cli_runner import BIN, REPO, trime_command
from shard_fixtures import write_segment_dir

from trime_dist.core.launch_env import free_port
from trime_dist.core.shm_buffers import BUFFER_PREFIX, SHM_DIR

# DeepSpeed's own init (as bench scripts or other tools call it) creates the buffer; trime train's
# init_deepspeed_distributed does not (test_trime_train_leaves_no_buffer)
PROBE = """\
import json, os, sys, deepspeed, torch
from trime_dist.core.distributed import all_reduce_sum, shutdown_distributed
from trime_dist.core.shm_buffers import own_buffer_path
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
path = own_buffer_path()
existed = os.path.exists(path)
all_reduce_sum(torch.ones(1))  # every rank has mapped every buffer before any is unlinked
shutdown_distributed()
with open(os.path.join(os.environ["PROBE_DIR"], f"rank{os.environ['RANK']}.json"), "w") as f:
    json.dump({"path": path, "existed": existed, "exists_after": os.path.exists(path)}, f)
"""


def _buffers_of_port(port: int) -> list[str]:
    return glob.glob(os.path.join(SHM_DIR, f"{BUFFER_PREFIX}_{os.getuid()}_*_{port}_*"))


def test_each_rank_unlinks_its_own_buffer_at_shutdown(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    (tmp_path / "out").mkdir()
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, PROBE_DIR=str(tmp_path / "out"))
    proc = subprocess.run([f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(port), str(script)],
                          check=False, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    # the name is the one DeepSpeed gave (the buffer existed), and it is gone after shutdown
    assert [(r["existed"], r["exists_after"]) for r in rows] == [(True, False), (True, False)], rows
    assert rows[0]["path"] != rows[1]["path"]
    assert _buffers_of_port(port) == []


def test_trime_train_creates_no_buffer(tmp_path):
    """init_deepspeed_distributed hides LOCAL_SIZE from DeepSpeed's shared-memory all-reduce (unused by
    training): no buffer while the ranks run, so none can leak or be waited for."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os, json\n"
                     "from trime_dist.core.shm_buffers import own_buffer_path\n"
                     "from trime_dist.core.distributed import all_reduce_sum, shutdown_distributed\n"
                     "from trime_dist.train.engine import init_deepspeed_distributed\n"
                     "import torch\n"
                     "init_deepspeed_distributed(60)\n"
                     "all_reduce_sum(torch.ones(1))\n"
                     "seen = os.path.exists(own_buffer_path())\n"
                     "local_size = os.environ.get('LOCAL_SIZE')\n"
                     "all_reduce_sum(torch.ones(1))\n"
                     "shutdown_distributed()\n"
                     "with open(f\"rank{os.environ['RANK']}.json\", 'w') as f:\n"   # one file per rank: printed lines interleave
                     "    json.dump({'seen': seen, 'local_size': local_size}, f)\n")
    proc = subprocess.run([f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(probe)],
                          check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert rows == [{"seen": False, "local_size": "2"}] * 2  # (LOCAL_SIZE is back for the rest of DeepSpeed)


def test_trime_train_leaves_no_buffer(tmp_path):
    write_segment_dir(str(tmp_path / "train"), [300] * 4, seq_len=32, vocab_size=50, per_shard=40)
    port = free_port()
    args = ["train", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"data.train={tmp_path}/train",
            "data.valid=", f"run.out_dir={tmp_path}/run", "run.max_steps=2", "model.max_seq_len=32"]
    cmd = trime_command(args, ranks=2)
    cmd[cmd.index("--master_port") + 1] = str(port)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(tmp_path / "run" / "summary.json")
    assert _buffers_of_port(port) == []
