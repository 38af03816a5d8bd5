"""`python -m slim_rl` is the `slim-rl` command line."""

from slim_rl.cli import main

if __name__ == "__main__":
    main()
