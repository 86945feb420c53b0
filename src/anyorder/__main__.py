"""``python -m anyorder`` runs the command-line tool."""

from anyorder.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
