"""One briefly SFT'd tiny model on the procedural shop tasks, shared by the GRPO end-to-end tests
and the multi-process tests (built once per session: `shop_sft_run` in conftest.py)."""

from pathlib import Path

import jax

from cacherl_jax.agent.procedural import generate_tasks, write_trajectories
from cacherl_jax.train import sft
from configs import sft as sft_configs

# Tasks whose first call takes no arguments (`get_special`): a briefly SFT'd model makes it right,
# so its rollouts meet the cache's exact tier whatever else they get wrong. (Calls that copy a word
# from the request are beyond such a model: see "What GRPO does at CPU scale" in docs/demo.md.)
KINDS = ("shop.buy_special", "shop.buy_all_special")
# Half the SFT trajectories answer with a plan instead of calling tools (noisy teacher data), so
# the SFT model acts only some of the time: GRPO has something to learn within a few dozen steps.
PLAN_ONLY_FRACTION = 0.5
SFT_STEPS = 300
SEQ_LEN = 512  # a buy_all_special trajectory is ~415 tokens: shorter rows would cut its answer off


def build(root: Path) -> Path:
    """`root` with train.jsonl (noisy), reference.jsonl (all solved: what the cache records) and
    the SFT run in sft/ (its HF export in sft/hf)."""
    tasks = generate_tasks("train", 600, seed=0, kinds=list(KINDS))
    write_trajectories(root / "train.jsonl", tasks, plan_only_fraction=PLAN_ONLY_FRACTION, seed=0)
    write_trajectories(root / "reference.jsonl", tasks)
    config = sft_configs.get_config("tiny")
    config.data.train = str(root / "train.jsonl")
    config.data.seq_len = SEQ_LEN
    config.train.steps = SFT_STEPS
    config.train.checkpoint_every = SFT_STEPS
    config.train.async_checkpoints = False
    # One device: sharding a 1.1M-parameter model over the suite's 8 simulated devices only
    # slows it down (about 1.7x here).
    sft.train(config, root / "sft", progress=False, devices=jax.devices()[:1])
    return root
