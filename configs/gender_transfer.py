"""Gender transfer (paper Table 2, bottom): an adapter learned with CDA on the BiasBios
corpus, frozen while fine-tuning on MNLI; Bias-NLI probes scored for FN.

Run: python run.py --config=configs/gender_transfer.py          (paper setting)
     python run.py --config=configs/gender_transfer.py:demo     (offline demo)
     python run.py --config=configs/gender_transfer.py:smoke    (seconds, for tests)
Another patch method: learn it with configs/gender_<method>.py, then transfer its patch:
     --config.phases='("downstream",)' --config.downstream.patches='("runs/gender_lora/patch",)'
"""

from configs import common


def get_config(preset=None):
    config = common.make("gender", "seq_bn", preset)
    config.downstream.task = "mnli"
    if preset == "demo":  # no stereotyped MNLI is generated: the templated synthetic one
        config.downstream.train_file = "synthetic"
    if not common.is_small(preset):
        config.downstream.train_file = "data/mnli/train.jsonl"
        config.downstream.validation_file = "data/mnli/validation_matched.jsonl"
        config.downstream.test_file = ""
        config.downstream.epochs = 10  # the paper's A.4 (the reference code has no MNLI)
        config.downstream.eval_every = 5_000
        config.downstream.bias_nli_occupations = "data/bias_nli/occupations"
        config.downstream.bias_nli_gendered_words = "data/bias_nli/gendered_words"
    # this config is itself the transfer run (its downstream task is the target)
    config.phases = tuple(p for p in config.phases if p != "transfer")
    return config
