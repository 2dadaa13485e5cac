"""`python -m ips ...`: the `ips` command (the same as `python -m ips.cli`)."""

from ips.cli.main import main

raise SystemExit(main())
