"""The one error type fedprune raises for bad user input.

Library parameters that users set from the command line carry the same name
as the driver flag, so a driver prints `--name=value: expected ...` on one line
without knowing which module raised.
"""


class InvalidArgument(ValueError):
    """A user-facing argument has a value outside what is accepted.

    Attributes:
      name: the parameter name, equal to the driver flag without `--`.
      value: the offending value.
      accepted: a short phrase saying what is accepted.
    """

    def __init__(self, name: str, value, accepted: str):
        self.name = name
        self.value = value
        self.accepted = accepted
        super().__init__(f"--{name}={value!r}: expected {accepted}")


def check(condition: bool, name: str, value, accepted: str) -> None:
    """Raises `InvalidArgument(name, value, accepted)` unless `condition` holds."""
    if not condition:
        raise InvalidArgument(name, value, accepted)
