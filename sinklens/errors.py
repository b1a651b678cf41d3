"""The one exception type sinklens raises for bad input: it names the problem and the fix."""


class SinklensError(ValueError):
    """A problem with the caller's input or environment, with a one-line fix.

    The CLI prints ``str(error)`` as a single line and exits with status 2.
    """

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. Fix: {fix}")


class NoSinkError(SinklensError):
    """The model makes no attention sink of its first token, so there is no sink layer or neuron to find."""
