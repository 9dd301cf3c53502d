"""Race axis, Lester-style prompt tuning, as the paper's A.2 describes "Prompt".

Run: python run.py --config=configs/race_prompt.py          (paper setting)
     python run.py --config=configs/race_prompt.py:demo     (offline demo)
     python run.py --config=configs/race_prompt.py:smoke    (seconds, for tests)
"""

from configs import common


def get_config(preset=None):
    return common.make("race", "prompt_tuning", preset)
