"""Errors that bndeploy reports to a user; the CLI turns each into one line and exit code 2."""


class BndeployError(Exception):
    """A problem with the user's input, files or machine, described in words a user can act on."""


class ArtifactError(BndeployError):
    """An artifact or export directory is missing, corrupt, tampered with or incompatible."""


class UnsupportedModelError(BndeployError):
    """The model uses something bndeploy cannot export or compile faithfully."""
