"""Race axis, LoRA on query and value: the paper's "LoRa" rows.

Run: python run.py --config=configs/race_lora.py          (paper setting)
     python run.py --config=configs/race_lora.py:demo     (offline demo)
     python run.py --config=configs/race_lora.py:smoke    (seconds, for tests)
"""

from configs import common


def get_config(preset=None):
    return common.make("race", "lora", preset)
