"""What every entry point agrees on about failures: the exit codes, and the base of the errors a user can fix.

Imports nothing, so a script that needs neither Paddle nor the training stack (make_demo_data.py) exits with the
same codes as the training scripts.
"""

EXIT_TRAINING_FAILED = 1  # training diverged or a process failed
EXIT_BAD_INPUT = 2  # input the user can fix; nothing was written


class BadInputError(ValueError):
    """Input the user can fix (a flag, a config key, a file): the entry point prints the message, which names the
    flag, key or file, and exits with EXIT_BAD_INPUT, having written nothing. Every such error derives from it."""
