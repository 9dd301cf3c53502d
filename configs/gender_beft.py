"""Gender axis, BEFT (MASKS.md Part B) on BiasBios: no debias patch; an all-bias (BitFit)
probe run, per-layer BEFT scores of every bias type (bias_scores.json, plots/bias_scores.png),
then fine-tuning of the top candidate type (b_q, b_k, b_v) with the pooler bias and the
classifier only. Variants: --config.beft.mode=v2_direct (b_v, no probe; drop bias_select
from config.phases), --config.beft.criterion=magnitude|fisher, or
--config.downstream.trainable=bitfit (every bias). Learning rate 4e-4 (the BEFT code's SST-2
rate for bias-only runs); the BEFT code keeps it constant, this library decays it linearly.

Run: python run.py --config=configs/gender_beft.py          (paper setting)
     python run.py --config=configs/gender_beft.py:demo     (offline demo)
     python run.py --config=configs/gender_beft.py:smoke    (seconds, for tests)
"""

from configs import common


def get_config(preset=None):
    config = common.make("gender", "none", preset)
    config.phases = ("bias_select", "downstream", "evaluate", "report")
    config.downstream.trainable = "beft"
    config.beft.mode = "v1_select"
    if not common.is_small(preset):
        config.downstream.learning_rate = 4e-4
    else:  # random-init biases start at zero, where the BEFT score is undefined
        config.beft.criterion = "magnitude"
    return config
