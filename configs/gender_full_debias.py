"""Gender axis, Full-Debias baseline: dense CDA masked-LM training of the whole encoder
(LayerNorms and an untied decoder frozen, L1 0.1 towards the pre-trained weights; the
reference's SFT dense phase, METHOD.md §3.7), then full fine-tuning on BiasBios from it.

Run: python run.py --config=configs/gender_full_debias.py          (paper setting)
     python run.py --config=configs/gender_full_debias.py:demo     (offline demo)
     python run.py --config=configs/gender_full_debias.py:smoke    (seconds, for tests)
"""

from configs import common


def get_config(preset=None):
    config = common.make("gender", "none", preset)
    config.upstream.dense = True
    config.upstream.l1 = 0.1
    config.upstream.train_mlm_head = True
    return config
