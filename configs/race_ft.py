"""Race axis, FT baseline: plain fine-tuning on GHC, no patch (METHOD.md §5.3).

Run: python run.py --config=configs/race_ft.py          (paper setting)
     python run.py --config=configs/race_ft.py:demo     (offline demo)
     python run.py --config=configs/race_ft.py:smoke    (seconds, for tests)
"""

from configs import common


def get_config(preset=None):
    config = common.make("race", "none", preset)
    config.phases = ("downstream", "evaluate", "report")
    return config
