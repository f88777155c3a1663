"""One exception hierarchy. The library raises; only the CLI prints and exits.

Every message names the offending value and, where there is one, the fix.
"""


class AutocompressError(Exception):
    """Base class of every error autocompress raises on purpose."""

    exit_code = 1


class UserInputError(AutocompressError):
    """Bad input from the user: exit code 2 and a one-line message."""

    exit_code = 2


class SpecError(UserInputError):
    """A model or data spec that cannot be parsed or resolved."""


class UnknownNameError(UserInputError):
    """A name missing from a registry; the message lists the valid names."""


class UntraceableModelError(UserInputError):
    """torch.fx could not trace the model."""


class PolicyError(UserInputError):
    """A policy that does not fit the model's search space, or a corrupt policy file."""


class BudgetError(UserInputError):
    """A budget string that cannot be parsed."""


class InfeasibleBudgetError(UserInputError):
    """No point of the search space can meet the budget."""


class DataError(UserInputError):
    """A data source that cannot be loaded or does not fit the model."""


class WeightsError(UserInputError):
    """A weights file that cannot be read or does not match the model."""


class EnvironmentProblem(AutocompressError):
    """The machine, not the input: permissions, a read-only or missing folder, a missing optional
    driver, storage that cannot be opened. Exit code 3."""

    exit_code = 3


class TrialFailed(AutocompressError):
    """A candidate failed to build, train or export; the search records it and goes on."""
