"""The one exception type for errors a user can cause and fix."""


class EdgeconvError(Exception):
    """A user-fixable problem: bad path, bad image, wrong shape, missing GPU.

    The message is one line saying what is wrong and how to fix it; command-line
    front ends print it without a traceback and exit non-zero.
    """


class BackendUnavailable(EdgeconvError):
    """A backend (CUDA, TensorRT, ...) cannot be used on this machine."""


class ImageTooLarge(EdgeconvError):
    """An image whose header declares more pixels than the decoder's cap (HTTP 413)."""


class UnsupportedImage(EdgeconvError):
    """An image in a format the decoder does not accept (only JPEG, PNG, WebP, BMP)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), at most 200 characters,
    for one-line errors that quote a library's own complaint."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]
