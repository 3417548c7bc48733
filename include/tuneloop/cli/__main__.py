"""``python -m tuneloop.cli``: how the runner starts an ML step in the ML environment."""

from tuneloop.cli import main

raise SystemExit(main())
