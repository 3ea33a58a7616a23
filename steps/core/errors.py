"""Errors a user can act on: one line that names the input and what is wrong."""


class TailwiseError(Exception):
    """A problem with the user's input or environment; the CLI prints it without a traceback."""


class StoreError(TailwiseError):
    """The artifact store cannot be used (unreachable, missing bucket, bad credentials, bad key)."""


class ObjectMissing(StoreError):
    """A stored object (a file's bytes) is not where its manifest says."""


class ArtifactNotFound(TailwiseError):
    """No artifact (no manifest) matches the reference."""


class TrackingError(TailwiseError):
    """The MLflow tracking server cannot be used."""


class ParamsError(TailwiseError):
    """A step's parameters or request are invalid."""


def one_line(text: object) -> str:
    """A library's message made safe to quote in ours: control characters (a newline in a
    hostile tensor name) escaped, so the error stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                   for c in str(text))
