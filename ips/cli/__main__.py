"""`python -m ips.cli ...` (torchrun uses it: `torchrun --nproc_per_node N -m ips.cli train ...`)."""

import sys

from ips.cli.main import main

sys.exit(main())
