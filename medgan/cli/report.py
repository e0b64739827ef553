"""``medgan report``: an evaluation folder to one self-contained HTML file."""

from __future__ import annotations

from medgan.cli.common import say


def add_parser(commands) -> None:
    report = commands.add_parser("report", help="evaluation folder -> one self-contained HTML file")
    report.add_argument("--eval", required=True, metavar="DIR")
    report.add_argument("--out", required=True, metavar="report.html")
    report.set_defaults(run=run)


def run(args, argv: list[str]) -> int:
    from medgan.evaluation.report import write_report

    say(f"wrote {write_report(args.eval, args.out)}")
    return 0
