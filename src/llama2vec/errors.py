"""The one exception type that the command line prints as a clean error message."""


class Llama2VecError(Exception):
    """A user-facing error: bad input, missing file, refused overwrite. Printed without traceback."""
