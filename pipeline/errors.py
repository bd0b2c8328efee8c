"""One exception type for expected, user-facing errors.

Jobs catch `FluidError` at the top level and print its one-line message without a traceback;
anything else is a bug and keeps its traceback.
"""


class FluidError(Exception):
    """An expected error whose message says what is wrong and what to do."""
