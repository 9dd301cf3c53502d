"""Gender axis, sparse fine-tuning (lottery-ticket SFT, METHOD.md §3.6): a dense CDA
masked-LM phase with L1 0.1 (its best model is `dense_model/`, the Full-Debias base), the 1%
encoder entries that moved most, a reset and a sparse phase on them; the patch is the sparse
diff in `patch/`, frozen entry by entry while fine-tuning on BiasBios.

Run: python run.py --config=configs/gender_sft.py          (paper setting)
     python run.py --config=configs/gender_sft.py:demo     (offline demo)
     python run.py --config=configs/gender_sft.py:smoke    (seconds, for tests)
"""

from configs import common


def get_config(preset=None):
    config = common.make("gender", "sft", preset)
    config.upstream.l1 = 0.1  # both phases, as the reference (0.1 x sum |delta| / N_all)
    return config
