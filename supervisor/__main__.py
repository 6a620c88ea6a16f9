"""``python -m supervisor ARGS`` behaves exactly like ``hostvisor ARGS``."""

from supervisor.cli import main

if __name__ == "__main__":
    main()
