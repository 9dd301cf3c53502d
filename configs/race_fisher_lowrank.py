"""Race axis, Fisher group-importance neutralization with a Fisher-weighted low-rank
head (after Zhang & Zhou 2024; RECONSTRUCTED, MASKS.md Part A: the paper's equations are not
known) on GHC (groups: whether a text names an identity term): per-example, per-group
diagonal Fisher of the pooler kernel,
balanced-mean neutralization, the row-weighted SVD at rank 64 replacing the kernel, then
fine-tuning of the factors, the pooler bias and the classifier only. Options live in
config.fisher (labels, neutralize, rank, mode, ewc_lambda).

Run: python run.py --config=configs/race_fisher_lowrank.py          (paper setting)
     python run.py --config=configs/race_fisher_lowrank.py:demo     (offline demo)
     python run.py --config=configs/race_fisher_lowrank.py:smoke    (seconds, for tests)
"""

from configs import common


def get_config(preset=None):
    config = common.make("race", "none", preset)
    config.phases = ("fisher_lowrank", "downstream", "evaluate", "report")
    config.downstream.trainable = "lowrank"
    if common.is_small(preset):  # the small models' pooler is 32 or 64 wide
        config.fisher.rank = 8
    else:
        config.downstream.learning_rate = 1e-3  # head-only training needs a larger step
    return config
