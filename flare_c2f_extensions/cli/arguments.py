"""What fire does not check on a command line: unknown or misspelled options, stray positional arguments, and
values holding ``#`` (which fire would read as a comment)."""

from __future__ import annotations

from collections.abc import Sequence

from flare_c2f_extensions.errors import InputError

__all__ = ["check_options", "keep_hashes"]


def _is_flag(argument: str) -> bool:
    """As fire reads the command line: ``--name``, ``-n``, ``-name`` (a negative number is a value)."""
    return argument.startswith("--") or (len(argument) > 1 and argument[0] == "-" and argument[1].isalpha())


def keep_hashes(argv: Sequence[str]) -> list[str]:
    """Values holding ``#`` (``--override solid#learning_rate=0.001``) quoted for fire, which reads a bare value as
    Python and so takes ``#`` for a comment (the value would arrive as ``solid``). Lists, mappings and values
    already quoted are left as they are: Python reads the ``#`` inside their strings as text."""
    kept = []
    for argument in argv:
        flag, equals, value = argument.partition("=") if argument.startswith("--") else ("", "", argument)
        if "#" in value and value[:1] not in "[{('\"":
            value = repr(value)
        kept.append(flag + equals + value)
    return kept


def check_options(command: str, function, argv: Sequence[str]) -> None:
    """Refuse, before anything runs, an option that ``function`` does not take (fire would try it on the result,
    after the whole run) or more positional arguments than it has parameters. ``argv``: the arguments after the
    command's name; everything after a lone ``--`` is fire's own."""
    import difflib
    import inspect

    parameters = [p for p in inspect.signature(function).parameters.values()
                  if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    names = [p.name for p in parameters]
    arguments = list(argv[: argv.index("--")] if "--" in argv else argv)
    given, positional, index = set(), [], 0
    while index < len(arguments):
        argument = arguments[index]
        if not _is_flag(argument):
            positional.append(argument)
        else:
            name, equals, _ = argument.lstrip("-").partition("=")
            name = name.replace("-", "_")
            if name in ("help", "h"):
                return  # fire shows the help
            known = name if name in names else name[2:] if name.startswith("no") and name[2:] in names else None
            if known is None:
                close = difflib.get_close_matches(name, names, n=1)
                hint = f" (did you mean --{close[0]}?)" if close else ""
                raise InputError(f"{command}: unknown option {argument.split('=')[0]}{hint}; its options: "
                                 + ", ".join(f"--{n}" for n in names))
            given.add(known)
            if not equals and index + 1 < len(arguments) and not _is_flag(arguments[index + 1]):
                index += 1  # the flag's value
        index += 1
    free = [n for n in names if n not in given]
    if len(positional) > len(free):
        raise InputError(f"{command}: unexpected argument {positional[len(free)]!r} (options start with --)")
