"""``lightning-pref`` for multi-process CLI tests: Lightning's launchers re-execute this script for every rank.

It skips compiling DeepSpeed's shared-memory CPU communication op (half a minute on a fresh machine), which
only speeds up all-reduce between CPU processes.
"""

import deepspeed.ops

from lightning_pref.cli import main

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

if __name__ == "__main__":
    main()
