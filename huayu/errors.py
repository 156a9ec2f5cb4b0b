"""Errors that mean "the user's input is wrong": the CLI prints them without a traceback."""


class HuayuError(Exception):
    """Base for every error caused by bad input (files, records, configs, model paths)."""


class DataError(HuayuError):
    """A malformed data record; the message names the file, the line or record and the reason."""

    def __init__(self, path, where, reason: str):
        self.path, self.where, self.reason = str(path), where, reason
        super().__init__(f"{path}: {where}: {reason}")
