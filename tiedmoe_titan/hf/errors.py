"""The one error class of the Hugging Face interop."""


class HFInteropError(ValueError):
    """A checkpoint, folder or model that cannot be converted; one line naming what is
    wrong and the fix. The command-line tools print it and exit with code 2."""
