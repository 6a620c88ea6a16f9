"""``python -m supervisor ARGS`` behaves exactly like ``hostvisor ARGS``."""

from supervisor.cli_status import main  # the console script's entry point

if __name__ == "__main__":
    main()
