"""``python -m kvcore`` is the ``kvcore`` command."""

from ._cli import main

raise SystemExit(main())
