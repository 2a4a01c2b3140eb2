"""The repository's plumbing, shared by train/ and bench/ (not part of the installed library)."""
