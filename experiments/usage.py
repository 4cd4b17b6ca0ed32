"""The drivers' --help: every flag under a topic, with its default; --only_check_args.

Every flag a driver defines belongs to exactly one topic, recorded where the
flag is defined: the experiment flags in `common._SPECS`, a driver's own
flags with `set_topic` next to their `DEFINE_*`. `--help` (also `-h`,
`--helpshort`) prints the driver's docstring and its flags grouped by topic,
each with its accepted values and default; `--helpfull` prints absl's own
listing. Both exit 0 while the flags are parsed, before anything is
validated or imported. `flags_without_topic` is what the tests check, so a
flag defined without a topic fails them.

absl's `app` and `logging` modules are not imported before the flags are
parsed, so their flags (--verbosity, --logtostderr, --log_dir,
--run_with_pdb, --pdb, --run_with_profiling, --profile_file, --helpxml, ...),
which these drivers do not honour, are unknown on the command line (exit 2,
one line). TensorFlow imports `absl.app` later, after the checks; that is why
`--only_check_args` is defined with `allow_override`: absl's later definition
of the same name then replaces it silently instead of failing.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterable

from absl import flags

FLAGS = flags.FLAGS
WIDTH = 100

# Topics, in the order --help shows them. A driver may name others (e.g.
# "grid"); they are shown between the experiment's topics and the last three.
DATA = "data"
MODEL = "model"
TRAINING = "training and optimizers"
SCHEDULE = "schedule"
MASKING = "masking and criteria"
STRUCTURE = "structure"
PRIVACY = "privacy"
RUNTIME = "runtime"
OUTPUTS = "outputs"
COMMAND_LINE = "help, checks and flagfiles"
_FIRST_TOPICS = (DATA, MODEL, TRAINING, SCHEDULE, MASKING, STRUCTURE, PRIVACY)
_LAST_TOPICS = (RUNTIME, OUTPUTS, COMMAND_LINE)

_TOPIC_OF: dict[str, str] = {}  # flag name -> topic, in the order flags were given one
_NOT_ACCEPTED: dict[str, tuple[str, str | None]] = {}  # name -> (why refused, shown as)


def set_topic(topic: str, *names_or_holders) -> None:
    """Files flags (names or `FlagHolder`s) under `topic` in --help."""
    for flag in names_or_holders:
        _TOPIC_OF[flag if isinstance(flag, str) else flag.name] = topic


def not_accepted(names: Iterable[str], reason: str, shown_as: str | None = None) -> None:
    """Leaves defined flags out of --help: the driver refuses them for `reason`.

    --help lists them with the reason, or says `shown_as` instead of the list.
    """
    for name in names:
        _NOT_ACCEPTED[name] = (reason, shown_as)


# absl's own --flagfile (a special flag, outside `FLAGS`), as --help shows it. Its
# --undefok is only in --helpfull.
_FLAGFILE = flags.Flag(flags.ArgumentParser(), flags.ArgumentSerializer(), "flagfile", "",
                       "Read flags from this file, one --name=value a line (# starts a "
                       "comment), as if given here; may be repeated. A run's flags.txt is one.")
set_topic(COMMAND_LINE, _FLAGFILE.name)


def _defined(flag_values: flags.FlagValues) -> dict[str, flags.Flag]:
    """Every flag by its long name (`FlagValues` also lists short names)."""
    return {flag_values[name].name: flag_values[name] for name in flag_values}


def flags_without_topic(flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """Names of defined flags that no `set_topic` filed; empty when --help shows all."""
    return sorted(set(_defined(flag_values)) - set(_TOPIC_OF))


def _default_text(flag: flags.Flag) -> str:
    default = flag.default
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, list):
        return ",".join(map(str, default)) or "empty"
    return str(default) if default != "" else "empty"


def _flag_text(flag: flags.Flag) -> str:
    """`  --name=<values>  (default: x)` and the wrapped help below it."""
    short = f"-{flag.short_name}, " if flag.short_name else ""
    help_ = flag.help
    if flag.boolean:
        head = f"--[no]{flag.name}"
    elif isinstance(flag.parser, flags.EnumParser):
        choices = "|".join(flag.parser.enum_values)
        head = f"--{flag.name}={choices}"
        help_ = help_.removeprefix(f"<{choices}>: ")  # absl's copy of the choices
    elif isinstance(flag.parser, flags.ListParser):
        head = f"--{flag.name}=<a,b,...>"
    else:
        head = f"--{flag.name}=<{flag.flag_type()}>"
    body = textwrap.fill(help_, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return f"  {short}{head}  (default: {_default_text(flag)})\n{body}"


def grouped_help(doc: str, flag_values: flags.FlagValues = FLAGS) -> str:
    """`doc`, then every accepted flag under its topic, then the refused ones."""
    by_topic: dict[str, list[flags.Flag]] = {}
    defined = {**_defined(flag_values), _FLAGFILE.name: _FLAGFILE}
    for name in [*_TOPIC_OF, *flags_without_topic(flag_values)]:
        if name in defined and name not in _NOT_ACCEPTED:
            by_topic.setdefault(_TOPIC_OF.get(name, "without a topic (a bug)"), []).append(
                defined[name])
    middle = [t for t in by_topic if t not in _FIRST_TOPICS + _LAST_TOPICS]
    parts = [doc.strip(), "", "Flags by topic (--helpfull: absl's listing of the same flags):"]
    for topic in [*_FIRST_TOPICS, *middle, *_LAST_TOPICS]:
        if topic in by_topic:
            parts += ["", f"{topic}:", *(_flag_text(f) for f in by_topic[topic])]
    refused: dict[tuple[str, str | None], list[str]] = {}
    for name, why in _NOT_ACCEPTED.items():
        if name in defined:
            refused.setdefault(why, []).append(f"--{name}")
    if refused:
        parts += ["", "not accepted here:"]
        for (reason, shown_as), names in refused.items():
            parts.append(textwrap.fill(f"{shown_as or ', '.join(names)}: {reason}", WIDTH,
                                       initial_indent="  ", subsequent_indent="    "))
    return "\n".join(parts) + "\n"


class _HelpFlag(flags.BooleanFlag):
    """A flag that, when given, prints `render(docstring of __main__)` and exits 0."""

    def __init__(self, name: str, help_: str, render, short_name: str | None = None):
        super().__init__(name, False, help_, short_name=short_name)
        self._render = render

    def parse(self, argument):
        if self._parse(argument):
            doc = getattr(sys.modules.get("__main__"), "__doc__", None) or ""
            sys.stdout.write(self._render(doc))
            sys.stdout.flush()
            sys.exit(0)


def _full_help(doc: str) -> str:
    return f"{doc.strip()}\n\n{FLAGS.get_help()}\n"


def define_command_line_flags() -> None:
    """--help/-h, --helpshort, --helpfull and --only_check_args (idempotent)."""
    if "only_check_args" in FLAGS and "helpfull" in FLAGS:
        return
    for flag in (_HelpFlag("help", "Print the flags grouped by topic, with defaults; exit 0.",
                           grouped_help, short_name="h"),
                 _HelpFlag("helpshort", "Same as --help.", grouped_help),
                 _HelpFlag("helpfull", "Print absl's listing of every flag, by module; exit 0.",
                           _full_help)):
        flags.DEFINE_flag(flag)
    flags.DEFINE_bool(
        "only_check_args", False, "Run every check this command makes before training (each "
        "flag and the rules between them, flagfiles, the output folder, --tff_workers), "
        "without importing TensorFlow and without writing anything; exit 0 if all pass, "
        "else 2 with one line naming the flag.", allow_override=True)
    set_topic(COMMAND_LINE, "help", "helpshort", "helpfull", "only_check_args")
