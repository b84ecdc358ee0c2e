"""The one exception type for errors a user can cause and fix."""


class EdgeconvError(Exception):
    """A user-fixable problem: bad path, bad image, wrong shape, missing GPU.

    The message is one line saying what is wrong and how to fix it; command-line
    front ends print it without a traceback and exit non-zero.
    """


class BackendUnavailable(EdgeconvError):
    """A backend (CUDA, TensorRT, ...) cannot be used on this machine."""
