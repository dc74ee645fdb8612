"""run.net_interface: the network interface gloo and NCCL use, set as GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME
before the process group exists; a bad value or a clash with the environment is a clear error. (Across two
real nodes, tests/launcher/test_two_hosts_faults.py trains with run.net_interface=tr0 and no
GLOO_SOCKET_IFNAME in the environment.)"""
import os
import socket
import subprocess

import pytest
from cli_runner import BIN, REPO, run_trime
from shard_fixtures import write_pattern_splits

from trime_dist.core.launch_env import apply_net_interface

VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


@pytest.fixture
def clean_env(monkeypatch):
    for var in VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_sets_both_variables(clean_env):
    apply_net_interface("lo")
    assert [os.environ[v] for v in VARS] == ["lo", "lo"]


def test_empty_leaves_the_environment_alone(clean_env):
    clean_env.setenv("GLOO_SOCKET_IFNAME", "eth7")
    apply_net_interface("")
    assert os.environ["GLOO_SOCKET_IFNAME"] == "eth7" and "NCCL_SOCKET_IFNAME" not in os.environ


def test_same_value_in_the_environment_is_fine(clean_env):
    clean_env.setenv("NCCL_SOCKET_IFNAME", "lo")
    apply_net_interface("lo")
    assert [os.environ[v] for v in VARS] == ["lo", "lo"]


@pytest.mark.parametrize("var", VARS)
def test_clash_with_the_environment_names_both(clean_env, var):
    clean_env.setenv(var, "eth7")
    with pytest.raises(ValueError, match=f"run.net_interface=lo but {var}=eth7 is set in the environment"):
        apply_net_interface("lo")


def test_missing_interface_names_key_value_and_host(clean_env):
    with pytest.raises(ValueError) as e:
        apply_net_interface("nosuch0", key="net_interface")
    assert str(e.value).startswith(f"net_interface=nosuch0: no such network interface on {socket.gethostname()} "
                                   f"(it has: ")
    assert "lo" in str(e.value) and not any(v in os.environ for v in VARS)


TWO_RANKS = """\
import os, torch, torch.distributed as dist
from trime_dist.core.distributed import init_distributed
env = init_distributed(net_interface="lo")
t = torch.ones(2) * (env.rank + 1)
dist.all_reduce(t)
print(f"rank {env.rank}: {os.environ['GLOO_SOCKET_IFNAME']} {os.environ['NCCL_SOCKET_IFNAME']} {t.tolist()}",
      flush=True)
dist.barrier()
dist.destroy_process_group()  # before exit: gloo's threads still running at exit abort the process
"""


def test_two_ranks_bring_their_group_up_on_the_named_interface(tmp_path):
    from trime_dist.core.launch_env import free_port

    script = tmp_path / "two.py"
    script.write_text(TWO_RANKS)
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.run([f"{BIN}/deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(script)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: lo lo [3.0, 3.0]" in proc.stdout, proc.stdout[-2000:]


def test_train_refuses_a_missing_interface_before_the_rendezvous(tmp_path):
    write_pattern_splits(tmp_path, valid=False)
    proc = run_trime(["train", "--config", os.path.join(REPO, "configs", "tiny.yaml"), f"data.train={tmp_path}/train",
                      "data.valid=", f"run.out_dir={tmp_path}/run", "run.max_steps=1", "model.max_seq_len=32",
                      "run.net_interface=nosuch0"], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"trime train: error: run.net_interface=nosuch0: no such network interface on {socket.gethostname()}" \
        in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
