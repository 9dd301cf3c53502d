"""Race axis, seq_bn (Pfeiffer) bottleneck adapter: the paper's "Adapter" rows.

Run: python run.py --config=configs/race_adapter.py          (paper setting)
     python run.py --config=configs/race_adapter.py:demo     (offline demo)
     python run.py --config=configs/race_adapter.py:smoke    (seconds, for tests)
"""

from configs import common


def get_config(preset=None):
    return common.make("race", "seq_bn", preset)
