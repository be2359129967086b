"""``detrkit train --precision auto`` under torchrun, with a fake step timer on each rank
(tests/test_distributed.py): rank 0 times a bf16 step at half an fp32 one, rank 1 at twice. Alone
they would decide differently; together (averaged: fp32 1.0 s, bf16 1.25 s) they take fp32."""
import os
import sys

import detrkit.precision as precision
from detrkit.cli import main
from test_precision import FakeClock  # this script's folder, tests/, is on sys.path

SECONDS = {0: (1.0, 0.5), 1: (1.0, 2.0)}  # rank -> the (fp32, bf16) seconds of every step
precision.clock = FakeClock(*SECONDS[int(os.environ["RANK"])])
sys.exit(main(sys.argv[1:]))
