"""The one error type users see: a single line naming the problem and the fix."""


class CliploomError(Exception):
    """A problem with the user's input or environment.

    The message is one line: what is wrong, then what to do about it. The CLI prints it
    as ``error: <message>`` and exits with code 2, without a traceback.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)
