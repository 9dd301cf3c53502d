"""Race axis, flat prefix tuning: what the reference code ran for the paper's "Prompt" rows.

Run: python run.py --config=configs/race_prefix.py          (paper setting)
     python run.py --config=configs/race_prefix.py:demo     (offline demo)
     python run.py --config=configs/race_prefix.py:smoke    (seconds, for tests)
"""

from configs import common


def get_config(preset=None):
    return common.make("race", "prefix_tuning", preset)
