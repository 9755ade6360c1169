"""The errors an export raises."""


class ExportError(RuntimeError):
    """An export could not be written or checked."""


class ExportDriftError(ExportError):
    """An exported graph's outputs differ from PyTorch's by more than the tolerance."""


class ManifestError(ValueError):
    """A manifest does not follow docs/model-package.md; the message lists every problem."""
