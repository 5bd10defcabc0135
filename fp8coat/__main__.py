"""``python -m fp8coat``: the command line of the training application (:mod:`fp8coat.train.cli`)."""

from .train.cli import main

raise SystemExit(main())
