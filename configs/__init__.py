"""ml_collections config files: `python run.py --config=configs/<axis>_<method>.py[:preset]`."""
