"""``python -m prx``: the ``prx`` command without its console script (e.g. ``torchrun -m prx train ...``)."""

from prx.cli import main

raise SystemExit(main())
