"""The DeepSpeed entry point: ``deepspeed [--num_gpus N | --hostfile F] launch/train.py --config X.yaml ...``.

Arguments are the config tree's: ``--config``, the seed's flags and ``--section.key value`` overrides.
"""

import sys

from medgan.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
