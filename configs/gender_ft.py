"""Gender axis, FT baseline: plain fine-tuning on BiasBios, no patch (METHOD.md §5.3).

Run: python run.py --config=configs/gender_ft.py          (paper setting)
     python run.py --config=configs/gender_ft.py:demo     (offline demo)
     python run.py --config=configs/gender_ft.py:smoke    (seconds, for tests)
"""

from configs import common


def get_config(preset=None):
    config = common.make("gender", "none", preset)
    config.phases = ("downstream", "evaluate", "report")
    return config
