"""Placeholder until implemented: install()/uninstall() are no-ops."""


def install() -> None:
    pass


def uninstall() -> None:
    pass
