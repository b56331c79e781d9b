class VlsafeError(Exception):
    """A user-facing error: one line, names the file, tensor or row."""
