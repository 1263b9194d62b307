"""The one exception type eesim raises for bad input.

The CLI turns it into a single line on stderr and exit status 2; library users catch it as a ValueError.
"""


class EesimError(ValueError):
    """Bad input: the message names what is wrong and where."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise EesimError(message)
