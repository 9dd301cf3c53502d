"""Race transfer (paper Table 2, bottom): an adapter learned with CDA on the Gab Hate
Corpus, frozen while fine-tuning on the Large Hate Corpus; FPRD in-domain and on IPTTS.

Run: python run.py --config=configs/race_transfer.py          (paper setting)
     python run.py --config=configs/race_transfer.py:demo     (offline demo)
     python run.py --config=configs/race_transfer.py:smoke    (seconds, for tests)
Another patch method: learn it with configs/race_<method>.py, then transfer its patch:
     --config.phases='("downstream",)' --config.downstream.patches='("runs/race_lora/patch",)'
"""

from configs import common


def get_config(preset=None):
    config = common.make("race", "seq_bn", preset)
    config.downstream.task = "lhc"
    if not common.is_small(preset):
        config.downstream.train_file = "data/lhc/train.jsonl"
        config.downstream.validation_file = "data/lhc/validation.jsonl"
        config.downstream.test_file = "data/lhc/test.jsonl"
        config.downstream.extra_evals = ("iptts=data/iptts77k/test.csv",)
    # this config is itself the transfer run (its downstream task is the target)
    config.phases = tuple(p for p in config.phases if p != "transfer")
    return config
