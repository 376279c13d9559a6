"""``python -m bame`` is the ``bame`` command."""

from bame.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
