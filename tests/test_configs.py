"""Every shipped config loads and validates: the training configs at the world size they are written for (with
the paper's tokens per step), and configs/slurm_example.yaml with every chain step parsed by its stage's flags."""
import glob
import os
import shlex

import pytest

from trime_dist.core.config import load_config
from trime_dist.train.config import TrainConfig, grad_accum_steps, validate_train_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")

# config -> (ranks it is written for, tokens per optimizer step in the paper's recipe, CE warm-up epochs);
# None: not a paper model
TRAINING = {"tiny.yaml": (2, None, None), "wt103_247m.yaml": (4, 3072 * 6 * 4, 9),
            "wt103_150m.yaml": (4, 9000 * 2 * 4, 3), "enwik8_38m.yaml": (4, 12288 * 1 * 4, 3)}


def test_every_shipped_config_is_checked_here():
    shipped = {os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yaml"))}
    assert shipped == set(TRAINING) | {"slurm_example.yaml"}


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_training_config_validates_with_the_papers_step(name):
    ranks, tokens_per_step, ce_epochs = TRAINING[name]
    cfg = load_config(TrainConfig, os.path.join(CONFIGS, name))
    validate_train_config(cfg, ranks)
    if tokens_per_step is None:
        return
    assert cfg.data.global_batch_size * cfg.model.max_seq_len == tokens_per_step
    assert cfg.objective.ce_warmup_epochs == ce_epochs
    assert cfg.model.dropout == 0.3
    for objective in ("trime_local", "trime_long", "trime_ext"):   # every row of the paper from this one file
        validate_train_config(load_config(TrainConfig, os.path.join(CONFIGS, name), [f"objective.name={objective}"]),
                              ranks)


def test_slurm_example_chain_parses_and_trains_the_papers_step():
    from launcher.slurm_config import load_slurm_config, resources_for
    from trime_dist.cli import build_parser
    from trime_dist.core.flags import dataclass_from_flags
    from trime_dist.eval.cli import settings_from_config
    from trime_dist.eval.config import EvalConfig

    cfg = load_slurm_config(os.path.join(CONFIGS, "slurm_example.yaml"))
    stages = []
    for step in cfg.chain:
        argv = shlex.split(step)
        args = build_parser(argv[0]).parse_args(argv)   # every flag exists and has a valid value
        stages.append(args.stage)
        if args.stage == "train":
            res = resources_for(cfg, "train")
            world = res.nodes * res.tasks_per_node
            train = load_config(TrainConfig, os.path.join(REPO, args.config), args.overrides)
            validate_train_config(train, world)
            assert train.data.global_batch_size * train.model.max_seq_len == 3072 * 24
            assert grad_accum_steps(train, world) == 3
        if args.stage == "datastore":
            assert "--context-window" in argv and argv[argv.index("--context-window") + 1] == "2560"
        if args.stage == "eval":
            ev = dataclass_from_flags(EvalConfig, args)
            rows = settings_from_config(ev)
            assert ev.context_window == 2560 and ev.mem_size == 12288 and ev.k == 1024
            assert ev.taus() and ev.lambdas() and ev.knn_temperatures() and ev.valid
            assert any(r.memory == "external" and r.knn_lambda == 0.3 and r.knn_temperature == 10.5 for r in rows)
    assert stages == ["prepare", "prepare", "prepare", "group", "train", "datastore", "eval"]
