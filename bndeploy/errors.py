"""Errors that bndeploy reports to a user, and the exit codes of every bndeploy command (defined here only).

The CLI turns each error into one line and EXIT_ERROR.
"""

EXIT_OK = 0        # success: every check passed
EXIT_MISMATCH = 1  # a numerical mismatch: an artifact does not match its references
EXIT_ERROR = 2     # an error: bad input, a missing device or dependency, a corrupt artifact, a mode not written


def exit_code_for_signal(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + int(signum)


class BndeployError(Exception):
    """A problem with the user's input, files or machine, described in words a user can act on."""


class ArtifactError(BndeployError):
    """An artifact or export directory is missing, corrupt, tampered with or incompatible."""


class UnsupportedModelError(BndeployError):
    """The model uses something bndeploy cannot export or compile faithfully."""
