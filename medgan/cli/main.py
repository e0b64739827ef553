"""``medgan`` (or ``python -m medgan``): the seed project's front door and the evaluate / synthesize /
export / report tools.

```
medgan --mode {train,test,both} --data_path DIR [seed flags, --config X.yaml, --section.key value]
medgan evaluate   --checkpoint C (--data_path SHARDS [--split test] | --subjects DIR) --out DIR
medgan synthesize --checkpoint C --input t1=a.nii.gz --input t2=b.nii.gz --target flair --out y.nii
medgan export     --checkpoint CKPT_DIR --out G.safetensors
medgan report     --eval DIR --out report.html
```
Problems a user can fix (a missing file, a bad NIfTI, a wrong flag or value) print one line on stderr and
exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

from data_prep.errors import EXIT_INPUT_ERROR, exit_status
from medgan.cli import evaluate, export, front_door, report, synthesize

SUBCOMMANDS = {"evaluate": evaluate, "synthesize": synthesize, "export": export, "report": report}
MODULE_PROG = "python -m medgan"


def build_parser(prog: str = MODULE_PROG) -> argparse.ArgumentParser:
    """The subcommands' parser; each subcommand's module adds its own arguments."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        module.add_parser(commands)
    parser.set_defaults(prog=prog)
    return parser


def main(argv: list[str] | None = None, prog: str = MODULE_PROG) -> int:
    """Dispatch to a subcommand, or to the seed's ``--mode`` front door; a UserError becomes one line."""
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in SUBCOMMANDS else "--mode"
    if command != "--mode":
        args = build_parser(prog).parse_args(argv)
        return exit_status(f"medgan {command}", lambda: args.run(args, argv))
    if any(token == "--mode" or token.startswith("--mode=") for token in argv):
        return exit_status("medgan mode", lambda: front_door.run(argv, prog))
    if argv and argv[0] in ("-h", "--help"):
        build_parser(prog).print_help()
        print(f"\nor the seed's front door: {prog} --mode {{train,test,both}} --data_path DIR ...")
        return 0
    print(
        f"{prog}: error: give a command ({', '.join(SUBCOMMANDS)}) or --mode train|test|both", file=sys.stderr
    )
    return EXIT_INPUT_ERROR


def entry() -> int:
    """The installed ``medgan`` console command."""
    return main(prog="medgan")
